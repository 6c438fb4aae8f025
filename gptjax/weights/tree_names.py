"""Name table: gptjax's own parameter tree, each leaf named by its path (``trf_blocks.0.att.W_query.kernel``),
as orbax stores it, both ways. The table is the identity: the names are the tree."""

from __future__ import annotations

import jax
import numpy as np

from gptjax.config import GPTConfig
from gptjax.model import Params, abstract_params
from gptjax.weights.files import NamedTensors
from gptjax.weights.mapping import Row, check_config, config_beside, params_from_tensors, tensors_from_params

MARKER = "tok_emb.embedding"


def claims(names) -> bool:
    return MARKER in names


def tree_table(cfg: GPTConfig) -> list[Row]:
    """Each leaf's path, joined with dots, -> that path."""
    paths = [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)
             for key_path, _ in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]]
    return [Row(".".join(map(str, p)), p) for p in paths]


def to_params(found: NamedTensors, cfg: GPTConfig | None) -> tuple[Params, GPTConfig]:
    """The stored config (a gptjax run's), else the one the shapes and a config file beside imply."""
    stored = found.config
    if stored is not None:  # any family's
        implied = stored.to_dict()
    else:  # only GPT-2's shapes say their config
        shapes = found.tensors.shapes
        implied = dict(
            vocab_size=shapes[MARKER][0], context_length=shapes["pos_emb.embedding"][0], emb_dim=shapes[MARKER][1],
            n_layers=len({k.split(".")[1] for k in shapes if k.startswith("trf_blocks.")}),
            qkv_bias="trf_blocks.0.att.W_query.bias" in shapes,
        )
    if cfg is not None:
        cfg = check_config(cfg, implied, found.source)
    else:
        cfg = stored or config_beside(found.weights_file, implied, source=found.source)
    return params_from_tensors(tree_table(cfg), found.tensors, cfg, source=found.source), cfg


def to_tensors(params: Params, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """Every leaf as float32 numpy, named by its path."""
    return tensors_from_params(tree_table(cfg), params)
