"""gptjax's compiled CPU kernels (``gptjax/csrc/``) through XLA's FFI: two for decoding, one for bf16 training.

Two things a batch-1 decode step on XLA:CPU does badly (benchmarks/NOTES.md):

* **the matrix-vector products** (:func:`weights_matmul`): XLA:CPU has no dot that reads bfloat16 or int8
  weights beside float32 activations; it widens the whole kernel into a float32 buffer first, so decoding
  from smaller weights was slower than from float32. This kernel reads the weights as stored and widens
  them in registers, so a step, bound by the bytes of weight it reads, reads 2 or 1 bytes per weight
  instead of 4. From bfloat16 weights, activations, products and sums stay float32. From int8 weights the
  activations are rounded to int8 as well, in blocks of 32 with a float32 scale each, and each block's
  products summed exactly as integers (AVX-512 VNNI: 64 multiply-adds an instruction, where float32 does
  16); past one row a step is bound by arithmetic, and this took gpt2-small's decode step at 8 rows from
  30 to 17 ms. Every loop computes the same integers and rounds alike, so they agree bit for bit. From
  float32 weights too it streams the weights faster than XLA's dot does at these shapes (gpt2-small's 73
  decode-step matmuls: 17.9 ms against 23.4 ms, benchmarks/NOTES.md).
* **the KV cache** (:func:`cached_attention`): writing the new key and value into the cache and attending
  over it in one loop iteration makes XLA copy every layer's cache slabs several times a token. This
  kernel updates the cache in place (its operands are aliased to its results) and reads only the filled
  slots.

And one for training in bfloat16 (:func:`swap_last_axes`): a transpose written out in memory, so that a
weight gradient's product stays bfloat16 (:mod:`gptjax.platform`'s table says why).

The library is built when gptjax is installed (``setup.py``; it needs a C++ compiler). Where it was not
built, :func:`unavailable` says so and :mod:`gptjax.platform` uses XLA alone (same values, slower; from
int8 weights, float32 activations). Used
only for CPU programs: the matmul up to :func:`row_limit` rows of activations (past that, XLA's float32 GEMM
on the widened kernel is faster), attention for one new position.
Each kernel has an AVX-512, an AVX2 and a portable loop and takes the widest this CPU runs; ``isa=`` forces
one (for testing them).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np

# The most rows of activations the model sends through weights_matmul from float32 weights: past that, XLA's
# GEMM is faster. From bfloat16 weights XLA first widens the whole kernel, which costs more than this
# kernel's arithmetic up to MAX_STORED_ROWS (a prompt chunk of gpt2-small: 16 rows 72 ms against XLA's 190,
# 64 rows 213 against 293; benchmarks/NOTES.md). From int8 weights the kernel's int8 dot products beat XLA's
# float32 GEMM at every length measured (gpt2-small's matmuls: 256 rows 0.13-0.16 s against 0.31 s, 1024
# rows 0.61-0.67 s against 0.93 s), so int8 has no limit: every CPU product with int8 weights is int8 x int8.
MAX_ROWS = 8
MAX_STORED_ROWS = 64


def row_limit(dtype) -> int | None:
    """The most rows :func:`weights_matmul` takes for weights of ``dtype`` (None: any number)."""
    return {"float32": MAX_ROWS, "bfloat16": MAX_STORED_ROWS, "int8": None}[jnp.dtype(dtype).name]
ISAS = ("auto", "avx512", "avx2", "portable")  # gptjax::Isa in tasks.h, in its order
_LIBRARY = "gptjax._cpu_kernels"
_TARGETS = {"bfloat16": ("gptjax_matmul_bf16", "GptjaxMatmulBf16"), "int8": ("gptjax_matmul_int8", "GptjaxMatmulInt8"),
            "float32": ("gptjax_matmul_f32", "GptjaxMatmulF32"),
            "attention": ("gptjax_cached_attention", "GptjaxCachedAttention"),
            "swap_last_axes": ("gptjax_swap_last_axes_bf16", "GptjaxSwapLastAxesBf16")}


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library with its handlers registered with XLA (once), or why it could not be."""
    spec = importlib.util.find_spec(_LIBRARY)
    if spec is None or spec.origin is None:
        return (f"{_LIBRARY} was not built when gptjax was installed (it needs a C++ compiler; "
                "reinstall with one, e.g. `pip install -e .`)")
    library = ctypes.CDLL(spec.origin)
    for target, symbol in _TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return library


def unavailable() -> str | None:
    """Why the compiled kernels cannot be used in this installation (None: they can)."""
    library = _library()
    return library if isinstance(library, str) else None


def supported_isas() -> tuple[str, ...]:
    """The loops this CPU runs, widest first ("avx512", "avx2", "portable"); () without the library."""
    if unavailable() is not None:
        return ()
    bits = _library().gptjax_supported_isas()
    return tuple(name for i, name in enumerate(ISAS) if i > 0 and bits & (1 << i))


def _isa_code(isa: str) -> np.int32:
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    if isa != "auto" and isa not in supported_isas():
        raise ValueError(f"this CPU cannot run the {isa} loop; it runs {supported_isas()}")
    return np.int32(ISAS.index(isa))


def _check_available() -> None:
    if (reason := unavailable()) is not None:
        raise RuntimeError(reason)


