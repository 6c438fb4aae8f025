"""Text generation (chapter 5's ``generate``) with a KV cache, and the sampling filters it composes.

Decoding strategy:

* The logits filters (:func:`top_k_filter`, :func:`apply_temperature`, :func:`top_p_filter`) and
  :func:`sample_next` are pure functions of any logits array, in the book's order: top-k, then
  temperature, then (our addition) top-p, then a categorical draw. Temperature 0 is greedy argmax.
* :func:`sample_rows` is the sampler :func:`generate` and the serving engine share: the same filters with
  each row's settings as arrays and its own key, on the 64 largest logits where they hold the answer
  (top-k up to 64, most top-p nuclei) and over the whole vocabulary, without sorting it, where they do
  not; sampling then costs a step little more than greedy's argmax.
* :func:`generate` prefills the prompt once, then decodes inside jitted ``jax.lax.while_loop``
  calls: one token per iteration, no host round trip per token, an early exit once every row has
  emitted ``eos_id``. Attention reads every slot of the KV cache, so the cache grows in power-of-two
  buckets (64, 128, ... up to ``context_length``), one compiled loop per bucket: a step reads and
  writes at most twice the filled length, not ``context_length`` slots (GPT-2's 1024). A bucket's
  program depends on the batch and the bucket only, so short and long continuations share them; the
  next bucket's compiles on a background thread while the current one decodes (from jax's persistent
  compilation cache, which the command-line tools turn on, it loads instead).
* ``weights_dtype`` "bfloat16" or "int8" stores the matmul kernels smaller (:mod:`gptjax.quantize`);
  each decode step reads them as stored (on CPU through :mod:`gptjax.cpu_kernels`).
* Prompts are right-padded to a power-of-two bucket: the causal mask means padding never
  influences the real positions, and the first decode step overwrites the padded cache slots
  before anything reads them, so a handful of compiles serve every prompt length and
  ``max_new_tokens``.
* GPT-2's positions are learned and absolute: once the sequence outgrows ``context_length`` the
  window slides (the model sees the last ``context_length`` tokens, as in the book) and every
  cached key/value is at the wrong position. From then on each token costs one full-window
  forward pass, which is exactly "rebuild the cache from the last context_length - 1 tokens and
  decode one".
"""

from __future__ import annotations

import concurrent.futures
import functools
import warnings
from collections.abc import Collection
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import cpu_kernels, platform
from gptjax.buckets import length_bucket
from gptjax.config import GPTConfig
from gptjax.model import Params, apply, apply_with_cache, init_cache
from gptjax.gqa import untie_head
from gptjax.quantize import check_weights_dtype, quantize_params

_MIN_KV_BUCKET = 64


# ---------------------------------------------------------------------------------------------
# Logits filters and the sampler: pure, jittable, any leading batch shape, vocab on the last axis.


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_temperature(temperature) -> None:
    if _is_concrete(temperature) and not float(temperature) >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")


def _check_top_k(top_k: int | None, vocab_size: int) -> None:
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be an integer in [1, {vocab_size}] (the vocabulary size) or None, got {top_k!r}")


