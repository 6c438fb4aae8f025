"""What every reader hands on, and the file layout readers share.

A reader turns a file or folder into a :class:`NamedTensors`: the tensors under the names they are stored
under (read lazily, see :mod:`gptjax.weights.lazy`), the file they came from, and how errors name them.
It knows the container (a torch pickle, safetensors, a TensorFlow bundle, an orbax run), never the names.
The wrapper prefixes that models add to every name are stripped here, in one place (:func:`unwrapped_name`),
before a name table looks at the names.

Also here: transformers' folder layout (``model.safetensors``, ``pytorch_model.bin``, their sharded
indexes), which spans two containers and the Hub's downloads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptjax.config import GPTConfig
from gptjax.weights.lazy import LazyTensors

# torch.compile's, DistributedDataParallel's, and transformers' GPT2LMHeadModel's (around its GPT2Model),
# stacked in any order ("_orig_mod.module.": a compiled DDP model).
WRAPPER_PREFIXES = ("_orig_mod.", "module.", "transformer.")

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHTS_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)  # transformers' preference


@dataclass(frozen=True)
class NamedTensors:
    """A reader's result. ``weights_file``: the file the tensors came from (for a folder, the name its weights
    go by: ``model.safetensors``, ``model.ckpt``), beside which a name table looks for config files.
    ``config``: the config the container itself stores (a gptjax run's), else None."""

    tensors: LazyTensors
    weights_file: Path
    source: str
    config: GPTConfig | None = None

    def unwrapped(self) -> NamedTensors:
        """The same tensors under names without :data:`WRAPPER_PREFIXES`."""
        return NamedTensors(self.tensors.renamed(unwrapped_name), self.weights_file, self.source, self.config)


def unwrapped_name(name: str) -> str:
    """A tensor name without the prefixes that wrapping a model adds (see :data:`WRAPPER_PREFIXES`)."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def folder_weights(folder: Path) -> Path | None:
    """The weights file transformers would read in ``folder`` (the first of :data:`WEIGHTS_FILES` there)."""
    return next((folder / n for n in WEIGHTS_FILES if (folder / n).is_file()), None)


def is_weights_folder(path: Path) -> bool:
    return folder_weights(path) is not None


def is_index(path: Path) -> bool:
    return path.name.endswith(".index.json")


def shard_names(index: Path) -> list[str]:
    """The files a sharded checkpoint's index maps its tensors to."""
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"cannot read the shard index {index}: {one_line(e)}") from None


def shards(index: Path) -> list[Path]:
    names = shard_names(index)
    for name in names:
        if not (index.parent / name).is_file():
            raise FileNotFoundError(f"shard {name} listed in {index} not found; the checkpoint is incomplete")
    return [index.parent / name for name in names]


def joined(parts: list[LazyTensors]) -> LazyTensors:
    """The tensors of several shards as one."""
    owner = {name: part for part in parts for name in part}
    return LazyTensors({k: part.shapes[k] for k, part in owner.items()}, lambda k: owner[k][k])


def import_torch():
    try:
        import torch
    except ImportError:
        raise ValueError("reading or writing torch .pth files needs PyTorch: pip install gptjax[torch]") from None
    return torch


def to_numpy(value: Any):
    """A tensor as numpy: torch's detached and upcast (bfloat16 has no numpy dtype), anything else as it is."""
    if hasattr(value, "detach"):
        return value.detach().to("cpu").float().numpy()
    return value


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line, for wrapping library errors into ours."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
