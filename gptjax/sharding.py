"""Many devices with jax.sharding: a named mesh, one rule for parameter shardings, sharded batches.

The mesh has two axes: ``data`` (pure data parallelism: parameters replicated) and ``fsdp`` (fully sharded
data parallelism: parameters and optimizer state split over it, batches too). The same pure train step
runs everywhere; only the shardings given to ``jax.jit`` change, and XLA inserts the collectives.

Multi-host runs (one process per host, every process running the same program) join with
:func:`initialize_distributed`; each process then builds its part of every global batch
(:class:`ShardedLoader`) and all of them take part in each jitted step and each orbax save.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gptjax import model
from gptjax.presets import ModelConfig
# split_over_batch lives below gptjax.model, which calls it; it is a mesh tool all the same, so named here too.
from gptjax.mesh_axes import BATCH_AXES, MESH_AXES, split_over_batch  # noqa: F401


# ---------------------------------------------------------------------------------------------
# The mesh


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=4,fsdp=2"`` -> ``{"data": 4, "fsdp": 2}``; missing axes have size 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(
                f"bad mesh {spec!r}: expected comma-separated axis=size with axes {list(MESH_AXES)}, "
                "e.g. mesh 'data=4,fsdp=2'"
            )
        sizes[name.strip()] = int(value)
    return sizes


def make_mesh(sizes: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A mesh over all (or the given) devices; the axis sizes must multiply to the device count.

    Axes are ``Auto``: shardings are given at the jit boundary and XLA propagates them inside."""
    devices = jax.devices() if devices is None else devices
    shape = tuple(sizes.get(axis, 1) for axis in MESH_AXES)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices but {len(devices)} are "
            "available; make the axis sizes multiply to the device count"
        )
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ---------------------------------------------------------------------------------------------
# Parameter and optimizer-state shardings


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """The sharding rule for one parameter (or optimizer-state) array.

    | array                                  | sharding                          |
    |----------------------------------------|-----------------------------------|
    | matrix                                 | its largest axis that ``fsdp``    |
    |                                        | divides, over ``fsdp``            |
    | vectors, scalars, indivisible matrices | replicated                        |

    (GPT-2's vocabulary of 50,257 is odd, so its embedding and output head split along emb_dim; Qwen3's
    151,936 and Llama 3's 128,256 split along the vocabulary, where a tied head is that same matrix.)

    Because the rule looks only at shapes, it holds for every family's tree (RMSNorm scales are vectors,
    grouped-query attention's narrower W_key/W_value are matrices like any other), and AdamW's moments get
    the shardings of their parameters.
    """
    if fsdp_size == 1 or len(shape) < 2:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec: list[Any] = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
    """NamedShardings for every leaf of a tree of arrays (or ShapeDtypeStructs) by :func:`fsdp_spec`."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), abstract_tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract_state(
    cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh | None = None
) -> tuple[model.Params, Any]:
    """(params, optimizer state) as ShapeDtypeStructs carrying their shardings on ``mesh`` (none without one).

    Nothing is allocated: these are the targets orbax restores into, on whatever mesh the run uses now."""
    params = model.abstract_params(cfg)
    opt_state = jax.eval_shape(optimizer.init, params)
    if mesh is None:
        return params, opt_state

    def with_shardings(tree):
        return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      tree, tree_shardings(mesh, tree))

    return with_shardings(params), with_shardings(opt_state)


def init_sharded_params(cfg: ModelConfig, key: jax.Array, mesh: Mesh) -> model.Params:
    """Freshly initialised parameters, each created directly in its shards (never whole on one device),
    with the same values as :func:`gptjax.model.init_params` gives on one device."""
    shardings = tree_shardings(mesh, model.abstract_params(cfg))
    return jax.jit(lambda k: model.init_params(cfg, k), out_shardings=shardings)(key)


def init_sharded_opt_state(optimizer: optax.GradientTransformation, params: model.Params, mesh: Mesh) -> Any:
    """The optimizer state of sharded ``params``, created in its shards (moments like their parameters)."""
    shardings = tree_shardings(mesh, jax.eval_shape(optimizer.init, params))
    return jax.jit(optimizer.init, out_shardings=shardings)(params)


def shard_params(params: model.Params, mesh: Mesh) -> model.Params:
    """Place a whole parameter tree (numpy or on one device, identical on every process, e.g. loaded
    weights) on the mesh; each process copies in only the shards its devices hold."""
    def place(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, params, tree_shardings(mesh, params))


def train_step_jit_kwargs(
    mesh: Mesh, cfg: ModelConfig, optimizer: optax.GradientTransformation, grad_accum: int = 1
) -> dict[str, Any]:
    """``in_shardings``/``out_shardings`` for :func:`gptjax.training.make_train_step` on ``mesh``.

    params and optimizer state keep their shardings through the step (so the donated buffers are
    reused in place), batches arrive split over the data axes, and the key and metrics are replicated."""
    params = model.abstract_params(cfg)
    params_sh, opt_sh = tree_shardings(mesh, params), tree_shardings(mesh, jax.eval_shape(optimizer.init, params))
    batch = batch_sharding(mesh, grad_accum)
    return {
        "in_shardings": (params_sh, opt_sh, (batch, batch), replicated(mesh)),
        "out_shardings": (params_sh, opt_sh, replicated(mesh)),
    }


# ---------------------------------------------------------------------------------------------
# Batches


def batch_sharding(mesh: Mesh, grad_accum: int = 1) -> NamedSharding:
    """Rows split over the data axes: [B, T] batches, or [grad_accum, B, T] micro-batch stacks."""
    return NamedSharding(mesh, P(BATCH_AXES) if grad_accum == 1 else P(None, BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    ways = data_parallel_size(mesh)
    if batch_size % ways:
        raise ValueError(
            f"batch size {batch_size} does not divide over the {ways} data-parallel shards of mesh "
            f"{dict(mesh.shape)}; use a batch size that is a multiple of {ways}"
        )


def process_rows(sharding: NamedSharding, n_rows: int) -> np.ndarray:
    """The rows of an ``n_rows``-row array held by this process's devices, in order: the process-local
    data :func:`jax.make_array_from_process_local_data` expects. All rows for one process."""
    held = sharding.addressable_devices_indices_map((n_rows,)).values()
    return np.unique(np.concatenate([np.arange(n_rows)[index[0]] for index in held]))


class ShardedLoader:
    """A :class:`gptjax.data.DataLoader`'s batches as global arrays split over the mesh's data axes.

    Every process walks the same (seed, epoch) order but reads from the dataset only the rows its own
    devices hold, so a memmapped token file is never read whole or twice. A batch whose rows do not
    split evenly (a last partial validation batch) is replicated instead: small, and still exact.
    ``step_batches`` stacks ``grad_accum`` micro-batches per optimizer step, for the training loop.
    """

    def __init__(self, loader: Any, mesh: Mesh):
        self.loader, self.mesh = loader, mesh
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[jax.Array, jax.Array]]:
        return self.batches(0)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[jax.Array, jax.Array]]:
        """Batch ``start`` onwards of epoch ``epoch``, as (inputs, targets) [B, T]."""
        return self.step_batches(epoch, start, 1)

    def step_batches(self, epoch: int, start: int, grad_accum: int) -> Iterator[tuple[jax.Array, jax.Array]]:
        """Groups of ``grad_accum`` batches from batch ``start`` on, as [grad_accum, B, T] (or [B, T] for one);
        a last group of fewer batches is dropped, as the training loop does."""
        n = len(self.loader)
        if not 0 <= start <= n:
            raise ValueError(f"start must be a batch index between 0 and {n}, got {start}")
        order, size = self.loader.order(epoch), self.loader.batch_size
        for first in range(start, n - grad_accum + 1, grad_accum):
            yield self._place([order[b * size : (b + 1) * size] for b in range(first, first + grad_accum)])

    def _place(self, group: list[np.ndarray]) -> tuple[jax.Array, jax.Array]:
        n_rows = len(group[0])
        split = n_rows % data_parallel_size(self.mesh) == 0
        mine = process_rows(batch_sharding(self.mesh) if split else replicated(self.mesh), n_rows)
        items = [[self.loader.dataset[int(rows[r])] for r in mine] for rows in group]
        local = tuple(np.stack([np.stack([item[k] for item in batch]) for batch in items]) for k in (0, 1))
        global_shape = (len(group), n_rows, *local[0].shape[2:])
        if len(group) == 1:  # a plain [B, T] batch
            local, global_shape = tuple(x[0] for x in local), global_shape[1:]
        sharding = batch_sharding(self.mesh, len(group)) if split else replicated(self.mesh)
        return tuple(jax.make_array_from_process_local_data(sharding, x, global_shape) for x in local)


# ---------------------------------------------------------------------------------------------
# Several hosts


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
    """Join a multi-host run if one is asked for; returns whether this process joined one.

    From the arguments, else the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``; ``auto`` (or any of those) with nothing else lets jax detect the cluster
    (Cloud TPU pod slices, SLURM, Open MPI). Nothing given: a single-process run, nothing to join.
    Must run before anything else touches jax's devices; a process that has joined stays joined.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes or _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if not auto and coordinator is None and num_processes is None and process_id is None:
        return False
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def is_main_process() -> bool:
    """Process 0 writes the run's logs, samples and plots (every process takes part in checkpoints)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Wait until every process gets here (nothing to wait for in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    if not value.strip().isdigit():
        raise ValueError(f"environment variable {name}={value!r} must be a non-negative integer")
    return int(value)
