"""Smaller weights for decoding: bfloat16 kernels, or int8 kernels with one float32 scale per output channel.

Only the matmul kernels change (the attention projections, the feed-forward layers and ``out_head``,
~80% of the weights and of the bytes a decode step reads); embeddings (a gather reads one row per
token), biases and LayerNorm parameters stay float32. Activations, accumulation, softmax and logits
stay float32, with one exception: where the compiled CPU kernel multiplies by int8 weights (decode steps
and prompt chunks of up to 64 rows), it rounds the activations to int8 too, in blocks of 32 with a
scale each (llama.cpp's q8_0 does the same), so that the products are int8 dot products
(:mod:`gptjax.cpu_kernels`). That costs a little more precision than int8 weights alone (about 0.4% of
a product's size on random data) and buys the arithmetic a batch of decode steps is bound by.

The quantized tree has the float32 tree's structure with each kernel replaced by a bfloat16 array or
a :class:`QuantizedKernel`, a small pytree, and the model runs on it as it is: each Linear layer hands
its stored kernel to :func:`gptjax.platform.linear_dot_general`, which multiplies by it where it lies
(on CPU, for decode steps, with the compiled kernel of :mod:`gptjax.cpu_kernels`, which reads the
weights in their stored width) or widens it to float32 right before the dot (elsewhere, where XLA fuses
the widening into the matmul). ``gptjax/model.py`` stays the book's model.

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

Params = dict[str, Any]  # gptjax.model.Params (not imported: gptjax.platform, which model uses, imports this)

WEIGHTS_DTYPES = ("float32", "bfloat16", "int8")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """An int8 kernel [in, out] and its float32 per-output-channel scale [out]."""

    values: jax.Array
    scale: jax.Array

    def dequantize(self) -> jax.Array:
        return self.values.astype(jnp.float32) * self.scale

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def __getitem__(self, index):
        # nnx reads a Param's value as ``param[...]``.
        if index is not Ellipsis:
            raise TypeError("a QuantizedKernel can only be read whole, as kernel[...]")
        return self


def dequantize_kernel(kernel: jax.Array | QuantizedKernel) -> jax.Array:
    """The float32 kernel a stored one stands for."""
    if isinstance(kernel, QuantizedKernel):
        return kernel.dequantize()
    return kernel.astype(jnp.float32)


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

    The model does not need it (it runs on the quantized tree); it is the reference the stored
    formats are measured against."""
    def to_float32(x):
        return dequantize_kernel(x) if isinstance(x, QuantizedKernel) or x.dtype != jnp.float32 else x

    return jax.tree_util.tree_map(to_float32, params, is_leaf=lambda x: isinstance(x, QuantizedKernel))


def weights_nbytes(params: Params) -> int:
    """Bytes held by the tree's arrays (int8 values and their scales counted)."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(params)))
