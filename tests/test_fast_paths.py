"""The model's speed paths compute what the plain paths compute (values, not timings).

bf16 mixed precision against float32, the heads-major KV cache against the plain layout, and
rematerialised blocks against stored activations (gradients too). The per-platform choices of
gptjax.platform are tested in test_platform.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gptjax
from gptjax import GPTConfig
from gptjax.attention import causal_attention

CFG = GPTConfig(vocab_size=257, context_length=32, emb_dim=48, n_layers=2, n_heads=4, drop_rate=0.1, qkv_bias=True)
# bf16 keeps 8 bits of mantissa: logits of a random model stay within 1% of their float32 range.
BF16_LOGITS_RTOL = 1e-2
BF16_GRAD_RTOL = 5e-2  # relative to the gradient's global norm


@pytest.fixture(scope="module")
def params():
    return gptjax.init_params(CFG, seed=0)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, size=(3, CFG.context_length), dtype=np.int32)


def loss_fn(params, ids, **kwargs):
    logits = gptjax.apply(params, CFG, ids[:, :-1], **kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def global_rel_error(a, b):
    diff = jax.tree_util.tree_map(lambda x, y: x - y, a, b)
    return float(optax.tree.norm(diff) / optax.tree.norm(a))


# --- bf16 mixed precision -------------------------------------------------------------------------


def test_bf16_logits_are_float32_and_close_to_float32(params, ids):
    want = np.asarray(gptjax.apply(params, CFG, ids))
    got = gptjax.apply(params, CFG, ids, dtype=jnp.bfloat16)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    err = np.abs(np.asarray(got) - want).max()
    assert 0 < err <= BF16_LOGITS_RTOL * np.abs(want).max()  # > 0: the matmuls really ran in bf16


def test_bf16_runs_matmuls_in_bf16_and_keeps_softmax_float32(params, ids):
    jaxpr = str(jax.make_jaxpr(lambda p: gptjax.apply(p, CFG, ids, dtype=jnp.bfloat16))(params))
    assert re.search(r"bf16\[3,32,192\] = dot_general", jaxpr)  # the feed-forward's first matmul
    assert "preferred_element_type=float32" in jaxpr  # logits and attention scores accumulate in float32
    # float32 parameters (and so optimizer state) whatever the compute dtype
    grads = jax.grad(loss_fn)(params, ids, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_bf16_gradients_close_to_float32(params, ids):
    g32 = jax.grad(loss_fn)(params, ids)
    g16 = jax.grad(loss_fn)(params, ids, dtype=jnp.bfloat16)
    assert 0 < global_rel_error(g32, g16) <= BF16_GRAD_RTOL


def test_bad_dtype_is_a_clear_error(params, ids):
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        gptjax.apply(params, CFG, ids, dtype=jnp.int32)


# --- KV cache ------------------------------------------------------------------------------------


def qkv(seed, q_len, kv_len, dtype=jnp.float32, heads=4, head_dim=16):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    shape = lambda n: (2, n, heads, head_dim)  # noqa: E731
    return (jax.random.normal(k1, shape(q_len), dtype), jax.random.normal(k2, shape(kv_len), dtype),
            jax.random.normal(k3, shape(kv_len), dtype))


@pytest.mark.parametrize("q_offset", [0, 5, 28])
def test_heads_major_cache_attention_equals_sequence_major(q_offset):
    # queries at positions q_offset.. over a 32-slot cache: keys past each query's position are masked
    q, k, v = qkv(1, 4, 32)
    want = causal_attention(q, k, v, q_offset=q_offset)
    k_hm, v_hm = k.swapaxes(1, 2), v.swapaxes(1, 2)
    np.testing.assert_allclose(causal_attention(q, k_hm, v_hm, q_offset=q_offset, kv_heads_major=True), want,
                               atol=1e-6)
    traced = jax.jit(lambda off: causal_attention(q, k_hm, v_hm, q_offset=off, kv_heads_major=True))(
        jnp.int32(q_offset))
    np.testing.assert_allclose(traced, want, atol=1e-6)
    # a query at position p sees exactly keys 0..p: changing key p + 1 changes nothing
    if q_offset + 4 < 32:
        changed = causal_attention(q, k.at[:, q_offset + 4].set(9.0), v, q_offset=q_offset)
        np.testing.assert_array_equal(changed, want)


def test_cache_slots_past_the_position_are_ignored(params, ids):
    """apply_with_cache over a cache full of garbage gives the logits of apply: masking is by position."""
    prompt, rest = ids[:, :20], ids[:, 20:24]
    garbage = [{name: 100.0 * jax.random.normal(jax.random.key(i), a.shape) for name, a in layer.items()}
               for i, layer in enumerate(gptjax.init_cache(CFG, ids.shape[0]))]
    step = jax.jit(gptjax.apply_with_cache, static_argnames="cfg")
    logits, cache = step(params, CFG, prompt, garbage, 0)
    want = gptjax.apply(params, CFG, ids[:, :24])
    np.testing.assert_allclose(logits, want[:, :20], atol=1e-4)
    for i in range(rest.shape[1]):
        logits, cache = step(params, CFG, rest[:, i : i + 1], cache, jnp.int32(20 + i))
        np.testing.assert_allclose(logits[:, 0], want[:, 20 + i], atol=1e-4)


def test_apply_with_cache_bf16_matches_apply_bf16(params, ids):
    cache = gptjax.init_cache(CFG, ids.shape[0], jnp.bfloat16)
    logits, _ = jax.jit(gptjax.apply_with_cache, static_argnames=("cfg", "dtype"))(
        params, CFG, ids, cache, 0, dtype=jnp.bfloat16)
    want = gptjax.apply(params, CFG, ids, dtype=jnp.bfloat16)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, want, atol=BF16_LOGITS_RTOL * float(jnp.abs(want).max()))


def test_dropout_free_training_takes_the_fused_path_and_matches_eval(params, ids):
    # drop_rate 0: train=True computes exactly what eval computes (no attention-weight dropout to keep)
    cfg = CFG.replace(drop_rate=0.0)
    train = gptjax.apply(params, cfg, ids, train=True, rng=jax.random.key(0))
    np.testing.assert_array_equal(train, gptjax.apply(params, cfg, ids))


# --- rematerialisation ----------------------------------------------------------------------------


def test_remat_equals_stored_activations_with_dropout(params, ids):
    key = jax.random.key(7)
    kwargs = dict(train=True, rng=key)
    np.testing.assert_allclose(gptjax.apply(params, CFG, ids, remat=True, **kwargs),
                               gptjax.apply(params, CFG, ids, **kwargs), atol=1e-5)
    g_plain = jax.grad(loss_fn)(params, ids, **kwargs)
    g_remat = jax.grad(loss_fn)(params, ids, remat=True, **kwargs)
    for a, b in zip(jax.tree_util.tree_leaves(g_remat), jax.tree_util.tree_leaves(g_plain)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_remat_really_rematerialises(params, ids):
    # jax.checkpoint shows up in the jaxpr as a remat primitive ("remat2" today) around each block
    remat = re.compile(r"\b(remat\w*|checkpoint)\[")
    jaxpr = lambda flag: str(jax.make_jaxpr(lambda p: gptjax.apply(p, CFG, ids, remat=flag))(params))  # noqa: E731
    assert len(remat.findall(jaxpr(True))) == CFG.n_layers
    assert not remat.findall(jaxpr(False))
