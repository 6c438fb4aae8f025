"""gptjax.attention: the blocked causal attention computes what the book's causal_attention computes,
values and gradients, for multi-head and grouped-query attention, and its compiled backward pass has no
[seq, seq] score array left."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.attention import BLOCK, blocked_causal_attention, causal_attention


def inputs(shape, dtype=jnp.float32, seed=0, groups=None):
    """q, k, v, the output's cotangent; k and v with ``groups`` key/value heads (default: as many as q's)."""
    kv_shape = shape if groups is None else (*shape[:2], groups, shape[3])
    shapes = (shape, kv_shape, kv_shape, shape)
    return tuple(jax.random.normal(key, s, dtype) for key, s in zip(jax.random.split(jax.random.key(seed), 4), shapes))


def value_and_grads(attention, q, k, v, g):
    out, vjp = jax.vjp(attention, q, k, v)
    return (out, *vjp(g))


@pytest.mark.parametrize("shape, block, groups", [
    ((1, 1, 2, 8), BLOCK, None),  # one position
    ((2, 5, 3, 4), 2, None),  # blocks of 2, the last one short
    ((2, 37, 3, 8), 16, None),  # a sequence the block size does not divide
    ((3, 64, 4, 16), 16, None),  # batch 3, whole blocks
    ((1, 64, 4, 16), BLOCK, None),  # one block larger than the sequence
    ((1, 1024, 2, 16), BLOCK, None),  # the context of gpt2
    ((2, 37, 8, 8), 16, 2),  # grouped-query: 4 query heads per key/value head, a short last block
    ((1, 150, 4, 8), 64, 2),  # Qwen3-0.6B's 2 query heads per group, three blocks
    ((2, 20, 3, 8), 16, 1),  # multi-query: one key/value head for all
])
def test_equals_the_books_causal_attention(shape, block, groups):
    q, k, v, g = inputs(shape, groups=groups)
    got = value_and_grads(lambda q, k, v: blocked_causal_attention(q, k, v, block), q, k, v, g)
    want = value_and_grads(causal_attention, q, k, v, g)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5, err_msg=name)


def test_bfloat16_inputs_give_bfloat16_close_to_float32():
    q, k, v, g = inputs((2, 40, 3, 16), jnp.bfloat16)
    got = value_and_grads(lambda q, k, v: blocked_causal_attention(q, k, v, 16), q, k, v, g)
    want = value_and_grads(causal_attention, *(x.astype(jnp.float32) for x in (q, k, v, g)))
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert x.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(x, np.float32), y, atol=5e-2, rtol=5e-2, err_msg=name)


def test_vmap_equals_one_at_a_time():
    q, k, v, g = inputs((3, 2, 20, 2, 8))
    f = jax.grad(lambda q, k, v, g: jnp.vdot(blocked_causal_attention(q, k, v, 8), g), argnums=(0, 1, 2))
    batched = jax.vmap(f)(q, k, v, g)
    for i in range(q.shape[0]):
        for x, y in zip(batched, f(q[i], k[i], v[i], g[i]), strict=True):
            np.testing.assert_allclose(x[i], y, atol=1e-6)


def test_compiled_backward_has_no_full_score_array():
    """Neither the masked upper half nor a transposed copy of the score gradient: no [.., seq, seq]
    array at all, where the autodiff'd attention has several."""
    x = jax.ShapeDtypeStruct((1, 512, 2, 16), jnp.float32)

    def compiled_text(attention):
        grad = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v)), argnums=(0, 1, 2))
        return jax.jit(grad).lower(x, x, x).compile().as_text()

    full = re.compile(r"f32\[[0-9,]*512,512\]")
    assert full.search(compiled_text(causal_attention))
    assert not full.search(compiled_text(blocked_causal_attention))
