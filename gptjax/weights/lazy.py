"""Tensors read from their files one at a time, so that loading holds the parameter tree being built plus
about one tensor, never a second copy of the whole model.

Memory-mapped pages count in a process's resident memory for as long as the mapping holds them; a reader
that maps a whole file (torch.load with ``mmap=True``) would end up resident twice over. Readers here map
each tensor on its own, or hand back the pages of the tensor read before (:func:`release_pages`).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

Shape = tuple[int, ...]


class LazyTensors(Mapping[str, Any]):
    """Name -> tensor, read by ``read(name)`` each time it is looked up (not kept); ``shapes`` without reading."""

    def __init__(self, shapes: Mapping[str, Shape], read: Callable[[str], Any]):
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self._read = read

    def __getitem__(self, name: str) -> Any:
        if name not in self.shapes:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def renamed(self, rename: Callable[[str], str | None]) -> LazyTensors:
        """The same tensors under ``rename(name)``; a name it maps to None is left out."""
        source = {new: old for old in self.shapes if (new := rename(old)) is not None}
        return LazyTensors({new: self.shapes[old] for new, old in source.items()}, lambda n: self._read(source[n]))

    def mapped(
        self, fn: Callable[[str, Any], Any], shape: Callable[[str, Shape], Shape] = lambda _, s: s
    ) -> LazyTensors:
        """Each tensor as ``fn(name, tensor)``, whose shape is ``shape(name, old shape)``."""
        return LazyTensors({k: shape(k, s) for k, s in self.shapes.items()}, lambda n: fn(n, self._read(n)))


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux <sys/mman.h>


def release_pages(address: int, nbytes: int) -> None:
    """Drop the resident pages wholly inside ``[address, address + nbytes)`` of a private, read-only file
    mapping: they stay valid and are read from the file again if touched. Only for such mappings (on
    anonymous memory this would zero the data); Linux only, elsewhere a no-op (more memory, same result)."""
    if not sys.platform.startswith("linux"):
        return
    start = -(-address // _PAGE) * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _LIBC
