"""Writing weights, the mirror of :func:`gptjax.weights.load_weights`: a name table turns the parameters into
its named tensors (``to_tensors``) and a container writes them (``write``), atomically.

- ``torch`` and ``safetensors``: one file in that container, in any naming of :data:`NAMINGS` (the book's by
  default), with the config in the file's own config file beside it (``model.pth`` -> ``model.config.json``):
  so every pair :func:`~gptjax.weights.load_weights` reads, a Hugging Face-named ``.pth`` or a book-named
  ``.safetensors`` say, is also written.
- ``hf``: a Hugging Face folder (``model.safetensors`` + ``config.json``) that transformers loads.
- ``openai``: OpenAI's release layout (a TensorFlow checkpoint + ``hparams.json``), through TensorFlow.
- ``gptjax``: an orbax checkpoint; ``gguf``: llama.cpp's file (:mod:`gptjax.weights.gguf`, its own container
  and names).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from gptjax.atomic import atomic_dir, atomic_file, check_overwrite
from gptjax.config import GPTConfig
from gptjax.model import Params
from gptjax.weights import book, gguf, hf, openai, safetensors_file, tf_checkpoint, torch_file, tree_names
from gptjax.weights.files import SAFETENSORS, is_weights_folder
from gptjax.weights.mapping import check_params, check_sidecar_free, write_sidecar

# A naming's name -> its table, for the single-file formats' ``naming``.
NAMINGS = {"book": book, "hf": hf, "openai": openai, "gptjax": tree_names}
SINGLE_FILE = {"torch": torch_file, "safetensors": safetensors_file}  # format -> its container
DEFAULT_NAMING = "book"
TORCH_SUFFIXES = (".pth", ".pt")


def save_file(container: ModuleType, params: Params, cfg: GPTConfig, path: str | os.PathLike, *,
              naming: str = DEFAULT_NAMING, overwrite: bool = False) -> None:
    """One ``container`` file of ``naming``'s tensors at ``path``, and the config in its own file beside it (the
    head count is in no tensor shape). An existing file or config file is replaced only with ``overwrite``."""
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; choose one of {', '.join(NAMINGS)}")
    check_overwrite(path, overwrite)
    check_sidecar_free(path, overwrite)
    tensors = NAMINGS[naming].to_tensors(params, cfg)
    with atomic_file(path) as tmp:
        container.write(tmp, tensors)
    write_sidecar(path, cfg)


def save_folder(names: ModuleType, weights: tuple[str, ...], write: Callable[[Path, dict], None],
                is_ours: Callable[[Path], bool], params: Params, cfg: GPTConfig, path: str | os.PathLike, *,
                overwrite: bool = False) -> None:
    """A folder of ``names``' tensors, written by ``write(folder, tensors)`` into the files ``weights``, and the
    table's config file. Into an existing folder only with ``overwrite``, replacing only those files (a
    tokenizer or anything else there stays)."""
    config_name, config_text = names.config_file(params, cfg)
    writer = atomic_dir(path, (*weights, config_name), is_ours, overwrite=overwrite)  # checks, before any work
    tensors = names.to_tensors(params, cfg)
    with writer as tmp:
        write(tmp, tensors)
        (tmp / config_name).write_text(config_text)


def _save_gptjax(params: Params, cfg: GPTConfig, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    from gptjax.checkpoint import save_params  # orbax: imported only when used

    save_params(params, cfg, path, overwrite=overwrite)


# Format -> its writer: save(params, cfg, path, *, overwrite, **options) that checks the destination before
# any slow work and writes atomically (gptjax.atomic).
WRITERS: dict[str, Callable[..., None]] = {
    "gptjax": _save_gptjax,
    "torch": functools.partial(save_file, torch_file),
    "safetensors": functools.partial(save_file, safetensors_file),
    "hf": functools.partial(save_folder, hf, (SAFETENSORS,),
                            lambda folder, tensors: safetensors_file.write(folder / SAFETENSORS, tensors),
                            is_weights_folder),
    "openai": functools.partial(save_folder, openai, tf_checkpoint.written_files(), tf_checkpoint.write_folder,
                                openai.is_openai_folder),
    "gguf": gguf.save_gguf,
}
FORMATS = tuple(WRITERS)


def default_format(path: str | os.PathLike) -> str:
    """The format a path's name implies: ``torch`` for .pth/.pt, ``safetensors``, ``gguf``, else ``gptjax``."""
    suffix = Path(path).suffix
    if suffix in TORCH_SUFFIXES:
        return "torch"
    return {".safetensors": "safetensors", gguf.GGUF_SUFFIX: "gguf"}.get(suffix, "gptjax")


def save_weights(
    params: Params, cfg: GPTConfig, path: str | os.PathLike, format: str | None = None, *, overwrite: bool = False,
    **options: Any,
) -> None:
    """Write ``params`` in ``format`` (one of :data:`FORMATS`; by default from the name, :func:`default_format`);
    ``options`` go to that format's writer (``naming`` for torch and safetensors files, ``gguf_type``).
    Atomic: on any failure nothing is left at ``path`` (an earlier file stays as it was).

    An existing destination is refused unless ``overwrite``; then only the files this format writes (the
    weights and their config) are replaced, each atomically, and every other file of a folder is kept."""
    format = format or default_format(path)
    if format not in WRITERS:
        raise ValueError(f"unknown weights format {format!r}; choose one of {', '.join(FORMATS)}")
    if "naming" in options and format not in SINGLE_FILE:
        raise ValueError(f"naming applies to the {' and '.join(SINGLE_FILE)} formats; {format} has its own names")
    check_params(params, cfg)
    WRITERS[format](params, cfg, path, overwrite=overwrite, **options)
