"""Name table: transformers' ``LlamaForCausalLM`` and ``Qwen3ForCausalLM`` names (``model.layers.0.self_attn
.q_proj.weight``, ...) in whatever file holds them, with the ``config.json`` beside them (``model_type`` llama
or qwen3), for :mod:`gptjax.gqa`'s models (:class:`~gptjax.llama3.Llama3Config`,
:class:`~gptjax.qwen3.Qwen3Config`), both ways.

torch Linear weights are [out, in]: transposed into Flax kernels. A tied output head (``tie_word_embeddings``,
as the published Llama 3.2 and small Qwen3 are) is the token embedding itself, not a tensor of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.llama3 import Llama3Config
from gptjax.model import Params
from gptjax.qwen3 import Qwen3Config
from gptjax.weights.files import NamedTensors, one_line
from gptjax.weights.mapping import Row, params_from_tensors, tensors_from_params

CONFIG = "config.json"
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FAMILIES = {"llama": Llama3Config, "qwen3": Qwen3Config}
# Buffers some checkpoints carry beside the weights.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)


def gqa_table(cfg: Llama3Config | Qwen3Config) -> list[Row]:
    """transformers key -> gptjax tree path."""
    table = [Row(EMBED, ("tok_emb", "embedding"))]
    for i in range(cfg.n_layers):
        p, b = f"model.layers.{i}.", ("trf_blocks", i)
        for proj, name in (("q_proj", "W_query"), ("k_proj", "W_key"), ("v_proj", "W_value"), ("o_proj", "out_proj")):
            table.append(Row(f"{p}self_attn.{proj}.weight", (*b, "att", name, "kernel"), transpose=True))
        if cfg.qk_norm:
            table += [Row(f"{p}self_attn.q_norm.weight", (*b, "att", "q_norm", "scale")),
                      Row(f"{p}self_attn.k_norm.weight", (*b, "att", "k_norm", "scale"))]
        for proj, name in (("gate_proj", "fc1"), ("up_proj", "fc2"), ("down_proj", "fc3")):
            table.append(Row(f"{p}mlp.{proj}.weight", (*b, "ff", name, "kernel"), transpose=True))
        table += [Row(f"{p}input_layernorm.weight", (*b, "norm1", "scale")),
                  Row(f"{p}post_attention_layernorm.weight", (*b, "norm2", "scale"))]
    table.append(Row("model.norm.weight", ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        table.append(Row(LM_HEAD, ("out_head", "kernel"), transpose=True))
    return table


def to_tensors(params: Params, cfg: Llama3Config | Qwen3Config) -> dict[str, np.ndarray]:
    """The state_dict transformers' model of the family loads, as float32 numpy (a tied head is not stored:
    transformers ties it on loading)."""
    return dict(sorted(tensors_from_params(gqa_table(cfg), params).items()))


def config_file(params: Params, cfg: Llama3Config | Qwen3Config) -> tuple[str, str]:
    """(name, text) of the config.json transformers reads beside these weights: the RoPE settings both as
    transformers 5 spells them (``rope_parameters``) and as earlier versions do (``rope_theta``,
    ``rope_scaling``)."""
    qwen = isinstance(cfg, Qwen3Config)
    scaling = None if qwen else {"rope_type": "llama3", "factor": cfg.rope_factor,
                                 "low_freq_factor": cfg.rope_low_freq_factor,
                                 "high_freq_factor": cfg.rope_high_freq_factor,
                                 "original_max_position_embeddings": cfg.rope_original_context_length}
    config = {
        "architectures": ["Qwen3ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen3" if qwen else "llama",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": False,
        **({} if qwen else {"mlp_bias": False}),
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_base,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_theta": cfg.rope_base, **(scaling or {"rope_type": "default"})},
        "torch_dtype": "float32",
    }
    return CONFIG, json.dumps(config, indent=2) + "\n"


def claims(names) -> bool:
    return EMBED in names


def to_params(found: NamedTensors, cfg: Any) -> tuple[Params, Any]:
    """Parameters and config from Llama- or Qwen3-named tensors and the ``config.json`` beside them."""
    weights_file = found.weights_file
    folder = weights_file if weights_file.is_dir() else weights_file.parent
    stored = read_config(folder / CONFIG, found.source)
    if cfg is not None and cfg != stored:
        name = next(k for k, v in stored.to_dict().items() if getattr(cfg, k, None) != v)
        raise ValueError(f"{found.source}: the weights have {name}={getattr(stored, name)!r} but the given config "
                         f"has {name}={getattr(cfg, name, None)!r}; drop that setting or load matching weights")
    cfg = stored
    ignore = BUFFER_SUFFIXES + ((LM_HEAD,) if cfg.tie_embeddings else ())
    return params_from_tensors(gqa_table(cfg), found.tensors, cfg, source=found.source, ignore=ignore), cfg


def read_config(path: Path, source: str) -> Llama3Config | Qwen3Config:
    """transformers' config.json as a gptjax config of its family; what gptjax's models do not compute (a
    bias, another activation, another RoPE) is an error naming the setting."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{source}: no {CONFIG} beside the weights; Llama and Qwen3 weights need their "
                                "transformers config") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {one_line(e)}") from None
    family = FAMILIES.get(config.get("model_type"))
    if family is None:
        raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not one gptjax reads with these "
                         f"names ({', '.join(FAMILIES)})")
    for name, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(name, want) != want:
            raise ValueError(f"{path}: {name}={config[name]!r} is not supported (gptjax's {family.__name__} needs "
                             f"{want!r})")
    rope = config.get("rope_parameters") or {**(config.get("rope_scaling") or {}),
                                             "rope_theta": config.get("rope_theta", 10_000.0)}
    common = dict(vocab_size=config["vocab_size"], context_length=config["max_position_embeddings"],
                  emb_dim=config["hidden_size"], n_heads=config["num_attention_heads"],
                  n_layers=config["num_hidden_layers"], hidden_dim=config["intermediate_size"],
                  n_kv_groups=config.get("num_key_value_heads", config["num_attention_heads"]),
                  rope_base=float(rope["rope_theta"]), tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                  norm_eps=float(config["rms_norm_eps"]))
    if family is Qwen3Config:
        return Qwen3Config(**common, head_dim=config.get("head_dim") or common["emb_dim"] // common["n_heads"])
    return _llama_config(common, rope, config, path)


def _llama_config(common: dict, rope: dict, config: dict, path: Path) -> Llama3Config:
    if rope.get("rope_type", "default") not in ("llama3", "default"):
        raise ValueError(f"{path}: rope_type {rope['rope_type']!r} is not supported (gptjax's Llama reads llama3 "
                         "or default)")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != common["emb_dim"] // common["n_heads"]:
        raise ValueError(f"{path}: head_dim {head_dim} is not hidden_size / num_attention_heads; gptjax's Llama "
                         "derives it")
    if rope.get("rope_type", "default") == "default":
        return Llama3Config(**common, rope_factor=1.0)  # a factor of 1 scales nothing
    return Llama3Config(**common, rope_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                        rope_high_freq_factor=float(rope["high_freq_factor"]),
                        rope_original_context_length=int(rope["original_max_position_embeddings"]))
