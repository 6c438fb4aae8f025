"""Name table: OpenAI's GPT-2 variable names (``model/h0/attn/c_attn/w``) with its ``hparams.json`` (or a single
file's own gptjax config file), both ways (the release's download is :mod:`gptjax.weights.hub`'s).

A release folder holds ``hparams.json`` and a TensorFlow checkpoint (``checkpoint``, ``model.ckpt.*``)
whose variables are named ``model/wte``, ``model/h0/attn/c_attn/w``, ... Its 1x1 convolution weights
are [1, in, out]: squeezed they are Flax's [in, out]. ``c_attn`` holds query, key and value side by
side, and the output head is the token embedding (tied). Reading needs no TensorFlow
(:mod:`gptjax.weights.tf_checkpoint`); it is imported only to write these checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import GPTConfig
from gptjax.model import Params
from gptjax.weights.files import NamedTensors
from gptjax.weights.lazy import LazyTensors
from gptjax.weights.mapping import (
    Row,
    check_config,
    gpt2_table,
    head_is_tied,
    one_line,
    params_from_tensors,
    sidecar_config,
    tensors_from_params,
    zero_qkv_biases,
)

HPARAMS = "hparams.json"
SCOPE = "model/"
_QKV_BIAS = "/attn/c_attn/b"


def openai_table(cfg: GPTConfig, *, head: bool = True) -> list[Row]:
    """OpenAI variable name -> gptjax tree path. The names are the keys of the squeezed tensors; the
    output head reads ``model/wte`` again (``head=False`` leaves that row out, for writing)."""
    table = gpt2_table(cfg, embeddings=(f"{SCOPE}wte", f"{SCOPE}wpe"), block=lambda i: f"{SCOPE}h{i}/",
                       final=f"{SCOPE}ln_f/", sep="/", weight="w", bias="b", gain="g")
    return table + ([Row(f"{SCOPE}wte", ("out_head", "kernel"), transpose=True)] if head else [])


def settings_to_config(settings: Mapping[str, Any], *, qkv_bias: bool = True, source: str = HPARAMS) -> GPTConfig:
    """hparams.json (``n_vocab``, ``n_ctx``, ``n_embd``, ``n_head``, ``n_layer``) as a GPTConfig."""
    try:
        return GPTConfig(
            vocab_size=settings["n_vocab"],
            context_length=settings["n_ctx"],
            emb_dim=settings["n_embd"],
            n_layers=settings["n_layer"],
            n_heads=settings["n_head"],
            qkv_bias=qkv_bias,
        )
    except KeyError as e:
        raise ValueError(f"{source}: no {e.args[0]!r}; it is not a GPT-2 hparams.json") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {one_line(e)}") from None


def config_to_settings(cfg: GPTConfig) -> dict[str, int]:
    return {
        "n_vocab": cfg.vocab_size,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
    }


def openai_to_params(params_dict: Mapping[str, Any], cfg: GPTConfig) -> Params:
    """gptjax parameters from the book's ``params`` dict (``blocks[i]["attn"]["c_attn"]["w"]``, ``wte``,
    ``wpe``, ``g``, ``b``), as :func:`gptjax.weights.load_openai_checkpoint` returns it."""
    tensors, source = flatten_book_params(params_dict), "OpenAI GPT-2 params"
    ignore = () if cfg.qkv_bias else _zero_qkv_bias(tensors, source)
    return params_from_tensors(openai_table(cfg), tensors, cfg, source=source, ignore=ignore)


def flatten_book_params(params_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The book's nested ``params`` dict back under OpenAI's variable names (its ``g``/``b`` are ``ln_f``'s)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}{k}/", v)
        else:
            out[prefix[:-1]] = node

    for key, value in params_dict.items():
        if key == "blocks":
            for i, block in enumerate(value):
                walk(f"{SCOPE}h{i}/", block)
        elif key in ("g", "b"):
            out[f"{SCOPE}ln_f/{key}"] = value
        else:
            walk(f"{SCOPE}{key}/", value)
    return out


def book_params(tensors: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    """OpenAI-named tensors as the book's nested ``params`` dict (the structure of its gpt_download.py)."""
    params: dict[str, Any] = {"blocks": [{} for _ in range(n_layers)]}
    for name, value in tensors.items():
        parts = name.split("/")[1:]  # without the "model/" scope
        target = params
        if parts[0].startswith("h") and parts[0][1:].isdigit():
            target = params["blocks"][int(parts[0][1:])]
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = value
    return params


# ---------------------------------------------------------------------------------------------
# Files


def is_openai_folder(path: Path) -> bool:
    return (path / HPARAMS).is_file()


