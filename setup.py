"""Builds gptjax's one compiled part, the CPU decode kernels of gptjax/cpu_kernels.py (gptjax/csrc/).

Everything else is in pyproject.toml. The extension is optional: without a C++ compiler gptjax installs
without it and decodes through XLA alone, slower (gptjax.cpu_kernels says so).
"""

import os
import sys

from setuptools import Extension, setup


def xla_ffi_include() -> str:
    # jax.ffi.include_dir() without importing jax: the XLA FFI headers ship inside jaxlib.
    import importlib.util

    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("building gptjax needs jaxlib for the XLA FFI headers (pyproject.toml's build requirements)")
    return os.path.join(spec.submodule_search_locations[0], "include")


setup(
    ext_modules=[
        Extension(
            "gptjax._cpu_kernels",
            sources=["gptjax/csrc/weights_matmul.cc", "gptjax/csrc/cached_attention.cc", "gptjax/csrc/transpose.cc"],
            depends=["gptjax/csrc/tasks.h", "gptjax/csrc/weights_matmul_simd.inc"],
            include_dirs=[xla_ffi_include()],
            language="c++",
            # No contraction into fused multiply-adds the source did not write: each kernel's loop variants
            # then round alike (cached_attention.cc).
            extra_compile_args=["-std=c++17", "-O3", "-fvisibility=hidden", "-ffp-contract=off"],
            optional=True,
        )
    ],
)
