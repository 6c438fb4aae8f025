"""Weight formats: one module per format, each an explicit name-mapping table onto the gptjax tree.

:func:`load_weights` reads any of them, telling them apart by their files, and :func:`save_weights`
writes any of them:

- ``gptjax``: a training run, one of its checkpoint steps, or a ``save_params`` directory (orbax);
- ``torch``: the book's ``GPTModel.state_dict()`` in a ``.pth`` / ``.pt`` file (or its checkpoint dict);
- ``hf``: a Hugging Face ``GPT2LMHeadModel`` folder (``config.json`` + ``model.safetensors``, sharded
  safetensors, or ``pytorch_model.bin``, sharded or not), one ``.safetensors`` file, or a Hub model id
  (``gpt2``, ``openai-community/gpt2-xl``) read from the Hugging Face cache or downloaded into it;
- ``openai``: OpenAI's GPT-2 release folder (TensorFlow checkpoint + ``hparams.json``; read without TensorFlow).
"""

from __future__ import annotations

import os
from pathlib import Path

from gptjax.config import GPTConfig
from gptjax.model import Params
from gptjax.weights.mapping import check_config, check_params

FORMATS = ("gptjax", "torch", "hf", "openai")
TORCH_SUFFIXES = (".pth", ".pt")

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6


def detect_format(path: str | os.PathLike) -> str:
    """Which of :data:`FORMATS` ``path`` holds, from its files (reads at most a few bytes)."""
    from gptjax.checkpoint import is_gptjax_checkpoint
    from gptjax.weights.hf import is_hf_folder, is_safetensors_file
    from gptjax.weights.openai import is_openai_folder

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights {p}: no such file or directory")
    if p.is_dir():
        if is_gptjax_checkpoint(p):
            return "gptjax"
        if is_openai_folder(p):
            return "openai"
        if is_hf_folder(p):
            return "hf"
        raise ValueError(
            f"{p} is not a weights folder gptjax knows: expected a gptjax run or checkpoint directory, an OpenAI "
            "GPT-2 folder (hparams.json + model.ckpt.*) or a Hugging Face folder (config.json + model.safetensors "
            "or pytorch_model.bin)"
        )
    if p.suffix in TORCH_SUFFIXES or p.suffix == ".bin":  # .bin: transformers' pytorch_model.bin
        return "torch"
    if p.suffix == ".safetensors" or is_safetensors_file(p):
        return "hf"
    with open(p, "rb") as f:
        if f.read(4) == _ZIP_MAGIC:
            return "torch"
    raise ValueError(
        f"{p}: unknown weights file format; expected a torch .pth/.pt file or a .safetensors file "
        "(or a gptjax, OpenAI or Hugging Face folder)"
    )


def load_weights(path: str | os.PathLike, cfg: GPTConfig | None = None) -> tuple[Params, GPTConfig]:
    """Parameters and model config from weights in any format (see :func:`detect_format`), or from a
    Hugging Face Hub model id (``gpt2``, ``gpt2-xl``, ``owner/name``) when no such local path exists.

    The config comes from the weights (their config file, else the tensor shapes). A ``cfg`` given here
    must agree with them in every architecture setting (an error names the one that does not); its
    ``drop_rate`` is kept, since no format stores a training-time setting reliably.
    """
    from gptjax.weights.hf import hub_folder, is_hub_id

    if not Path(path).exists() and is_hub_id(os.fspath(path)):
        path = hub_folder(os.fspath(path))
    fmt = detect_format(path)
    if fmt == "gptjax":
        from gptjax.checkpoint import load_params

        params, found = load_params(path)
        return params, (found if cfg is None else check_config(cfg, found.to_dict(), f"gptjax checkpoint {path}"))
    if fmt == "torch":
        from gptjax.weights.book import load_torch

        return load_torch(path, cfg)
    if fmt == "hf":
        from gptjax.weights.hf import load_hf

        return load_hf(path, cfg)
    from gptjax.weights.openai import load_openai

    return load_openai(path, cfg)


def save_weights(
    params: Params, cfg: GPTConfig, path: str | os.PathLike, format: str | None = None, *, overwrite: bool = False
) -> None:
    """Write ``params`` in ``format`` (one of :data:`FORMATS`; by default ``torch`` for a .pth/.pt path,
    else ``gptjax``). Atomic: on any failure nothing is left at ``path`` (an earlier file stays as it was).

    An existing destination is refused unless ``overwrite``; then only the files this format writes (the
    weights and their config) are replaced, each atomically, and every other file of a folder is kept."""
    if format is None:
        format = "torch" if Path(path).suffix in TORCH_SUFFIXES else "gptjax"
    if format not in FORMATS:
        raise ValueError(f"unknown weights format {format!r}; choose one of {', '.join(FORMATS)}")
    check_params(params, cfg)
    if format == "gptjax":
        from gptjax.checkpoint import save_params as save
    elif format == "torch":
        from gptjax.weights.book import save_torch as save
    elif format == "hf":
        from gptjax.weights.hf import save_hf as save
    else:
        from gptjax.weights.openai import save_openai as save
    save(params, cfg, path, overwrite=overwrite)


__all__ = ["FORMATS", "detect_format", "load_weights", "save_weights"]