def _check_top_p(top_p) -> None:
    if top_p is not None and _is_concrete(top_p) and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def apply_temperature(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """``logits / temperature``: below 1 sharpens the distribution, above 1 flattens it."""
    if _is_concrete(temperature) and not float(temperature) > 0.0:
        raise ValueError(f"apply_temperature needs temperature > 0, got {temperature!r}; use argmax for greedy")
    return logits / temperature


def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
    """Keep the ``top_k`` largest logits (and any ties with the k-th), set the rest to -inf."""
    _check_top_k(top_k, logits.shape[-1])
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth_largest, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches
    ``top_p`` (always at least the most likely one), set the rest to -inf."""
    _check_top_p(top_p)
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # A token stays if the more likely tokens have not yet reached top_p. top_p == 1 keeps
    # everything, even tokens that rounding pushes past a cumulative mass of exactly 1.
    n_keep = jnp.sum((mass_before < top_p) | (top_p >= 1.0), axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_next(
    logits: jax.Array,
    key: jax.Array | None,
    temperature: float | jax.Array = 0.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
    """The next token id (int32, logits' shape without the vocab axis).

    A Python ``temperature`` of 0 is greedy argmax (``key`` unused, may be None); otherwise top-k,
    temperature and top-p filtering, then one categorical draw per row from ``key``.
    """
    _check_temperature(temperature)
    _check_top_k(top_k, logits.shape[-1])
    _check_top_p(top_p)
    if _is_concrete(temperature) and float(temperature) == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sampling with temperature > 0 needs a key, e.g. jax.random.key(123)")
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    logits = apply_temperature(logits, temperature)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The per-row sampler that generate and the serving engine share.

CANDIDATES = 64  # the bounded candidate set: top-k up to this size, and most top-p nuclei of trained models
_BLOCK = 256  # the inverse-CDF draw over the vocabulary walks block sums, then one block


def _sortable(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order (negative floats' bits flipped, positives' sign bit set)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_key(keys: jax.Array, enough: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Per row, the largest uint32 ``t`` for which ``enough(keys >= t)`` holds (``enough`` of a [rows, vocab]
    mask gives [rows] bools, true for the all-true mask and monotone): 32 halvings of the key range, one
    pass over the vocabulary each, where a sort would cost a hundred times more on a CPU."""
    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        ok = enough(keys >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    rows = keys.shape[0]
    bounds = (jnp.zeros(rows, jnp.uint32), jnp.full(rows, 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, halve, bounds)[0]


def _last_positive(w: jax.Array) -> jax.Array:
    return w.shape[-1] - 1 - jnp.argmax(jnp.flip(w > 0, axis=-1), axis=-1)


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Per row, the index drawn from the (unnormalised, nonnegative) ``weights`` [rows, n] by the uniform
    ``u`` [rows] in [0, 1): the first index whose cumulative weight exceeds ``u`` times the total, found in
    blocks of _BLOCK so that no scan runs over the whole vocabulary. Never an index of weight 0."""
    rows, n = weights.shape
    blocks = -(-n // _BLOCK)
    w = jnp.pad(weights, ((0, 0), (0, blocks * _BLOCK - n))).reshape(rows, blocks, _BLOCK)
    block_mass = w.sum(-1)
    cum = jnp.cumsum(block_mass, axis=-1)
    target = u * cum[:, -1]
    b = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), _last_positive(block_mass))
    inner = jnp.take_along_axis(w, b[:, None, None], axis=1)[:, 0]
    rest = target - jnp.where(b > 0, jnp.take_along_axis(cum, jnp.maximum(b - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    j = jnp.minimum(jnp.sum(jnp.cumsum(inner, axis=-1) <= rest[:, None], axis=-1), _last_positive(inner))
    return (b * _BLOCK + j).astype(jnp.int32)


def _draw_from_vocabulary(logits: jax.Array, u: jax.Array, temperature: jax.Array, k: jax.Array,
                          top_p: jax.Array) -> jax.Array:
    """The exact draw over the whole vocabulary: top-k's and top-p's thresholds found by halving (each only
    when some row asks for it), the kept probabilities drawn from by ``u``."""
    vocab = logits.shape[-1]
    keys = _sortable(logits)
    zero = jnp.zeros(logits.shape[:1], jnp.uint32)
    kth = jax.lax.cond(jnp.any(k < vocab), lambda: _largest_key(keys, lambda m: jnp.sum(m, axis=-1) >= k),
                       lambda: zero)
    x = jnp.where(keys >= kth[:, None], logits / temperature[:, None], -jnp.inf)
    probs = jax.nn.softmax(x, axis=-1)
    nucleus = jax.lax.cond(
        jnp.any(top_p < 1.0),
        lambda: _largest_key(keys, lambda m: jnp.sum(jnp.where(m, probs, 0.0), axis=-1) >= top_p), lambda: zero)
    nucleus = jnp.where(top_p < 1.0, nucleus, 0)
    return _inverse_cdf(jnp.where(keys >= nucleus[:, None], probs, 0.0), u)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """One token per row of ``logits`` [rows, vocab], each row with its own settings ([rows] arrays, so one
    compiled program serves every mix): temperature 0 is argmax; otherwise top-k (0: off; ties with the
    k-th kept), temperature, top-p (1: off), and a draw with the row's key, as :func:`sample_next`
    filters. A row's token depends on its own logits, settings and key only, never on the other rows.

    The filters run on the CANDIDATES largest logits (one ``lax.top_k``), which hold the whole answer when
    top-k is at most CANDIDATES or the top-p nucleus ends inside them; a row whose answer they do not hold
    (no filter, a larger k, a wider nucleus, ties past the candidates) takes the exact draw over the whole
    vocabulary, computed only when some row needs it. Either draw inverts the kept probabilities' CDF with
    one uniform number from the row's key."""
    def sampled():
        vocab = logits.shape[-1]
        c = min(CANDIDATES, vocab)
        t = jnp.where(temperature > 0, temperature, 1.0)
        u = jax.vmap(jax.random.uniform)(keys)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        # The barrier keeps XLA:CPU's top-k a partial selection: where its operand also feeds a conditional
        # (the exact draw below), XLA turns it into a sort of the whole vocabulary, 100x slower.
        vals, ids, full = jax.lax.optimization_barrier((*jax.lax.top_k(logits, c), logits))
        kth = jnp.take_along_axis(vals, jnp.clip(k - 1, 0, c - 1)[:, None], axis=-1)[:, 0]
        k_inside = k <= c
        kept = jnp.where(k_inside[:, None], vals >= kth[:, None], True)
        x = vals / t[:, None]
        # Probabilities over what top-k kept: the candidates, or (no top-k) the whole vocabulary.
        lse = jnp.where(k_inside, jax.nn.logsumexp(jnp.where(kept, x, -jnp.inf), axis=-1),
                        jax.nn.logsumexp(full / t[:, None], axis=-1))
        probs = jnp.where(kept, jnp.exp(x - lse[:, None]), 0.0)
        before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.sum(kept & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0)), axis=-1)
        threshold = jnp.take_along_axis(vals, jnp.maximum(n_keep - 1, 0)[:, None], axis=-1)[:, 0]
        spill = (c < vocab) & (vals[:, -1] >= jnp.where(k_inside, kth, threshold))  # ties past the candidates
        inside = ~spill & (k_inside | ((k == vocab) & (top_p < 1.0) & (n_keep < c)))
        drawn = ids[jnp.arange(ids.shape[0]), _inverse_cdf(jnp.where(vals >= threshold[:, None], probs, 0.0), u)]
        exact = jax.lax.cond(jnp.any(~inside & (temperature > 0)),
                             lambda: _draw_from_vocabulary(full, u, t, k, top_p), lambda: drawn)
        # The first candidate is the argmax (top_k puts the lowest index first among ties, as argmax picks).
        return jnp.where(temperature > 0, jnp.where(inside, drawn, exact), ids[:, 0]).astype(jnp.int32)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def row_keys(key: jax.Array, rows: int) -> jax.Array:
    """The sampling key of each of ``rows`` sequences drawn with ``key``: row r's is ``fold_in(key, r)``, so
    a served request with seed s draws what row 0 of ``generate(..., rng=s)`` draws."""
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows))


