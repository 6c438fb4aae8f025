"""What each platform gets, and why: the one place where gptjax computes differently on CPU, GPU and TPU.

Every choice here computes the same values (to float rounding) on every platform; only the program XLA
is given differs. One exception: the CPU's compiled matmul rounds activations to int8 where it meets int8
weights (below), as llama.cpp's q8_0 does, so int8 decode steps on CPU are int8 x int8. Attention's choices
are :mod:`gptjax.attention`'s. Each is made for the platform a function is *lowered* for, through
``jax.lax.platform_dependent``: both variants are traced, and lowering keeps only the one for the
target. So a train step compiled ahead of time for a TPU or GPU on a CPU-only machine
(``python -m gptjax.aot``) is the accelerator program, and one jitted function lowered for two
platforms gets each its own, whatever ``jax.default_backend()`` says.

=====================  =====================  ========================  ==================================
operation              CPU                    GPU                       TPU
=====================  =====================  ========================  ==================================
LayerNorm mean         matrix-vector product  reduction                 reduction
LayerNorm scale/shift  matrix-vector products reductions                reductions
gradients
q, k, v projections    three matmuls          one [d, 3d] matmul        one [d, 3d] matmul
logits matmul          50257 columns          padded to 50304           50257 columns
block input, backward  barrier (conditional)  plain                     plain
gradient norm          matrix-vector products reductions                reductions
Linear, <= 8 rows      compiled kernel,       XLA's dot (bf16 / int8    XLA's dot (bf16 / int8
(a decode step; bf16:  weights as stored      widened first)            widened first)
<= 64 rows; int8:      (int8: activations
any number)            int8 too, blocks of 32)
Linear, more rows      XLA's dot (bf16        the same                  the same
                       widened first)
Linear computing in    bf16 x bf16 dots,      XLA's dot                 XLA's dot
bf16 (mixed-precision  float32 result; the
training)              weight gradient's
                       input transposed in
                       memory (compiled call)
KV cache length        the whole context      grown in buckets          grown in buckets
                       (one decode program)   (64, 128, ...)            (64, 128, ...)
=====================  =====================  ========================  ==================================

Why (benchmarks/NOTES.md has the measurements):

- LayerNorm mean: left as a reduction, XLA:CPU fuses the residual chain (every earlier block's output
  and dropout mask) into each consumer and recomputes it there, O(n_layers^2) work, 30% of a 124M
  step. A matmul cannot absorb its operand, so the residual stream is materialised. GPU and TPU
  compilers do not recompute like this, and a reduction is cheaper there.
- LayerNorm scale/shift gradients (sums over every row): XLA:CPU makes each a YNNPACK reduce that, run
  beside the rest of the backward pass, took 10-14 ms for gpt2-small's [1024, 768] at T=1024 (0.25 ms
  alone), ~0.27 s of the step for its 25 LayerNorms; a ones-vector product is a plain GEMV (as the gradient
  norm's below).
- Fused QKV: one wide GEMM reads ``x`` once and fills a GPU or TPU better; on CPU the kernel
  concatenation and the wider weight-gradient GEMM cost more than they save. The parameter tree keeps
  the book's three Linear layers either way (the concatenation happens inside the jitted function).
- Padded vocabulary: a multiple of 64 gives the widest matmul of the model tensor-core-friendly
  shapes on a GPU; on CPU the pad and the slice cost more than they save. TPU layouts are tiled
  (8, 128) anyway, so XLA pads there by itself, and libtpu 0.0.42 fails to compile the explicit pad's
  gradient under FSDP (a RET_CHECK in its all-reduce-scatter fusion of the sliced kernel gradient).
- Backward barrier: at long sequences XLA:CPU fuses the residual stream's whole gradient chain into
  each block's weight-gradient operands and recomputes it (gpt2-small, T=1024: 10.0 s instead of
  7.3 s a step). A conditional is one thing its fusion passes cannot see through.
- Gradient norm: on XLA:CPU a plain reduction over the output head's [768, 50257] gradient becomes a
  YNNPACK reduce that, run beside the rest of the backward pass, stalls a core: 0.9 s of a 3.2 s
  GPT_CONFIG_124M step. The matvec is an ordinary GEMV there (HIGHEST keeps it float32).
- Linear layers in a decode step: from bfloat16 / int8 weights (:mod:`gptjax.quantize`'s trees) XLA:CPU
  widens a whole kernel into a float32 buffer before any dot, so decode steps read more memory than from
  float32; and from float32 weights its matrix-vector dot streams the weights slower than the machine
  allows. The compiled matmul of :mod:`gptjax.cpu_kernels` reads the weights as stored, at the memory's
  speed; it is built for matrix-vector shapes, so longer inputs (a prompt, a training batch) take XLA's
  GEMM (on the widened kernel). GPU and TPU compilers fuse the widening into the dot's operand read.
  From int8 weights a batch of rows is bound by arithmetic rather than bytes, so there the kernel rounds
  the activations to int8 as well and multiplies with int8 dot products (AVX-512 VNNI): 8 rows of
  gpt2-small's decode step 30 -> 17 ms, and faster than XLA's float32 GEMM at any prompt length, so int8
  weights on CPU always take it.
- Linear layers computing in bfloat16 (``--dtype bfloat16`` training): XLA:CPU multiplies bfloat16 operands
  as bfloat16 (AVX512-BF16 / AMX: twice float32's rate here) only when the product is float32 and the left
  operand is contracted over its last axis; any other bfloat16 dot it widens to float32 first, slower than
  float32 throughout. So the layer's product is taken in float32 and rounded, its input gradient
  ``g @ W^T`` is already in that form, and its weight gradient ``x^T g``, which contracts both operands
  over their first axis, reads ``x`` transposed in memory by :func:`gptjax.cpu_kernels.swap_last_axes` (a
  transpose XLA could see it would fold back into the dot). gpt2-small's bf16 step at 1 x 1024 went from
  5.7 to 3.6 s on a 2-core AMD EPYC (benchmarks/NOTES.md). GPU and TPU compilers multiply bf16 in any form.
- KV cache length (:mod:`gptjax.sampling`): XLA's attention reads every slot of the cache it is given,
  so elsewhere the decode loop's cache grows in buckets, one compiled program each, and a step reads at
  most twice the filled length. The compiled attention reads only the filled slots whatever the cache's
  length, so on CPU one cache of the whole context costs no step anything, and one program serves every
  continuation: a longer one compiles (or loads from the persistent cache) nothing a short one did not.
  This is chosen for the device the weights are on, where the decode programs are compiled. The compiled
  attention serves grouped-query heads (Llama 3, Qwen3) too: each key/value head's slots are read once for
  the query heads it serves.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import cpu_kernels
from gptjax.quantize import QuantizedKernel, dequantize_kernel

Linear = nnx.Linear
VOCAB_MULTIPLE = 64


def _cpu_or_accelerator(*args, cpu: Callable, accelerator: Callable):
    return jax.lax.platform_dependent(*args, cpu=cpu, default=accelerator)


# --- LayerNorm mean --------------------------------------------------------------------------------


def mean_by_matvec(x: jax.Array) -> jax.Array:
    return x @ jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)


def mean_by_reduction(x: jax.Array) -> jax.Array:
    return x.mean(axis=-1, keepdims=True)


def layer_norm_mean(x: jax.Array) -> jax.Array:
    """The mean over the last axis, keepdims."""
    return _cpu_or_accelerator(x, cpu=mean_by_matvec, accelerator=mean_by_reduction)


# --- LayerNorm's scale and shift ------------------------------------------------------------------


def row_sum_by_matvec(x: jax.Array) -> jax.Array:
    rows = x.reshape(-1, x.shape[-1])
    return jnp.matmul(jnp.ones((rows.shape[0],), rows.dtype), rows, precision=jax.lax.Precision.HIGHEST)


def row_sum_by_reduction(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1]).sum(axis=0)


def row_sum(x: jax.Array) -> jax.Array:
    """The sum over every axis but the last."""
    return _cpu_or_accelerator(x, cpu=row_sum_by_matvec, accelerator=row_sum_by_reduction)


@jax.custom_vjp
def scale_and_shift(x: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """``scale * x + shift`` (scale, shift: [x.shape[-1]]); the parameters' gradients summed by :func:`row_sum`."""
    return scale * x + shift


