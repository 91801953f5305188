"""Device mesh and shardings: the only place that knows how arrays are laid out over devices.

The mesh has three named axes from the config: `data` (pure data parallelism), `fsdp` (data parallelism
with parameters and optimizer state sharded) and `tensor` (model parallelism). The batch is split over
('data', 'fsdp'). Parameter shardings come from flax logical axis names (nn.with_logical_partitioning in
the models) mapped onto mesh axes by the config's rule table; unannotated arrays are replicated.
"""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices=None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh; one axis size may be -1 (all remaining devices)."""
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh_config[a]) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"config.mesh {dict(zip(AXES, sizes))}: {len(devices)} devices are not divisible by {known}; "
                "set the mesh axis sizes so that their product divides the device count.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but {len(devices)} are "
            "present; set one axis to -1 to use all devices.")
    # Auto axes: XLA (GSPMD) propagates shardings from the inputs, outputs and annotations we give.
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_size_per_shard(mesh: Mesh, global_batch_size: int) -> int:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % shards or global_batch_size % jax.process_count():
        raise ValueError(
                f"config.batch_size={global_batch_size} is not divisible by the {shards} batch shards of the mesh "
                f"(data x fsdp) and the {jax.process_count()} processes; choose a multiple of "
                f"{np.lcm(shards, jax.process_count())}.")
    return global_batch_size // shards


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_shardings(abstract_tree, mesh: Mesh, rules):
    """NamedShardings for a pytree that may hold flax nn.Partitioned boxes (from eval_shape).

    The result has the structure of nn.unbox(abstract_tree): one sharding per array.
    """
    # optax's masked states (multi_transform, e.g. fix_pred_lr) hold for each parameter they skip a box around
    # a MaskedNode, a pytree without arrays: unboxed, it gets no sharding, just as it holds no array.
    is_box = lambda x: isinstance(x, nn.Partitioned)
    abstract_tree = jax.tree.map(lambda x: x.value if is_box(x) and not jax.tree.leaves(x.value) else x,
                                 abstract_tree, is_leaf=is_box)
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])


def to_global_batch(local_batch, mesh: Mesh):
    """Process-local numpy arrays -> global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                                            local_batch)
