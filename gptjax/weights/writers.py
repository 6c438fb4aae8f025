"""Writing weights, the mirror of :func:`gptjax.weights.load_weights`: a name table turns the parameters into
its named tensors (``to_tensors``) and a container writes them (``write``), atomically.

- ``torch``, ``safetensors``: one file in that container; ``openai``: a TensorFlow checkpoint folder, OpenAI's
  release layout. Each takes any naming of :data:`NAMES` (``names``; by default the book's for a file,
  OpenAI's for the folder), with the config beside it: its own config file (``model.pth`` ->
  ``model.config.json``), or for OpenAI's names their ``hparams.json``. So every container and naming pair
  that :func:`~gptjax.weights.load_weights` reads, a Hugging Face-named ``.pth`` say, is also written.
- ``hf``: a Hugging Face folder (``model.safetensors`` + ``config.json``) that transformers loads.
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
from gptjax.weights import book, gguf, hf, hf_gqa, openai, safetensors_file, tf_checkpoint, torch_file, tree_names
from gptjax.weights.files import SAFETENSORS, is_weights_folder
from gptjax.weights.mapping import check_params, check_sidecar_free, sidecar_path, sidecar_text, write_sidecar

NAMES = {"book": book, "hf": hf, "openai": openai, "gptjax": tree_names}  # a naming's name -> its table
NAMED_FORMATS = ("torch", "safetensors", "openai")  # the formats that take ``names``
TORCH_SUFFIXES = (".pth", ".pt")


def _table(names: str) -> ModuleType:
    if names not in NAMES:
        raise ValueError(f"unknown names {names!r}; choose one of {', '.join(NAMES)}")
    return NAMES[names]


def save_file(container: ModuleType, params: Params, cfg: GPTConfig, path: str | os.PathLike, *,
              names: str = "book", overwrite: bool = False) -> None:
    """One ``container`` file of the ``names`` table's tensors at ``path``, and the config in its own file beside
    it (the head count is in no tensor shape). An existing file or config file is replaced only with
    ``overwrite``."""
    table = _table(names)
    check_overwrite(path, overwrite)
    check_sidecar_free(path, overwrite)
    tensors = table.to_tensors(params, cfg)
    with atomic_file(path) as tmp:
        container.write(tmp, tensors)
    write_sidecar(path, cfg)


def save_tf_folder(params: Params, cfg: GPTConfig, path: str | os.PathLike, *, names: str = "openai",
                   overwrite: bool = False) -> None:
    """A TensorFlow checkpoint folder of the ``names`` table's tensors (by default OpenAI's release layout, which
    TensorFlow and :func:`~gptjax.weights.load_weights` read; its tokenizer files and ``.meta`` graph are not
    written, gptjax bundles the tokenizer), with ``hparams.json`` for OpenAI's names, else the checkpoint's own
    config file. Into an existing folder only with ``overwrite``, replacing only those files."""
    table = _table(names)
    if table is openai:
        config_name, config_text = openai.config_file(params, cfg)
    else:
        config_name, config_text = sidecar_path(tf_checkpoint.DEFAULT_PREFIX).name, sidecar_text(cfg)
    _save_folder(params, cfg, path, table, (*tf_checkpoint.written_files(), config_name), config_name, config_text,
                 tf_checkpoint.write_folder, tf_checkpoint.is_checkpoint_folder, overwrite)


def save_hf_folder(params: Params, cfg: GPTConfig, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """A folder that transformers' ``from_pretrained`` (``GPT2LMHeadModel``, or for Llama 3 and Qwen3 configs
    ``LlamaForCausalLM`` / ``Qwen3ForCausalLM``) and :func:`~gptjax.weights.load_weights` read
    (``model.safetensors``, ``config.json``); an output head of its own is written as ``lm_head.weight``. Into an existing folder only with ``overwrite``, replacing only those two files (a
    tokenizer or anything else there stays)."""
    table = hf if isinstance(cfg, GPTConfig) else hf_gqa  # GPT2LMHeadModel, or LlamaForCausalLM / Qwen3ForCausalLM
    config_name, config_text = table.config_file(params, cfg)
    _save_folder(params, cfg, path, table, (SAFETENSORS, config_name), config_name, config_text,
                 lambda folder, tensors: safetensors_file.write(folder / SAFETENSORS, tensors), is_weights_folder,
                 overwrite)


def _save_folder(params: Params, cfg: GPTConfig, path: str | os.PathLike, table: ModuleType, files: tuple[str, ...],
                 config_name: str, config_text: str, write: Callable[[Path, dict], None],
                 is_ours: Callable[[Path], bool], overwrite: bool) -> None:
    writer = atomic_dir(path, files, is_ours, overwrite=overwrite)  # checks, before any work
    tensors = table.to_tensors(params, cfg)
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
    "hf": save_hf_folder,
    "openai": save_tf_folder,
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
    ``options`` go to that format's writer (``names`` for torch, safetensors and openai, ``gguf_type``).
    Atomic: on any failure nothing is left at ``path`` (an earlier file stays as it was).

    An existing destination is refused unless ``overwrite``; then only the files this format writes (the
    weights and their config) are replaced, each atomically, and every other file of a folder is kept."""
    format = format or default_format(path)
    if format not in WRITERS:
        raise ValueError(f"unknown weights format {format!r}; choose one of {', '.join(FORMATS)}")
    if "names" in options and format not in NAMED_FORMATS:
        raise ValueError(f"names applies to the {', '.join(NAMED_FORMATS)} formats; {format} has its own names")
    check_params(params, cfg)
    WRITERS[format](params, cfg, path, overwrite=overwrite, **options)