def weights_matmul(x: jax.Array, values: jax.Array, scale: jax.Array | None = None, *,
                   isa: str = "auto") -> jax.Array:
    """``x @ values`` (times ``scale`` per column for int8, with x rounded to int8 in blocks of 32 along k)
    in float32, for x [rows, k] float32 with rows <= :func:`row_limit` of the weights' dtype and values
    [k, n] float32 or bfloat16 (no scale) or int8 (with its [n] float32 scale).

    Only for programs lowered for the CPU, and only where :func:`unavailable` is None. Under ``jax.vmap``
    of the activations (the weights unbatched), the mapped rows are more rows of the same call. Not
    differentiable (:func:`gptjax.platform.float32_weights_matmul` is)."""
    _check_available()
    if values.dtype not in (jnp.bfloat16, jnp.float32, jnp.int8):
        raise ValueError("weights_matmul reads bfloat16 or float32 weights, or int8 weights with a scale; got "
                         f"{values.dtype}")
    most = row_limit(values.dtype)
    if x.ndim != 2 or (most is not None and x.shape[0] > most) or x.dtype != jnp.float32:
        rows = "rows" if most is None else f"rows <= {most}"
        raise ValueError(f"weights_matmul needs float32 x of shape [{rows}, k], got {x.dtype}{x.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], values.shape[1]), jnp.float32)
    if values.dtype == jnp.int8:
        if scale is None:
            raise ValueError("int8 weights need their per-column scale")
        call = jax.ffi.ffi_call(_TARGETS["int8"][0], out, vmap_method="expand_dims")
        return call(x, values, scale.astype(jnp.float32), isa=_isa_code(isa))
    if scale is not None:
        raise ValueError(f"{values.dtype} weights take no scale")
    call = jax.ffi.ffi_call(_TARGETS[str(values.dtype)][0], out, vmap_method="expand_dims")
    return call(x, values, isa=_isa_code(isa))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                     pos: jax.Array, cache_rows: jax.Array | None = None, *,
                     isa: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
    """One new position's attention over a KV cache, and the cache with that position written.

    q: [rows, heads, head_dim], k, v: [rows, groups, head_dim] float32, the new queries, keys and values of
    each row (``groups`` dividing ``heads``: key/value head g serves the g-th run of heads / groups query
    heads, grouped-query attention); cache_k, cache_v: [cache_rows, groups, slots, head_dim] float32; pos:
    [rows] int32, each row's position; ``cache_rows``:
    [rows] int32, the cache row each row reads and writes (default: row r uses cache row r, and then the
    cache has ``rows`` rows). Writes row r's key and value at slot pos[r] (clamped into the cache) and
    returns (the attention output [rows, heads, head_dim] of each query over slots 0..pos[r], the new
    cache_k, the new cache_v): what :func:`gptjax.attention.causal_attention` computes for one query over the
    updated cache. A row at a negative position writes and reads nothing (its output is NaN): padding.
    Rows at positions >= 0 must name distinct cache rows. The caches are updated in place where XLA can
    give their buffers to the results (a donated or loop-carried cache).
    """
    _check_available()
    rows, groups, slots, head_dim = ((q.shape[0], *cache_k.shape[1:]) if cache_k.ndim == 4 and q.ndim == 3
                                     else (None,) * 4)
    if cache_rows is None:
        cache_rows = jnp.arange(cache_k.shape[0] if cache_k.ndim == 4 else 0, dtype=jnp.int32)
    if (cache_k.ndim != 4 or cache_v.shape != cache_k.shape or q.shape[::2] != (rows, head_dim)
            or q.shape[1] % groups or k.shape != (rows, groups, head_dim) or v.shape != k.shape
            or pos.shape != (rows,) or cache_rows.shape != (rows,)):
        raise ValueError("cached_attention needs q [rows, heads, head_dim], k, v [rows, groups, head_dim] with groups "
                         "dividing heads, caches [cache_rows, groups, slots, head_dim] and pos, cache_rows [rows]; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}, caches {cache_k.shape} {cache_v.shape}, pos "
                         f"{pos.shape}, cache_rows {cache_rows.shape}")
    if not all(a.dtype == jnp.float32 for a in (q, k, v, cache_k, cache_v)):
        raise ValueError("cached_attention reads float32 queries, keys, values and caches")
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(cache_k.shape, jnp.float32),
           jax.ShapeDtypeStruct(cache_v.shape, jnp.float32))
    # Under vmap, one call per mapped element: the cache rows index each element's own cache.
    call = jax.ffi.ffi_call(_TARGETS["attention"][0], out, input_output_aliases={3: 1, 4: 2},
                            vmap_method="sequential")
    return call(q, k, v, cache_k, cache_v, pos.astype(jnp.int32), cache_rows.astype(jnp.int32), isa=_isa_code(isa))


def swap_last_axes(x: jax.Array) -> jax.Array:
    """``x`` bfloat16 [..., m, k] as [..., k, m], written out in memory: a call XLA cannot see into, so it
    cannot fold the transpose into a following dot's dimension numbers (gptjax/csrc/transpose.cc says why
    that matters). Only for programs lowered for the CPU, and only where :func:`unavailable` is None."""
    _check_available()
    if x.ndim < 2 or x.dtype != jnp.bfloat16:
        raise ValueError(f"swap_last_axes takes a bfloat16 array of at least two axes, got {x.dtype}{x.shape}")
    out = jax.ShapeDtypeStruct((*x.shape[:-2], x.shape[-1], x.shape[-2]), x.dtype)
    return jax.ffi.ffi_call(_TARGETS["swap_last_axes"][0], out, vmap_method="expand_dims")(x)
