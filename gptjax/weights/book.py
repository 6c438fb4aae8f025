"""Name table: the book's PyTorch ``GPTModel`` state_dict (chapter 4/5 names: ``trf_blocks.0.att.W_query.weight``),
in whatever file holds it (a torch ``.pth``, a safetensors file), both ways.

torch is imported only inside the functions that need it, so the rest of gptjax runs without it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import GPTConfig, get_config
from gptjax.model import Params
from gptjax.weights.files import NamedTensors, import_torch, to_numpy
from gptjax.weights.mapping import (
    Row,
    check_config,
    config_beside,
    params_from_tensors,
    sidecar_path,
    tensors_from_params,
)

MASK_SUFFIX = ".att.mask"


def book_table(cfg: GPTConfig) -> list[Row]:
    """Book state_dict key -> gptjax tree path. torch Linear weights are [out, in]: transposed."""
    table = [
        Row("tok_emb.weight", ("tok_emb", "embedding")),
        Row("pos_emb.weight", ("pos_emb", "embedding")),
    ]
    for i in range(cfg.n_layers):
        p, b = f"trf_blocks.{i}.", ("trf_blocks", i)
        for proj in ("W_query", "W_key", "W_value", "out_proj"):
            table.append(Row(f"{p}att.{proj}.weight", (*b, "att", proj, "kernel"), transpose=True))
            if cfg.qkv_bias or proj == "out_proj":
                table.append(Row(f"{p}att.{proj}.bias", (*b, "att", proj, "bias")))
        for layer in (0, 2):
            table.append(Row(f"{p}ff.layers.{layer}.weight", (*b, "ff", "layers", layer, "kernel"), transpose=True))
            table.append(Row(f"{p}ff.layers.{layer}.bias", (*b, "ff", "layers", layer, "bias")))
        for norm in ("norm1", "norm2"):
            table.append(Row(f"{p}{norm}.scale", (*b, norm, "scale")))
            table.append(Row(f"{p}{norm}.shift", (*b, norm, "shift")))
    table += [
        Row("final_norm.scale", ("final_norm", "scale")),
        Row("final_norm.shift", ("final_norm", "shift")),
        Row("out_head.weight", ("out_head", "kernel"), transpose=True),
    ]
    return table


def from_torch_state_dict(state_dict: Mapping[str, Any], cfg: GPTConfig) -> Params:
    """Parameters from the book's ``GPTModel.state_dict()`` (the ``att.mask`` buffers may be absent)."""
    tensors = {k: to_numpy(v) for k, v in state_dict.items()}
    return params_from_tensors(book_table(cfg), tensors, cfg, source="torch state_dict", ignore=(MASK_SUFFIX,))


def to_tensors(params: Params, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """The book's state_dict as float32 numpy arrays: every parameter, and each block's causal-mask buffer, so
    that ``GPTModel(cfg).load_state_dict(..., strict=True)`` takes it."""
    tensors = tensors_from_params(book_table(cfg), params)
    for i in range(cfg.n_layers):
        tensors[f"trf_blocks.{i}{MASK_SUFFIX}"] = np.triu(np.ones((cfg.context_length,) * 2, np.float32), k=1)
    return tensors


def to_torch_state_dict(params: Params, cfg: GPTConfig) -> dict[str, Any]:
    """A state_dict that the book's ``GPTModel(cfg).load_state_dict(..., strict=True)`` accepts."""
    torch = import_torch()
    return {k: torch.from_numpy(v) for k, v in to_tensors(params, cfg).items()}


# ---------------------------------------------------------------------------------------------
# Files: torch.save'd state_dicts (.pth / .pt), the book's checkpoint dicts, and their config


def config_from_tensors(
    shapes: Mapping[str, tuple[int, ...]], given: GPTConfig | None, weights_file: Path, *, source: str
) -> GPTConfig:
    """The config implied by book-named tensor shapes. The head count is not in the shapes: it comes from
    ``given``, else the config file beside ``weights_file``, else GPT-2's 64-wide heads (see config_beside)."""
    if "tok_emb.weight" not in shapes or "pos_emb.weight" not in shapes:
        raise ValueError(
            f"{source}: missing tensor 'tok_emb.weight' or 'pos_emb.weight'; "
            "this is not a state_dict of the book's GPTModel"
        )
    vocab_size, emb_dim = shapes["tok_emb.weight"]
    layers = [int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))]
    found = dict(
        vocab_size=int(vocab_size),
        context_length=int(shapes["pos_emb.weight"][0]),
        emb_dim=int(emb_dim),
        n_layers=max(layers) + 1 if layers else 0,
        qkv_bias="trf_blocks.0.att.W_query.bias" in shapes,
    )
    if found["n_layers"] == 0:
        raise ValueError(f"{source}: no transformer blocks (no 'trf_blocks.0.norm1.scale'); the file is incomplete")
    if given is None and not sidecar_path(weights_file).exists():
        given = _published_config(weights_file, found)
    if given is not None:
        return check_config(given, found, source)
    return config_beside(weights_file, found, source=source)


def _published_config(weights_file: Path, found: Mapping[str, Any]) -> GPTConfig | None:
    """The book's converted GPT-2 files (``gpt2-small-124M.pth`` ... ``gpt2-xl-1558M.pth``) are named after
    their size: the head count the shapes leave open comes from that size's config."""
    m = _PUBLISHED_NAME.fullmatch(weights_file.stem)
    if m is None:
        return None
    preset = get_config(f"gpt2-{m.group(1)}")
    return GPTConfig(**found, n_heads=preset.n_heads) if preset.emb_dim == found["emb_dim"] else None


def claims(names) -> bool:
    return "tok_emb.weight" in names


def to_params(found: NamedTensors, cfg: GPTConfig | None) -> tuple[Params, GPTConfig]:
    """Parameters and config from book-named tensors (the ``att.mask`` buffers may be there or not)."""
    cfg = config_from_tensors(found.tensors.shapes, cfg, found.weights_file, source=found.source)
    return params_from_tensors(book_table(cfg), found.tensors, cfg, source=found.source, ignore=(MASK_SUFFIX,)), cfg


_BLOCK_KEY = re.compile(r"trf_blocks\.(\d+)\.norm1\.scale$")
_PUBLISHED_NAME = re.compile(r"gpt2-(small|medium|large|xl)-(124M|355M|774M|1558M)")