def position_keys(keys: jax.Array, position: jax.Array) -> jax.Array:
    """Each row's key for the token at ``position`` (a scalar or one per row)."""
    return jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(position, keys.shape[:1]))


# ---------------------------------------------------------------------------------------------
# Generation.


# Up to this many positions, a cache that needs no growing (the compiled attention) is the whole context, so
# one program serves every continuation; Llama 3's 131,072 positions would be 8 GB a row.
_WHOLE_CACHE_SLOTS = 4096


def _kv_buckets(prompt_bucket: int, buffer_len: int, context: int, *, grow: bool = True) -> list[int]:
    """The cache lengths the decode loop runs at, shortest first: powers of two from the padded prompt
    (at least _MIN_KV_BUCKET) up to the last position the cache can hold, at most ``context``; without
    ``grow`` (:func:`gptjax.platform.decode_cache_grows`), one cache of the whole context, or of what the call
    needs where the context is longer than _WHOLE_CACHE_SLOTS."""
    if not grow:
        return [min(context, max(_WHOLE_CACHE_SLOTS, buffer_len))]
    last = min(buffer_len, context)
    buckets = [min(max(prompt_bucket, _MIN_KV_BUCKET), context)]
    while buckets[-1] < last:
        buckets.append(min(2 * buckets[-1], context))
    return buckets


