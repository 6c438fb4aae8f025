"""Hugging Face transformers ``GPT2LMHeadModel`` weights: a folder with ``model.safetensors`` and ``config.json``.

Reading needs only the safetensors package. The names are GPT-2's (``h.0.attn.c_attn.weight``, ...),
with or without the ``transformer.`` prefix that ``GPT2LMHeadModel`` adds. Its Conv1D weights are
already [in, out] like Flax kernels, and ``c_attn`` holds query, key and value side by side.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.atomic import atomic_dir
from gptjax.config import GPTConfig
from gptjax.model import Params
from gptjax.weights.mapping import (
    Row,
    check_config,
    get_path,
    heads_for,
    one_line,
    params_from_tensors,
    tensors_from_params,
)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
# The causal-mask buffers older transformers versions saved with the weights.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# GPT-2's GELU is the tanh approximation, under either name; gptjax has no other.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def hf_table(cfg: GPTConfig, *, lm_head: bool) -> list[Row]:
    """transformers GPT2 key (without ``transformer.``) -> gptjax tree path. ``lm_head``: whether the
    output head has its own ``lm_head.weight`` rather than sharing ``wte.weight``."""
    table = [
        Row("wte.weight", ("tok_emb", "embedding")),
        Row("wpe.weight", ("pos_emb", "embedding")),
    ]
    for i in range(cfg.n_layers):
        p, b = f"h.{i}.", ("trf_blocks", i)
        for j, proj in enumerate(("W_query", "W_key", "W_value")):
            table.append(Row(f"{p}attn.c_attn.weight", (*b, "att", proj, "kernel"), part=(j, 3)))
            if cfg.qkv_bias:
                table.append(Row(f"{p}attn.c_attn.bias", (*b, "att", proj, "bias"), part=(j, 3)))
        table += [
            Row(f"{p}attn.c_proj.weight", (*b, "att", "out_proj", "kernel")),
            Row(f"{p}attn.c_proj.bias", (*b, "att", "out_proj", "bias")),
            Row(f"{p}mlp.c_fc.weight", (*b, "ff", "layers", 0, "kernel")),
            Row(f"{p}mlp.c_fc.bias", (*b, "ff", "layers", 0, "bias")),
            Row(f"{p}mlp.c_proj.weight", (*b, "ff", "layers", 2, "kernel")),
            Row(f"{p}mlp.c_proj.bias", (*b, "ff", "layers", 2, "bias")),
            Row(f"{p}ln_1.weight", (*b, "norm1", "scale")),
            Row(f"{p}ln_1.bias", (*b, "norm1", "shift")),
            Row(f"{p}ln_2.weight", (*b, "norm2", "scale")),
            Row(f"{p}ln_2.bias", (*b, "norm2", "shift")),
        ]
    table += [
        Row("ln_f.weight", ("final_norm", "scale")),
        Row("ln_f.bias", ("final_norm", "shift")),
        Row(LM_HEAD if lm_head else "wte.weight", ("out_head", "kernel"), transpose=True),
    ]
    return table


def is_hf_folder(path: Path) -> bool:
    return (path / SAFETENSORS).is_file() or (path / SAFETENSORS_INDEX).is_file()


def is_safetensors_file(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian) and then the header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def load_hf(path: str | os.PathLike, cfg: GPTConfig | None = None) -> tuple[Params, GPTConfig]:
    """A Hugging Face GPT-2 folder, or a single ``.safetensors`` file (GPT-2 names, or the book's
    names as in a saved ``GPTModel.state_dict()``). The config comes from ``config.json`` when there is one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    tensors = _read_tensors(path)
    source = f"safetensors weights {path}"
    if "tok_emb.weight" in tensors:  # the book's names: a torch state_dict saved with safetensors
        from gptjax.weights.book import load_book_tensors

        return load_book_tensors(tensors, path if path.is_file() else path / SAFETENSORS, cfg, source=source)
    tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items() if not k.endswith(BUFFER_SUFFIXES)}
    found = _config_from_tensors(tensors, source)
    hf_config = _read_hf_config(folder / CONFIG, found)
    if hf_config is not None:
        found["n_heads"] = hf_config["n_head"]
    if cfg is not None:
        cfg = check_config(cfg, found, source)
    else:
        n_heads = found.pop("n_heads", None) or heads_for(found["emb_dim"], source)
        cfg = GPTConfig(**{"qkv_bias": False, **found}, n_heads=n_heads)
    if not cfg.qkv_bias:  # all zero (checked above): the same model without the biases
        tensors = {k: v for k, v in tensors.items() if not k.endswith("attn.c_attn.bias")}
    lm_head = LM_HEAD in tensors and not np.array_equal(tensors[LM_HEAD], tensors.get("wte.weight"))
    if not lm_head:
        tensors.pop(LM_HEAD, None)
    return params_from_tensors(hf_table(cfg, lm_head=lm_head), tensors, cfg, source=source), cfg


