"""Attention, and what each platform gets for it: the one home of gptjax's attention. The models
(:class:`gptjax.model.MultiHeadAttention`, :class:`gptjax.gqa.GroupedQueryAttention`) call three functions
here: :func:`causal_attention` (the book's, with dropout), :func:`self_attention` (a whole sequence, no
dropout) and :func:`cached_attention` (a chunk over the KV cache); each is chosen for the platform it is
compiled for (``jax.lax.platform_dependent``), and each takes grouped-query attention (fewer key/value heads
than query heads) as it takes multi-head attention.

=======================  ==========================  ========================  ======================
operation                CPU                         GPU                       TPU
=======================  ==========================  ========================  ======================
with dropout (training)  causal_attention            causal_attention          causal_attention
whole sequence           blocked, own backward       cuDNN flash (bf16/fp16)   XLA
KV cache, 1 new token    compiled kernel,            XLA (update, attend)      XLA (update, attend)
                         updated in place
KV cache, a chunk        XLA (update, attend)        the same                  the same
=======================  ==========================  ========================  ======================

Why (benchmarks/NOTES.md has the measurements):

- Blocked attention (below): XLA:CPU's attention computes the masked upper half of the scores, and its
  gradient copies the [heads, seq, seq] score gradient transposed. Query blocks that skip the masked
  blocks, and a backward pass whose matmuls read every operand as it lies, took gpt2-small's T=1024
  training step from 7.56 s to 6.03 s at batch 1 and from 46.2 s to 28.0 s at batch 4; attention alone
  (forward and backward, [1, 1024, 12, 64] float32) from ~180 ms to ~85 ms.
- cuDNN attention: flash attention that never materialises the [seq, seq] weights and skips the masked
  half; only in bf16/fp16, and only where cuDNN can be found when the function is traced
  (:func:`cudnn_attention_unavailable` says why not).
- KV cache at one new token (a decode step): in XLA the cache update is a dynamic-update-slice of the
  decode loop's carry that the same iteration reads for attention, and XLA:CPU's copy insertion copies
  every layer's K and V slabs several times a token; attention also reads every slot of the cache. The
  compiled attention of :mod:`gptjax.cpu_kernels` writes the new slot in place and reads only the filled
  ones. GPU and TPU programs keep XLA's update and attention.

The blocked attention: query block i (rows ``i*block`` to ``(i+1)*block``) attends only to keys ``0`` to
``(i+1)*block``: the blocks above the diagonal, all masked, are never computed, and each block's softmax is the exact
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
from typing import Callable

import jax
import jax.numpy as jnp

from gptjax import cpu_kernels


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_offset: int | jax.Array = 0,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
    kv_heads_major: bool = False,
) -> jax.Array:
    """Scaled dot-product attention with a causal mask.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, groups, head_dim], or
    [batch, groups, kv_len, head_dim] with ``kv_heads_major`` (the KV cache's layout), where ``groups``
    divides ``heads`` (grouped-query attention; ``groups == heads`` is multi-head attention). Query i sits at
    position ``q_offset + i`` (``q_offset`` a scalar or one per batch row) and key j at position j; a query attends to keys at positions <= its
    own. With a KV cache, keys past the filled part of the cache are therefore masked too.
    ``dropout`` is applied to the attention weights, as in the book. Scores and softmax are
    float32 whatever the input dtype.
    """
    batch, q_len, heads, head_dim = q.shape
    groups = k.shape[1 if kv_heads_major else 2]
    kv = "bhkd" if kv_heads_major else "bkhd"
    if groups != heads:  # grouped-query attention (Llama 3, Qwen3): each key/value head serves the
        # heads // groups query heads next to each other (the book's repeat_interleave), here as one more
        # axis of the matmul rather than repeated keys and values, which would copy a KV cache every step
        kv = kv.replace("h", "g")
        q = q.reshape(batch, q_len, groups, heads // groups, head_dim)
        scores = jnp.einsum(f"bqgrd,{kv}->bgrqk", q, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(batch, heads, q_len, -1) / math.sqrt(head_dim)
    else:
        scores = jnp.einsum(f"bqhd,{kv}->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    q_pos = jnp.asarray(q_offset)[..., None, None, None] + jnp.arange(q.shape[1])[:, None]  # [(batch, 1,) q, 1]
    k_pos = jnp.arange(k.shape[2 if kv_heads_major else 1])[None, :]
    scores = jnp.where(k_pos <= q_pos, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        weights = dropout(weights)
    if groups != heads:
        weights = weights.reshape(batch, groups, heads // groups, q_len, -1)
        return jnp.einsum(f"bgrqk,{kv}->bqgrd", weights.astype(v.dtype), v).reshape(batch, q_len, heads, -1)
    return jnp.einsum(f"bhqk,{kv}->bqhd", weights.astype(v.dtype), v)


def attend_with_cache(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], pos: int | jax.Array,
    cache_rows: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Write this chunk's keys and values at positions pos..pos+t-1 and attend over the whole
    preallocated cache; the causal mask hides the slots not yet written. The cache is heads-major
    ([batch, heads, slots, head_dim]): each decode step then reads it as it lies instead of
    transposing all of it.

    ``pos`` is a scalar or one position per batch row. ``cache_rows`` [batch] names the cache row each
    batch row reads and writes (a serving engine's slots); a row at a negative position is padding and
    leaves the cache as it was."""
    pos = jnp.asarray(pos, jnp.int32)
    if cache_rows is not None:
        pos = jnp.broadcast_to(pos, q.shape[:1])

        def write_rows(slab, new):
            # Row by row, only the new positions: in place, where a scatter of whole rows would copy the cache.
            new = new.swapaxes(1, 2).astype(slab.dtype)

            def one(r, slab):
                at = (cache_rows[r], 0, jnp.maximum(pos[r], 0), 0)
                update = jax.lax.dynamic_index_in_dim(new, r)
                kept = jax.lax.dynamic_slice(slab, at, update.shape)
                return jax.lax.dynamic_update_slice(slab, jnp.where(pos[r] >= 0, update, kept), at)

            return jax.lax.fori_loop(0, new.shape[0], one, slab)

        cache = {"k": write_rows(cache["k"], k), "v": write_rows(cache["v"], v)}
        context = causal_attention(q, cache["k"][cache_rows].astype(q.dtype), cache["v"][cache_rows].astype(q.dtype),
                                   q_offset=pos, kv_heads_major=True)
        return context, cache

    def write_rows(slots, new):
        if pos.ndim == 0:
            return jax.lax.dynamic_update_slice(slots, new.swapaxes(1, 2).astype(slots.dtype), (0, 0, pos, 0))
        return jax.vmap(lambda slots, new, at: jax.lax.dynamic_update_slice(
            slots, new.swapaxes(0, 1).astype(slots.dtype), (0, at, 0)))(slots, new, pos)

    cache = {"k": write_rows(cache["k"], k), "v": write_rows(cache["v"], v)}
    context = causal_attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), q_offset=pos,
                               kv_heads_major=True)
    return context, cache


