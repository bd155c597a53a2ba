"""Served generation batched across rows and requests, and streamed: a row generated in a batch
gets what it gets alone, a stream yields what predict returns, and a row nobody waits for stops.
The models are small and every weight random (randomise_), so a row that read another row's
cache, logits or random draws would change."""
from __future__ import annotations

import concurrent.futures
import random
import threading
import time
from concurrent.futures import Future

import pandas as pd
import pytest
import torch

import textgen
from randomise import randomise_
from steps import counted_steps

from composition.model import ComposedLM
from experts.gpt import GPT, GPTConfig
from experts.hourglass import HourglassConfig, HourglassLM
from pipeline.serve.sampling import Cancelled, DeadlineExceeded, Generation, Limits, Row, sample, sample_together
from pipeline.serve.serving import MoieModel, Scheduler
from routing.ensemble import prefix_router
from routing.router import ClusterRouter

BLOCK = 48


def gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32))


def hourglass(seed: int) -> HourglassLM:
    torch.manual_seed(seed)
    return HourglassLM(HourglassConfig(block_size=BLOCK, group_len=8, latents=[4, 2], widths=[16, 24, 32], n_head=2,
                                       n_latent_layers=2))


def composition() -> ComposedLM:
    """Router routing by a cBTM router fitted on generated text, cross-attention and aligned glue, mixed output."""
    router = ClusterRouter.fit([r["text"] for r in textgen.corpus(20, seed=0)], 3, svd_dim=8, min_df=1, seed=0)
    model = ComposedLM(hourglass(0), [hourglass(1), gpt(2), hourglass(3)], n_points=2, routing="router", k=2,
                       glue="both", output="mix", pool="token", prefix_router=prefix_router(router, [0, 1, 2]))
    return model


MODELS = {"gpt": lambda: gpt(0), "hourglass": lambda: hourglass(0), "composition": composition}

# prompts of one length in bytes (so one batch), the settings of each row differing
PROMPTS = ["The ship", "Stir the", "Interest", "bread an"]
SETTINGS = [dict(max_new_tokens=20, temperature=0.0, top_k=50, seed=0),
            dict(max_new_tokens=7, temperature=0.8, top_k=50, seed=1),
            dict(max_new_tokens=60, temperature=1.0, top_k=5, seed=2),  # past the block: the window jumps
            dict(max_new_tokens=20, temperature=0.8, top_k=50, seed=3)]


def built(name: str):
    return randomise_(MODELS[name](), seed=7).eval()


@pytest.mark.parametrize("name", MODELS)
def test_rows_generated_together_get_what_each_gets_alone(name):
    model = built(name)
    alone = [sample(model, p, **s) for p, s in zip(PROMPTS, SETTINGS)]
    steps = counted_steps(model)
    together = sample_together(model, [Row(p, **s) for p, s in zip(PROMPTS, SETTINGS)])
    assert [(r.text, r.ids, r.experts) for r in together] == [(r.text, r.ids, r.experts) for r in alone]
    assert steps[0] == max(s["max_new_tokens"] for s in SETTINGS)  # one forward a step for all the rows
    assert len({r.text for r in alone}) == len(alone)  # the rows differ: a row given another's draws would show


def test_a_row_past_its_deadline_stops_while_the_others_of_its_batch_go_on():
    model = built("gpt")
    late = Row(PROMPTS[0], **SETTINGS[0], deadline=time.monotonic() - 1)
    on_time = Row(PROMPTS[1], **SETTINGS[2])
    stopped, finished = sample_together(model, [late, on_time])
    assert isinstance(stopped, DeadlineExceeded)
    assert finished.text == sample(model, PROMPTS[1], **SETTINGS[2]).text


def served(name: str, **limits) -> MoieModel:
    return MoieModel(built(name), Limits(**limits))


def test_concurrent_requests_are_batched_and_answer_what_they_answer_one_by_one():
    rows = [dict(prompt=p, **s) for p, s in zip(PROMPTS, SETTINGS)]
    alone = served("composition", batch_rows=1)
    expected = [alone.predict(pd.DataFrame([row])) for row in rows]
    # a batch starts when full (4 rows) or after the window: a window this long means full here
    batched = served("composition", batch_rows=len(rows), batch_wait_s=600)
    steps = counted_steps(batched.model)
    with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:
        answers = list(pool.map(lambda row: batched.predict(pd.DataFrame([row])), rows, timeout=300))
    for got, want in zip(answers, expected):
        pd.testing.assert_frame_equal(got, want)
    assert steps[0] == max(s["max_new_tokens"] for s in SETTINGS)  # the four requests ran as one batch


def test_rows_of_other_lengths_run_in_batches_of_their_own():
    model = served("gpt", batch_rows=2, batch_wait_s=600)
    steps = counted_steps(model.model)
    frame = pd.DataFrame({"prompt": ["A", "Bb", "Ccc", "Dddd"], "max_new_tokens": [5, 5, 5, 5]})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # four batches of one row, each waiting ...
        answer = pool.submit(model.predict, frame)
        extra = [model.scheduler.submit(Row(p, 5, 0.0, 50, 0)) for p in ["E", "Ff", "Ggg", "Hhhh"]]  # ... for its second
        got = answer.result(timeout=300)
    texts = [f.result(timeout=300).text for f in extra]
    assert steps[0] == 4 * 5  # four batches (one a length) of two rows each, five steps each
    assert texts == [sample(model.model, p, 5, 0.0, 50, 0).text for p in ["E", "Ff", "Ggg", "Hhhh"]]
    assert list(got["text"]) == [sample(model.model, p, 5, 0.8, 50, 0).text for p in ["A", "Bb", "Ccc", "Dddd"]]