def save_hf(params: Params, cfg: GPTConfig, path: str | os.PathLike) -> None:
    """A folder that ``GPT2LMHeadModel.from_pretrained`` and :func:`load_hf` read. An output head that
    differs from the token embedding is written as ``lm_head.weight`` with ``tie_word_embeddings: false``."""
    from safetensors.numpy import save_file

    tok_emb = np.asarray(get_path(params, ("tok_emb", "embedding")))
    tied = np.array_equal(np.asarray(get_path(params, ("out_head", "kernel"))).T, tok_emb)
    tensors = tensors_from_params(hf_table(cfg, lm_head=not tied), params)
    if not cfg.qkv_bias:  # GPT-2 always has these biases; zeros are the same model
        for i in range(cfg.n_layers):
            tensors[f"h.{i}.attn.c_attn.bias"] = np.zeros(3 * cfg.emb_dim, np.float32)
    tensors = {(k if k == LM_HEAD else PREFIX + k): v for k, v in sorted(tensors.items())}
    with atomic_dir(path, is_hf_folder) as tmp:
        save_file(tensors, tmp / SAFETENSORS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(hf_config(cfg, tied=tied), indent=2) + "\n")


def hf_config(cfg: GPTConfig, *, tied: bool) -> dict[str, Any]:
    """transformers' GPT2Config for ``cfg`` (the settings gptjax's model has fixed are written out too)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }


# ---------------------------------------------------------------------------------------------


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if path.is_dir():
        index = path / SAFETENSORS_INDEX
        if (path / SAFETENSORS).is_file():
            files = [path / SAFETENSORS]
        else:  # a sharded checkpoint: the index maps each tensor to its shard
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = [path / name for name in sorted(set(weight_map.values()))]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"cannot read the shard index {index}: {one_line(e)}") from None
    else:
        files = [path]
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"safetensors file {file} not found")
        try:
            tensors.update(load_file(file))
        except Exception as e:  # safetensors raises several types for a damaged file
            raise ValueError(f"cannot read {file}: {one_line(e)}; the file is truncated or corrupt") from None
    return tensors


def _config_from_tensors(tensors: dict[str, np.ndarray], source: str) -> dict[str, Any]:
    """The settings the tensor shapes imply. The c_attn biases decide qkv_bias only when they are not
    all zero: zero biases fit a model with or without them."""
    for key in ("wte.weight", "wpe.weight"):
        if key not in tensors:
            raise ValueError(f"{source}: missing tensor {key!r}; this is not a GPT-2 checkpoint")
    layers = [int(m.group(1)) for k in tensors if (m := _LAYER_KEY.match(k))]
    if not layers:
        raise ValueError(f"{source}: no transformer blocks (no 'h.0.ln_1.weight'); the file is incomplete")
    found = dict(
        vocab_size=int(tensors["wte.weight"].shape[0]),
        context_length=int(tensors["wpe.weight"].shape[0]),
        emb_dim=int(tensors["wte.weight"].shape[1]),
        n_layers=max(layers) + 1,
    )
    if any(np.any(v) for k, v in tensors.items() if k.endswith("attn.c_attn.bias")):
        found["qkv_bias"] = True
    return found


def _read_hf_config(path: Path, found: dict[str, Any]) -> dict[str, Any] | None:
    """transformers' config.json, checked against the tensors and against what gptjax's model computes."""
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {one_line(e)}") from None
    if config.get("model_type") not in (None, "gpt2"):
        raise ValueError(f"{path}: model_type {config['model_type']!r} is not GPT-2; gptjax reads GPT-2 models only")
    for name, value, want in [
        ("activation_function", config.get("activation_function", "gelu_new"), TANH_GELU),
        ("layer_norm_epsilon", config.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        ("scale_attn_weights", config.get("scale_attn_weights", True), (True,)),
        ("scale_attn_by_inverse_layer_idx", config.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        ("n_inner", config.get("n_inner"), (None, 4 * found["emb_dim"])),
    ]:
        if value not in want:
            raise ValueError(f"{path}: {name}={value!r} is not supported (gptjax's GPT-2 needs one of {want})")
    if "n_head" not in config:
        raise ValueError(f"{path}: no 'n_head'; it is not a transformers GPT2Config")
    for name, key in [("vocab_size", "vocab_size"), ("context_length", "n_positions"),
                      ("emb_dim", "n_embd"), ("n_layers", "n_layer")]:
        if key in config and config[key] != found[name]:
            raise ValueError(f"{path} says {key}={config[key]} but the weights have {name}={found[name]}; "
                             "the config does not belong to these weights")
    return config


_LAYER_KEY = re.compile(r"h\.(\d+)\.ln_1\.weight$")
