"""Shared machinery for the weight formats: a table row maps one external tensor to one tree path."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig
from gptjax.model import Params, abstract_params

TreePath = tuple[Any, ...]


@dataclass(frozen=True)
class Row:
    """``key`` in the external format is ``path`` in the gptjax tree; ``transpose`` for torch-style [out, in]."""

    key: str
    path: TreePath
    transpose: bool = False


def get_path(tree: Mapping, path: TreePath) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def set_path(tree: dict, path: TreePath, value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def path_str(path: TreePath) -> str:
    return ".".join(str(p) for p in path)


def params_from_tensors(
    table: list[Row], tensors: Mapping[str, Any], cfg: GPTConfig, *, source: str, ignore: tuple[str, ...] = ()
) -> Params:
    """Build the parameter tree from ``tensors`` (name -> array-like) following ``table``.

    Every tensor the table names must be present with the shape ``cfg`` implies, and no tensor
    may be left over (except names ending in one of ``ignore``): a mismatch is an error naming
    the tensor, never a silently half-loaded model.
    """
    expected = abstract_params(cfg)
    wanted = {row.key for row in table}
    missing = [row.key for row in table if row.key not in tensors]
    if missing:
        raise ValueError(
            f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all) for config {cfg}; "
            "is the checkpoint complete and the config right?"
        )
    extra = [k for k in tensors if k not in wanted and not k.endswith(ignore)]
    if extra:
        raise ValueError(
            f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all); "
            f"the weights do not fit config {cfg}"
        )
    params: dict = {}
    for row in table:
        value = np.asarray(tensors[row.key], dtype=np.float32)
        if row.transpose:
            value = value.T
        want = tuple(get_path(expected, row.path).shape)
        if value.shape != want:
            got = value.T.shape if row.transpose else value.shape
            raise ValueError(
                f"{source}: tensor {row.key!r} has shape {tuple(got)}, expected "
                f"{tuple(reversed(want)) if row.transpose else want} for config {cfg}"
            )
        set_path(params, row.path, jnp.asarray(value))
    return params


def tensors_from_params(table: list[Row], params: Params) -> dict[str, np.ndarray]:
    """The external tensors (float32 numpy, C-contiguous) for ``params`` following ``table``."""
    out = {}
    for row in table:
        value = np.asarray(jax.device_get(get_path(params, row.path)), dtype=np.float32)
        out[row.key] = np.array(value.T if row.transpose else value, order="C")  # a writable copy
    return out
