"""gptjax.cpu_kernels: the compiled bfloat16/int8-weight matmul against numpy, and where the model uses it
(CPU decode steps) and where not (prompts, GPU and TPU programs)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import gptjax
from gptjax import GPTConfig, cpu_kernels, platform
from gptjax.quantize import dequantize_params, quantize_kernel, quantize_params
from gptjax.sampling import generate

CFG = GPTConfig(vocab_size=101, context_length=32, emb_dim=48, n_layers=2, n_heads=4, drop_rate=0.0, qkv_bias=True)
CUSTOM_CALL = "gptjax_matmul"


def test_the_kernel_was_built_by_the_install():
    assert cpu_kernels.unavailable() is None


# rows 1..MAX_ROWS; k not a multiple of the 4 rows the kernel widens at once; n not a multiple of its
# 16-column registers, and narrower than the column share of two threads
@pytest.mark.parametrize("portable", [False, True], ids=["cpu-specific", "portable"])
@pytest.mark.parametrize("rows,k,n", [(1, 768, 3072), (1, 37, 5), (3, 130, 1000), (8, 64, 17), (2, 3, 50257)])
def test_matches_a_numpy_reference(rows, k, n, portable):
    rng = np.random.default_rng(rows * k + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w_bf16 = w.astype(ml_dtypes.bfloat16)
    q = quantize_kernel(w)
    want_bf16 = x.astype(np.float64) @ w_bf16.astype(np.float64)
    want_int8 = (x.astype(np.float64) @ np.asarray(q.values, np.float64)) * np.asarray(q.scale, np.float64)
    run = jax.jit(functools.partial(cpu_kernels.weights_matmul, portable=portable))
    got_bf16, got_int8 = run(x, jnp.asarray(w_bf16)), run(x, q.values, q.scale)
    assert got_bf16.dtype == got_int8.dtype == jnp.float32 and got_bf16.shape == (rows, n)
    # float32 sums of k products: rounding grows like sqrt(k) ulps of the terms' size
    tol = 1e-6 * np.sqrt(k) * np.abs(x).max() * np.abs(w).max() * 4
    np.testing.assert_allclose(got_bf16, want_bf16, atol=tol, rtol=0)
    np.testing.assert_allclose(got_int8, want_int8, atol=tol * float(np.abs(q.values).max()), rtol=0)


def test_refuses_what_it_cannot_compute():
    x = jnp.ones((cpu_kernels.MAX_ROWS + 1, 4))
    with pytest.raises(ValueError, match=r"float32 x of shape \[rows <= 8, k\]"):
        cpu_kernels.weights_matmul(x, jnp.ones((4, 3), jnp.bfloat16))
    with pytest.raises(ValueError, match="need their per-column scale"):
        cpu_kernels.weights_matmul(jnp.ones((1, 4)), jnp.ones((4, 3), jnp.int8))
    with pytest.raises(ValueError, match="reads bfloat16 weights, or int8 weights with a scale"):
        cpu_kernels.weights_matmul(jnp.ones((1, 4)), jnp.ones((4, 3), jnp.float32))


@pytest.mark.parametrize("weights_dtype", ["bfloat16", "int8"])
def test_model_runs_on_stored_weights(weights_dtype):
    """One token (a decode step) goes through the kernel, a prompt through XLA's dot on the widened
    kernel; both give the logits of the dequantized float32 tree."""
    params = quantize_params(gptjax.init_params(CFG, seed=0), weights_dtype)
    reference = dequantize_params(params)
    for ids in (jnp.array([[5]]), jnp.arange(20).reshape(2, 10)):
        np.testing.assert_allclose(gptjax.apply(params, CFG, ids), gptjax.apply(reference, CFG, ids), atol=2e-5)
    step, prompt = (jax.jit(lambda p, x: gptjax.apply(p, CFG, x)).lower(params, ids).as_text()
                    for ids in (jnp.array([[5]]), jnp.arange(20).reshape(2, 10)))
    n_kernels = 6 * CFG.n_layers + 1
    assert step.count(f"@{CUSTOM_CALL}") == n_kernels  # every Linear layer, out_head included
    assert CUSTOM_CALL not in prompt


def test_accelerator_programs_widen_instead():
    """Lowered for a GPU or TPU, the same traced step holds no CPU custom call: the widening is fused into
    the dot there."""
    params = quantize_params(gptjax.init_params(CFG, seed=0), "int8")
    traced = jax.jit(lambda p, x: gptjax.apply(p, CFG, x)).trace(params, jax.ShapeDtypeStruct((1, 1), jnp.int32))
    cpu, cuda, tpu = (traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda", "tpu"))
    assert CUSTOM_CALL in cpu
    for text in (cuda, tpu):
        assert CUSTOM_CALL not in text
        assert f"tensor<{CFG.emb_dim}x{CFG.vocab_size}xi8>" in text  # the head stored as int8 ...
        assert f"tensor<1x1x{3 * CFG.emb_dim}xf32>" in text  # ... and the accelerator's fused QKV still taken


def test_mixed_precision_keeps_bfloat16_kernels_ordinary():
    """A bfloat16 kernel in a layer computing in bfloat16 is mixed precision, not a stored format: XLA's dot."""
    params = quantize_params(gptjax.init_params(CFG, seed=0), "bfloat16")
    text = jax.jit(lambda p, x: gptjax.apply(p, CFG, x, dtype=jnp.bfloat16)).lower(params, jnp.array([[5]])).as_text()
    assert CUSTOM_CALL not in text
    assert f"tensor<1x1x{CFG.vocab_size}xf32>" in text  # logits still float32


def test_stored_weights_matmul_shapes():
    """Batch dimensions around the rows, and both paths (kernel up to MAX_ROWS rows, widened above)."""
    q = quantize_kernel(jax.random.normal(jax.random.key(0), (24, 7)))
    for shape in ((1, 1, 24), (2, 4, 24), (3, 5, 24)):
        x = jax.random.normal(jax.random.key(1), shape)
        got = platform.stored_weights_matmul(x, q)
        assert got.shape == shape[:-1] + (7,)
        np.testing.assert_allclose(got, x @ q.dequantize(), atol=1e-5)


def test_quantized_kernel_reads_whole_only():
    """nnx reads a Param as param[...]; any other index would silently mean something else."""
    q = quantize_kernel(jnp.ones((4, 3)))
    assert q[...] is q and q.shape == (4, 3)
    with pytest.raises(TypeError, match="only be read whole"):
        q[0]


def test_without_the_library_decoding_widens_and_says_so(monkeypatch):
    """An install without a C++ compiler: same tokens through XLA's dot, and a warning saying why it is slow."""
    monkeypatch.setattr(cpu_kernels, "unavailable", lambda: "gptjax._weights_matmul was not built")
    cfg = CFG.replace(emb_dim=40, n_heads=2, n_layers=1)  # a shape no other test traced, so it is traced anew
    params = gptjax.init_params(cfg, seed=4)
    prompt = np.array([[3, 1, 4]])
    with pytest.warns(UserWarning, match="was not built; decoding from int8 weights widens them"):
        got = generate(params, cfg, prompt, 6, weights_dtype="int8")
    np.testing.assert_array_equal(got, generate(dequantize_params(quantize_params(params, "int8")), cfg, prompt, 6))
    step = jax.jit(lambda p, x: gptjax.apply(p, cfg, x)).lower(quantize_params(params, "int8"), prompt[:, :1])
    assert CUSTOM_CALL not in step.as_text()