@pytest.mark.parametrize("name", ["hourglass", "composition"])
def test_rows_whose_prompts_differ_a_little_in_length_catch_up_merge_and_answer_as_alone(name):
    model = built(name)
    prompts = ["The ship", "The ship s", "The ship sai"]  # 8, 10 and 12 bytes
    settings = [dict(max_new_tokens=20, temperature=t, top_k=50, seed=i) for i, t in enumerate([0.0, 0.8, 1.0])]
    alone = [sample(model, p, **s) for p, s in zip(prompts, settings)]
    steps = counted_steps(model)
    scheduler = Scheduler(model, size=4, wait_s=0.005)  # its thread never starts: the test runs its rounds
    futures = []
    running = []
    for p, s in zip(prompts, settings):
        row = Row(p, **s)
        futures.append(Future())
        row.finish = futures[-1].set_result
        running.append(Generation(model, [row]))
    waited: dict = {}
    batches = []
    while running:
        running = scheduler.round(running, waited)
        batches.append(len(running))
    assert [f.result(timeout=0).text for f in futures] == [a.text for a in alone]
    # the 8-byte row alone for 2 steps, with the 10-byte one for 2, then all three in one batch for 20
    assert steps[0] == 2 + 2 + 20
    assert batches[:5] == [3, 3, 2, 2, 1]  # batches after each round: merged at 10 bytes, then at 12


def test_concurrent_requests_of_other_prompt_lengths_answer_what_they_answer_one_by_one():
    rows = [dict(prompt=p, max_new_tokens=30, temperature=0.8, seed=i)
            for i, p in enumerate(["The", "The s", "The shi", "The ship s"])]
    model = served("composition")
    expected = [served("composition", batch_rows=1).predict(pd.DataFrame([row])) for row in rows]
    with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:
        answers = list(pool.map(lambda row: model.predict(pd.DataFrame([row])), rows))
    for got, want in zip(answers, expected):
        pd.testing.assert_frame_equal(got, want)


@pytest.mark.parametrize("name", ["hourglass", "composition"])
def test_a_stream_yields_the_bytes_and_experts_predict_returns(name):
    model = served(name)
    row = {"prompt": "The ship", "max_new_tokens": 120, "temperature": 1.0, "seed": 4}
    want = model.predict(pd.DataFrame([row]))
    events = list(model.predict_stream(pd.DataFrame([row])))
    assert "".join(e["text"] for e in events) == want["text"][0]
    assert "\ufffd" in want["text"][0]  # random weights draw broken UTF-8: decoded as predict decodes it
    if name == "composition":
        assert [e["expert"] for e in events if "expert" in e] == list(want["experts"][0])


def test_closing_a_stream_stops_its_generation_at_the_next_step():
    model = served("gpt")
    steps = counted_steps(model.model)
    permits = threading.Semaphore(0)  # a step runs only with a permit: the test sets the pace
    counted = model.model.extend

    def paced(*args, **kwargs):
        permits.acquire()
        logits = counted(*args, **kwargs)
        logits[..., 256:] = -float("inf")  # bytes only (no special token): each step streams one event
        return logits

    model.model.extend = paced
    stream = model.predict_stream(pd.DataFrame([{"prompt": "The ship", "max_new_tokens": 1000}]))
    permits.release(3)
    assert len([next(stream) for _ in range(3)]) == 3  # three steps, three bytes
    stream.close()
    permits.release(100)  # enough for any step begun before the close, and for 96 more if it went on
    for _ in range(2):  # jobs run between rounds of steps: two rounds on, the cancelled row has stopped
        model.scheduler.run(lambda: None).result(timeout=300)
    assert 3 <= steps[0] <= 4  # the three read, and at most the one begun before the close


def test_a_row_whose_listener_fails_stops_alone_and_its_batch_goes_on():
    model = built("gpt")

    def broken(token, expert):
        raise RuntimeError("the listener is gone")

    failing = Row(PROMPTS[0], **SETTINGS[0], emit=broken)
    other = Row(PROMPTS[1], **SETTINGS[2])
    stopped, finished = sample_together(model, [failing, other])
    assert isinstance(stopped, RuntimeError)
    assert finished.text == sample(model, PROMPTS[1], **SETTINGS[2]).text


def test_a_stream_past_its_deadline_ends_with_a_504_naming_it():
    from mlflow.exceptions import MlflowException

    model = served("gpt", timeout_s=0.05)
    stream = model.predict_stream(pd.DataFrame([{"prompt": "The ship", "max_new_tokens": 1024}]))
    with pytest.raises(MlflowException, match="ran past the serving deadline of 0.05 s") as err:
        for _ in stream:  # 1,024 steps take far longer than 0.05 s
            pass
    assert err.value.get_http_status_code() == 504


def test_a_cancelled_row_is_reported_cancelled():
    row = Row("The ship", 1000, 0.0, 50, 0, cancelled=lambda: True)
    [result] = sample_together(built("gpt"), [row])
    assert isinstance(result, Cancelled)


def test_a_stream_refuses_a_request_of_several_rows_naming_the_fix():
    model = served("gpt")
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="a stream generates one row, got 2; send each row as a request"):
        next(model.predict_stream(pd.DataFrame({"prompt": ["a", "b"]})))


def test_a_prompt_of_random_text_streams_as_it_predicts():
    model = served("hourglass")
    prompt = textgen.document(random.Random(5), "cooking")[:40] + " café"
    row = {"prompt": prompt, "max_new_tokens": 30, "seed": 9}
    assert "".join(e["text"] for e in model.predict_stream(pd.DataFrame([row]))) == \
        model.predict(pd.DataFrame([row]))["text"][0]
