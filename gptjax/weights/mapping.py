"""The tree side of every name table: a :class:`Row` maps one stored tensor (or one part of a fused tensor)
to one path of the gptjax parameter tree, :func:`params_from_tensors` builds the tree from named tensors by
a table (and :func:`tensors_from_params` goes back); plus the config helpers every name table uses."""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gptjax.atomic import atomic_file, check_overwrite
from gptjax.config import GPTConfig
from gptjax.presets import config_from_dict, config_to_dict
from gptjax.model import Params, abstract_params
from gptjax.weights.files import one_line

TreePath = tuple[Any, ...]


@dataclass(frozen=True)
class Row:
    """``key`` in the external format is ``path`` in the gptjax tree; ``transpose`` for torch-style [out, in].

    ``part=(i, n)``: the tensor fuses ``n`` equal slices along its last axis (GPT-2's c_attn holds
    query, key and value side by side) and this row is slice ``i``.
    """

    key: str
    path: TreePath
    transpose: bool = False
    part: tuple[int, int] | None = None


def gpt2_table(cfg: GPTConfig, *, embeddings: tuple[str, str], block: Callable[[int], str], final: str, sep: str,
               weight: str, bias: str, gain: str) -> list[Row]:
    """GPT-2's own module names -> gptjax tree paths, without the output head. OpenAI's release and Hugging
    Face's transformers spell the same modules (``c_attn`` fusing query, key and value; ``c_proj``,
    ``mlp.c_fc``, ``ln_1``, ...) with their own separators and leaf names: ``block(i)`` is block i's prefix,
    ``final`` the last LayerNorm's. Both store [in, out] kernels, as Flax does."""
    table = [Row(embeddings[0], ("tok_emb", "embedding")), Row(embeddings[1], ("pos_emb", "embedding"))]
    for i in range(cfg.n_layers):
        p, b = block(i), ("trf_blocks", i)
        for j, proj in enumerate(("W_query", "W_key", "W_value")):
            table.append(Row(f"{p}attn{sep}c_attn{sep}{weight}", (*b, "att", proj, "kernel"), part=(j, 3)))
            if cfg.qkv_bias:
                table.append(Row(f"{p}attn{sep}c_attn{sep}{bias}", (*b, "att", proj, "bias"), part=(j, 3)))
        for module, path in ((f"attn{sep}c_proj", ("att", "out_proj")), (f"mlp{sep}c_fc", ("ff", "layers", 0)),
                             (f"mlp{sep}c_proj", ("ff", "layers", 2))):
            table += [Row(f"{p}{module}{sep}{weight}", (*b, *path, "kernel")),
                      Row(f"{p}{module}{sep}{bias}", (*b, *path, "bias"))]
        for module, norm in (("ln_1", "norm1"), ("ln_2", "norm2")):
            table += [Row(f"{p}{module}{sep}{gain}", (*b, norm, "scale")),
                      Row(f"{p}{module}{sep}{bias}", (*b, norm, "shift"))]
    return table + [Row(f"{final}{gain}", ("final_norm", "scale")), Row(f"{final}{bias}", ("final_norm", "shift"))]


@functools.lru_cache(maxsize=8)
def _abstract(cfg: GPTConfig) -> Params:
    """abstract_params, once per config: building the model abstractly takes seconds for GPT-2 XL."""
    return abstract_params(cfg)


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
    expected = _abstract(cfg)
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
        # Transposes, slices and shape checks work alike on numpy views (of a file mapping, say) and on
        # the tracers of an abstract check under jax.eval_shape; the one copy comes last.
        value = tensors[row.key]
        if not hasattr(value, "shape"):
            value = np.asarray(value)
        if row.transpose:
            value = value.T
        want = tuple(get_path(expected, row.path).shape)
        full = want if row.part is None else (*want[:-1], want[-1] * row.part[1])
        if value.shape != full:
            got = value.T.shape if row.transpose else value.shape
            raise ValueError(
                f"{source}: tensor {row.key!r} has shape {tuple(got)}, expected "
                f"{tuple(reversed(full)) if row.transpose else full} for config {cfg}"
            )
        if row.part is not None:
            i, size = row.part[0], want[-1]
            value = value[..., i * size : (i + 1) * size]
        if isinstance(value, np.ndarray):
            value = jax.device_put(_own_copy(value))
        else:  # a jax array, or a tracer when the table is checked under jax.eval_shape
            value = value.astype(np.float32)
        set_path(params, row.path, value)
    return params