def _scale_and_shift_fwd(x, scale, shift):
    return scale_and_shift(x, scale, shift), (x, scale)


def _scale_and_shift_bwd(res, g):
    x, scale = res
    return g * scale, row_sum(g * x), row_sum(g)


scale_and_shift.defvjp(_scale_and_shift_fwd, _scale_and_shift_bwd)


# --- Linear layers over stored bfloat16 / int8 kernels ---------------------------------------------


def _reads_stored(kernel: Any, compute_dtype: Any) -> bool:
    """Whether a Linear kernel is a stored small format: int8, or bfloat16 in a layer computing in float32
    (a bfloat16 kernel in a bfloat16 layer is ordinary mixed precision)."""
    if isinstance(kernel, QuantizedKernel):
        return True
    return kernel.dtype == jnp.bfloat16 and jnp.dtype(compute_dtype or jnp.float32) != jnp.bfloat16


def _dense_kernel(layer: Linear) -> jax.Array:
    """The layer's kernel as an array in its compute dtype's terms (stored formats widened)."""
    kernel = layer.kernel[...]
    return dequantize_kernel(kernel) if _reads_stored(kernel, layer.dtype) else kernel


def widened_matmul(x: jax.Array, kernel: jax.Array | QuantizedKernel) -> jax.Array:
    return jnp.matmul(x, dequantize_kernel(kernel))


