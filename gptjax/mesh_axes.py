"""The mesh's axis names, and the one sharding constraint the model itself applies.

Below :mod:`gptjax.model` (which calls :func:`split_over_batch` in every block) and :mod:`gptjax.sharding`
(which builds meshes with these axes and places parameters and batches on them), so that imports run one
way: sharding -> model -> mesh_axes.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
# Batches are split over every mesh axis: FSDP is data parallelism with sharded state.
BATCH_AXES = MESH_AXES


def split_over_batch(x: jax.Array) -> jax.Array:
    """``x`` ([batch, ...]) kept split over the batch axes when traced for a mesh (the train step traces under
    its mesh: ``make_train_step(mesh=...)``); unchanged otherwise.

    Without it XLA's sharding propagation follows the fsdp-split weights into the activations and holds
    whole-batch activations on every device: for four gpt2-xl-wide blocks at T=1024 and 8 rows per GPU
    on 8 H100s with fsdp=8, 54 GiB of temporaries per device instead of the 11 GiB that one GPU with
    those 8 rows needs (python -m gptjax.aot)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))
