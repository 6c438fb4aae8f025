"""gptjax.cpu_kernels: the compiled bfloat16/int8-weight matmul against numpy and the cached attention
against XLA's, every SIMD loop this CPU runs, and where the model uses them (CPU decode steps) and where
not (prompts, GPU and TPU programs)."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import gptjax
from gptjax import GPTConfig, cpu_kernels, platform
from gptjax import sampling
from gptjax.attention import attend_with_cache
from gptjax.quantize import dequantize_params, quantize_kernel, quantize_params
from gptjax.sampling import generate

CFG = GPTConfig(vocab_size=101, context_length=32, emb_dim=48, n_layers=2, n_heads=4, drop_rate=0.0, qkv_bias=True)
CUSTOM_CALL = "gptjax_matmul"
ATTENTION_CALL = "gptjax_cached_attention"
ISAS = cpu_kernels.supported_isas()


def test_the_kernel_was_built_by_the_install():
    assert cpu_kernels.unavailable() is None
    assert ISAS[-1] == "portable"  # every CPU runs the portable loops


def int8_reference(x: np.ndarray, values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What the int8 loops compute, in numpy: each row's blocks of 32 activations scaled to [-127, 127] and
    rounded half to even in float32, each block's integer dot products exact, then scaled (float64 here)."""
    w = np.asarray(values, np.int64)
    y = np.zeros((x.shape[0], w.shape[1]))
    for b in range(0, x.shape[1], 32):
        block = x[:, b:b + 32]
        amax = np.abs(block).max(axis=1, keepdims=True)
        inv = np.float32(127) / np.where(amax > 0, amax, np.float32(1))
        q = np.clip(np.rint(block * inv), -127, 127).astype(np.int64)
        y += (q @ w[b:b + 32]) * (amax / np.float32(127)).astype(np.float64)
    return y * np.asarray(scale, np.float64)


# rows 1..MAX_STORED_ROWS; k not a multiple of the kernels' 8-row groups or 32-row int8 blocks; n not a multiple
# of their 16- and 64-column registers, and narrower than the column share of two threads
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows,k,n", [(1, 768, 3072), (1, 37, 5), (3, 130, 1000), (8, 64, 17), (2, 3, 50257),
                                      (64, 96, 200)])
