"""Weight formats as readers x name tables: any file gptjax reads, holding any naming it knows.

:func:`load_weights` runs four steps, each in its own module:

1. **detect the reader** from the files (:func:`detect_format`; a Hub model id is first fetched into the
   Hugging Face cache, :mod:`gptjax.weights.hub`);
2. **read**: the reader turns the file or folder into lazily read named tensors (:class:`files.NamedTensors`):
   :mod:`~gptjax.weights.torch_file` (``.pth``/``.pt``/``.bin``, sharded, pre-1.6 torch too),
   :mod:`~gptjax.weights.safetensors_file` (one file or sharded), :mod:`~gptjax.weights.tf_checkpoint`
   (TensorFlow's bundle, read without TensorFlow), :mod:`~gptjax.weights.orbax_run` (gptjax's runs);
   the wrapper prefixes (``_orig_mod.``, ``module.``, ``transformer.``) go, in one place (:mod:`~gptjax.weights.files`);
3. **detect the naming**: the first of :data:`NAMINGS` whose names are there;
4. **map**: that name table builds the config (from the shapes, the config files beside the weights and
   ``cfg``) and the parameter tree (:mod:`~gptjax.weights.mapping`): :mod:`~gptjax.weights.book` (the book's
   ``state_dict``), :mod:`~gptjax.weights.hf` (Hugging Face's ``h.0.attn.c_attn.weight``),
   :mod:`~gptjax.weights.openai` (OpenAI's ``model/h0/attn/c_attn/w``), :mod:`~gptjax.weights.tree_names`
   (gptjax's own ``trf_blocks.0.att.W_query.kernel``).

No reader knows a name and no name table knows a file, so a ``.pth`` of Hugging Face names or a safetensors
file of the book's names goes through the same path. No reader or name table imports a sibling; this module
(reading) and :mod:`~gptjax.weights.writers` (writing) are the only ones that join them.

:func:`save_weights` is the mirror (:mod:`~gptjax.weights.writers`): a name table's ``to_tensors`` and a
container's ``write``, for each of :data:`FORMATS`; a torch, safetensors or TensorFlow container takes any
naming (``names=``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gptjax.config import GPTConfig
from gptjax.model import Params
from gptjax.weights import (book, gguf, hf, hf_gqa, hub, openai, orbax_run, safetensors_file, tf_checkpoint,
                            torch_file, tree_names)
from gptjax.weights.files import NamedTensors, folder_weights, is_weights_folder
from gptjax.weights.writers import FORMATS, WRITERS, save_weights

# Name tables, tried in this order: each has claims(names) -> bool and to_params(NamedTensors, cfg).
NAMINGS = (book, hf, openai, tree_names, hf_gqa)


def detect_format(path: str | os.PathLike) -> str:
    """Which format's reader reads ``path``, from its files (reads at most a few bytes): ``gptjax``,
    ``torch`` (a torch.save'd file), ``hf`` (a Hugging Face folder or a safetensors file) or ``openai``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights {p}: no such file or directory")
    if p.is_dir():
        if orbax_run.is_run_folder(p):
            return "gptjax"
        if openai.is_openai_folder(p) or tf_checkpoint.is_checkpoint_folder(p):
            return "openai"
        if is_weights_folder(p):
            return "hf"
        raise ValueError(
            f"{p} is not a weights folder gptjax knows: expected a gptjax run or checkpoint directory, an OpenAI "
            "GPT-2 folder (hparams.json + model.ckpt.*) or a Hugging Face folder (config.json + model.safetensors "
            "or pytorch_model.bin)"
        )
    if p.suffix in torch_file.SUFFIXES:
        return "torch"
    if safetensors_file.is_safetensors_file(p):
        return "hf"
    if torch_file.is_torch_file(p):
        return "torch"
    if p.suffix == gguf.GGUF_SUFFIX:
        raise ValueError(f"{p}: gptjax writes GGUF files (for llama.cpp) but does not read them; give the "
                         "weights it was exported from")
    raise ValueError(
        f"{p}: unknown weights file format; expected a torch .pth/.pt file or a .safetensors file "
        "(or a gptjax, OpenAI or Hugging Face folder)"
    )


def read_tensors(path: str | os.PathLike) -> NamedTensors:
    """Steps 1 and 2 of :func:`load_weights`: the named tensors at ``path``, without wrapper prefixes."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "gptjax":
        found = orbax_run.read(p)
    elif fmt == "openai":
        found = tf_checkpoint.read_folder(p)
    elif fmt == "torch":
        found = torch_file.read(p)
    elif p.is_dir():  # a Hugging Face folder: safetensors or torch files, as transformers reads them
        file = folder_weights(p)
        read = safetensors_file.read if safetensors_file.is_safetensors_file(file) else torch_file.read
        found = read(file)
        found = NamedTensors(found.tensors, found.weights_file, f"Hugging Face weights {p}")
    else:
        found = safetensors_file.read(p)
    return found.unwrapped()


def load_weights(path: str | os.PathLike, cfg: GPTConfig | None = None) -> tuple[Params, GPTConfig]:
    """Parameters and model config from weights in any format (see :func:`detect_format`) holding any naming
    of :data:`NAMINGS`, or from a Hugging Face Hub model id (``gpt2``, ``gpt2-xl``, ``owner/name``) when no
    such local path exists.

    The config comes from the weights (their config file, else the tensor shapes). A ``cfg`` given here
    must agree with them in every architecture setting (an error names the one that does not); its
    ``drop_rate`` is kept, since no format stores a training-time setting reliably.
    """
    if not Path(path).exists() and hub.is_hub_id(os.fspath(path)):
        path = hub.hub_folder(os.fspath(path))
    found = read_tensors(path)
    names = next((n for n in NAMINGS if n.claims(found.tensors)), None)
    if names is None:
        example = next(iter(found.tensors), None)
        raise ValueError(
            f"{found.source}: none of the tensor names gptjax knows (the book's tok_emb.weight, Hugging Face's "
            f"wte.weight, OpenAI's model/wte, gptjax's tok_emb.embedding; the first here is {example!r}); "
            "these are not GPT-2 weights"
        )
    return names.to_params(found, cfg)


def tokenizer_folder(path: str | os.PathLike) -> Path | None:
    """Where the tokenizer files of the weights at ``path`` (what :func:`load_weights` takes) are: its folder
    (a file's folder), a ``tokenizer/`` folder there, or, for a run directory's checkpoint, the run's
    ``tokenizer/``; a Hub id's cached snapshot. None when there are none (GPT-2 needs none)."""
    p = Path(path)
    if not p.exists() and hub.is_hub_id(os.fspath(path)):
        p = hub.hub_folder(os.fspath(path))
    start = p if p.is_dir() else p.parent
    for folder in (start, start / "tokenizer", *(up / "tokenizer" for up in list(start.parents)[:3])):
        if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")):
            return folder
    return None


def load_openai_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, params)`` exactly as the book's ``load_gpt2_params_from_tf_ckpt``: hparams.json and the
    squeezed variables nested as ``params["blocks"][i]["attn"]["c_attn"]["w"]``, ``wte``, ``wpe``, ``g``, ``b``."""
    return openai.book_release(folder, tf_checkpoint.read_folder(Path(folder)).tensors)


__all__ = ["FORMATS", "NAMINGS", "WRITERS", "detect_format", "load_openai_checkpoint", "load_weights",
           "read_tensors", "save_weights"]
