"""Smaller weights for decoding: bfloat16 kernels, or int8 kernels with one float32 scale per output channel.

Only the matmul kernels change (the attention projections, the feed-forward layers and ``out_head``,
~80% of the weights and of the bytes a decode step reads); embeddings (a gather reads one row per
token), biases and LayerNorm parameters stay float32. Activations, accumulation, softmax and logits
stay float32: this is weight-only quantization.

The quantized tree has the float32 tree's structure with each kernel replaced by a bfloat16 array or
a :class:`QuantizedKernel`, a small pytree. :func:`dequantize_params` turns it back into the float32
values the matmuls use, and callers apply it *inside* their jitted step (:mod:`gptjax.sampling`
does), so the arrays held in memory between steps stay small and the conversion is an elementwise
producer of each matmul's weight operand, which XLA fuses into the matmul where the backend can
(GPU, TPU). ``gptjax/model.py`` then stays the book's model over a float32 tree. On XLA:CPU (jax
0.10) no dot reads bfloat16 or int8 operands: it converts the whole kernel to float32 first, so on
CPU these formats save memory but not time (benchmarks/NOTES.md has the measurements).

int8 is symmetric round-to-nearest with a per-output-channel scale ``max|W[:, j]| / 127``, so
``W[:, j] ~= values[:, j] * scale[j]``; the scale multiplies the matmul's output columns, which is the
same as scaling the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from gptjax.model import Params

WEIGHTS_DTYPES = ("float32", "bfloat16", "int8")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """An int8 kernel [in, out] and its float32 per-output-channel scale [out]."""

    values: jax.Array
    scale: jax.Array

    def dequantize(self) -> jax.Array:
        return self.values.astype(jnp.float32) * self.scale


def check_weights_dtype(weights_dtype: str) -> str:
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    return weights_dtype


def quantize_kernel(kernel: jax.Array) -> QuantizedKernel:
    """Symmetric int8 with one scale per output column (a zero column gets scale 1 and stays zero)."""
    kernel = jnp.asarray(kernel, jnp.float32)
    amax = jnp.max(jnp.abs(kernel), axis=0)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    values = jnp.clip(jnp.round(kernel / scale), -127, 127).astype(jnp.int8)
    return QuantizedKernel(values, scale)


def _is_kernel(path: tuple, leaf: Any) -> bool:
    return getattr(path[-1], "key", None) == "kernel" and getattr(leaf, "ndim", 0) == 2


def quantize_params(params: Params, weights_dtype: str) -> Params:
    """``params`` with every matmul kernel stored as ``weights_dtype`` ("float32": ``params`` itself)."""
    if check_weights_dtype(weights_dtype) == "float32":
        return params
    return _quantize_params(params, weights_dtype)


@functools.partial(jax.jit, static_argnames=("weights_dtype",))
def _quantize_params(params: Params, weights_dtype: str) -> Params:
    convert = quantize_kernel if weights_dtype == "int8" else (lambda k: k.astype(jnp.bfloat16))
    return jax.tree_util.tree_map_with_path(lambda p, x: convert(x) if _is_kernel(p, x) else x, params)


def dequantize_params(params: Params) -> Params:
    """The float32 tree a quantized tree stands for (a float32 tree passes through unchanged).

    Traceable: call it inside the jitted function that uses the weights, so that only the small
    arrays live between calls."""
    def to_float32(x):
        if isinstance(x, QuantizedKernel):
            return x.dequantize()
        return x.astype(jnp.float32) if x.dtype != jnp.float32 else x

    return jax.tree_util.tree_map(to_float32, params, is_leaf=lambda x: isinstance(x, QuantizedKernel))


def weights_nbytes(params: Params) -> int:
    """Bytes held by the tree's arrays (int8 values and their scales counted)."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(params)))
