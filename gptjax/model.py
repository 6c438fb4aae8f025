"""The book's GPTModel (chapter 4) as Flax NNX modules, and the pure functions that run it.

Module and attribute names follow the book's PyTorch code, so the parameter tree reads like its
``state_dict``: ``trf_blocks[0]["att"]["W_query"]["kernel"]`` is ``trf_blocks.0.att.W_query.weight``
(transposed: Flax kernels are [in, out], torch Linear weights [out, in]).

The modules are built once per config and split into a static graph definition and a parameter
tree (a plain nested dict of arrays). Everything downstream (training, sampling, weight formats,
checkpoints) works on that tree through the pure functions at the bottom of this file.

Speed options (``apply``/``apply_with_cache`` keywords; the defaults compute what the book computes,
in float32, to within float rounding): ``dtype=jnp.bfloat16`` runs the matmuls in bfloat16 while the
parameters, residual stream, softmax, LayerNorm statistics and logits stay float32; ``remat=True``
recomputes each block's activations in the backward pass instead of storing them. Always on, as they
change nothing beyond rounding: a heads-major KV cache, and the per-platform choices of
:mod:`gptjax.platform` and :mod:`gptjax.attention` (the ``platform.`` and ``attention.`` calls below), made
for the platform a function is compiled for.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import attention, mesh_axes, platform
from gptjax.config import GPTConfig

Params = dict[str, Any]
KVCache = list[dict[str, jax.Array]]


class LayerCache(NamedTuple):
    """What one layer's attention reads and extends: its ``kv`` ("k", "v" [batch, heads, slots, head_dim]), the
    position of the chunk's first token (``pos``, a scalar or one per row) and the cache row of each batch row
    (``rows``; None: row r of the batch is row r of the cache)."""

    kv: dict[str, jax.Array]
    pos: int | jax.Array
    rows: jax.Array | None


# torch's default initialisers, so that training from scratch starts where the book's runs start
# (nn.Embedding: N(0, 1); nn.Linear: weight and bias uniform in +-1/sqrt(fan_in)).
embedding_init = jax.nn.initializers.normal(stddev=1.0)
_kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def linear(d_in: int, d_out: int, *, use_bias: bool, dtype: Any, rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
    """torch's nn.Linear as an NNX layer: its initialisation, and the platform's matmul (gptjax.platform)."""
    # dtype is the compute dtype: nnx.Linear casts its input and float32 parameters to it. The platform's
    # promotion and dot_general also take the stored bfloat16/int8 kernels of gptjax.quantize as they are.
    return nnx.Linear(
        d_in, d_out, use_bias=use_bias, dtype=dtype, kernel_init=_kernel_init, bias_init=_bias_init(d_in),
        promote_dtype=platform.linear_promote_dtype, dot_general=platform.linear_dot_general, rngs=rngs, **kwargs,
    )


class LayerNorm(nnx.Module):
    """LayerNorm with the book's parameter names; biased variance and eps 1e-5 like torch."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((emb_dim,), jnp.float32))
        self.shift = nnx.Param(jnp.zeros((emb_dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype: they are where low precision hurts.
        x32 = x.astype(jnp.float32)
        mean = platform.layer_norm_mean(x32)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        norm_x = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        # self.scale * norm_x + self.shift, its parameter gradients summed as the platform sums fastest
        return platform.scale_and_shift(norm_x, self.scale[...], self.shift[...]).astype(x.dtype)


class GELU(nnx.Module):
    """The tanh approximation of GELU used by GPT-2 and the book."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return 0.5 * x * (1.0 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (x + 0.044715 * x**3)))


class FeedForward(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        # A list rather than nnx.Sequential keeps the book's key names: ff.layers.0 / ff.layers.2.
        self.layers = nnx.List(
            [
                linear(cfg.emb_dim, 4 * cfg.emb_dim, use_bias=True, dtype=dtype, rngs=rngs),
                GELU(),
                linear(4 * cfg.emb_dim, cfg.emb_dim, use_bias=True, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class MultiHeadAttention(nnx.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_heads: int,
        dropout: float,
        qkv_bias: bool,
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = linear(d_in, d_out, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.W_key = linear(d_in, d_out, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.W_value = linear(d_in, d_out, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.out_proj = linear(d_out, d_out, use_bias=True, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None,
                 cache: LayerCache | None = None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        b, t, _ = x.shape
        qkv = platform.project_qkv(x, (self.W_query, self.W_key, self.W_value))
        q, k, v = (y.reshape(b, t, self.num_heads, self.head_dim) for y in qkv)
        new_kv = None
        if cache is not None:
            context, new_kv = attention.cached_attention(q, k, v, cache.kv, cache.pos, cache.rows)
        elif rngs is not None and self.dropout.rate > 0:
            dropout = functools.partial(self.dropout, deterministic=False, rngs=rngs)
            context = attention.causal_attention(q, k, v, dropout=dropout)
        else:
            context = attention.self_attention(q, k, v)
        return self.out_proj(context.reshape(b, t, -1)), new_kv


class TransformerBlock(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.att = MultiHeadAttention(
            cfg.emb_dim, cfg.emb_dim, cfg.n_heads, cfg.drop_rate, cfg.qkv_bias, dtype=dtype, rngs=rngs
        )
        self.ff = FeedForward(cfg, dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nnx.Dropout(cfg.drop_rate)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None,
                 cache: LayerCache | None = None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        drop = functools.partial(self.drop_shortcut, deterministic=rngs is None, rngs=rngs)
        x = platform.block_input(mesh_axes.split_over_batch(x))
        shortcut = x
        x, new_kv = self.att(self.norm1(x), rngs=rngs, cache=cache)
        # The residual stream stays float32: with bf16 compute, the branch output is promoted here.
        x = drop(x) + shortcut
        shortcut = x
        x = drop(self.ff(self.norm2(x))) + shortcut
        return x, new_kv


@nnx.remat
def _block_rematerialized(block: TransformerBlock, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """One block under jax.checkpoint: only its input is kept for the backward pass."""
    return block(x, rngs=rngs)[0]


class GPTModel(nnx.Module):
    """The book's GPTModel. ``dtype`` is the matmul compute dtype (parameters stay float32);
    ``remat`` recomputes each block's activations in the backward pass (training only)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, remat: bool = False):
        self.context_length = cfg.context_length
        self.remat = remat
        self.tok_emb = nnx.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=embedding_init, rngs=rngs)
        self.pos_emb = nnx.Embed(cfg.context_length, cfg.emb_dim, embedding_init=embedding_init, rngs=rngs)
        self.drop_emb = nnx.Dropout(cfg.drop_rate)
        self.trf_blocks = nnx.List([TransformerBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        # Logits in float32 straight from the matmul's accumulator, whatever the compute dtype.
        self.out_head = linear(
            cfg.emb_dim, cfg.vocab_size, use_bias=False, dtype=dtype, preferred_element_type=jnp.float32,
            rngs=rngs,
        )

    def __call__(
        self,
        in_idx: jax.Array,
        *,
        rngs: nnx.Rngs | None = None,
        cache: KVCache | None = None,
        pos: int | jax.Array = 0,
        cache_rows: jax.Array | None = None,
        logits_at: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits [batch, seq, vocab] in float32; with ``cache``, also the updated cache. ``pos`` (a scalar
        or one per row) is the first token's position; ``cache_rows`` and ``logits_at`` (see
        :func:`apply_with_cache`)."""
        _, seq_len = in_idx.shape
        if seq_len > self.context_length:
            raise ValueError(
                f"sequence length {seq_len} exceeds the model's context_length {self.context_length}; "
                f"pass at most the last {self.context_length} tokens"
            )
        x = self.tok_emb(in_idx) + self.pos_emb(jnp.asarray(pos)[..., None] + jnp.arange(seq_len))
        x = self.drop_emb(x, deterministic=rngs is None, rngs=rngs)
        new_cache = []
        for i, block in enumerate(self.trf_blocks):
            if self.remat and cache is None:
                x, layer_cache = _block_rematerialized(block, x, rngs), None
            else:
                x, layer_cache = block(x, rngs=rngs,
                                       cache=None if cache is None else LayerCache(cache[i], pos, cache_rows))
            new_cache.append(layer_cache)
        if logits_at is not None:  # a prefill needs one position's logits, not the head over every position
            x = jax.lax.dynamic_slice_in_dim(x, logits_at, 1, axis=1)
        logits = platform.logits(self.out_head, self.final_norm(x))
        return logits if cache is None else (logits, new_cache)


# ---------------------------------------------------------------------------------------------
# Functional API: the parameter tree is the single source of truth.


def model_class(cfg: Any) -> type[nnx.Module]:
    """The module a config describes: a model family's config names its class (``cfg.model_class``, as
    :class:`gptjax.qwen3.Qwen3Config` does); GPT-2's :class:`GPTConfig` is this module's GPTModel."""
    return getattr(cfg, "model_class", GPTModel)


def _compute_dtype(dtype: Any) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


@functools.lru_cache(maxsize=None)
def graphdef(cfg: GPTConfig, dtype: Any = jnp.float32, remat: bool = False) -> nnx.GraphDef:
    """The static structure of GPTModel for ``cfg`` (and compute options), built once (abstractly)."""
    abstract = nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0), dtype=dtype, remat=remat))
    return nnx.split(abstract)[0]


def model_from_params(
    params: Params, cfg: GPTConfig, *, dtype: Any = jnp.float32, remat: bool = False
) -> GPTModel:
    """The NNX module carrying ``params``: for interactive use and inside pure functions."""
    return nnx.merge(graphdef(cfg, _compute_dtype(dtype), remat), params)


def init_params(cfg: GPTConfig, seed: int | jax.Array = 0) -> Params:
    """A freshly initialised parameter tree: a nested dict of float32 arrays."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed

    @jax.jit
    def _init(key):
        return nnx.to_pure_dict(nnx.state(model_class(cfg)(cfg, rngs=nnx.Rngs(params=key)), nnx.Param))

    return _init(key)


def abstract_params(cfg: GPTConfig) -> Params:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, with nothing allocated."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


@functools.partial(jax.jit, static_argnames=("cfg", "train", "dtype", "remat"))
def apply(
    params: Params,
    cfg: GPTConfig,
    token_ids: jax.Array,
    *,
    train: bool = False,
    rng: jax.Array | None = None,
    dtype: Any = jnp.float32,
    remat: bool = False,
) -> jax.Array:
    """Logits [batch, seq, vocab] (float32) for ``token_ids`` [batch, seq].

    ``train=True`` turns dropout on and needs ``rng``, a fresh key per call. ``dtype`` is the
    matmul compute dtype (``jnp.bfloat16`` for mixed precision; parameters, softmax, LayerNorm
    statistics and logits stay float32). ``remat=True`` rematerialises each transformer block in
    the backward pass: less activation memory for about a third more compute.
    """
    if train and rng is None:
        raise ValueError("apply(train=True) needs rng=<a jax.random key> for dropout")
    model = model_from_params(params, cfg, dtype=dtype, remat=remat)
    return model(token_ids, rngs=nnx.Rngs(dropout=rng) if train else None)


def init_cache(cfg: GPTConfig, batch_size: int, dtype: Any = jnp.float32, slots: int | None = None) -> KVCache:
    """An empty KV cache for :func:`apply_with_cache`: "k" and "v" of shape
    [batch, n_kv_groups, slots, head_dim] per layer (GPT-2: n_kv_groups = n_heads), ``slots`` defaulting to
    context_length.

    Attention reads every slot of the cache it is given, so a cache only as long as the positions
    written so far makes a step's cache traffic follow the filled length (:mod:`gptjax.sampling`
    grows it in buckets); positions written must stay below ``slots``.
    """
    slots = cfg.context_length if slots is None else slots
    if not 1 <= slots <= cfg.context_length:
        raise ValueError(f"slots must be in [1, context_length={cfg.context_length}], got {slots}")
    shape = (batch_size, cfg.n_kv_groups, slots, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]


def apply_with_cache(
    params: Params,
    cfg: GPTConfig,
    token_ids: jax.Array,
    cache: KVCache,
    pos: int | jax.Array,
    *,
    cache_rows: jax.Array | None = None,
    logits_at: int | jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> tuple[jax.Array, KVCache]:
    """Logits for ``token_ids`` placed at positions pos..pos+seq-1, reading and extending ``cache``.

    Pure and traceable; callers jit it (``pos`` may be traced). ``pos`` is one position for the batch or
    one per row ([batch]). Positions must stay below context_length: the caller slides the window, as
    :mod:`gptjax.sampling` does. ``cache_rows`` [batch] int32 names the cache row each batch row reads
    and writes, for a cache with more rows than the batch (a serving engine's slots; None: row r is cache
    row r); rows at a negative position are padding, writing nothing. ``logits_at`` (an index into the
    sequence) returns that position's logits alone, [batch, 1, vocab]: what a prefill needs. ``dtype`` is
    the compute dtype as in :func:`apply`; the cache keeps its own dtype (see :func:`init_cache`).
    """
    return model_from_params(params, cfg, dtype=dtype)(token_ids, cache=cache, pos=pos, cache_rows=cache_rows,
                                                       logits_at=logits_at)


def param_count(params: Params) -> int:
    """Number of scalars in the parameter tree (the book counts out_head separately from tok_emb)."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
