"""The transformer that Llama 3 and Qwen3 share, as the book's chapter-5 bonus material builds it
(``ch05/07_gpt_to_llama``, ``ch05/11_qwen3``), name for name: RMSNorm, compute_rope_params / apply_rope,
FeedForward (SwiGLU), GroupedQueryAttention, TransformerBlock.

What differs from GPT-2 (:mod:`gptjax.model`): RMSNorm instead of LayerNorm, rotary position embeddings
(RoPE, split-halves style as the book and Hugging Face compute it) instead of learned ones, a gated SiLU
feed-forward, grouped-query attention (``n_kv_groups`` key/value heads, each serving several query heads),
no biases and no dropout. Qwen3 adds RMSNorm on queries and keys (``qk_norm``) and a ``head_dim`` of its own;
Llama 3 scales RoPE's low frequencies (``rope_freq``). The family modules (:mod:`gptjax.qwen3`,
:mod:`gptjax.llama3`) hold the configs; the model classes here take any config with these fields.

The model's call is GPT-2's (:class:`gptjax.model.GPTModel`): logits, or with a KV cache the logits and the
updated cache, so :func:`gptjax.model.apply`, :func:`~gptjax.model.apply_with_cache` and
:func:`~gptjax.model.init_params` serve every family.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import attention
from gptjax.model import KVCache, LayerCache, embedding_init, linear


class RopeFreq(NamedTuple):
    """Llama 3's RoPE frequency scaling (the book's ``rope_freq``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_context_length: int


def check_config(cfg: Any) -> None:
    """The checks every family's config makes on construction: sizes positive, query heads a multiple of the
    key/value groups, an even head size (RoPE rotates pairs)."""
    name = type(cfg).__name__
    for field in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim", "n_kv_groups"):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}.{field} must be a positive integer, got {value!r}")
    if cfg.n_heads % cfg.n_kv_groups:
        raise ValueError(f"{name}.n_heads ({cfg.n_heads}) must be a multiple of n_kv_groups ({cfg.n_kv_groups})")
    if cfg.head_dim <= 0 or cfg.head_dim % 2:
        raise ValueError(f"{name}.head_dim must be a positive even number (RoPE rotates pairs), got {cfg.head_dim}")