def _own_copy(value: np.ndarray) -> np.ndarray:
    """``value`` as a C-order float32 copy in 64-byte-aligned memory of its own.

    The copy is needed: the source may be a file mapping or a torch tensor that an optimizer mutates, and
    jax.device_put on the CPU aliases 64-byte-aligned host memory (jax 0.10.2 does so even with
    may_alias=False). The alignment is what lets device_put take this copy over instead of making another,
    so that loading holds one extra copy of one tensor at a time (jnp.array holds two)."""
    size = value.size * 4
    buffer = np.empty(size + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    out = buffer[start : start + size].view(np.float32).reshape(value.shape)
    np.copyto(out, value, casting="unsafe")
    return out


def tensors_from_params(table: list[Row], params: Params) -> dict[str, np.ndarray]:
    """The external tensors (float32 numpy, C-contiguous) for ``params`` following ``table``: the exact
    inverse of :func:`params_from_tensors` (a fused tensor's parts are joined, then transposed)."""
    out: dict[str, np.ndarray] = {}
    parts: dict[str, dict[int, np.ndarray]] = {}
    transposed: dict[str, bool] = {}
    for row in table:
        value = np.asarray(jax.device_get(get_path(params, row.path)), dtype=np.float32)
        if row.part is None:
            out[row.key] = np.array(value.T if row.transpose else value, order="C")  # a writable copy
        else:
            parts.setdefault(row.key, {})[row.part[0]] = value
            transposed[row.key] = row.transpose
    for key, pieces in parts.items():
        joined = np.concatenate([pieces[i] for i in sorted(pieces)], axis=-1)
        out[key] = np.ascontiguousarray(joined.T if transposed[key] else joined)
    return out


def head_is_tied(params: Params) -> bool:
    """Whether the output head is the token embedding (as GPT-2 trained it), so a format that stores one
    matrix for both (Hugging Face's tied ``lm_head``, OpenAI's release) loses nothing."""
    tok_emb = np.asarray(get_path(params, ("tok_emb", "embedding")))
    return np.array_equal(np.asarray(get_path(params, ("out_head", "kernel"))).T, tok_emb)


def zero_qkv_biases(cfg: GPTConfig, key: Any) -> dict[str, np.ndarray]:
    """The fused query/key/value biases of a model built without them, as zeros (the same model), for the
    formats whose GPT-2 layout always has them; ``key(i)`` names block ``i``'s. Empty when ``cfg.qkv_bias``."""
    if cfg.qkv_bias:
        return {}
    return {key(i): np.zeros(3 * cfg.emb_dim, np.float32) for i in range(cfg.n_layers)}


def check_params(params: Params, cfg: GPTConfig) -> None:
    """``params`` must be a full tree with the shapes ``cfg`` implies (before writing them anywhere)."""
    expected = jax.tree_util.tree_flatten_with_path(_abstract(cfg))[0]
    for key_path, want in expected:
        path = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)
        try:
            got = tuple(get_path(params, path).shape)
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ValueError(f"the parameters have no {path_str(path)!r} for config {cfg}") from None
        if got != tuple(want.shape):
            raise ValueError(
                f"parameter {path_str(path)!r} has shape {got}, expected {tuple(want.shape)} for config {cfg}"
            )


# ---------------------------------------------------------------------------------------------
# Configs


ARCH_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads", "qkv_bias")
GPT2_HEAD_DIM = 64


class AssumedHeadsWarning(UserWarning):
    """The weights hold no head count, so GPT-2's 64-wide heads were assumed (once per load)."""


class UnknownHeadsError(ValueError):
    """The weights hold no head count and their emb_dim is no multiple of 64; ``found`` has every other
    architecture setting, so a caller that knows the head count can complete the config."""

    def __init__(self, message: str, found: Mapping[str, Any]):
        super().__init__(message)
        self.found = dict(found)


def heads_for(emb_dim: int, source: str, found: Mapping[str, Any] | None = None) -> int:
    """The head count when only the tensors are known (``found``: what they imply): the shapes do not hold it,
    so assume GPT-2's 64-wide heads, and say so once."""
    if emb_dim % GPT2_HEAD_DIM:
        raise UnknownHeadsError(
            f"{source}: the head count cannot be read from the tensors and emb_dim {emb_dim} is not a multiple "
            f"of GPT-2's head size {GPT2_HEAD_DIM}; pass the head count as cfg.n_heads", found or {"emb_dim": emb_dim})
    n_heads = emb_dim // GPT2_HEAD_DIM
    warnings.warn(AssumedHeadsWarning(
        f"{source} holds no head count: assuming {n_heads} head{'s' * (n_heads != 1)} of {GPT2_HEAD_DIM} (GPT-2's "
        "head size); if that is wrong, pass the head count as cfg.n_heads"), stacklevel=2)
    return n_heads


