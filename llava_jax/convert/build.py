"""Models from tensors (the import side): abstract creation, runtime config fields, leaf-by-leaf filling
from checkpoint tensors (`load_params`: the full model exists once in memory plus at most one stacked leaf
being assembled) and vocabulary growth. The way back (model -> named tensors) is in `export.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.convert import params as param_names
from llava_jax.convert.checkpoint_io import CheckpointError, CheckpointReader, Rename
from llava_jax.sharding import state_shardings

def _leaves(model: nnx.Module) -> dict[tuple[str, ...], nnx.Variable]:
    state = nnx.state(model)
    return {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def _is_abstract(var: nnx.Variable) -> bool:
    return isinstance(var.get_value(), jax.ShapeDtypeStruct)


def fresh_leaves(create: Callable[[], nnx.Module], paths: Sequence[tuple[str, ...]]) -> dict[tuple, jax.Array]:
    """Initial values of some leaves of `create()`, computing only those (XLA drops the rest).

    Leaves are addressed by their path in `nnx.state(create())`.
    """
    wanted = set(paths)
    if not wanted:
        return {}

    def init():
        return {p: v.get_value() for p, v in _leaves(create()).items() if p in wanted}

    return jax.jit(init)()


def plan_sources(model: nnx.Module, reader: CheckpointReader, rename: Rename | None = None, *,
                 prefix: str = "", ignore: Callable[[str], bool] | None = None) -> dict[str, tuple]:
    """{our tensor name: (reader, checkpoint name)} for every checkpoint tensor that `rename` keeps.

    Args:
      rename: checkpoint name -> our name (relative to `prefix`), or None to skip the tensor.
      prefix: prepended to every renamed tensor, e.g. 'language_model.' when reading an LLM into LLaVA.
      ignore: our names that may be absent from the model (raise nothing when unexpected).
    Raises:
      CheckpointError on unexpected tensors (naming them and the checkpoint).
    """
    expected = param_names.hf_names(model)
    sources, unexpected = {}, []
    for name in reader.names():
        ours = rename(name) if rename else name
        if ours is None:
            continue
        ours = prefix + ours
        if ours in sources:
            raise CheckpointError(f"{reader.path}: tensors '{sources[ours][1]}' and '{name}' both map to '{ours}'")
        if ours not in expected:
            if not (ignore and ignore(ours)):
                unexpected.append(name)
            continue
        sources[ours] = (reader, name)
    if unexpected:
        raise CheckpointError(f"{reader.path}: unexpected tensors not in the model: {_short(unexpected)}")
    return sources


def _short(names: Sequence[str], n: int = 8) -> str:
    names = sorted(names)
    return ", ".join(f"'{x}'" for x in names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def leaf_shardings(model: nnx.Module, mesh: jax.sharding.Mesh | None) -> dict[tuple, jax.sharding.Sharding]:
    """{leaf path: NamedSharding} from the logical axis names of an (abstract) model; {} without a mesh."""
    if mesh is None:
        return {}
    shardings = state_shardings(nnx.state(model), mesh)
    return {tuple(str(k) for k in p): v.get_value() for p, v in nnx.to_flat_state(shardings)}


def _place(value, sharding: jax.sharding.Sharding | None) -> jax.Array:
    return jnp.asarray(value) if sharding is None else jax.device_put(value, sharding)


def load_params(create: Callable[[], nnx.Module], sources: Mapping[str, tuple], *,
                fresh: Callable[[str], bool] | None = None,
                transform: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
                mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """Builds `create()` abstractly and fills its parameters from checkpoint tensors, leaf by leaf.

    Args:
      create: model factory (e.g. `lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))`).
      sources: {our tensor name: (CheckpointReader, checkpoint name)}, from `plan_sources`.
      fresh: our names that get their freshly initialized value instead (e.g. a new projector).
      transform: {our tensor name: fn} applied to the stored tensor before the shape check.
      mesh: place every leaf directly in its sharding (from its logical axis names) on this mesh.
    Returns:
      The model with every parameter loaded (cast to the model's param dtype); non-parameter state
      (e.g. rng counters) and `fresh` parameters take their initial values.
    Raises:
      CheckpointError naming the checkpoint and tensors for missing tensors and shape mismatches.
    """
    model = nnx.eval_shape(create)
    expected = param_names.hf_names(model)
    missing = [n for n in expected if n not in sources and not (fresh and fresh(n))]
    if missing:
        where = sorted({str(r.path) for r, _ in sources.values()}) or ["<no checkpoint>"]
        raise CheckpointError(f"{', '.join(where)}: missing tensors required by the model: {_short(missing)}")
    transform = transform or {}
    leaves = _leaves(model)
    shardings = leaf_shardings(model, mesh)
    by_leaf: dict[tuple, list[tuple[int | None, str]]] = {}
    for name, (path, layer) in expected.items():
        if name in sources:
            by_leaf.setdefault(path, []).append((layer, name))
    for path, items in by_leaf.items():
        var = leaves[path]
        spec = var.get_value()
        if items[0][0] is None:
            value = _read(sources, items[0][1], spec.shape, spec.dtype, transform)
        else:
            value = np.empty(spec.shape, spec.dtype)
            for layer, name in items:
                value[layer] = _read(sources, name, spec.shape[1:], spec.dtype, transform)
        var.set_value(_place(value, shardings.get(path)))
        del value
    rest = [p for p, v in leaves.items() if _is_abstract(v)]
    for path, value in fresh_leaves(create, rest).items():
        leaves[path].set_value(_place(value, shardings.get(path)))
    return model


def _read(sources, name, shape, dtype, transform) -> np.ndarray:
    reader, stored = sources[name]
    value = reader.get(stored)
    if name in transform:
        value = transform[name](value)
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{reader.file_of(stored)}: tensor '{stored}' has shape {tuple(value.shape)}, "
                              f"the model expects {tuple(shape)} for '{name}'")
    return value.astype(dtype, copy=False)

def _flat(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, object]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), v

def with_runtime(config, **runtime):
    """Returns `config` with runtime fields (dtype, param_dtype, scan_layers, remat, ...) replaced, recursing
    into nested config dataclasses; None values are left alone. Raises TypeError for unknown fields."""
    runtime = {k: v for k, v in runtime.items() if v is not None}
    unknown = set(runtime) - _field_names(config)
    if unknown:
        raise TypeError(f"{type(config).__name__}: unknown config fields {sorted(unknown)}")
    return _replace_fields(config, runtime)


def _field_names(config) -> set[str]:
    names = set()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        names |= _field_names(value) if dataclasses.is_dataclass(value) else {f.name}
    return names


def _replace_fields(config, runtime: dict):
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _replace_fields(value, runtime)
        elif f.name in runtime:
            changes[f.name] = runtime[f.name]
    return dataclasses.replace(config, **changes) if changes else config


def pad_rows(new_rows: int) -> Callable[[np.ndarray], np.ndarray]:
    """[V, D] -> [V + new_rows, D]; new rows are the mean row (transformers' conversion samples around it)."""

    def pad(table: np.ndarray) -> np.ndarray:
        mean = table.astype(np.float32).mean(axis=0, keepdims=True).astype(table.dtype)
        return np.concatenate([table, np.repeat(mean, new_rows, axis=0)], axis=0)

    return pad


def vocab_transforms(prefix: str, grow: int, tied: bool) -> dict:
    if not grow:
        return {}
    names = [prefix + "model.embed_tokens.weight"] + ([] if tied else [prefix + "lm_head.weight"])
    return {n: pad_rows(grow) for n in names}