def compute_rope_params(head_dim: int, theta_base: float, positions: jax.Array,
                        freq_config: RopeFreq | None = None) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [..., head_dim] of the rotary embedding at ``positions`` (the book precomputes them for
    every position up to the context length; computing them for the positions at hand costs less than reading
    a 40,960-row table). ``freq_config``: Llama 3's scaling of the low frequencies."""
    inv_freq = 1.0 / (theta_base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if freq_config is not None:
        inv_freq = _llama3_scaled(inv_freq, freq_config)
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _llama3_scaled(inv_freq: jax.Array, f: RopeFreq) -> jax.Array:
    """Llama 3's frequency scaling: wavelengths past the original context divided by ``factor``, the short ones
    kept, the band between blended smoothly."""
    low_freq_wavelen = f.original_context_length / f.low_freq_factor
    high_freq_wavelen = f.original_context_length / f.high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / f.factor, inv_freq)
    smooth = (f.original_context_length / wavelen - f.low_freq_factor) / (f.high_freq_factor - f.low_freq_factor)
    smoothed = (1 - smooth) * (inv_freq / f.factor) + smooth * inv_freq
    medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` [batch, seq, heads, head_dim] by the angles of its positions (cos, sin [batch or 1, seq,
    head_dim]), in float32; the result in ``x``'s dtype."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm, computed in float32 whatever the compute dtype (as Qwen3 requires), with a learned ``scale``."""

    def __init__(self, emb_dim: int, eps: float = 1e-6):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((emb_dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        norm_x = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (norm_x * self.scale[...]).astype(x.dtype)


class FeedForward(nnx.Module):
    """SwiGLU: ``fc3(silu(fc1(x)) * fc2(x))``."""

    def __init__(self, cfg: Any, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.fc1 = linear(cfg.emb_dim, cfg.hidden_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.fc2 = linear(cfg.emb_dim, cfg.hidden_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.fc3 = linear(cfg.hidden_dim, cfg.emb_dim, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc3(jax.nn.silu(self.fc1(x)) * self.fc2(x))


class GroupedQueryAttention(nnx.Module):
    """Causal attention with ``num_heads`` query heads and ``num_kv_groups`` key/value heads, RoPE on queries
    and keys (after RMSNorm on each head with ``qk_norm``)."""

    def __init__(self, d_in: int, num_heads: int, num_kv_groups: int, head_dim: int, *, qk_norm: bool,
                 norm_eps: float, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if num_heads % num_kv_groups:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_groups ({num_kv_groups})")
        self.num_heads, self.num_kv_groups, self.head_dim = num_heads, num_kv_groups, head_dim
        self.W_query = linear(d_in, num_heads * head_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.W_key = linear(d_in, num_kv_groups * head_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.W_value = linear(d_in, num_kv_groups * head_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.out_proj = linear(num_heads * head_dim, d_in, use_bias=False, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, *,
                 cache: LayerCache | None = None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        b, t, _ = x.shape
        queries = self.W_query(x).reshape(b, t, self.num_heads, self.head_dim)
        keys = self.W_key(x).reshape(b, t, self.num_kv_groups, self.head_dim)
        values = self.W_value(x).reshape(b, t, self.num_kv_groups, self.head_dim)
        if self.q_norm is not None:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        queries, keys = apply_rope(queries, cos, sin), apply_rope(keys, cos, sin)
        if cache is None:
            context, new_kv = attention.self_attention(queries, keys, values), None
        else:
            context, new_kv = attention.cached_attention(queries, keys, values, cache.kv, cache.pos, cache.rows)
        return self.out_proj(context.reshape(b, t, -1)), new_kv


class TransformerBlock(nnx.Module):
    def __init__(self, cfg: Any, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.att = GroupedQueryAttention(cfg.emb_dim, cfg.n_heads, cfg.n_kv_groups, cfg.head_dim,
                                         qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(cfg, dtype=dtype, rngs=rngs)
        self.norm1 = RMSNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.norm2 = RMSNorm(cfg.emb_dim, eps=cfg.norm_eps)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, *,
                 cache: LayerCache | None = None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        shortcut = x
        x, new_kv = self.att(self.norm1(x), cos, sin, cache=cache)
        x = x + shortcut
        shortcut = x
        x = self.ff(self.norm2(x)) + shortcut
        return x, new_kv


@nnx.remat
def _block_rematerialized(block: TransformerBlock, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    return block(x, cos, sin)[0]


class GQAModel(nnx.Module):
    """Token embedding, blocks, final RMSNorm and output head; with ``cfg.tie_embeddings`` the head is the
    token embedding itself (one matrix, as the published Qwen3 0.6B-4B and Llama 3.2 are trained), else a
    separate ``out_head``. Logits are float32."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, remat: bool = False):
        self.cfg, self.remat = cfg, remat
        self.tok_emb = nnx.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=embedding_init, rngs=rngs)
        self.trf_blocks = nnx.List([TransformerBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.out_head = None if cfg.tie_embeddings else linear(
            cfg.emb_dim, cfg.vocab_size, use_bias=False, dtype=dtype, preferred_element_type=jnp.float32, rngs=rngs)

    def __call__(self, in_idx: jax.Array, *, rngs: nnx.Rngs | None = None, cache: KVCache | None = None,
                 pos: int | jax.Array = 0, cache_rows: jax.Array | None = None,
                 logits_at: jax.Array | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
        """As :meth:`gptjax.model.GPTModel.__call__` (``rngs`` is unused: these models have no dropout)."""
        cfg = self.cfg
        _, seq_len = in_idx.shape
        if seq_len > cfg.context_length:
            raise ValueError(f"sequence length {seq_len} exceeds the model's context_length {cfg.context_length}")
        positions = jnp.asarray(pos)[..., None] + jnp.arange(seq_len)
        cos, sin = compute_rope_params(cfg.head_dim, cfg.rope_base, jnp.atleast_2d(positions), cfg.rope_freq)
        x = self.tok_emb(in_idx)
        new_cache = []
        for i, block in enumerate(self.trf_blocks):
            if self.remat and cache is None:
                x, layer_cache = _block_rematerialized(block, x, cos, sin), None
            else:
                x, layer_cache = block(x, cos, sin,
                                       cache=None if cache is None else LayerCache(cache[i], pos, cache_rows))
            new_cache.append(layer_cache)
        if logits_at is not None:
            x = jax.lax.dynamic_slice_in_dim(x, logits_at, 1, axis=1)
        x = self.final_norm(x)
        if self.out_head is None:
            logits = jnp.einsum("bte,ve->btv", x, self.tok_emb.embedding[...].astype(x.dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = self.out_head(x)
        return logits if cache is None else (logits, new_cache)


def untie_head(params: dict[str, Any], cfg: Any) -> tuple[dict[str, Any], Any]:
    """The same model with its tied output head as a layer of its own, whose kernel is the token embedding
    transposed: the same logits. Decoding on CPU runs on it (:func:`gptjax.sampling.decoding_weights`), where a
    Linear layer's kernel goes through the compiled matmul at its stored width (bfloat16, int8) instead of
    XLA's dot over the float32 embedding, a third of Qwen3-0.6B's bytes a step."""
    if not cfg.tie_embeddings:
        return params, cfg
    return {**params, "out_head": {"kernel": params["tok_emb"]["embedding"].T}}, cfg.replace(tie_embeddings=False)
