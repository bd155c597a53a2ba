import math

import numpy as np
import pytest
import torch

import textgen

from experts.checkpoint import CheckpointError, latest_checkpoint, load_model, save_model
from experts.flops import forward_flops_per_token, mfu
from experts.gpt import GPT, GPTConfig
from experts.hourglass import HourglassConfig, HourglassLM
from experts.tokenizer import encode_texts
from experts.trainer import TrainConfig, bits_per_byte, configure_optimizer, lr_at, train

SMALL = dict(vocab_size=259, block_size=32, group_len=8, latents=[4, 2], widths=[16, 32, 32], n_head=2,
             n_latent_layers=2)


def tokens(seed: int = 0) -> np.ndarray:
    return encode_texts([r["text"] for r in textgen.corpus(4, seed=seed)], eos_id=257)


def small_model(seed: int = 0, **over) -> HourglassLM:
    torch.manual_seed(seed)
    return HourglassLM(HourglassConfig(**{**SMALL, **over}))


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def cfg(**over) -> TrainConfig:
    base = dict(max_tokens=8 * 32 * 12, batch_size=8, warmup_steps=3, eval_every=0, log_every=1,
                precision="fp32", seed=3)
    return TrainConfig(**{**base, **over})


def test_resume_from_checkpoint_equals_uninterrupted_training(tmp_path):
    data, val = tokens(0), tokens(1)
    # dropout on: the torch RNG state must be restored too
    straight = small_model(dropout=0.1, latent_loss=0.1)
    train(straight, data, val, cfg(), ckpt_dir=tmp_path / "a")

    def crash_at_step_7(step, metrics):
        if step == 7:
            raise KeyboardInterrupt("simulated crash")

    interrupted = small_model(dropout=0.1, latent_loss=0.1)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, data, val, cfg(ckpt_every=5), ckpt_dir=tmp_path / "b", on_metrics=crash_at_step_7)
    assert latest_checkpoint(tmp_path / "b") == 5
    resumed = small_model(seed=99, dropout=0.1, latent_loss=0.1)  # fresh process: other init, same config
    result = train(resumed, data, val, cfg(ckpt_every=5), ckpt_dir=tmp_path / "b")
    assert result.resumed_from == 5 and result.steps == 12
    for key, value in state(straight).items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_checkpoints_every_n_steps_keep_only_the_newest(tmp_path):
    train(small_model(), tokens(), None, cfg(ckpt_every=2, keep_checkpoints=2), ckpt_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-00000010.json", "step-00000010.safetensors", "step-00000012.json",
                     "step-00000012.safetensors"]


def test_a_finished_run_resumes_to_no_further_steps(tmp_path):
    model = small_model()
    train(model, tokens(), None, cfg(), ckpt_dir=tmp_path)
    before = state(model)
    result = train(model, tokens(), None, cfg(), ckpt_dir=tmp_path)
    assert result.steps == 12 and result.resumed_from == 12
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_same_seed_gives_the_same_metrics():
    logs = []
    for _ in range(2):
        seen = []
        train(small_model(), tokens(), tokens(1), cfg(eval_every=6),
              on_metrics=lambda step, m, seen=seen: seen.append((step, m.get("train_loss"), m.get("val_bpb"))))
        logs.append(seen)
    assert logs[0] == logs[1]


def test_training_lowers_validation_bits_per_byte():
    model = small_model()
    val = tokens(1)
    before = bits_per_byte(model, val, 32, precision="fp32")
    result = train(model, tokens(0), val, cfg(max_tokens=8 * 32 * 150, lr=3e-3))
    assert result.val_bpb < before - 2.0  # random init is ~8 bits; generated text is very repetitive


def test_token_budget_sets_the_number_of_steps():
    seen = []
    result = train(small_model(), tokens(), None, cfg(max_tokens=8 * 32 * 2 * 7 + 5, grad_accum=2),
                   on_metrics=lambda s, m: seen.append(s))
    assert result.steps == 7 and result.tokens == 7 * 8 * 32 * 2
    assert seen == list(range(1, 8))


