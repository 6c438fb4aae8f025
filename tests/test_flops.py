"""Model FLOPs against XLA's own count, the peak table, and the tokens/s and MFU the training loop reports."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptjax
from gptjax import GPTConfig
from gptjax.data import DataLoader, GPTDataset
from gptjax.flops import PEAK_TFLOPS, Throughput, device_peak_flops, flops_per_token, peak_tflops
from gptjax.training import TrainConfig, TrainHooks, init_opt_state, make_optimizer, make_train_step, train_model_simple

# A long context next to a narrow model: attention's FLOPs are a third of the total, so a wrong
# attention term shows as clearly as a wrong parameter count.
CFG = GPTConfig(vocab_size=64, context_length=128, emb_dim=32, n_layers=2, n_heads=2, drop_rate=0.0)


def xla_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def test_flops_per_token_agrees_with_xlas_count_of_the_train_step():
    params = gptjax.init_params(CFG, seed=0)
    tokens = jnp.zeros((2, CFG.context_length), jnp.int32)
    ours = flops_per_token(CFG) * tokens.size
    forward = xla_flops(jax.jit(lambda p, x: gptjax.apply(p, CFG, x)).lower(params, tokens).compile())
    # A third of the count is the forward pass; XLA adds the elementwise work (GELU, softmax, LayerNorm).
    assert 1.0 <= forward / (ours / 3) < 1.1
    optimizer = make_optimizer(TrainConfig(), 10)
    step = make_train_step(CFG, optimizer).lower(params, init_opt_state(optimizer, params), (tokens, tokens),
                                                 jax.random.key(0))
    assert 1.0 <= xla_flops(step.compile()) / ours < 1.12  # and AdamW's update on top


def test_flops_per_token_counts_the_head_but_not_the_embedding_lookups():
    cfg = gptjax.GPT_CONFIG_124M
    bigger_vocab = flops_per_token(cfg.replace(vocab_size=cfg.vocab_size + 1000)) - flops_per_token(cfg)
    assert bigger_vocab == 6 * 1000 * cfg.emb_dim  # out_head grows by 1000 columns; tok_emb is not counted
    longer = flops_per_token(cfg.replace(context_length=512)) - flops_per_token(cfg)
    assert longer == 12 * cfg.n_layers * cfg.emb_dim * 256  # pos_emb grows too, but is a lookup
    assert flops_per_token(cfg, seq_len=128) < flops_per_token(cfg)


def test_peak_table_is_complete_and_plausible():
    for kind, peaks in PEAK_TFLOPS.items():
        assert set(peaks) == {"bfloat16", "float32"}, kind
        assert 0 < peaks["float32"] <= peaks["bfloat16"] < 5000, kind
        if kind.startswith("TPU"):  # float32 matmuls at default precision are one bf16 pass on the MXU
            assert peaks["float32"] == peaks["bfloat16"], kind
        else:  # TF32 tensor cores run at half the bf16 rate on these NVIDIA parts
            assert peaks["float32"] == pytest.approx(peaks["bfloat16"] / 2, rel=0.01), kind
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == PEAK_TFLOPS["NVIDIA H100 80GB HBM3"]["bfloat16"]
    assert peak_tflops("TPU v5 lite", "float32") == PEAK_TFLOPS["TPU v5 lite"]["float32"]
    assert peak_tflops("cpu") is None and peak_tflops("NVIDIA H100 80GB HBM3", "float16") is None


def test_device_peak_is_per_device_times_devices():
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    v5e = types.SimpleNamespace(device_kind="TPU v5 lite")
    assert device_peak_flops([h100] * 8, "bfloat16") == pytest.approx(8 * 989.4e12)
    assert device_peak_flops([h100, v5e], "bfloat16") is None  # mixed kinds: no single datasheet figure
    assert device_peak_flops(jax.devices(), "float32") is None  # this CPU
    assert device_peak_flops(jax.devices(), "float32", 2.5) == 2.5e12 * len(jax.devices())


def test_throughput_of_a_step_and_of_the_run():
    speed = Throughput(flops_per_token=1e6, peak_flops=1e9)
    assert speed.step(100, 0.5) == {"tokens_per_sec": 200.0, "mfu": pytest.approx(0.2)}
    assert speed.step(300, 0.5)["tokens_per_sec"] == 600.0
    assert speed.average() == {"tokens_per_sec": 400.0, "mfu": pytest.approx(0.4)}
    assert Throughput(1e6).step(100, 0.5)["mfu"] is None
    assert Throughput(1e6).average()["tokens_per_sec"] is None  # no step yet


# --- the loop ---------------------------------------------------------------------------------------


class Recorder(TrainHooks):
    def __init__(self):
        self.steps = []

    def on_step(self, record):
        self.steps.append(record)


class Clock:
    """A fake ``perf_counter`` that moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def tiny_loaders():
    ids = np.tile(np.arange(64, dtype=np.int32), 40)
    train = DataLoader(GPTDataset(ids[:2048], 32, 32), 2, shuffle=False, drop_last=True)
    val = DataLoader(GPTDataset(ids[2048:], 32, 32), 2, shuffle=False, drop_last=False)
    return train, val


def test_loop_times_steps_by_their_reads_and_leaves_evaluations_out(monkeypatch):
    """Each read of a step's metrics takes 1 s and each evaluation 100 s on a fake clock: every step
    must come out at exactly 1 s, evaluations (and the compile before the first step) excluded."""
    import gptjax.training as training

    cfg = CFG.replace(context_length=32)
    clock = Clock()
    monkeypatch.setattr(training, "perf_counter", clock)
    real_get = jax.device_get

    def slow_get(tree):
        clock.now += 1.0
        return real_get(tree)

    def slow_evaluation(*args):
        clock.now += 100.0
        return 1.0, 1.0

    monkeypatch.setattr(training.jax, "device_get", slow_get)
    monkeypatch.setattr(training, "evaluate_model", slow_evaluation)
    train, val = tiny_loaders()
    tcfg = TrainConfig(batch_size=2, epochs=2, eval_freq=3, start_context="")
    hooks = Recorder()
    result = train_model_simple(gptjax.init_params(cfg, seed=0), cfg, train, val, tcfg, hooks=hooks, progress=False,
                                peak_tflops=1e-6)
    assert len(hooks.steps) == 2 * len(train) and len(hooks.steps) > 2 * tcfg.eval_freq
    tokens = 2 * 32
    mfu = tokens * flops_per_token(cfg, 32) / 1e6
    for record in hooks.steps:
        assert record["tokens_per_sec"] == tokens and record["mfu"] == pytest.approx(mfu, rel=1e-3)
    assert result.speed == {"tokens_per_sec": tokens, "mfu": pytest.approx(mfu, rel=1e-3)}


def test_loop_reports_speed_without_mfu_on_cpu():
    cfg = CFG.replace(context_length=32)
    train, val = tiny_loaders()
    hooks = Recorder()
    result = train_model_simple(gptjax.init_params(cfg, seed=0), cfg, train, val,
                                TrainConfig(batch_size=2, epochs=1, eval_freq=1000, start_context=""), hooks=hooks,
                                progress=False)
    assert all(r["tokens_per_sec"] > 0 and r["mfu"] is None for r in hooks.steps)
    assert result.speed["tokens_per_sec"] > 0 and result.speed["mfu"] is None
