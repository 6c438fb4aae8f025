"""Model configuration: the book's GPT_CONFIG dictionaries as a frozen dataclass with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Self


class Settings:
    """What the frozen dataclasses of settings (GPTConfig, TrainConfig) share: copies with changes, and the
    plain dict a run directory stores, read back with unknown fields refused."""

    def replace(self, **changes) -> Self:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"{type(self).__name__} has no {', '.join(sorted(unknown))} setting (the model has "
                             "no such part); leave it out")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; expected a subset of {sorted(fields)}")
        return cls(**d)


@dataclass(frozen=True)
class GPTConfig(Settings):
    """Architecture of a GPT-2 style model, with the field names of the book's ``GPT_CONFIG_124M``."""

    vocab_size: int = 50257
    context_length: int = 256
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}); "
                "pick a head count that divides the embedding size"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def n_kv_groups(self) -> int:
        """Key/value heads (what a KV cache holds): GPT-2's multi-head attention has one per query head."""
        return self.n_heads



GPT_CONFIG_124M = GPTConfig()

_GPT2_SIZES = {
    "gpt2-small (124M)": dict(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium (355M)": dict(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large (774M)": dict(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl (1558M)": dict(emb_dim=1600, n_layers=48, n_heads=25),
}

PRESETS: dict[str, GPTConfig] = {"GPT_CONFIG_124M": GPT_CONFIG_124M}
PRESETS.update(
    {name: GPTConfig(context_length=1024, qkv_bias=True, **dims) for name, dims in _GPT2_SIZES.items()}
)

# Short names accepted wherever a preset name is: the size tag ("124M") and the Hugging Face id ("gpt2-small").
ALIASES: dict[str, str] = {}
for _name in _GPT2_SIZES:
    _hf_id, _size = _name[:-1].split(" (")
    ALIASES[_size] = _name
    ALIASES[_hf_id] = _name
ALIASES["gpt2"] = "gpt2-small (124M)"


def get_config(name: str, **overrides) -> GPTConfig:
    """A preset by full name (``"gpt2-medium (355M)"``) or alias (``"355M"``, ``"gpt2-medium"``), with overrides."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        choices = sorted(PRESETS) + sorted(ALIASES)
        raise ValueError(f"unknown preset {name!r}; choose one of {choices}")
    return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]
