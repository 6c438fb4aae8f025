"""gptjax.platform: each platform's variant computes what the others compute (values and gradients),
and each compiled program holds its own platform's variants, whatever jax.default_backend() says."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gptjax
from gptjax import GPTConfig, attention, platform
from gptjax.attention import causal_attention
from gptjax.model import model_from_params
from gptjax.training import global_norm

CFG = GPTConfig(vocab_size=250, context_length=32, emb_dim=48, n_layers=2, n_heads=4, drop_rate=0.0, qkv_bias=True)


def close_trees(a, b, tol=1e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=tol, rtol=tol)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_qkv_equals_three_projections(qkv_bias):
    cfg = CFG.replace(qkv_bias=qkv_bias)
    params = gptjax.init_params(cfg, seed=1)
    x = jax.random.normal(jax.random.key(2), (2, 7, cfg.emb_dim))

    def project(params, variant):
        att = model_from_params(params, cfg).trf_blocks[0].att
        return variant(x, (att.W_query, att.W_key, att.W_value))

    close_trees(project(params, platform.fused_qkv), project(params, platform.separate_qkv))
    # its gradient reaches the book's three kernels (and biases) unchanged
    grad = jax.grad(lambda p, v: sum(jnp.sum(jnp.sin(y)) for y in project(p, v)))
    g_fused = grad(params, platform.fused_qkv)
    close_trees(g_fused, grad(params, platform.separate_qkv))
    att = g_fused["trf_blocks"][0]["att"]
    assert set(att) == {"W_query", "W_key", "W_value", "out_proj"}
    assert float(jnp.abs(att["W_key"]["kernel"]).max()) > 0
    jaxpr = str(jax.make_jaxpr(lambda p: project(p, platform.fused_qkv))(params))
    assert f"f32[2,7,{3 * cfg.emb_dim}] = dot_general" in jaxpr  # one matmul, three projections wide


def test_padded_vocabulary_equals_unpadded():
    params = gptjax.init_params(CFG, seed=3)  # vocab 250 pads to 256
    x = jax.random.normal(jax.random.key(4), (2, 5, CFG.emb_dim))

    def logits(params, variant):
        return variant(model_from_params(params, CFG).out_head, x)

    padded, plain = logits(params, platform.padded_logits), logits(params, platform.plain_logits)
    assert padded.shape == plain.shape == (2, 5, 250) and padded.dtype == jnp.float32
    np.testing.assert_allclose(padded, plain, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda p: logits(p, platform.padded_logits))(params))
    assert "f32[2,5,256] = dot_general" in jaxpr  # the matmul really ran 256 wide
    grad = jax.grad(lambda p, v: jnp.sum(jnp.sin(logits(p, v))))
    g_padded = grad(params, platform.padded_logits)["out_head"]["kernel"]
    assert g_padded.shape == (CFG.emb_dim, 250)
    np.testing.assert_allclose(g_padded, grad(params, platform.plain_logits)["out_head"]["kernel"], atol=1e-5)


def test_layer_norm_means_agree():
    x = jax.random.normal(jax.random.key(5), (3, 7, 48)) * 3.0 + 1.0
    np.testing.assert_allclose(platform.mean_by_matvec(x), platform.mean_by_reduction(x), atol=1e-6)
    np.testing.assert_allclose(platform.layer_norm_mean(x), x.mean(-1, keepdims=True), atol=1e-6)


def test_scale_and_shift_gradients_are_autodiffs():
    """LayerNorm's affine step: values and all three gradients those of ``scale * x + shift``, the parameters'
    row sums a matrix-vector product in the CPU program (a reduction in the TPU program)."""
    x, g = (jax.random.normal(jax.random.key(i), (3, 7, 48)) for i in (6, 7))
    scale, shift = jax.random.normal(jax.random.key(8), (2, 48))
    loss = lambda f: lambda *a: jnp.vdot(f(*a), g)  # noqa: E731
    got = jax.value_and_grad(loss(platform.scale_and_shift), argnums=(0, 1, 2))(x, scale, shift)
    want = jax.value_and_grad(loss(lambda x, a, b: a * x + b), argnums=(0, 1, 2))(x, scale, shift)
    close_trees(got, want, tol=1e-5)
    for variant in (platform.row_sum_by_matvec, platform.row_sum_by_reduction):
        np.testing.assert_allclose(variant(x), x.sum(axis=(0, 1)), atol=1e-5)
    traced = jax.jit(jax.grad(loss(platform.scale_and_shift), argnums=(1, 2))).trace(x, scale, shift)
    ones = "(tensor<21xf32>, tensor<21x48xf32>) -> tensor<48xf32>"  # the 3 x 7 rows summed by a product
    assert ones in traced.lower(lowering_platforms=("cpu",)).as_text()
    assert ones not in traced.lower(lowering_platforms=("tpu",)).as_text()


def test_sums_of_squares_give_optax_global_norm():
    params = gptjax.init_params(CFG, seed=6)
    want = float(optax.tree.norm(params))
    for variant in (platform.sum_of_squares_by_matvec, platform.sum_of_squares_by_reduction):
        got = float(jnp.sqrt(sum(variant(x) for x in jax.tree_util.tree_leaves(params))))
        assert got == pytest.approx(want, rel=1e-6)
    assert float(global_norm(params)) == pytest.approx(want, rel=1e-6)


def test_backward_barrier_passes_finite_gradients_unchanged():
    x = jnp.arange(6.0).reshape(1, 2, 3)
    f = lambda x, w: jnp.sum(platform.backward_barrier(x) * w)  # noqa: E731
    np.testing.assert_array_equal(jax.grad(f)(x, x + 1.0), x + 1.0)
    assert "cond" in str(jax.make_jaxpr(jax.grad(f))(x, x))  # the barrier XLA cannot fuse through
    assert np.isnan(np.asarray(jax.grad(f)(x, x.at[0, 0, 0].set(jnp.inf)))).all()  # non-finite stays non-finite


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_self_attention_equals_the_books_causal_attention(dtype, atol):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, 32, 4, 16), dtype) for key in (k1, k2, k3))
    want = causal_attention(*(a.astype(jnp.float32) for a in (q, k, v)))
    for variant in (attention.self_attention, attention.xla_attention, attention.cuda_attention):
        got = variant(q, k, v)
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=atol)


def test_cudnn_attention_says_why_not():
    q = jax.ShapeDtypeStruct((1, 16, 2, 8), jnp.float32)
    assert "bfloat16 or float16" in attention.cudnn_attention_unavailable(q, q, q)


def test_one_function_lowered_for_two_platforms_gets_each_its_own():
    """The choice is made at lowering: the same jitted function, traced once, lowered for CPU and for
    CUDA, carries the CPU's three projections and the accelerator's one fused projection."""
    params = gptjax.init_params(CFG, seed=0)
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    traced = jax.jit(lambda p, x: gptjax.apply(p, CFG, x)).trace(params, ids)
    fused_shape = f"tensor<2x16x{3 * CFG.emb_dim}xf32>"
    cpu, cuda, tpu = (traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda", "tpu"))
    assert fused_shape not in cpu and "tensor<2x16x256xf32>" not in cpu
    assert fused_shape in cuda and "tensor<2x16x256xf32>" in cuda  # fused QKV, padded vocabulary
    assert fused_shape in tpu and "tensor<2x16x256xf32>" not in tpu  # fused QKV, vocabulary as it is


def test_cpu_attention_skips_the_masked_half():
    """The CPU program's attention never makes a [seq, seq] score array; the TPU program's (XLA's) does."""
    x = jax.ShapeDtypeStruct((1, 512, 2, 16), jnp.float32)
    grad = jax.grad(lambda q, k, v: jnp.sum(attention.self_attention(q, k, v)), argnums=(0, 1, 2))
    traced = jax.jit(grad).trace(x, x, x)
    # compiled: the lowered CPU program still carries zeros for the other branches' residuals
    assert not re.search(r"f32\[[0-9,]*512,512\]", traced.lower(lowering_platforms=("cpu",)).compile().as_text())
    assert "512x512xf32" in traced.lower(lowering_platforms=("tpu",)).as_text()


def widened_to_float32(hlo: str) -> list[str]:
    """The instructions of a compiled program that convert a bfloat16 operand to float32."""
    types = dict(re.findall(r"%?([\w.\-]+)(?::| =) (\w+)\[", hlo))
    converts = (re.search(r"= f32\[[^\]]*\]\S* convert\(%?([\w.\-]+)\)", line) for line in hlo.splitlines())
    return [m.group(0) for m in converts if m and types.get(m.group(1)) == "bf16"]


def test_bfloat16_linear_multiplies_in_bfloat16_on_cpu():
    """A Linear layer computing in bfloat16 gives XLA's values and gradients (its output bfloat16, so the
    incoming gradient is too), and on CPU neither its product nor its gradients' products widen an operand to
    float32 (XLA:CPU's dot would: platform.py's table); accelerator programs keep XLA's dot."""
    x = jax.random.normal(jax.random.key(0), (2, 20, 48)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (48, 96)).astype(jnp.bfloat16)
    c = jax.random.normal(jax.random.key(2), (2, 20, 96))
    dims = (((2,), (0,)), ((), ()))

    def loss(dot_general):
        return lambda x, w: jnp.vdot(dot_general(x, w, dims).astype(jnp.float32), c)

    got = jax.jit(jax.value_and_grad(loss(platform.linear_dot_general), argnums=(0, 1)))(x, w)
    want = jax.value_and_grad(loss(jax.lax.dot_general), argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)
    grad = jax.jit(jax.grad(loss(platform.linear_dot_general), argnums=(0, 1)))  # no forward value: only products
    hlo = grad.lower(x, w).compile().as_text()
    assert "gptjax_swap_last_axes_bf16" in hlo and not widened_to_float32(hlo)
    xla_grad = jax.jit(jax.grad(loss(jax.lax.dot_general), argnums=(0, 1)))
    assert widened_to_float32(xla_grad.lower(x, w).compile().as_text())
    assert "gptjax_swap_last_axes" not in grad.trace(x, w).lower(lowering_platforms=("tpu",)).as_text()
