"""Checkpoints with orbax: a run's full training state, and weights-only parameter directories.

Layouts (every directory written by orbax, which writes to a temporary name and renames, so a
process killed mid-save leaves the earlier checkpoints intact):

    RUN/checkpoints/<step>/params      the parameter tree
    RUN/checkpoints/<step>/opt_state   the optimizer state
    RUN/checkpoints/<step>/meta        JSON: model config, step, data position, RNG key
    PARAMS_DIR/params + PARAMS_DIR/config.json    (save_params: weights only)

The parameter tree has int keys for list indices (``trf_blocks[0]``); orbax stores them as strings,
so every restore is given the abstract tree of the config, which brings the int keys back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gptjax.atomic import atomic_dir
from gptjax.presets import ModelConfig, config_from_dict, config_to_dict
from gptjax.model import Params, abstract_params
from gptjax.training import OptState, Position

CHECKPOINTS = "checkpoints"
PARAMS, OPT_STATE, META = "params", "opt_state", "meta"
CONFIG_JSON = "config.json"
FORMAT = "gptjax"


# ---------------------------------------------------------------------------------------------
# Training state (a run directory's checkpoints)


def checkpoint_manager(run_dir: str | os.PathLike, keep: int = 3) -> ocp.CheckpointManager:
    """The run's orbax CheckpointManager, keeping the last ``keep`` checkpoints.

    Saves are synchronous because the train step donates (reuses) the buffers of the arrays being
    saved; temporary directories left by a save that was killed are removed when it opens."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINTS, item_names=(PARAMS, OPT_STATE, META),
                                 options=options)


def save_checkpoint(
    manager: ocp.CheckpointManager,
    position: Position,
    params: Params,
    opt_state: OptState,
    key: jax.Array,
    cfg: ModelConfig,
) -> None:
    """Save the state after ``position.step`` optimizer steps as checkpoint ``position.step``."""
    meta = {
        "format": FORMAT,
        "model": config_to_dict(cfg),
        **dataclasses.asdict(position),
        "rng_impl": str(jax.random.key_impl(key)),
        "rng_key": np.asarray(jax.random.key_data(key)).tolist(),
    }
    manager.save(
        position.step,
        args=ocp.args.Composite(
            **{
                PARAMS: ocp.args.StandardSave(params),
                OPT_STATE: ocp.args.StandardSave(opt_state),
                META: ocp.args.JsonSave(meta),
            }
        ),
    )
    manager.wait_until_finished()


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """The last completely written checkpoint of a run (unfinished temporary saves are ignored)."""
    return max(ocp.utils.checkpoint_steps(Path(run_dir).absolute() / CHECKPOINTS), default=None)


def restore_checkpoint(
    run_dir: str | os.PathLike, params_target: Any, opt_state_target: Any, *, step: int | None = None
) -> tuple[Params, OptState, Position, jax.Array]:
    """(params, opt_state, position, rng key) of checkpoint ``step`` (default: the latest).

    The targets are the trees to restore into (arrays or ``jax.ShapeDtypeStruct``s, e.g. from
    ``jax.eval_shape`` or :func:`gptjax.sharding.abstract_state`); their shardings, where given, place
    the restored arrays, so a checkpoint written on one mesh restores onto another (or onto one device).
    In a multi-host run every process calls this (and :func:`save_checkpoint`) together.
    """
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise ValueError(f"{run_dir} has no checkpoint to resume from; start a new run instead")
    step_dir = Path(run_dir).absolute() / CHECKPOINTS / str(step)
    meta = _read_meta(step_dir)
    params = _restore_tree(step_dir / PARAMS, params_target)
    opt_state = _restore_tree(step_dir / OPT_STATE, opt_state_target)
    fields = {f.name for f in dataclasses.fields(Position)}
    position = Position(**{k: int(v) for k, v in meta.items() if k in fields})
    key = jax.random.wrap_key_data(np.asarray(meta["rng_key"], np.uint32), impl=meta["rng_impl"])
    return params, opt_state, position, key


# ---------------------------------------------------------------------------------------------
# Weights only


