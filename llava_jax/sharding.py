"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names (metadata `out_sharding`, see `llava_jax.models.layers`);
input batches use `batch` and `length`, activations inside the model the `activation_*` names (MaxText
style), applied at layer boundaries with `constrain`. `LOGICAL_RULES` maps each name to a mesh axis (or a
tuple of mesh axes, or None for replicated). A mesh axis is used at most once per array: later dimensions
that map to an axis already taken stay replicated.

Layout: FSDP shards every weight's model dimension over `fsdp` (gathered per layer, in the compute dtype)
and the activations' batch over (`data`, `fsdp`); tensor parallelism splits heads, MLP and vocabulary, and
keeps the residual stream whole (one reduction after the attention and one after the MLP of each block).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP shards the model dimension of every weight; tensor parallelism splits heads, MLP and vocabulary.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("lora", "fsdp"),          # the adapter rank: every lora_a / lora_b is split over fsdp (once per array)
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_kv", None),          # head_dim
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

# Common activation layouts.
BTD = ("activation_batch", "activation_length", "activation_embed")
BTHK = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
BTKK = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")
BTF = ("activation_batch", "activation_length", "activation_mlp")
BTV = ("activation_batch", "activation_length", "activation_vocab")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 (takes the remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known} "
                             f"({dict(zip(MESH_AXES, sizes))})")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {len(devices)} devices "
                         f"({dict(zip(MESH_AXES, sizes))})")
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(axes: Sequence[str | None] | None, rules=LOGICAL_RULES,
                    shape: Sequence[int] | None = None, mesh: jax.sharding.Mesh | None = None) -> P:
    """Logical axis names -> PartitionSpec. With `shape` and `mesh`, axes that do not divide stay replicated."""
    if axes is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        if mesh is not None:
            targets = tuple(t for t in targets if mesh.shape[t] > 1)
            if shape is not None and targets and shape[dim] % int(np.prod([mesh.shape[t] for t in targets])):
                targets = ()
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None], rules=LOGICAL_RULES) -> jax.Array:
    """`jax.lax.with_sharding_constraint` of x by logical axis names under the current mesh
    (`jax.set_mesh`); x unchanged without a mesh. Dimensions that do not divide stay replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: axes {tuple(axes)} do not match shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules, shape=x.shape, mesh=mesh))


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for every leaf of an (abstract) nnx.State, from its `out_sharding` metadata."""

    def leaf_sharding(var):
        axes = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        spec = logical_to_spec(axes, rules, shape=getattr(value, "shape", None), mesh=mesh)
        return var.replace(NamedSharding(mesh, spec)) if isinstance(var, nnx.Variable) else NamedSharding(mesh, spec)

    return jax.tree.map(leaf_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(factory: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules=LOGICAL_RULES) -> nnx.Module:
    """Builds `factory()` directly into its shardings: abstract shapes -> shardings -> jit(out_shardings).

    No host ever materializes the full unsharded model.
    """
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.split(factory())[1]

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch array [B, ...]: the batch dimension over (data, fsdp)."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))