def check_config(given: GPTConfig, found: Mapping[str, Any], source: str) -> GPTConfig:
    """``given``, once every architecture setting in ``found`` (what the file holds) agrees with it."""
    for name in ARCH_FIELDS:
        if name in found and getattr(given, name) != found[name]:
            raise ValueError(
                f"{source}: the weights have {name}={found[name]!r} but the given config has "
                f"{name}={getattr(given, name)!r}; drop that setting or load matching weights"
            )
    return given


# ---------------------------------------------------------------------------------------------
# The config file that save_weights writes beside single-file formats (.pth): model.pth -> model.config.json

SIDECAR_SUFFIX = ".config.json"
SHARED_SIDECAR = "config.json"  # one per folder: older gptjax wrote it, and the book's GPT_CONFIG dict by hand


def sidecar_path(weights_file: str | os.PathLike) -> Path:
    """Each weights file's own config file, so files sharing a folder never share a config."""
    return Path(weights_file).with_suffix(SIDECAR_SUFFIX)


def config_beside(weights_file: str | os.PathLike, found: Mapping[str, Any], *, source: str) -> GPTConfig:
    """The config of ``weights_file``, whose tensors imply ``found`` (every architecture setting but n_heads).

    From its own config file (which must agree with the tensors: the error names it); else from a plain
    config.json in the folder when that agrees (one that does not belongs to other weights, and is
    ignored); else GPT-2's 64-wide heads, with a notice (:class:`AssumedHeadsWarning`)."""
    own = sidecar_path(weights_file)
    cfg = _read_config_file(own)
    if own.exists() and cfg is None:
        raise ValueError(f"{own} does not describe a gptjax model; fix or remove it, or pass the config")
    if cfg is not None:
        name, value = next(_disagreement(cfg, found), (None, None))
        if name is not None:
            raise ValueError(
                f"{source}: its config file {own} says {name}={getattr(cfg, name)!r}, but the tensors have "
                f"{name}={value!r}; that config belongs to other weights: fix or remove it, or pass the config"
            )
        return cfg
    try:
        shared = _read_config_file(Path(weights_file).with_name(SHARED_SIDECAR))
    except ValueError:  # a folder's config.json may be anyone's: unreadable is not ours
        shared = None
    if shared is not None and not any(_disagreement(shared, found)):
        return shared
    return GPTConfig(**found, n_heads=heads_for(found["emb_dim"], source, found))


def sidecar_config(weights_file: str | os.PathLike) -> GPTConfig | None:
    """The config in ``weights_file``'s own config file (as save_weights writes beside single files), if any."""
    return _read_config_file(sidecar_path(weights_file))


def _disagreement(cfg: GPTConfig, found: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    return ((name, found[name]) for name in ARCH_FIELDS if name in found and getattr(cfg, name) != found[name])


def _read_config_file(path: Path) -> GPTConfig | None:
    """``{"format": "gptjax", "model": {...}}`` as save_weights writes it, or the book's plain GPT_CONFIG dict;
    None when there is no such file or it is some other config (say a Hugging Face one)."""
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {one_line(e)}; fix or remove it, or pass the config") from None
    if isinstance(d, dict) and d.get("format") == "gptjax" and isinstance(d.get("model"), dict):
        d = d["model"]
    if not isinstance(d, dict) or "n_heads" not in d:
        return None
    try:
        return config_from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid gptjax config: {one_line(e)}") from None


def check_sidecar_free(weights_file: str | os.PathLike, overwrite: bool = False) -> None:
    """Before writing ``weights_file``: its config file must be new, or (with ``overwrite``) ours to replace."""
    path = sidecar_path(weights_file)
    check_overwrite(path, overwrite)
    if path.exists() and _read_config_file(path) is None:
        raise ValueError(f"{path} exists and is not a gptjax config; write {Path(weights_file).name} elsewhere")


def sidecar_text(cfg: GPTConfig) -> str:
    """What a weights file's own config file holds."""
    return json.dumps({"format": "gptjax", "model": config_to_dict(cfg)}, indent=2) + "\n"


def write_sidecar(weights_file: str | os.PathLike, cfg: GPTConfig) -> None:
    with atomic_file(sidecar_path(weights_file)) as tmp:
        tmp.write_text(sidecar_text(cfg))