def test_weight_decay_applies_to_two_dimensional_weights_only():
    model = small_model()
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    c = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, 100, c) == pytest.approx(0.1)


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab():
    model = GPT(GPTConfig(vocab_size=259, block_size=16, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # logits all zero: uniform over 259 tokens
    assert bits_per_byte(model, tokens(), 16, precision="fp32") == pytest.approx(math.log2(259), rel=1e-5)


def test_bits_per_byte_ignores_special_token_targets():
    model = small_model()
    plain = encode_texts(["abcdefgh" * 20])
    with_eos = encode_texts(["abcdefgh" * 20], eos_id=257)
    # the eos at the end is a target in the second stream but is not a byte: same count of bytes scored
    a = bits_per_byte(model, plain, 32, precision="fp32")
    b = bits_per_byte(model, with_eos, 32, precision="fp32")
    assert a == pytest.approx(b, rel=1e-6)


def test_too_little_training_data_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one window"):
        train(small_model(), encode_texts(["short"]), None, cfg())


def test_exported_model_round_trips_and_a_changed_file_is_refused(tmp_path):
    model = small_model()
    save_model(tmp_path, model, {"tokenizer": "abc"})
    loaded, meta = load_model(tmp_path)
    idx = torch.randint(0, 259, (1, 20))
    assert torch.equal(loaded(idx)[0], model(idx)[0]) and meta["tokenizer"] == "abc"
    assert loaded.lm_head.weight is loaded.wte.weight  # tying survives the round trip
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(tmp_path)


def test_hourglass_costs_fewer_flops_per_token_than_a_gpt_of_similar_size():
    hg = HourglassLM(HourglassConfig(block_size=256))
    gpt = GPT(GPTConfig(block_size=256, n_layer=6, n_embd=256, n_head=4))
    assert hg.num_params() > gpt.num_params()
    assert forward_flops_per_token(hg) < forward_flops_per_token(gpt) / 2


def test_gpt_flops_match_the_nanogpt_formula():
    c = GPTConfig(block_size=64, n_layer=3, n_embd=32, n_head=2)
    model = GPT(c)
    non_embedding = model.num_params() - model.wpe.weight.numel()  # lm_head (tied) is a matmul
    attention = c.n_layer * 4 * c.n_embd * (c.block_size + 1) / 2  # causal: (T+1)/2 keys a query
    assert forward_flops_per_token(model) == pytest.approx(2 * (non_embedding - _norm_params(model)) + attention)
    assert mfu(1e6, 1000, 1e10) == pytest.approx(0.1)


def _norm_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)


def test_moie_generate_samples_text_from_an_exported_model_and_a_checkpoint(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    model = small_model()
    train(model, tokens(), None, cfg(), ckpt_dir=tmp_path / "ckpt")
    save_model(tmp_path / "export", model)
    outputs = []
    for directory in (tmp_path / "export", tmp_path / "ckpt"):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "--model", str(directory),
                               "--prompt", "Flour butter", "--max-new-tokens", "30", "--temperature", "0"],
                              cwd=repo, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("Flour butter")
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1]  # same weights, greedy: same text


def test_moie_generate_on_a_directory_without_a_model_is_a_clear_error(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "--model", str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "holds neither model.safetensors" in proc.stderr


def test_compile_without_a_cxx_compiler_falls_back_to_eager_and_trains_the_same(caplog):
    import torch._inductor.config as inductor_config

    default = inductor_config.cpp.cxx
    data = tokens()
    eager, compiled = small_model(seed=3), small_model(seed=3)
    a = train(eager, data, None, cfg(max_tokens=3 * 4 * 64, precision="fp32"))
    # torch's own patch context restores its config exactly (no test after this one sees the fake compiler)
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}), caplog.at_level("WARNING", logger="experts.trainer"):
        torch._dynamo.reset()  # nothing compiled earlier in this process may be reused
        b = train(compiled, data, None, cfg(max_tokens=3 * 4 * 64, precision="fp32", compile=True))
    torch._dynamo.reset()  # nor what failed to compile here
    assert inductor_config.cpp.cxx == default
    assert "torch.compile failed" in caplog.text
    assert b.steps == a.steps == 3 and b.train_loss == a.train_loss
    assert all(torch.equal(x, y) for x, y in zip(state(eager).values(), state(compiled).values()))


@pytest.fixture
def two_threads():
    """Races show only on more than one thread (the CI machine has 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_compiled_training_learns_what_eager_training_learns_and_is_bitwise_repeatable(caplog, two_threads):
    torch._dynamo.reset()
    data = tokens()
    eager, compiled = small_model(seed=3), small_model(seed=3)
    a = train(eager, data, None, cfg(max_tokens=4 * 8 * 32))
    metrics = []
    with caplog.at_level("WARNING", logger="experts.trainer"):
        b = train(compiled, data, None, cfg(max_tokens=4 * 8 * 32, compile=True),
                  on_metrics=lambda step, m: metrics.append((step, m)))
    assert "torch.compile failed" not in caplog.text  # it really ran compiled
    assert [(step, sorted(m)) for step, m in metrics if "compile_s" in m] == [(1, ["compile_s"])]  # its cost, once
    assert b.steps == a.steps == 4
    assert b.train_loss == pytest.approx(a.train_loss, rel=1e-4)  # fused kernels round differently
    for (name, x), y in zip(state(eager).items(), state(compiled).values()):
        assert torch.allclose(x, y, atol=1e-4), name
    # compiled again (from the inductor cache the first compile filled), on 2 threads: the same
    # config gives the same model bit for bit (without deterministic algorithms 67 of 117 tensors differed)
    torch._dynamo.reset()
    again = small_model(seed=3)
    c = train(again, data, None, cfg(max_tokens=4 * 8 * 32, compile=True))
    torch._dynamo.reset()
    assert c.train_loss == b.train_loss
    assert all(torch.equal(x, y) for x, y in zip(state(compiled).values(), state(again).values()))


def test_compile_auto_compiles_long_schedules_only_and_decides_by_the_whole_schedule():
    from experts.trainer import COMPILE_MIN_STEPS

    step_tokens = 4 * 64
    long = TrainConfig(max_tokens=COMPILE_MIN_STEPS * step_tokens, batch_size=4)
    short = TrainConfig(max_tokens=(COMPILE_MIN_STEPS - 1) * step_tokens, batch_size=4)
    assert long.compile == "auto" and long.compiles(64) and not short.compiles(64)
    assert TrainConfig(max_tokens=step_tokens, batch_size=4, compile=True).compiles(64)
    assert not TrainConfig(max_tokens=10 ** 9, batch_size=4, compile=False).compiles(64)


def test_an_eager_schedule_emits_no_compile_time():
    metrics = []
    train(small_model(seed=3), tokens(), None, cfg(max_tokens=2 * 8 * 32), on_metrics=lambda s, m: metrics.append(m))
    assert metrics and not any("compile_s" in m for m in metrics)