BLOCK = 256


def _blocks(seq: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, seq)) for start in range(0, seq, block)]


def _nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` over the last two axes, batched over the others, accumulated in float32."""
    return jnp.einsum("...mk,...kn->...mn", a, b, preferred_element_type=jnp.float32)


def _weights(q_block: jax.Array, k_t: jax.Array, start: int, scale: float) -> jax.Array:
    """Softmax weights [batch, groups, reps * rows, keys] of a query block starting at ``start`` over the keys
    up to its last row (``q_block``: [batch, groups, reps * rows, head_dim], the ``reps`` query heads of a
    key/value head one after another; ``k_t``: [batch, groups, head_dim, keys])."""
    rows, keys = q_block.shape[-2], k_t.shape[-1]
    scores = _nn(q_block, k_t) * scale
    per_head = keys - start  # the keys end at the block's last row: that many rows per query head
    causal = jnp.arange(keys)[None, :] <= start + jnp.arange(rows)[:, None] % per_head
    scores = jnp.where(causal, scores, -jnp.inf)
    scores = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    return scores / scores.sum(axis=-1, keepdims=True)


# Grouped-query attention (Llama 3, Qwen3): the query heads of one key/value head are stacked into one block
# of rows, so that each matmul reads that head's keys and values once for all of them (no repeated K/V) and
# dK, dV sum over them inside the matmul. Multi-head attention is the case of one query head per group.
def _grouped(x: jax.Array, groups: int) -> jax.Array:
    """[batch, seq, heads, head_dim] -> [batch, groups, heads // groups, seq, head_dim]."""
    b, seq, heads, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, groups, heads // groups, seq, d)


def _rows(x: jax.Array, start: int, end: int) -> jax.Array:
    """Rows start..end of each query head of [batch, groups, reps, seq, head_dim], as [batch, groups,
    reps * (end - start), head_dim]."""
    b, g, r, _, d = x.shape
    return x[:, :, :, start:end].reshape(b, g, r * (end - start), d)


def _ungrouped(blocks: list[jax.Array], reps: int) -> jax.Array:
    """The blocks of :func:`_rows` back to [batch, seq, heads, head_dim]."""
    b, g, _, d = blocks[0].shape
    x = jnp.concatenate([y.reshape(b, g, reps, -1, d) for y in blocks], axis=3)
    return x.reshape(b, g * reps, -1, d).transpose(0, 2, 1, 3)


def _transposed(x: jax.Array) -> jax.Array:
    """``x`` with its last two axes swapped; in bfloat16 written out in memory, so that XLA:CPU multiplies
    it as bfloat16 (:mod:`gptjax.platform`'s table says why)."""
    if x.dtype == jnp.bfloat16 and cpu_kernels.unavailable() is None:
        return cpu_kernels.swap_last_axes(x)
    return x.swapaxes(-1, -2)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, block: int):
    seq, groups, head_dim = q.shape[1], k.shape[2], q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim)
    qg = _grouped(q, groups)  # [batch, groups, reps, seq, head_dim]
    vh = v.transpose(0, 2, 1, 3)  # [batch, groups, seq, head_dim]
    k_t = k.transpose(0, 2, 3, 1)  # [batch, groups, head_dim, seq]
    weights, outs = [], []
    for start, end in _blocks(seq, block):
        p = _weights(_rows(qg, start, end), k_t[..., :end], start, scale)
        weights.append(p)
        outs.append(_nn(p.astype(v.dtype), vh[:, :, :end]).astype(v.dtype))
    out = _ungrouped(outs, qg.shape[2])
    return out, (qg, k_t, vh, _grouped(out, groups), weights)


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
    qg, k_t, vh, out, weights = res
    groups, reps, seq, head_dim = qg.shape[1:]
    scale = 1.0 / math.sqrt(head_dim)
    dtype = qg.dtype
    gg = _grouped(g, groups)
    # softmax's backward subtracts sum_k P dP = sum_d dO O per row
    delta = jnp.sum(gg.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    kh, v_t = k_t.swapaxes(2, 3), vh.swapaxes(2, 3)
    dq, dk_t, dv_t = [], [], []
    for (start, end), p in zip(_blocks(seq, block), weights):
        g_rows = _rows(gg, start, end)
        ds = p * (_nn(g_rows, v_t[..., :end]) - _rows(delta, start, end)) * scale
        ds = ds.astype(dtype)
        dq.append(_nn(ds, kh[:, :, :end]).astype(dtype))
        dk_t.append(_pad_keys(_nn(_transposed(_rows(qg, start, end)), ds), seq))
        dv_t.append(_pad_keys(_nn(_transposed(g_rows), p.astype(dtype)), seq))
    dq = _ungrouped(dq, reps)
    dk = sum(dk_t).astype(k_t.dtype).transpose(0, 3, 1, 2)
    dv = sum(dv_t).astype(vh.dtype).transpose(0, 3, 1, 2)
    return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = BLOCK) -> jax.Array:
    """Causal softmax(q k^T / sqrt(head_dim)) v, q: [batch, seq, heads, head_dim], k, v: [batch, seq, groups,
    head_dim], computed in query blocks of ``block`` rows; scores and softmax in float32, the result in
    ``v``'s dtype."""
    return _attention(q, k, v, block)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def cudnn_attention_unavailable(q: jax.Array, k: jax.Array, v: jax.Array) -> str | None:
    """Why cuDNN's flash attention cannot be traced for these inputs here (None: it can)."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bfloat16 or float16 inputs, not {q.dtype}"
    try:
        jax.eval_shape(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
                       q, k, v)
    except (NotImplementedError, RuntimeError, ValueError) as e:  # no cuDNN, or a shape it does not support
        return f"cuDNN flash attention unavailable: {' '.join(str(e).split())[:200]}"
    return None


def cuda_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    if cudnn_attention_unavailable(q, k, v) is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return xla_attention(q, k, v)


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax(q k^T / sqrt(head_dim)) v over a whole sequence, q: [batch, seq, heads, head_dim],
    k, v: [batch, seq, groups, head_dim] (``groups`` divides ``heads``): what :func:`causal_attention` computes
    without dropout."""
    return jax.lax.platform_dependent(q, k, v, cpu=blocked_causal_attention, cuda=cuda_attention,
                                      default=xla_attention)


def compiled_cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array],
                              pos: jax.Array, cache_rows: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    rows = [y.reshape(y.shape[0], *y.shape[2:]) for y in (q, k, v)]
    out, cache_k, cache_v = cpu_kernels.cached_attention(*rows, cache["k"], cache["v"], jnp.broadcast_to(pos, q.shape[:1]),
                                                         cache_rows)
    return out.reshape(q.shape), {"k": cache_k, "v": cache_v}


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], pos: int | jax.Array,
                     cache_rows: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`attend_with_cache`, per platform: write the chunk's keys and values into the KV cache at
    positions pos..pos+t-1 (``pos`` a scalar or one per row) of cache rows ``cache_rows`` (None: row r of the
    batch is row r of the cache) and attend over them; q, k, v [batch, t, heads, head_dim]. Returns
    (context, new cache)."""
    pos = jnp.asarray(pos, jnp.int32)
    compiled = (q.shape[1] == 1 and cpu_kernels.unavailable() is None
                and all(a.dtype == jnp.float32 for a in (q, k, v, cache["k"], cache["v"])))
    if not compiled:
        return attend_with_cache(q, k, v, cache, pos, cache_rows)
    return jax.lax.platform_dependent(q, k, v, cache, pos, cache_rows, cpu=compiled_cached_attention,
                                      default=attend_with_cache)
