"""Accelerator checks, run by benchmarks/device_check.sh on a machine with a GPU (pytest module; on a CPU
it runs too, against the CPU's own paths, which is how CI keeps it working).

- a bfloat16 mixed-precision train step against the float32 step on the device;
- cuDNN flash attention against XLA's attention on the device (GPU only), values and gradients;
- gptjax's logits against the book's torch GPTModel carrying the same weights, on the device, at
  float32 matmul precision (GPUs default to TF32 matmuls: that error is reported, not asserted).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gptjax  # noqa: E402
from gptjax import attention  # noqa: E402
from gptjax.training import TrainConfig, init_opt_state, make_optimizer, make_train_step  # noqa: E402

CFG = gptjax.GPTConfig(vocab_size=50257, context_length=64, emb_dim=64, n_layers=2, n_heads=2, drop_rate=0.0,
                       qkv_bias=True)


@pytest.fixture(scope="module")
def params():
    return gptjax.init_params(CFG, seed=0)


@pytest.fixture(scope="module")
def batch():
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(4, CFG.context_length + 1), dtype=np.int32)
    return jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])


def test_bf16_step_close_to_float32(params, batch):
    optimizer = make_optimizer(TrainConfig(), total_steps=10)
    results = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        p = jax.tree_util.tree_map(jnp.copy, params)
        step = make_train_step(CFG, optimizer, dtype=dtype)
        new, _, metrics = step(p, init_opt_state(optimizer, p), batch, jax.random.key(0))
        results[name] = (jax.tree_util.tree_map(lambda a, b: a - b, new, params), float(metrics["loss"]))
    (u32, loss32), (u16, loss16) = results["float32"], results["bfloat16"]
    rel = float(optax.tree.norm(jax.tree_util.tree_map(jnp.subtract, u32, u16)) / optax.tree.norm(u32))
    print(f"\n{jax.default_backend()}: bf16 update vs float32: relative error {rel:.3g}; loss {loss32:.4f} vs {loss16:.4f}")
    assert abs(loss32 - loss16) < 0.05 * loss32 and rel < 0.05


@pytest.mark.parametrize("heads, groups, head_dim", [(12, 12, 64), (16, 8, 128)])  # gpt2-small, Qwen3-0.6B
def test_cudnn_attention_matches_xla(heads, groups, head_dim):
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN flash attention needs an NVIDIA GPU")
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (4, 1024, h, head_dim), jnp.bfloat16)
               for key, h in zip(keys, (heads, groups, groups)))
    assert attention.cudnn_attention_unavailable(q, k, v) is None
    hlo = jax.jit(attention.self_attention).lower(q, k, v).compile().as_text()
    assert "__cudnn$fmha" in hlo

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)

    got, want = (fn(q, k, v).astype(jnp.float32) for fn in (attention.self_attention, attention.xla_attention))
    err = float(jnp.abs(got - want).max())
    print(f"\ncuDNN vs XLA attention (bf16, {heads} heads over {groups} key/value heads): max abs error {err:.3g}")
    assert err < 2e-2
    g_cudnn = jax.grad(lambda *a: loss(attention.self_attention, *a), argnums=(0, 1, 2))(q, k, v)
    g_xla = jax.grad(lambda *a: loss(attention.xla_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_cudnn, g_xla):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-2


def test_logits_match_torch_reference(params):
    torch = pytest.importorskip("torch")
    from tests.torch_reference import GPTModel

    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, size=(2, CFG.context_length), dtype=np.int64)
    model = GPTModel(CFG.to_dict())
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in gptjax.to_torch_state_dict(params, CFG).items()},
                          strict=False)
    model.eval()
    with torch.no_grad():
        want = model(torch.as_tensor(ids)).numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(gptjax.apply(params, CFG, jnp.asarray(ids, jnp.int32)))
    default = np.asarray(jax.jit(lambda p, x: gptjax.apply(p, CFG, x))(params, jnp.asarray(ids, jnp.int32)))
    err, err_default = float(np.abs(got - want).max()), float(np.abs(default - want).max())
    print(f"\n{jax.default_backend()}: logits vs torch reference: max abs error {err:.3g} at float32 precision, "
          f"{err_default:.3g} at the default matmul precision")
    assert err <= 1e-4 * max(1.0, float(np.abs(want).max()))