def save_params(params: Params, cfg: ModelConfig, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``params`` and ``cfg`` as a gptjax parameter directory (``params/`` and ``config.json``), atomically.
    An existing folder needs ``overwrite``; then only those two entries are replaced."""
    with atomic_dir(path, (PARAMS, CONFIG_JSON), _is_params_dir, overwrite=overwrite) as tmp:
        ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(tmp / PARAMS, args=ocp.args.StandardSave(params))
        (tmp / CONFIG_JSON).write_text(json.dumps({"format": FORMAT, "model": config_to_dict(cfg)}, indent=2) + "\n")


def load_params(path: str | os.PathLike) -> tuple[Params, ModelConfig]:
    """Parameters and config from a run directory (its latest checkpoint), a checkpoint step
    directory (RUN/checkpoints/<step>) or a :func:`save_params` directory."""
    step_dir, cfg = _locate(Path(path))
    return _restore_tree(step_dir / PARAMS, abstract_params(cfg)), cfg


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The training step of the checkpoint :func:`load_params` reads at ``path`` (a run's latest, or a step
    directory's own); None for a save_params directory, which records none."""
    step_dir, _ = _locate(Path(path))
    return int(_read_meta(step_dir)["step"]) if _is_step_dir(step_dir) else None


def is_gptjax_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like something :func:`load_params` reads (cheap; reads no arrays)."""
    p = Path(path)
    return p.is_dir() and (_is_run_dir(p) or _is_params_dir(p) or _is_step_dir(p))


# ---------------------------------------------------------------------------------------------


def _is_run_dir(p: Path) -> bool:
    return (p / CHECKPOINTS).is_dir() and (p / CONFIG_JSON).is_file()


def _is_params_dir(p: Path) -> bool:
    return (p / PARAMS).is_dir() and (p / CONFIG_JSON).is_file()


def _is_step_dir(p: Path) -> bool:
    return (p / PARAMS).is_dir() and (p / META).is_dir()


def _locate(p: Path) -> tuple[Path, ModelConfig]:
    """The directory holding ``params`` and the model config, for any of the three layouts."""
    if not p.exists():
        raise FileNotFoundError(f"no gptjax checkpoint at {p}: the path does not exist")
    p = p.absolute()
    if _is_run_dir(p):
        step = latest_step(p)
        if step is None:
            raise ValueError(f"run directory {p} has no finished checkpoint yet; wait for a save or pass a "
                             "parameter directory")
        p = p / CHECKPOINTS / str(step)
    if _is_step_dir(p):
        return p, _config_from(_read_meta(p), p / META)
    if _is_params_dir(p):
        try:
            config = json.loads((p / CONFIG_JSON).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {p / CONFIG_JSON}: {_one_line(e)}") from None
        return p, _config_from(config, p / CONFIG_JSON)
    raise ValueError(
        f"{p} is not a gptjax checkpoint: expected a run directory (with {CHECKPOINTS}/), a checkpoint step "
        f"directory (with {PARAMS}/ and {META}/) or a save_params directory (with {PARAMS}/ and {CONFIG_JSON})"
    )


def _config_from(d: Any, source: Path) -> ModelConfig:
    if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("model"), dict):
        raise ValueError(f"{source} does not describe a gptjax model (no 'format': 'gptjax' and 'model' entry)")
    return config_from_dict(d["model"])


def _read_meta(step_dir: Path) -> dict:
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / META)
    except Exception as e:  # orbax raises many types for a damaged directory
        raise ValueError(_damaged(step_dir / META, e)) from None


def _restore_tree(item_dir: Path, target: Any) -> Any:
    # Leaves without a sharding land on this process's first device (jax.devices()[0] belongs to
    # process 0 in a multi-host run).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(x):
        sharding = getattr(x, "sharding", None) or device
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    try:
        return ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
            item_dir, args=ocp.args.StandardRestore(jax.tree_util.tree_map(abstract, target))
        )
    except Exception as e:  # orbax raises many types for a damaged directory
        raise ValueError(_damaged(item_dir, e)) from None


def _damaged(path: Path, e: BaseException) -> str:
    return (f"cannot read the gptjax checkpoint at {path}: {_one_line(e)}; it is incomplete or corrupt "
            "(an earlier step in the run's checkpoints/ directory may still load)")


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
