"""Counting a model's decoding steps, for tests that check how much generation ran."""


def counted_steps(model, forwards: bool = False) -> list[int]:
    """A counter ([n]) of the model's decoding steps: its `extend` calls (one a step, whatever
    the batch), and with `forwards` its forward passes too (decoding without a cache)."""
    count = [0]
    if forwards:
        model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    extend = model.extend

    def counted(*args, **kwargs):
        count[0] += 1
        return extend(*args, **kwargs)

    model.extend = counted
    return count