class _Sampler(NamedTuple):
    """How each new token is chosen: arrays, one value per row (one compiled program serves every value)."""

    eos_ids: jax.Array  # int32 [k]: the ids that end a row (-1: none)
    keys: jax.Array  # [batch] keys (row_keys)
    temperature: jax.Array  # [batch] float32
    top_k: jax.Array  # [batch] int32; 0: off
    top_p: jax.Array  # [batch] float32; 1: off


class _State(NamedTuple):
    """The decode loop's carry, handed from one cache bucket's program to the next."""

    tokens: jax.Array  # [batch, slots + 1] int32: the sequence so far (prompt, then new tokens)
    cache: list  # the KV cache at `slots` slots
    done: jax.Array  # [batch] bool: the row has emitted eos
    length: jax.Array  # int32: tokens written; tokens[:, length - 1] is the last, not yet fed to the model


def _write_next(state: _State, logits: jax.Array, sampler: _Sampler, *, greedy: bool) -> _State:
    """Choose the token at position `length` from the logits that predict it and write it; rows already
    stopped repeat the id they stopped at."""
    tokens, cache, done, length = state
    if greedy:
        picked = sample_next(logits, None)
    else:
        picked = sample_rows(logits, position_keys(sampler.keys, length), sampler.temperature, sampler.top_k,
                             sampler.top_p)
    next_id = jnp.where(done, jax.lax.dynamic_index_in_dim(tokens, length - 1, axis=1, keepdims=False), picked)
    tokens = jax.lax.dynamic_update_slice(tokens, next_id[:, None], (0, length))
    return _State(tokens, cache, done | jnp.isin(next_id, sampler.eos_ids), length + 1)


def _running(state: _State, end: jax.Array) -> jax.Array:
    return (state.length < end) & ~jnp.all(state.done)


@functools.partial(jax.jit, static_argnames=("cfg", "slots", "greedy"))
def _prefill(params: Params, cfg: GPTConfig, padded_prompt: jax.Array, prompt_len: jax.Array, sampler: _Sampler,
             *, slots: int, greedy: bool) -> _State:
    """Run the padded prompt through the model once into a cache of ``slots`` positions, and choose the
    first new token. The prompt attends only to itself: it runs on a cache of its own width, padded to
    ``slots`` afterwards, instead of attending over every slot (on CPU the whole context)."""
    batch, width = padded_prompt.shape
    cache = init_cache(cfg, batch, slots=width)
    logits, cache = apply_with_cache(params, cfg, padded_prompt, cache, 0, logits_at=prompt_len - 1)
    cache = [{name: _pad_to(slab, 2, slots) for name, slab in layer.items()} for layer in cache]
    tokens = jnp.zeros((batch, slots + 1), jnp.int32).at[:, :width].set(padded_prompt)
    state = _State(tokens, cache, jnp.zeros((batch,), bool), prompt_len)
    return _write_next(state, logits[:, 0], sampler, greedy=greedy)


def _weights_for_step(params: Params, step: jax.Array) -> Params:
    """The weights one decode step of a loop reads, as stored (maybe quantized).

    A quantized tree is tied to the loop's step by a barrier: where a matmul widens its kernel to
    float32 first (see :func:`gptjax.platform.stored_weights_matmul`), the widening is loop-invariant,
    and XLA would hoist it out and keep a float32 copy of every kernel for the whole decode, which is
    the memory the smaller weights are there to save."""
    if all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params)):
        return params
    stored, _ = jax.lax.optimization_barrier((params, step))
    return stored