def compiled_matmul(x: jax.Array, kernel: jax.Array | QuantizedKernel) -> jax.Array:
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if isinstance(kernel, QuantizedKernel):
        y = cpu_kernels.weights_matmul(rows, kernel.values, kernel.scale)
    else:
        y = cpu_kernels.weights_matmul(rows, kernel)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def stored_weights_matmul(x: jax.Array, kernel: jax.Array | QuantizedKernel) -> jax.Array:
    """``x @ W`` in float32 for a stored bfloat16 or int8 kernel standing for W."""
    most = cpu_kernels.row_limit(jnp.int8 if isinstance(kernel, QuantizedKernel) else kernel.dtype)
    if (most is not None and math.prod(x.shape[:-1]) > most) or cpu_kernels.unavailable() is not None:
        return widened_matmul(x, kernel)
    return _cpu_or_accelerator(x, cpu=lambda x: compiled_matmul(x, kernel),
                               accelerator=lambda x: widened_matmul(x, kernel))


def linear_promote_dtype(args: tuple, *, dtype: Any = None, **kwargs) -> tuple:
    """flax's promotion of a Linear layer's (inputs, kernel, bias), leaving a stored kernel as it is."""
    inputs, kernel, bias = args
    if not _reads_stored(kernel, dtype):
        return nnx.nn.dtypes.promote_dtype(args, dtype=dtype, **kwargs)
    inputs, bias = nnx.nn.dtypes.promote_dtype((inputs, bias), dtype=dtype, **kwargs)
    return inputs, kernel, bias


