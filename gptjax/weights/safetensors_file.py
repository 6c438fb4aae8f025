"""Container: safetensors files (one, or every shard a ``model.safetensors.index.json`` names), with any names
in them, read; and one file written. Needs only the safetensors package."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from gptjax.weights.files import NamedTensors, is_index, joined, one_line, shards
from gptjax.weights.lazy import LazyTensors


def is_safetensors_file(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian) and then the header."""
    if path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def read(path: Path) -> NamedTensors:
    files = shards(path) if is_index(path) else [path]
    return NamedTensors(joined([read_file(f) for f in files]), path, f"Hugging Face weights {path}")


def read_file(file: Path) -> LazyTensors:
    from safetensors import safe_open

    def damaged(e: Exception) -> ValueError:
        return ValueError(f"cannot read {file}: {one_line(e)}; the file is truncated or corrupt")

    if not file.is_file():
        raise FileNotFoundError(f"safetensors file {file} not found")
    try:
        with safe_open(file, framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise damaged(e) from None

    def read_one(name: str) -> np.ndarray:
        # safe_open maps the whole file and keeps every page it touched resident until it is closed:
        # opened once per tensor (the header is read again, a few milliseconds), the file never is.
        try:
            with safe_open(file, framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise damaged(e) from None

    return LazyTensors(shapes, read_one)


def write(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """``tensors`` as one safetensors file at ``path`` (the caller makes it atomic), with transformers'
    ``format: pt`` metadata, which its loaders require."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), path, metadata={"format": "pt"})
