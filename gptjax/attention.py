"""Causal self-attention in query blocks, with its own backward pass: the CPU's attention for training.

Query block i (rows ``i*block`` to ``(i+1)*block``) attends only to keys ``0`` to ``(i+1)*block``: the
blocks above the diagonal, all masked, are never computed, and each block's softmax is the exact
two-pass softmax over all the keys it sees. The forward pass keeps each block's softmax weights (about
half of the [seq, seq] weights) for the backward pass, which is written out so that every matmul is a
plain ``[m, k] @ [k, n]`` of operands as they lie in memory (heads-major; only the small [seq, head_dim]
operands are transposed): XLA:CPU's matmul kernels take that form, and for the autodiff'd attention it
copies the whole [heads, seq, seq] score gradient transposed for ``dK = dS^T Q``. Here ``dK^T = Q^T dS``
and ``dV^T = dO^T P`` read each block's score gradient and weights as they are.

Blocks of 256 rows: at gpt2-small's T=1024, 128 computes less of the masked half (56% of the full
scores instead of 62.5%) but makes twice the operations, and its training step was slower (measured
6.26 s against 6.03 s at batch 1, 31.9 s against 28.0 s at batch 4, on a shared 2-core CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BLOCK = 256


def _blocks(seq: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, seq)) for start in range(0, seq, block)]


def _nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` over the last two axes, batched over the others, accumulated in float32."""
    return jnp.einsum("...mk,...kn->...mn", a, b, preferred_element_type=jnp.float32)


def _weights(q_block: jax.Array, k_t: jax.Array, start: int, scale: float) -> jax.Array:
    """Softmax weights [batch, heads, rows, keys] of a query block starting at ``start`` over the keys
    up to its last row (``k_t``: [batch, heads, head_dim, keys])."""
    rows, keys = q_block.shape[-2], k_t.shape[-1]
    scores = _nn(q_block, k_t) * scale
    causal = jnp.arange(keys)[None, :] <= start + jnp.arange(rows)[:, None]
    scores = jnp.where(causal, scores, -jnp.inf)
    scores = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    return scores / scores.sum(axis=-1, keepdims=True)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, block: int):
    seq, head_dim = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim)
    qh, vh = (a.transpose(0, 2, 1, 3) for a in (q, v))  # [batch, heads, seq, head_dim]
    k_t = k.transpose(0, 2, 3, 1)  # [batch, heads, head_dim, seq]
    weights, outs = [], []
    for start, end in _blocks(seq, block):
        p = _weights(qh[:, :, start:end], k_t[..., :end], start, scale)
        weights.append(p)
        outs.append(_nn(p.astype(v.dtype), vh[:, :, :end]).astype(v.dtype))
    out = jnp.concatenate(outs, axis=2)
    return out.transpose(0, 2, 1, 3), (qh, k_t, vh, out, weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    return _forward(q, k, v, block)[0]


def _attention_fwd(q, k, v, block):
    return _forward(q, k, v, block)


# Each block's dK^T and dV^T cover a prefix of the keys; padded to the whole sequence, their sum is one
# loop fusion (with the transpose back to [batch, seq, heads, head_dim]).
def _pad_keys(x: jax.Array, seq: int) -> jax.Array:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, seq - x.shape[-1])])


def _attention_bwd(block, res, g):
    qh, k_t, vh, out, weights = res
    seq, head_dim = qh.shape[2], qh.shape[3]
    scale = 1.0 / math.sqrt(head_dim)
    dtype = qh.dtype
    gh = g.transpose(0, 2, 1, 3)
    # softmax's backward subtracts sum_k P dP = sum_d dO O per row
    delta = jnp.sum(gh.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    kh, v_t, q_t, g_t = k_t.swapaxes(2, 3), vh.swapaxes(2, 3), qh.swapaxes(2, 3), gh.swapaxes(2, 3)
    dq, dk_t, dv_t = [], [], []
    for (start, end), p in zip(_blocks(seq, block), weights):
        ds = p * (_nn(gh[:, :, start:end], v_t[..., :end]) - delta[:, :, start:end]) * scale
        ds = ds.astype(dtype)
        dq.append(_nn(ds, kh[:, :, :end]).astype(dtype))
        dk_t.append(_pad_keys(_nn(q_t[..., start:end], ds), seq))
        dv_t.append(_pad_keys(_nn(g_t[..., start:end], p.astype(dtype)), seq))
    dq = jnp.concatenate(dq, axis=2).transpose(0, 2, 1, 3)
    dk = sum(dk_t).astype(k_t.dtype).transpose(0, 3, 1, 2)
    dv = sum(dv_t).astype(vh.dtype).transpose(0, 3, 1, 2)
    return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = BLOCK) -> jax.Array:
    """Causal softmax(q k^T / sqrt(head_dim)) v, q, k, v: [batch, seq, heads, head_dim], computed in
    query blocks of ``block`` rows; scores and softmax in float32, the result in ``v``'s dtype."""
    return _attention(q, k, v, block)
