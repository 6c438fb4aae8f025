"""The compiled CPU matmul for bfloat16 and int8 weights (``gptjax/csrc/weights_matmul.cc``), through XLA's FFI.

XLA:CPU has no dot that reads bfloat16 or int8 weights beside float32 activations: it widens the whole
kernel into a float32 buffer first, so decoding from smaller weights was slower than from float32
(benchmarks/NOTES.md). This kernel reads the weights as stored and widens them in registers, so a
batch-1 decode step, bound by the bytes of weight it reads, reads 2 or 1 bytes per weight instead of 4.
Activations, products and sums stay float32.

The library is built when gptjax is installed (``setup.py``; it needs a C++ compiler). Where it was not
built, :func:`unavailable` says so and :mod:`gptjax.platform` uses XLA's dot instead (same values, no
speed-up). Used only for CPU programs, and only for up to :data:`MAX_ROWS` rows of activations (decode
steps): past that, XLA's float32 GEMM on the widened kernel is faster.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util

import jax
import jax.numpy as jnp

MAX_ROWS = 8  # kMaxRows in weights_matmul.cc
_LIBRARY = "gptjax._weights_matmul"
_TARGETS = {"bfloat16": ("gptjax_matmul_bf16", "GptjaxMatmulBf16"), "int8": ("gptjax_matmul_int8", "GptjaxMatmulInt8")}


@functools.cache
def _register() -> str | None:
    """Load the library and register its handlers with XLA once; None, or why it could not be."""
    spec = importlib.util.find_spec(_LIBRARY)
    if spec is None or spec.origin is None:
        return (f"{_LIBRARY} was not built when gptjax was installed (it needs a C++ compiler; "
                "reinstall with one, e.g. `pip install -e .`)")
    library = ctypes.CDLL(spec.origin)
    for target, symbol in _TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None


def unavailable() -> str | None:
    """Why the compiled kernels cannot be used in this installation (None: they can)."""
    return _register()


def weights_matmul(x: jax.Array, values: jax.Array, scale: jax.Array | None = None, *,
                   portable: bool = False) -> jax.Array:
    """``x @ values`` (times ``scale`` per column for int8) in float32, for x [rows, k] float32 with
    rows <= MAX_ROWS and values [k, n] bfloat16 (no scale) or int8 (with its [n] float32 scale).

    Only for programs lowered for the CPU, and only where :func:`unavailable` is None. The library
    takes its AVX-512 loop where the CPU has AVX-512, else a portable one; ``portable=True`` forces
    the portable one (for testing it)."""
    if (reason := unavailable()) is not None:
        raise RuntimeError(reason)
    if x.ndim != 2 or x.shape[0] > MAX_ROWS or x.dtype != jnp.float32:
        raise ValueError(f"weights_matmul needs float32 x of shape [rows <= {MAX_ROWS}, k], got {x.dtype}{x.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], values.shape[1]), jnp.float32)
    if values.dtype == jnp.int8:
        if scale is None:
            raise ValueError("int8 weights need their per-column scale")
        return jax.ffi.ffi_call(_TARGETS["int8"][0], out)(x, values, scale.astype(jnp.float32), portable=portable)
    if values.dtype != jnp.bfloat16 or scale is not None:
        raise ValueError(f"weights_matmul reads bfloat16 weights, or int8 weights with a scale; got {values.dtype}")
    return jax.ffi.ffi_call(_TARGETS["bfloat16"][0], out)(x, values, portable=portable)
