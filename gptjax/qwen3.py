"""Qwen3 (dense), as the book's ``ch05/11_qwen3`` builds it: the config and its presets. The model is
:class:`gptjax.gqa.GQAModel` with RMSNorm on queries and keys (``qk_norm``), RMSNorm eps 1e-6 and RoPE base 1e6.

    from gptjax.qwen3 import QWEN3_CONFIGS
    cfg = QWEN3_CONFIGS["qwen3-0.6b"]
    params = gptjax.init_params(cfg)            # random; gptjax.load_weights reads the published ones
    logits = gptjax.apply(params, cfg, token_ids)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gptjax.config import Settings
from gptjax.gqa import GQAModel, check_config


@dataclass(frozen=True)
class Qwen3Config(Settings):
    """The book's ``QWEN_CONFIG_06_B`` and its siblings, field for field (``dtype`` aside: gptjax keeps float32
    parameters and takes the compute dtype per call)."""

    vocab_size: int = 151_936
    context_length: int = 40_960
    emb_dim: int = 1024
    n_heads: int = 16
    n_layers: int = 28
    hidden_dim: int = 3072
    head_dim: int = 128
    qk_norm: bool = True
    n_kv_groups: int = 8
    rope_base: float = 1_000_000.0
    tie_embeddings: bool = True  # the published 0.6B, 1.7B and 4B share them; 8B and larger do not
    norm_eps: float = 1e-6

    model_class: ClassVar[type] = GQAModel
    rope_freq: ClassVar[None] = None  # Qwen3 uses RoPE unscaled

    def __post_init__(self) -> None:
        check_config(self)


QWEN3_CONFIGS = {
    "qwen3-0.6b": Qwen3Config(),
    "qwen3-1.7b": Qwen3Config(emb_dim=2048, hidden_dim=6144),
    "qwen3-4b": Qwen3Config(emb_dim=2560, n_heads=32, n_layers=36, hidden_dim=9728),
    "qwen3-8b": Qwen3Config(emb_dim=4096, n_heads=32, n_layers=36, hidden_dim=12288, tie_embeddings=False),
}