@jax.custom_jvp
def float32_weights_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` (float32 both) through the compiled kernel; differentiable (the derivative through
    XLA's dots), so a tiny training batch that takes this path still has gradients."""
    return compiled_matmul(x, kernel)


@float32_weights_matmul.defjvp
def _float32_weights_matmul_jvp(primals, tangents):
    (x, kernel), (dx, dkernel) = primals, tangents
    return float32_weights_matmul(x, kernel), dx @ kernel + x @ dkernel


def _plain_contraction(x: jax.Array, kernel: Any, dimension_numbers: Any) -> bool:
    (contract_x, contract_k), (batch_x, batch_k) = dimension_numbers
    return (tuple(contract_x) == (x.ndim - 1,) and tuple(contract_k) == (0,) and not batch_x and not batch_k
            and isinstance(kernel, jax.Array) and kernel.ndim == 2)


def _decode_shaped(x: jax.Array, kernel: Any, dimension_numbers: Any) -> bool:
    """A float32 Linear layer applied to at most MAX_ROWS rows (a decode step), in the plain contraction."""
    return (_plain_contraction(x, kernel, dimension_numbers) and x.dtype == kernel.dtype == jnp.float32
            and math.prod(x.shape[:-1]) <= cpu_kernels.MAX_ROWS and cpu_kernels.unavailable() is None)


def _bf16_dot(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    return jnp.einsum(spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


@jax.custom_vjp
def bfloat16_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` for bfloat16 x [..., k] and kernel [k, n], in float32, its forward pass and both
    gradients as dots XLA:CPU keeps in bfloat16 (see the table above); the gradients in the operands' dtype.
    CPU only (:func:`gptjax.cpu_kernels.swap_last_axes`)."""
    return _bf16_dot(x, kernel, "...k,kn->...n")


def _bfloat16_matmul_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return bfloat16_matmul(x, kernel), (x, kernel)


def _bfloat16_matmul_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    dx = _bf16_dot(g, kernel, "...n,kn->...k")
    x_t = cpu_kernels.swap_last_axes(x.reshape(-1, x.shape[-1]))  # [k, rows] in memory: contracted last
    dkernel = _bf16_dot(x_t, g.reshape(-1, g.shape[-1]), "km,mn->kn")
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


bfloat16_matmul.defvjp(_bfloat16_matmul_fwd, _bfloat16_matmul_bwd)


def linear_dot_general(x: jax.Array, kernel: Any, dimension_numbers: Any, **kwargs) -> jax.Array:
    """A Linear layer's ``lax.dot_general``; a stored kernel (left unpromoted by
    :func:`linear_promote_dtype`) goes through :func:`stored_weights_matmul`; on CPU, a float32 one in a
    decode step through :func:`float32_weights_matmul`, and bfloat16 compute through
    :func:`bfloat16_matmul`."""
    if _reads_stored(kernel, x.dtype):  # x is already in the layer's compute dtype
        return stored_weights_matmul(x, kernel)

    def xla(x, kernel):
        return jax.lax.dot_general(x, kernel, dimension_numbers, **kwargs)

    if _decode_shaped(x, kernel, dimension_numbers):
        return _cpu_or_accelerator(x, kernel, cpu=float32_weights_matmul, accelerator=xla)
    if (x.dtype == jnp.bfloat16 and _plain_contraction(x, kernel, dimension_numbers)
            and kernel.dtype == jnp.bfloat16 and cpu_kernels.unavailable() is None):
        out_dtype = kwargs.get("preferred_element_type") or jnp.bfloat16
        return _cpu_or_accelerator(x, kernel, cpu=lambda x, k: bfloat16_matmul(x, k).astype(out_dtype),
                                   accelerator=xla)
    return xla(x, kernel)


def decode_cache_grows(params: Any) -> bool:
    """Whether decoding from ``params`` grows its KV cache in buckets (True) or keeps one cache of the whole
    context (False: CPU weights with the compiled attention, which reads only the filled slots)."""
    leaf = jax.tree_util.tree_leaves(params)[0]
    devices = leaf.devices() if isinstance(leaf, jax.Array) else {jax.devices()[0]}
    return not (all(d.platform == "cpu" for d in devices) and cpu_kernels.unavailable() is None)


def head_as_kernel(params: Any) -> bool:
    """Whether decoding from ``params`` multiplies a tied output head as a kernel of its own (CPU with the
    compiled kernels, where a Linear layer reads its weights at their stored width: see the table above)."""
    return not decode_cache_grows(params)


# --- q, k, v projections ---------------------------------------------------------------------------


def separate_qkv(x: jax.Array, layers: tuple[Linear, Linear, Linear]) -> tuple[jax.Array, ...]:
    return tuple(layer(x) for layer in layers)


def fused_qkv(x: jax.Array, layers: tuple[Linear, Linear, Linear]) -> tuple[jax.Array, ...]:
    """The three projections as one matmul against the kernels side by side; its gradient is split back
    into the three kernels by the concatenation's transpose."""
    kernel = jnp.concatenate([_dense_kernel(layer) for layer in layers], axis=1)
    bias = jnp.concatenate([layer.bias[...] for layer in layers]) if layers[0].use_bias else None
    x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, kernel, bias), dtype=layers[0].dtype)
    qkv = x @ kernel
    if bias is not None:
        qkv = qkv + bias
    return tuple(jnp.split(qkv, 3, axis=-1))