def test_matches_a_numpy_reference(rows, k, n, isa):
    rng = np.random.default_rng(rows * k + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w_bf16 = w.astype(ml_dtypes.bfloat16)
    q = quantize_kernel(w)
    want_bf16 = x.astype(np.float64) @ w_bf16.astype(np.float64)
    run = jax.jit(functools.partial(cpu_kernels.weights_matmul, isa=isa))
    got_bf16, got_int8 = run(x, jnp.asarray(w_bf16)), run(x, q.values, q.scale)
    assert got_bf16.dtype == got_int8.dtype == jnp.float32 and got_bf16.shape == (rows, n)
    # float32 sums of k products: rounding grows like sqrt(k) ulps of the terms' size
    tol = 1e-6 * np.sqrt(k) * np.abs(x).max() * np.abs(w).max() * 4
    np.testing.assert_allclose(got_bf16, want_bf16, atol=tol, rtol=0)
    if rows <= cpu_kernels.MAX_ROWS:
        np.testing.assert_allclose(run(x, jnp.asarray(w)), x.astype(np.float64) @ w.astype(np.float64), atol=tol, rtol=0)
    # int8: only the float32 scaling of each block's exact integer sum rounds
    int8_tol = 1e-6 * np.sqrt(k / 32) * np.abs(x).max() * float(np.abs(q.dequantize()).max()) * 32 * 4
    np.testing.assert_allclose(got_int8, int8_reference(x, q.values, q.scale), atol=int8_tol, rtol=0)
    # ... and it is the float32 product to 8-bit activations' precision
    np.testing.assert_allclose(got_int8, x.astype(np.float64) @ np.asarray(q.dequantize(), np.float64),
                               atol=0.02 * np.abs(x).max() * float(np.abs(q.dequantize()).max()) * np.sqrt(k), rtol=0)


def test_int8_blocks_that_are_zero_or_not_finite():
    """An all-zero block adds nothing; a block holding an infinity or a NaN makes its row NaN, as the float
    product would."""
    q = quantize_kernel(np.random.default_rng(0).standard_normal((70, 20)).astype(np.float32))
    x = np.ones((3, 70), np.float32)
    x[0, :32] = 0.0
    x[1, 40] = np.inf
    x[2, 65] = np.nan
    for isa in ISAS:
        got = np.asarray(cpu_kernels.weights_matmul(x, q.values, q.scale, isa=isa))
        np.testing.assert_allclose(got[0], int8_reference(x[:1], q.values, q.scale)[0], rtol=1e-5)
        assert np.isnan(got[1:]).all()


def test_loops_agree_bit_for_bit():
    """The AVX-512 and AVX2 float loops add the same fused products in the same order; every int8 loop (the
    portable one too) sums exact integers and then rounds alike."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((200, 777)).astype(ml_dtypes.bfloat16))
    q = quantize_kernel(rng.standard_normal((200, 777)).astype(np.float32))

    def results(isas, *args):
        return [np.asarray(jax.jit(functools.partial(cpu_kernels.weights_matmul, isa=isa))(*args)) for isa in isas]

    for got in results(ISAS[1:], x, q.values, q.scale):
        np.testing.assert_array_equal(got, results(ISAS[:1], x, q.values, q.scale)[0])
    simd = [isa for isa in ISAS if isa != "portable"]
    if len(simd) < 2:
        pytest.skip(f"this CPU runs only {ISAS}: no two float loops to compare")
    a, b = results(simd, x, w)
    np.testing.assert_array_equal(a, b)


def test_refuses_what_it_cannot_compute():
    x = jnp.ones((cpu_kernels.MAX_ROWS + 1, 4))
    with pytest.raises(ValueError, match=r"float32 x of shape \[rows <= 8, k\]"):
        cpu_kernels.weights_matmul(x, jnp.ones((4, 3), jnp.float32))
    x = jnp.ones((cpu_kernels.MAX_STORED_ROWS + 1, 4))
    with pytest.raises(ValueError, match=r"float32 x of shape \[rows <= 64, k\]"):
        cpu_kernels.weights_matmul(x, jnp.ones((4, 3), jnp.bfloat16))
    with pytest.raises(ValueError, match="need their per-column scale"):
        cpu_kernels.weights_matmul(jnp.ones((1, 4)), jnp.ones((4, 3), jnp.int8))
    with pytest.raises(ValueError, match="reads bfloat16 or float32 weights, or int8 weights with a scale"):
        cpu_kernels.weights_matmul(jnp.ones((1, 4)), jnp.ones((4, 3), jnp.float16))
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu_kernels.weights_matmul(jnp.ones((1, 4)), jnp.ones((4, 3), jnp.bfloat16), isa="sse")
    with pytest.raises(ValueError, match=r"cached_attention needs q \[rows, heads, head_dim\]"):
        cpu_kernels.cached_attention(*(jnp.ones((1, 2, 8)),) * 3, *(jnp.ones((1, 2, 4, 4)),) * 2, jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="groups dividing heads"):  # 3 key/value heads for 4 query heads
        cpu_kernels.cached_attention(jnp.ones((1, 4, 8)), *(jnp.ones((1, 3, 8)),) * 2, *(jnp.ones((1, 3, 4, 8)),) * 2,
                                     jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="reads float32"):
        cpu_kernels.cached_attention(*(jnp.ones((1, 2, 8), jnp.bfloat16),) * 3, *(jnp.ones((1, 2, 4, 8)),) * 2,
                                     jnp.zeros(1, jnp.int32))


# --- the transpose that keeps bfloat16 products bfloat16 -------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (1024, 768), (3, 130, 67), (2, 12, 256, 64), (0, 4)])
def test_swap_last_axes_writes_the_transpose(shape):
    x = jax.random.normal(jax.random.key(0), shape).astype(jnp.bfloat16)
    got = jax.jit(cpu_kernels.swap_last_axes)(x)
    np.testing.assert_array_equal(np.asarray(got), np.swapaxes(np.asarray(x), -1, -2))
    batched = jax.jit(jax.vmap(cpu_kernels.swap_last_axes))(jnp.stack([x, -x]))
    np.testing.assert_array_equal(np.asarray(batched[1]), -np.swapaxes(np.asarray(x), -1, -2))
    with pytest.raises(ValueError, match="takes a bfloat16 array of at least two axes"):
        cpu_kernels.swap_last_axes(x.astype(jnp.float32))


# --- the cached attention -------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("groups", [4, 2, 1])
def test_cached_attention_matches_xla(isa, groups):
    """Against the XLA update and attention it replaces (gptjax.attention.attend_with_cache): the cache written
    identically, the output within float32 rounding, at the first slot, in the middle, at the last slot,
    and past it (clamped, as XLA's update is); rows at different positions; multi-head attention and
    grouped-query attention (2 and 1 key/value heads for 4 query heads)."""
    rng = np.random.default_rng(3)
    b, heads, slots, head_dim = 3, 4, 20, 24  # head_dim not a multiple of the kernel's 16 partial sums
    q = jnp.asarray(rng.standard_normal((b, 1, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, 1, groups, head_dim)), jnp.float32) for _ in range(2))
    cache = {name: jnp.asarray(rng.standard_normal((b, groups, slots, head_dim)), jnp.float32) for name in "kv"}
    run = jax.jit(functools.partial(cpu_kernels.cached_attention, isa=isa))
    for positions in ([0, 0, 0], [0, 7, 19], [19, 25, 3]):
        pos = np.array(positions, np.int32)
        out, cache_k, cache_v = run(*(y[:, 0] for y in (q, k, v)), cache["k"], cache["v"], pos)
        for r, p in enumerate(positions):
            want, want_cache = attend_with_cache(q[r:r + 1], k[r:r + 1], v[r:r + 1],
                                                 {name: c[r:r + 1] for name, c in cache.items()}, p)
            np.testing.assert_allclose(out[r], want[0, 0], atol=2e-6, rtol=0)
            np.testing.assert_array_equal(cache_k[r], want_cache["k"][0])
            np.testing.assert_array_equal(cache_v[r], want_cache["v"][0])


def test_cached_attention_loops_agree_bit_for_bit():
    """Every loop sums in one order (no contraction into fused multiply-adds): identical outputs."""
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 12, 64)), jnp.float32) for _ in range(3))
    caches = [jnp.asarray(rng.standard_normal((2, 12, 300, 64)), jnp.float32) for _ in range(2)]
    pos = jnp.array([299, 130], jnp.int32)
    outs = [np.asarray(jax.jit(functools.partial(cpu_kernels.cached_attention, isa=isa))(q, k, v, *caches, pos)[0])
            for isa in ISAS]
    for other in outs[1:]:
        np.testing.assert_array_equal(other, outs[0])


def test_decode_loop_updates_the_cache_in_place():
    """The compiled decode program of a cache bucket calls the kernel once per layer, and copies no
    cache-sized array inside its loop (XLA's update of the loop-carried cache copied every slab several
    times a token); the only cache copies are of the program's inputs, once, as it starts."""
    cfg = CFG.replace(context_length=256, emb_dim=64)
    params = gptjax.init_params(cfg, seed=0)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    sampler = sampling._sampler_shapes(1)
    compiled = sampling._decode_bucket_in_place.lower(params, cfg, sampling._state_shapes(cfg, 1, 64), i32, sampler,
                                             slots=64, greedy=True).compile().as_text()
    cache_shape = re.compile(rf"f32\[1,{cfg.n_heads},64,{cfg.head_dim}\]\S* copy\(")
    copies = [line for line in compiled.splitlines() if cache_shape.search(line)]
    assert len(copies) <= 2 * cfg.n_layers and all("cache" in line for line in copies), copies
    assert compiled.count(f"custom_call_target=\"{ATTENTION_CALL}\"") == cfg.n_layers


def test_accelerator_programs_keep_xla_attention():
    cache = sampling.init_cache(CFG, 1, slots=16)
    traced = jax.jit(lambda p, x, c: gptjax.apply_with_cache(p, CFG, x, c, 5)).trace(
        gptjax.init_params(CFG, seed=0), jax.ShapeDtypeStruct((1, 1), jnp.int32), cache)
    cpu, cuda, tpu = (traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda", "tpu"))
    assert cpu.count(ATTENTION_CALL) == CFG.n_layers
    assert ATTENTION_CALL not in cuda and ATTENTION_CALL not in tpu


@pytest.mark.parametrize("weights_dtype", ["bfloat16", "int8"])
def test_model_runs_on_stored_weights(weights_dtype):
    """One token (a decode step) and a prompt chunk of up to MAX_STORED_ROWS tokens go through the kernel, a
    longer prompt from bfloat16 through XLA's dot on the widened kernel (from int8 through the kernel at any
    length); all give the logits of the dequantized float32 tree (int8 activations to their 8 bits)."""
    params = quantize_params(gptjax.init_params(CFG, seed=0), weights_dtype)
    reference = dequantize_params(params)
    inputs = (jnp.array([[5]]), jnp.arange(20).reshape(2, 10), jnp.arange(96).reshape(3, 32) % CFG.vocab_size)
    for ids in inputs:
        np.testing.assert_allclose(gptjax.apply(params, CFG, ids), gptjax.apply(reference, CFG, ids),
                                   atol=2e-5 if weights_dtype == "bfloat16" else 3e-2)
    step, chunk, prompt = (jax.jit(lambda p, x: gptjax.apply(p, CFG, x)).lower(params, ids).as_text() for ids in inputs)
    n_kernels = 6 * CFG.n_layers + 1
    assert step.count(f"@{CUSTOM_CALL}") == chunk.count(f"@{CUSTOM_CALL}") == n_kernels  # out_head included
    assert prompt.count(f"@{CUSTOM_CALL}") == (0 if weights_dtype == "bfloat16" else n_kernels)


def test_float32_decode_steps_use_the_kernel_and_keep_gradients():
    """A float32 decode step's Linear layers go through the kernel (a prompt's through XLA's dot), with the
    same logits; a batch small enough to take the kernel still differentiates, to XLA's gradient."""
    params = gptjax.init_params(CFG, seed=0)
    step, prompt = (jax.jit(lambda p, x: gptjax.apply(p, CFG, x)).lower(params, ids).as_text()
                    for ids in (jnp.array([[5]]), jnp.arange(20).reshape(2, 10)))
    assert step.count("@gptjax_matmul_f32") == 6 * CFG.n_layers + 1
    assert CUSTOM_CALL not in prompt
    ids = jnp.array([[5, 7, 9, 11]])  # 4 rows: the kernel's path
    forward = jax.jit(lambda p: gptjax.apply(p, CFG, ids))
    assert "gptjax_matmul_f32" in forward.lower(params).as_text()

    def loss(p, allow_kernel):
        if allow_kernel:
            return jnp.mean(gptjax.apply(p, CFG, ids) ** 2)
        with pytest.MonkeyPatch.context() as m:  # the same function through XLA alone
            m.setattr(cpu_kernels, "MAX_ROWS", 0)
            return jnp.mean(gptjax.apply(p, CFG, ids) ** 2)

    got, want = (jax.grad(functools.partial(loss, allow_kernel=a))(params) for a in (True, False))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("weights_dtype", ["float32", "bfloat16", "int8"])
def test_kernels_under_vmap(weights_dtype):
    """Batched activations over unbatched weights (the serving engine vmaps its decode step per row):
    the mapped rows are more rows of one call, equal to the unmapped product."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((5, 1, 48)), jnp.float32)
    w = rng.standard_normal((48, 30)).astype(np.float32)
    args = {"float32": (jnp.asarray(w),), "bfloat16": (jnp.asarray(w.astype(ml_dtypes.bfloat16)),),
            "int8": (quantize_kernel(w).values, quantize_kernel(w).scale)}[weights_dtype]
    mapped = jax.jit(jax.vmap(lambda row: cpu_kernels.weights_matmul(row, *args)))(x)
    np.testing.assert_allclose(mapped[:, 0], cpu_kernels.weights_matmul(x[:, 0], *args), atol=1e-5)


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
    """Batch dimensions around the rows, and both paths for bfloat16 (kernel up to MAX_STORED_ROWS rows,
    widened above); int8 takes the kernel at any number of rows."""
    w = jax.random.normal(jax.random.key(0), (24, 7))
    q, w_bf16 = quantize_kernel(w), w.astype(jnp.bfloat16)
    for shape in ((1, 1, 24), (2, 4, 24), (3, 5, 24), (5, 13, 24), (40, 40, 24)):
        x = jax.random.normal(jax.random.key(1), shape)
        rows = np.asarray(x).reshape(-1, 24)
        got = platform.stored_weights_matmul(x, q)
        assert got.shape == shape[:-1] + (7,)
        np.testing.assert_allclose(got, int8_reference(rows, q.values, q.scale).reshape(got.shape), atol=1e-5)
        want = rows @ np.asarray(w_bf16, np.float64)
        np.testing.assert_allclose(platform.stored_weights_matmul(x, w_bf16), want.reshape(got.shape), atol=1e-5)


def test_quantized_kernel_reads_whole_only():
    """nnx reads a Param as param[...]; any other index would silently mean something else."""
    q = quantize_kernel(jnp.ones((4, 3)))
    assert q[...] is q and q.shape == (4, 3)
    with pytest.raises(TypeError, match="only be read whole"):
        q[0]


def test_without_the_library_decoding_widens_and_says_so(monkeypatch):
    """An install without a C++ compiler: same tokens through XLA alone, and a warning saying why it is slow."""
    monkeypatch.setattr(cpu_kernels, "unavailable", lambda: "gptjax._cpu_kernels was not built")
    cfg = CFG.replace(emb_dim=40, n_heads=2, n_layers=1)  # a shape no other test traced, so it is traced anew
    params = gptjax.init_params(cfg, seed=4)
    prompt = np.array([[3, 1, 4]])
    with pytest.warns(UserWarning, match="was not built; decoding from int8 weights widens them"):
        got = generate(params, cfg, prompt, 6, weights_dtype="int8")
    np.testing.assert_array_equal(got, generate(dequantize_params(quantize_params(params, "int8")), cfg, prompt, 6))
    step = jax.jit(lambda p, x: gptjax.apply(p, cfg, x)).lower(quantize_params(params, "int8"), prompt[:, :1])
    assert CUSTOM_CALL not in step.as_text()
    cached = jax.jit(lambda p, x, c: gptjax.apply_with_cache(p, cfg, x, c, 2)).lower(
        params, prompt[:, :1], sampling.init_cache(cfg, 1, slots=16))
    assert ATTENTION_CALL not in cached.as_text()
