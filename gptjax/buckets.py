"""The static shapes compiled for what varies at run time: one rule for ``generate``, the serving engine and
the HellaSwag scorer.

XLA compiles one program per shape, so a length or a batch size is padded up to one of a few sizes: powers
of two, which cost at most twice the work of the exact size and keep the number of programs (and of entries
in the persistent compilation cache) logarithmic. One rule everywhere means the scorer, the engine and
``generate`` pad a prompt alike and share the compiled shapes.
"""

from __future__ import annotations

MIN_LENGTH = 16  # shorter sequences gain nothing from a smaller program; fewer programs compile


def length_bucket(n: int, cap: int | None = None) -> int:
    """The padded length for ``n`` tokens: the power of two >= n, at least MIN_LENGTH, at most ``cap``."""
    size = max(MIN_LENGTH, 1 << (max(n, 1) - 1).bit_length())
    return size if cap is None else min(size, cap)


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes compiled for up to ``max_batch`` rows: the powers of two below it, and itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]
