"""The book's PyTorch ``GPTModel`` state_dict (chapter 4/5 names), in and out.

torch is imported only inside the functions that need it, so the rest of gptjax runs without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gptjax.config import GPTConfig
from gptjax.model import Params
from gptjax.weights.mapping import Row, params_from_tensors, tensors_from_params

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
    tensors = {k: _to_numpy(v) for k, v in state_dict.items()}
    return params_from_tensors(book_table(cfg), tensors, cfg, source="torch state_dict", ignore=(MASK_SUFFIX,))


def to_torch_state_dict(params: Params, cfg: GPTConfig) -> dict[str, Any]:
    """A state_dict that the book's ``GPTModel(cfg).load_state_dict(..., strict=True)`` accepts."""
    import torch

    state = {k: torch.from_numpy(v) for k, v in tensors_from_params(book_table(cfg), params).items()}
    mask = torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1)
    for i in range(cfg.n_layers):
        state[f"trf_blocks.{i}{MASK_SUFFIX}"] = mask.clone()
    return state


def _to_numpy(value: Any):
    if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy dtype, so upcast first
        return value.detach().to("cpu").float().numpy()
    return value