def read_settings(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / HPARAMS
    try:
        settings = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found; is {folder} an OpenAI GPT-2 folder (see gptjax.download)?") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {one_line(e)}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is not a JSON object; it is not a GPT-2 hparams.json")
    return settings


def book_release(folder: str | os.PathLike, tensors: LazyTensors) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, params)`` of a release folder whose checkpoint holds ``tensors``, nested as the book's
    ``load_gpt2_params_from_tf_ckpt`` does (see :func:`gptjax.weights.load_openai_checkpoint`)."""
    settings = read_settings(folder)
    tensors = {k: np.squeeze(np.array(v)) for k, v in tensors.items()}
    n_layers = settings.get("n_layer")
    if not isinstance(n_layers, int):
        raise ValueError(f"{Path(folder) / HPARAMS}: no integer 'n_layer'; it is not a GPT-2 hparams.json")
    try:
        return settings, book_params(tensors, n_layers)
    except (IndexError, ValueError) as e:
        raise ValueError(f"{folder}: the checkpoint does not fit hparams.json (n_layer {n_layers}): {one_line(e)}") from None


def claims(names) -> bool:
    return f"{SCOPE}wte" in names


def to_params(found: NamedTensors, cfg: GPTConfig | None) -> tuple[Params, GPTConfig]:
    """Parameters and config from OpenAI-named tensors and the ``hparams.json`` beside them (else the file's
    own config file). Zero c_attn biases (as :func:`to_tensors` writes for a model without them) load as
    ``qkv_bias=False`` unless ``cfg`` or the file's own config asks for them."""
    folder = found.weights_file.parent
    own = None if (folder / HPARAMS).is_file() else sidecar_config(found.weights_file)
    source = f"OpenAI GPT-2 checkpoint {folder}" if own is None else found.source
    tensors = found.tensors
    found = own or settings_to_config(read_settings(folder), source=str(folder / HPARAMS))
    has_bias = any(np.any(tensors[k]) for k in tensors if k.endswith(_QKV_BIAS))
    if cfg is None:
        cfg = found if own is not None else found.replace(qkv_bias=has_bias)
    else:
        cfg = check_config(cfg, {**found.to_dict(), **({} if has_bias else {"qkv_bias": cfg.qkv_bias})}, source)
    ignore = () if cfg.qkv_bias else _zero_qkv_bias(tensors, source)
    return params_from_tensors(openai_table(cfg), _squeezed(tensors, source), cfg, source=source, ignore=ignore), cfg


def to_tensors(params: Params, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """The release's variables as float32 numpy: its names, [1, in, out] convolution weights, zero c_attn
    biases for a model without them. OpenAI's format ties the output head to the token embedding, so
    ``params`` must too."""
    if not head_is_tied(params):
        raise ValueError(
            "OpenAI's GPT-2 format has no separate output head, but out_head differs from tok_emb in these "
            "parameters; save them as hf, torch or gptjax instead"
        )
    tensors = {**tensors_from_params(openai_table(cfg, head=False), params),
               **zero_qkv_biases(cfg, lambda i: f"{SCOPE}h{i}{_QKV_BIAS}")}
    return {k: v[None] if k.endswith("/w") else v for k, v in sorted(tensors.items())}


def config_file(params: Params, cfg: GPTConfig) -> tuple[str, str]:
    """(name, text) of the hparams.json beside the checkpoint."""
    return HPARAMS, json.dumps(config_to_settings(cfg), indent=2) + "\n"


def _squeezed(tensors: LazyTensors, source: str) -> LazyTensors:
    """OpenAI's conv weights are [1, in, out]; only that leading axis goes (np.squeeze would also eat
    any other axis of size 1). Checked on the shapes, before anything is read."""
    for name, shape in tensors.shapes.items():
        if name.endswith("/w") and (len(shape) != 3 or shape[0] != 1):
            raise ValueError(f"{source}: tensor {name!r} has shape {shape}, expected [1, in, out]")
    conv = lambda name: name.endswith("/w")  # noqa: E731
    return tensors.mapped(lambda k, v: v[0] if conv(k) else v, lambda k, s: s[1:] if conv(k) else s)


def _zero_qkv_bias(tensors: Mapping[str, Any], source: str) -> tuple[str, ...]:
    """Without qkv_bias the c_attn biases must be zero (then they change nothing): the name suffix to
    leave out."""
    for k in tensors:
        if k.endswith(_QKV_BIAS) and np.any(np.asarray(tensors[k])):
            raise ValueError(f"{source}: tensor {k!r} is not zero but the config has qkv_bias=False")
    return (_QKV_BIAS,)