def _pad_to(array: jax.Array, axis: int, size: int) -> jax.Array:
    pad = [(0, 0)] * array.ndim
    pad[axis] = (0, size - array.shape[axis])
    return jnp.pad(array, pad)


def _decode_bucket(params: Params, cfg: GPTConfig, state: _State, end: jax.Array, sampler: _Sampler, *, slots: int,
                   greedy: bool) -> _State:
    """Decode with a cache of ``slots`` positions (the state's cache grown to it first) while the sequence
    is shorter than ``end`` and fits the cache: one token per iteration, each feeding the last token at
    its own position. Attention reads the whole cache it is given, so the cache grows in buckets, one
    program each: a step reads at most twice the filled length instead of all context_length slots."""
    tokens, cache, done, length = state
    state = _State(_pad_to(tokens, 1, slots + 1), [{name: _pad_to(slab, 2, slots) for name, slab in layer.items()}
                                                   for layer in cache], done, length)

    def body(state):
        last = jax.lax.dynamic_slice(state.tokens, (0, state.length - 1), (state.tokens.shape[0], 1))
        logits, cache = apply_with_cache(_weights_for_step(params, state.length), cfg, last, state.cache,
                                         state.length - 1)
        return _write_next(state._replace(cache=cache), logits[:, -1], sampler, greedy=greedy)

    return jax.lax.while_loop(lambda state: _running(state, end) & (state.length <= slots), body, state)


_BUCKET_STATIC = ("cfg", "slots", "greedy")
# A bucket's program, from a state of its own size (donated: the loop then updates that cache in place) or
# from the previous bucket's (grown into new buffers).
_decode_bucket_in_place = jax.jit(_decode_bucket, static_argnames=_BUCKET_STATIC, donate_argnums=(2,))
_decode_bucket_grown = jax.jit(_decode_bucket, static_argnames=_BUCKET_STATIC)


@functools.partial(jax.jit, static_argnames=("cfg", "width", "greedy"))
def _decode_sliding(params: Params, cfg: GPTConfig, tokens: jax.Array, done: jax.Array, length: jax.Array,
                    end: jax.Array, sampler: _Sampler, *, width: int, greedy: bool) -> tuple[jax.Array, jax.Array]:
    """Past the context the window slides and every position shifts each step: recompute the whole window
    for each token, into a buffer of ``width`` tokens. Returns the buffer and the length written."""
    context = cfg.context_length
    state = _State(_pad_to(tokens, 1, width), [], done, length)

    def body(state):
        window = jax.lax.dynamic_slice(state.tokens, (0, state.length - context), (state.tokens.shape[0], context))
        logits = apply(_weights_for_step(params, state.length), cfg, window)[:, -1]
        return _write_next(state, logits, sampler, greedy=greedy)

    state = jax.lax.while_loop(lambda state: _running(state, end), body, state)
    return state.tokens, state.length


def _sampler_shapes(batch: int, n_eos: int = 1) -> _Sampler:
    """The abstract sampler of ``batch`` rows and ``n_eos`` end ids (what the decode programs are compiled for)."""
    def rows(dtype):
        return jax.ShapeDtypeStruct((batch,), dtype)
    keys = jax.eval_shape(lambda: row_keys(jax.random.key(0), batch))
    return _Sampler(jax.ShapeDtypeStruct((n_eos,), jnp.int32), keys, rows(jnp.float32), rows(jnp.int32), rows(jnp.float32))


def _state_shapes(cfg: GPTConfig, batch: int, slots: int) -> _State:
    """The abstract state a bucket of ``slots`` hands on (what the next bucket's program is compiled for)."""
    slab = jax.ShapeDtypeStruct((batch, cfg.n_kv_groups, slots, cfg.head_dim), jnp.float32)
    return _State(jax.ShapeDtypeStruct((batch, slots + 1), jnp.int32), [{"k": slab, "v": slab}] * cfg.n_layers,
                  jax.ShapeDtypeStruct((batch,), bool), jax.ShapeDtypeStruct((), jnp.int32))


# Compiled decode programs by what they were compiled for (like jit's own cache, which a program compiled
# ahead through .lower().compile() does not fill).
_COMPILED: dict[tuple, jax.stages.Compiled] = {}