def project_qkv(x: jax.Array, layers: tuple[Linear, Linear, Linear]) -> tuple[jax.Array, ...]:
    """``W_query(x), W_key(x), W_value(x)``."""
    return _cpu_or_accelerator(x, cpu=lambda x: separate_qkv(x, layers), accelerator=lambda x: fused_qkv(x, layers))


# --- logits ----------------------------------------------------------------------------------------


def plain_logits(out_head: Linear, x: jax.Array) -> jax.Array:
    return out_head(x)


def padded_logits(out_head: Linear, x: jax.Array) -> jax.Array:
    """``out_head(x)`` through the kernel padded with zero columns to a multiple of 64 (50257 -> 50304),
    the logits sliced back: the parameter keeps the book's columns."""
    kernel = _dense_kernel(out_head)
    vocab = kernel.shape[1]
    kernel = jnp.pad(kernel, ((0, 0), (0, -vocab % VOCAB_MULTIPLE)))
    x, kernel = nnx.nn.dtypes.promote_dtype((x, kernel), dtype=out_head.dtype)
    return jnp.matmul(x, kernel, preferred_element_type=jnp.float32)[..., :vocab]


def logits(out_head: Linear, x: jax.Array) -> jax.Array:
    """``out_head(x)``: float32 logits over the vocabulary (the layer accumulates in float32)."""
    def plain(x):
        return plain_logits(out_head, x)

    return jax.lax.platform_dependent(x, cpu=plain, tpu=plain, default=lambda x: padded_logits(out_head, x))


# --- the backward-pass barrier at each block's input -----------------------------------------------


@jax.custom_vjp
def backward_barrier(x: jax.Array) -> jax.Array:
    """The identity; in the backward pass, the gradient flowing back into a block is written to memory
    by a conditional. Its other branch is taken only when the gradient is already not finite, and makes
    all of it NaN, which stops training just the same."""
    return x


def _barrier_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _barrier_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    first = g[(0,) * g.ndim]
    return (jax.lax.cond(jnp.isfinite(first), lambda g: g, lambda g: jnp.full_like(g, jnp.nan), g),)


backward_barrier.defvjp(_barrier_fwd, _barrier_bwd)


def block_input(x: jax.Array) -> jax.Array:
    """A transformer block's input: the identity, with the CPU's backward barrier."""
    return _cpu_or_accelerator(x, cpu=backward_barrier, accelerator=lambda x: x)


# --- a gradient's sum of squares (its global norm) -------------------------------------------------


def sum_of_squares_by_matvec(x: jax.Array) -> jax.Array:
    x = jnp.square(x.astype(jnp.float32))
    if x.ndim < 2:
        return jnp.sum(x)
    ones = jnp.ones((x.shape[-1],), jnp.float32)
    return jnp.sum(jnp.matmul(x.reshape(-1, x.shape[-1]), ones, precision=jax.lax.Precision.HIGHEST))


def sum_of_squares_by_reduction(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x.astype(jnp.float32)))


def sum_of_squares(x: jax.Array) -> jax.Array:
    """``sum(x ** 2)`` in float32."""
    return _cpu_or_accelerator(x, cpu=sum_of_squares_by_matvec, accelerator=sum_of_squares_by_reduction)


__all__ = ["layer_norm_mean", "scale_and_shift", "project_qkv", "logits", "block_input", "sum_of_squares",
           "backward_barrier", "linear_promote_dtype", "linear_dot_general", "stored_weights_matmul",
           "decode_cache_grows", "head_as_kernel", "VOCAB_MULTIPLE"]
