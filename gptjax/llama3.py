"""Llama 3.2, as the book's ``ch05/07_gpt_to_llama`` converts the chapter's GPT into it: the config and its
presets. The model is :class:`gptjax.gqa.GQAModel` with RMSNorm eps 1e-5 and RoPE base 500,000 with Llama 3's
frequency scaling (factor 32 past an original context of 8,192).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gptjax.config import Settings
from gptjax.gqa import GQAModel, RopeFreq, check_config


@dataclass(frozen=True)
class Llama3Config(Settings):
    """The book's ``LLAMA32_CONFIG_1B`` and ``_3B``, field for field (its ``rope_freq`` dict as the four
    ``rope_*`` fields; ``dtype`` aside: gptjax keeps float32 parameters and takes the compute dtype per call)."""

    vocab_size: int = 128_256
    context_length: int = 131_072
    emb_dim: int = 2048
    n_heads: int = 32
    n_layers: int = 16
    hidden_dim: int = 8192
    n_kv_groups: int = 8
    rope_base: float = 500_000.0
    rope_factor: float = 32.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context_length: int = 8192
    tie_embeddings: bool = True  # Llama 3.2 1B and 3B share them
    norm_eps: float = 1e-5

    model_class: ClassVar[type] = GQAModel
    qk_norm: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.n_heads, int) and self.n_heads > 0 and self.emb_dim % self.n_heads:
            raise ValueError(f"Llama3Config.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        check_config(self)

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def rope_freq(self) -> RopeFreq:
        return RopeFreq(self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                        self.rope_original_context_length)


LLAMA3_CONFIGS = {
    "llama-3.2-1b": Llama3Config(),
    "llama-3.2-3b": Llama3Config(emb_dim=3072, n_heads=24, n_layers=28),
}
