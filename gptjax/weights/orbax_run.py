"""Reader: gptjax's own orbax directories (a training run, one of its checkpoint steps, a ``save_params``
directory; see :mod:`gptjax.checkpoint`), under the parameter tree's own names (``trf_blocks.0.att.W_query.kernel``)
and with the config they store.

orbax restores the tree whole, each array straight into its device buffer: the leaves handed out are the
parameters' final storage, so nothing is held twice.
"""

from __future__ import annotations

from pathlib import Path

import jax

from gptjax.weights.files import NamedTensors
from gptjax.weights.lazy import LazyTensors


def is_run_folder(path: Path) -> bool:
    from gptjax.checkpoint import is_gptjax_checkpoint

    return is_gptjax_checkpoint(path)


def read(path: Path) -> NamedTensors:
    from gptjax.checkpoint import load_params

    params, cfg = load_params(path)
    leaves = {_name(key_path): leaf for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    tensors = LazyTensors({k: v.shape for k, v in leaves.items()}, leaves.__getitem__)
    return NamedTensors(tensors, Path(path), f"gptjax checkpoint {path}", config=cfg)


def _name(key_path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)
