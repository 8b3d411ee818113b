"""Our own model folder format: `model.json` (model class and config as plain JSON) and `params/` (Orbax)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from llava_jax.convert.build import _flat, _is_abstract, _leaves, _place, fresh_leaves, leaf_shardings, with_runtime
from llava_jax.sharding import state_shardings

MODEL_JSON = "model.json"
PARAMS_DIR = "params"


def _qualname(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _import(qualname: str):
    import importlib

    module, name = qualname.split(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def config_to_json(value):
    """A config dataclass (nested dataclasses, dtypes, tuples) -> JSON-able data that `config_from_json` reads."""
    if dataclasses.is_dataclass(value):
        fields = {f.name: config_to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__dataclass__": _qualname(type(value)), **fields}
    if isinstance(value, (list, tuple)):
        return {"__tuple__": [config_to_json(v) for v in value]} if isinstance(value, tuple) else \
            [config_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: config_to_json(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        return {"__dtype__": jnp.dtype(value).name}
    except TypeError:
        raise TypeError(f"config value {value!r} of type {type(value).__name__} cannot be stored as JSON") from None


def config_from_json(data):
    if isinstance(data, list):
        return [config_from_json(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "__dtype__" in data:
        return jnp.dtype(data["__dtype__"])
    if "__tuple__" in data:
        return tuple(config_from_json(v) for v in data["__tuple__"])
    if "__dataclass__" in data:
        cls = _import(data["__dataclass__"])
        return cls(**{k: config_from_json(v) for k, v in data.items() if k != "__dataclass__"})
    return {k: config_from_json(v) for k, v in data.items()}


def save(model: nnx.Module, out_dir: str | os.PathLike) -> Path:
    """Writes our format: `model.json` (model class + config) and `params/` (an Orbax checkpoint).

    The model class must be constructible as `cls(config, rngs=...)` and expose `model.config`.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": _qualname(type(model)), "config": config_to_json(model.config)}
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / PARAMS_DIR, params, force=True)
    (out_dir / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def load(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, **runtime) -> nnx.Module:
    """Reads a model written by `save`; `runtime` overrides config fields (dtype, param_dtype, scan_layers,
    remat) of the model and of its nested sub-configs that have them. Parameters restored into a different
    `param_dtype` are cast by Orbax. With `mesh`, each parameter is restored directly into its sharding."""
    path = Path(path).absolute()
    meta_file = path / MODEL_JSON
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: not a llava_jax checkpoint folder (no {MODEL_JSON})")
    meta = json.loads(meta_file.read_text())
    cls = _import(meta["model"])
    config = with_runtime(config_from_json(meta["config"]), **runtime)

    def create():
        return cls(config, rngs=nnx.Rngs(0))

    abstract = nnx.eval_shape(create)
    targets = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    if mesh is not None:
        shardings = nnx.to_pure_dict(state_shardings(nnx.state(abstract, nnx.Param), mesh))
        targets = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), targets, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path / PARAMS_DIR, targets)
    leaves = _leaves(abstract)
    for path_, value in _flat(restored):
        leaves[path_].set_value(value)
    rest = [p for p, v in leaves.items() if _is_abstract(v)]
    shardings = leaf_shardings(abstract, mesh) if rest else {}
    for path_, value in fresh_leaves(create, rest).items():
        leaves[path_].set_value(_place(value, shardings.get(path_)))
    return abstract
