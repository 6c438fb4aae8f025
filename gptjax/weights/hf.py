"""Name table: Hugging Face transformers' ``GPT2LMHeadModel`` names (``h.0.attn.c_attn.weight``, ... once the
``transformer.`` prefix is stripped), in whatever file holds them (safetensors, a torch ``pytorch_model.bin``),
with the ``config.json`` beside them (or a single file's own gptjax config file), both ways (Hub model ids
are :mod:`gptjax.weights.hub`'s).

Its Conv1D weights are already [in, out] like Flax kernels, and ``c_attn`` holds query, key and value side
by side.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import GPTConfig
from gptjax.model import Params
from gptjax.weights.files import NamedTensors, one_line
from gptjax.weights.mapping import (
    Row,
    check_config,
    gpt2_table,
    head_is_tied,
    heads_for,
    params_from_tensors,
    sidecar_config,
    tensors_from_params,
    zero_qkv_biases,
)

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
    table = gpt2_table(cfg, embeddings=("wte.weight", "wpe.weight"), block=lambda i: f"h.{i}.", final="ln_f.",
                       sep=".", weight="weight", bias="bias", gain="weight")
    return table + [Row(LM_HEAD if lm_head else "wte.weight", ("out_head", "kernel"), transpose=True)]


def claims(names) -> bool:
    return "wte.weight" in names


def to_params(found: NamedTensors, cfg: GPTConfig | None) -> tuple[Params, GPTConfig]:
    """Parameters and config from GPT-2-named tensors, with the ``config.json`` beside them if there is one."""
    tensors, source = found.tensors.renamed(lambda k: None if k.endswith(BUFFER_SUFFIXES) else k), found.source
    weights_file = found.weights_file
    folder = weights_file if weights_file.is_dir() else weights_file.parent
    found = _config_from_tensors(tensors, source)
    own = None if weights_file.is_dir() else sidecar_config(weights_file)
    hf_config = None if own is not None else _read_hf_config(folder / CONFIG, found)
    if own is not None:
        cfg = cfg or check_config(own, found, source)
    elif hf_config is not None:
        found["n_heads"] = hf_config["n_head"]
    if cfg is not None:
        cfg = check_config(cfg, found, source)
    else:
        n_heads = found.pop("n_heads", None) or heads_for(found["emb_dim"], source, found)
        cfg = GPTConfig(**{"qkv_bias": False, **found}, n_heads=n_heads)
    # Without qkv_bias the c_attn biases are all zero (checked above): the same model without them.
    ignore = () if cfg.qkv_bias else ("attn.c_attn.bias",)
    lm_head = LM_HEAD in tensors and not np.array_equal(tensors[LM_HEAD], tensors["wte.weight"])
    if not lm_head:
        ignore += (LM_HEAD,)
    table = hf_table(cfg, lm_head=lm_head)
    return params_from_tensors(table, tensors, cfg, source=source, ignore=ignore), cfg


def to_tensors(params: Params, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """``GPT2LMHeadModel``'s state_dict as float32 numpy: an output head that differs from the token embedding
    as ``lm_head.weight`` (:func:`config_file` then says ``tie_word_embeddings: false``), zero c_attn biases
    for a model without them (GPT-2 always has them)."""
    tied = head_is_tied(params)
    tensors = {**tensors_from_params(hf_table(cfg, lm_head=not tied), params),
               **zero_qkv_biases(cfg, lambda i: f"h.{i}.attn.c_attn.bias")}
    return {(k if k == LM_HEAD else PREFIX + k): v for k, v in sorted(tensors.items())}


def config_file(params: Params, cfg: GPTConfig) -> tuple[str, str]:
    """(name, text) of the config.json that transformers reads beside these weights."""
    return CONFIG, json.dumps(hf_config(cfg, tied=head_is_tied(params)), indent=2) + "\n"


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


def _config_from_tensors(tensors: Any, source: str) -> dict[str, Any]:
    """The settings the tensor shapes imply. The c_attn biases decide qkv_bias only when they are not
    all zero: zero biases fit a model with or without them."""
    for key in ("wte.weight", "wpe.weight"):
        if key not in tensors.shapes:
            raise ValueError(f"{source}: missing tensor {key!r}; this is not a GPT-2 checkpoint")
    layers = [int(m.group(1)) for k in tensors if (m := _LAYER_KEY.match(k))]
    if not layers:
        raise ValueError(f"{source}: no transformer blocks (no 'h.0.ln_1.weight'); the file is incomplete")
    found = dict(
        vocab_size=tensors.shapes["wte.weight"][0],
        context_length=tensors.shapes["wpe.weight"][0],
        emb_dim=tensors.shapes["wte.weight"][1],
        n_layers=max(layers) + 1,
    )
    if any(np.any(tensors[k]) for k in tensors if k.endswith("attn.c_attn.bias")):
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