class _Programs:
    """The compiled decode programs a call runs through, compiled ahead on one background thread in the
    order they are needed, so that the bucket a sequence grows into next compiles (or, from jax's
    persistent compilation cache, loads) while the current one decodes, not after it.

    The main thread traces nothing while the background thread does: it only runs compiled programs.
    """

    def __init__(self, params: Params, cfg: GPTConfig, sampler: _Sampler, end: np.int32, static: dict):
        self._params, self._cfg, self._end, self._sampler, self._static = params, cfg, end, sampler, static
        weights = tuple((leaf.shape, leaf.dtype, getattr(leaf, "sharding", None))
                        for leaf in jax.tree_util.tree_leaves(params))
        self._key = (cfg, jax.tree_util.tree_structure(params), weights, jax.random.key_impl(sampler.keys),
                     sampler.eos_ids.shape, tuple(sorted(static.items())))
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gptjax-compile")

    def bucket(self, batch: int, previous: int, slots: int) -> concurrent.futures.Future:
        def lower():
            program = _decode_bucket_in_place if previous == slots else _decode_bucket_grown
            return program.lower(self._params, self._cfg, _state_shapes(self._cfg, batch, previous), self._end,
                                 self._sampler, slots=slots, **self._static)
        return self._submit(("bucket", batch, previous, slots), lower)

    def sliding(self, batch: int, width: int) -> concurrent.futures.Future:
        def lower():
            state = _state_shapes(self._cfg, batch, self._cfg.context_length)
            return _decode_sliding.lower(self._params, self._cfg, state.tokens, state.done, state.length, self._end,
                                         self._sampler, width=width, **self._static)
        return self._submit(("sliding", batch, width), lower)

    def _submit(self, what: tuple, lower) -> concurrent.futures.Future:
        key = (*what, *self._key)

        def compile():
            if key not in _COMPILED:
                _COMPILED[key] = lower().compile()
            return _COMPILED[key]
        return self._pool.submit(compile)

    def close(self) -> None:
        """Drop the compiles not started (a row's eos ended the call early); one under way finishes."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _prompt_ids(token_ids: Any, cfg: GPTConfig) -> np.ndarray:
    """``token_ids`` as a non-empty [batch, prompt] integer array of the model's vocabulary."""
    ids = np.asarray(token_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be integer ids of shape [batch, prompt], got {ids.dtype} {ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"generate needs a non-empty prompt, got token_ids of shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got values in [{ids.min()}, {ids.max()}]")
    return ids


def _check_generate_settings(cfg: GPTConfig, max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
                             eos_id: Any, rng: Any, weights_dtype: str) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    _check_temperature(temperature)
    _check_top_k(top_k, cfg.vocab_size)
    _check_top_p(top_p)
    check_weights_dtype(weights_dtype)
    ids = [eos_id] if isinstance(eos_id, (int, np.integer)) else eos_id
    if ids is not None and (not ids or not all(isinstance(i, (int, np.integer)) and 0 <= i < cfg.vocab_size
                                               for i in ids)):
        raise ValueError(f"eos_id must be a token id in [0, {cfg.vocab_size}), a non-empty collection of them, "
                         f"or None, got {eos_id!r}")
    if float(temperature) != 0.0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs rng=jax.random.key(seed) (or an int seed)")


def decoding_weights(params: Params, cfg: GPTConfig, weights_dtype: str) -> tuple[Params, GPTConfig]:
    """The tree and config a decode runs on: the kernels stored as ``weights_dtype``, and on CPU a tied output
    head as a kernel of its own (:func:`gptjax.gqa.untie_head`; the same logits)."""
    if getattr(cfg, "tie_embeddings", False) and platform.head_as_kernel(params):
        params, cfg = untie_head(params, cfg)
    return quantize_params(params, weights_dtype), cfg


def generate(
    params: Params,
    cfg: GPTConfig,
    token_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Collection[int] | None = None,
    rng: jax.Array | int | None = None,
    weights_dtype: str = "float32",
) -> np.ndarray:
    """Continue ``token_ids`` [batch, prompt] by up to ``max_new_tokens`` tokens: int32 numpy
    [batch, prompt + new].

    ``temperature`` 0 is greedy (the book's ``generate_text_simple``); above 0, tokens are drawn
    from ``softmax(logits / temperature)`` after optional ``top_k`` / ``top_p`` filtering, with the
    jax key ``rng`` (or an int seed). With ``eos_id`` (an id, or several: a Llama 3 or Qwen3 model's
    end-of-turn and end-of-text), a row that emits one stops (its later positions repeat that id)
    and the call returns early, after the step at which the last row
    stopped. Prompts longer than the context are fine: the model sees the last
    ``context_length`` tokens, as in the book.

    ``weights_dtype`` ("float32", "bfloat16" or "int8") stores the matmul kernels in that format
    for decoding (:mod:`gptjax.quantize`; activations, accumulation, softmax and logits stay
    float32). ``params`` may also be a tree that :func:`gptjax.quantize.quantize_params` returned.
    """
    ids = _prompt_ids(token_ids, cfg)
    _check_generate_settings(cfg, max_new_tokens, temperature, top_k, top_p, eos_id, rng, weights_dtype)
    greedy = float(temperature) == 0.0
    if max_new_tokens == 0:
        return ids.astype(np.int32)
    key = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else (rng if rng is not None else jax.random.key(0))

    params, cfg = decoding_weights(params, cfg, weights_dtype)
    if weights_dtype != "float32" and jax.default_backend() == "cpu" and (why := cpu_kernels.unavailable()):
        warnings.warn(f"{why}; decoding from {weights_dtype} weights widens them to float32 every step, "
                      "slower than float32 weights", stacklevel=2)
    # The model only ever sees the last context_length tokens; older prompt tokens pass through.
    context = cfg.context_length
    head, prompt = ids[:, : max(0, ids.shape[1] - context)], ids[:, -context:].astype(np.int32)
    prompt_len = prompt.shape[1]
    buffer = np.zeros((ids.shape[0], length_bucket(prompt_len + max_new_tokens)), np.int32)
    buffer[:, :prompt_len] = prompt
    padded = buffer[:, : length_bucket(prompt_len, cap=context)]

    greedy_static = dict(greedy=greedy)
    batch = ids.shape[0]
    eos_ids = [-1] if eos_id is None else [eos_id] if isinstance(eos_id, (int, np.integer)) else sorted(eos_id)
    sampler = _Sampler(np.asarray(eos_ids, np.int32), row_keys(key, batch),
                       np.full(batch, temperature, np.float32), np.full(batch, top_k or 0, np.int32),
                       np.full(batch, 1.0 if top_p is None else top_p, np.float32))
    end = np.int32(prompt_len + max_new_tokens)
    buckets = _kv_buckets(padded.shape[1], buffer.shape[1], context, grow=platform.decode_cache_grows(params))
    state = _prefill(params, cfg, padded, np.int32(prompt_len), sampler, slots=buckets[0], **greedy_static)
    programs = _Programs(params, cfg, sampler, end, greedy_static)
    try:
        ahead = [programs.bucket(batch, previous, slots) for previous, slots in zip(buckets[:1] + buckets, buckets)]
        slides = prompt_len + max_new_tokens > context + 1  # the last bucket's buffer holds context + 1 tokens
        if slides:
            ahead.append(programs.sliding(batch, buffer.shape[1]))
        for program in ahead[: len(buckets)]:
            state = program.result()(params, state, end, sampler)
            length, done = int(state.length), bool(np.all(state.done))
            if length >= end or done:
                break
        if slides and length < end and not done:
            tokens, length = ahead[-1].result()(params, state.tokens, state.done, state.length, end, sampler)
            state = state._replace(tokens=tokens, length=length)
    finally:
        programs.close()
    tokens, n_new = state.tokens, int(state.length) - prompt_len
    new = np.asarray(tokens)[:, : prompt_len + int(n_new)]
    return np.concatenate([head.astype(np.int32), new], axis=1)
