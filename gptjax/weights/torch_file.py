"""Container: torch.save'd files (``.pth``, ``.pt``, transformers' ``pytorch_model.bin`` and its sharded index),
zip-format (torch >= 1.6, memory-mapped) or older, with any names in them, read; and one file written.

torch is imported only when a file is read, so the rest of gptjax runs without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.weights.files import NamedTensors, import_torch, is_index, joined, one_line, shards, to_numpy
from gptjax.weights.lazy import LazyTensors, release_pages

SUFFIXES = (".pth", ".pt", ".bin")  # .bin: transformers' pytorch_model.bin
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6


def is_torch_file(path: Path) -> bool:
    if path.suffix in SUFFIXES:
        return True
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def read(path: Path) -> NamedTensors:
    """The state_dict in a torch.save'd file (or in every shard a ``pytorch_model.bin.index.json`` names)."""
    files = shards(path) if is_index(path) else [path]
    return NamedTensors(joined([read_state_dict(f) for f in files]), path, f"torch checkpoint {path}")


def read_state_dict(path: Path) -> LazyTensors:
    """The state_dict in a torch.save'd file, read with ``weights_only=True`` (no code runs), memory-mapped
    (``mmap=True``) and handed out tensor by tensor; the book's ``{"model_state_dict": ...}`` checkpoint too."""
    torch = import_torch()
    try:
        with open(path, "rb") as f:
            mapped = f.read(4) == ZIP_MAGIC  # torch < 1.6's format cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except FileNotFoundError:
        raise FileNotFoundError(f"torch checkpoint {path} not found") from None
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise ValueError(
            f"cannot read torch checkpoint {path}: {one_line(e)}; the file is truncated, corrupt or not from torch.save"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state_dict of tensors (nor the book's "
            "{'model_state_dict': ...} checkpoint); save model.state_dict()"
        )
    held: list[Any] = []

    def read_one(name: str) -> Any:
        # One mapping spans the whole file, and every page read stays resident with it: the pages of the
        # tensor handed out before (copied into the parameters by now) go back. A view of it still in use
        # reads them from the file again, so this costs time at worst, never data.
        while held:
            storage = held.pop().untyped_storage()
            release_pages(storage.data_ptr(), storage.nbytes())
        if mapped:
            held.append(obj[name])
        return to_numpy(obj[name])

    return LazyTensors({k: tuple(v.shape) for k, v in obj.items()}, read_one)


def write(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """``tensors`` as a state_dict torch.save'd to ``path`` (the caller makes it atomic)."""
    torch = import_torch()
    torch.save({name: torch.from_numpy(value) for name, value in tensors.items()}, path)
