"""Every family's model presets by one name, and model configs stored as plain dicts that say their family.

GPT-2's presets and aliases are :mod:`gptjax.config`'s; Qwen3's and Llama 3.2's are their modules'. A stored
config (a run directory's ``config.json``, a checkpoint's metadata, a weights file's sidecar) carries
``"family"`` beside the fields; a dict without it is GPT-2's, as gptjax wrote them before other families.
"""

from __future__ import annotations

from typing import Any

from gptjax.config import ALIASES, PRESETS, GPTConfig
from gptjax.llama3 import LLAMA3_CONFIGS, Llama3Config
from gptjax.qwen3 import QWEN3_CONFIGS, Qwen3Config

ModelConfig = GPTConfig | Qwen3Config | Llama3Config

FAMILIES: dict[str, type] = {"gpt2": GPTConfig, "qwen3": Qwen3Config, "llama3": Llama3Config}
MODEL_PRESETS: dict[str, Any] = {**PRESETS, **QWEN3_CONFIGS, **LLAMA3_CONFIGS}


def preset_names() -> list[str]:
    """Every name :func:`model_preset` takes: full preset names, then GPT-2's aliases."""
    return sorted(MODEL_PRESETS) + sorted(ALIASES)


def model_preset(name: str, **overrides) -> ModelConfig:
    """A preset of any family by name (``"gpt2-medium (355M)"``, ``"355M"``, ``"qwen3-0.6b"``,
    ``"llama-3.2-1b"``), with field overrides."""
    key = ALIASES.get(name, name)
    if key not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {preset_names()}")
    return MODEL_PRESETS[key].replace(**overrides) if overrides else MODEL_PRESETS[key]


def family_of(cfg: ModelConfig) -> str:
    for family, cls in FAMILIES.items():
        if type(cfg) is cls:
            return family
    raise TypeError(f"{type(cfg).__name__} is not a model config of gptjax's families ({', '.join(FAMILIES)})")


def config_to_dict(cfg: ModelConfig) -> dict:
    """The plain dict a run directory or checkpoint stores for ``cfg``."""
    return {"family": family_of(cfg), **cfg.to_dict()}


def config_from_dict(d: dict) -> ModelConfig:
    """The config :func:`config_to_dict` stored (or a GPT-2 dict written without ``"family"``)."""
    d = dict(d)
    family = d.pop("family", "gpt2")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[family].from_dict(d)
