"""Our own model folder format: `model.json` (model type and config as plain JSON) and `params/` (Orbax).

Reading a folder never imports or calls anything the file names: the model and config types come from
fixed allow-lists of our own classes, everything else is plain data."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from llava_jax.atomic_files import replaced_directory
from llava_jax.convert.checkpoint_io import CheckpointError, read_json
from llava_jax.convert.build import _flat, _is_abstract, _leaves, _place, fresh_leaves, leaf_shardings, with_runtime
from llava_jax.convert.export import check_stacked
from llava_jax.convert.families import FAMILIES
from llava_jax.models.dtypes import DTYPES
from llava_jax.models.quant import QuantConfig, quantize_model, quantization_of
from llava_jax.sharding import state_shardings

MODEL_JSON = "model.json"
PARAMS_DIR = "params"

# The only types model.json may name (by "module:qualname", as `save` writes them): the model and config
# classes of the families table, fixed in code; nothing named by the file is ever imported or called.
MODEL_TYPES = {f"{f.model.__module__}:{f.model.__qualname__}": f.model for f in FAMILIES}
CONFIG_TYPES = {f"{f.config.__module__}:{f.config.__qualname__}": f.config for f in FAMILIES}
CONFIG_TYPES[f"{QuantConfig.__module__}:{QuantConfig.__qualname__}"] = QuantConfig
_CONFIG_OF = {f.model: f.config for f in FAMILIES}
# The dtypes a stored config may name: the model dtypes and, for fields that hold other arrays, these.
STORED_DTYPES = (*DTYPES, "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


class FormatError(CheckpointError):
    """A model.json that names something outside the allow-lists or is not our format."""


def _qualname(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def config_to_json(value):
    """A config dataclass (nested dataclasses, dtypes, tuples) -> JSON-able data that `config_from_json` reads."""
    if dataclasses.is_dataclass(value):
        if _qualname(type(value)) not in CONFIG_TYPES:
            raise TypeError(f"{type(value).__name__} is not one of the config types our format stores "
                            f"({', '.join(sorted(CONFIG_TYPES))})")
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


def config_from_json(data, where: str = MODEL_JSON):
    """Plain JSON -> config: dataclasses only from `CONFIG_TYPES`, dtypes only from `STORED_DTYPES`.
    Raises FormatError naming `where` for anything else."""
    if isinstance(data, list):
        return [config_from_json(v, where) for v in data]
    if not isinstance(data, dict):
        return data
    if "__dtype__" in data:
        return jnp.dtype(_allowed(STORED_DTYPES, data["__dtype__"], "dtype", where))
    if "__tuple__" in data:
        return tuple(config_from_json(v, where) for v in data["__tuple__"])
    if "__dataclass__" in data:
        cls = _allowed(CONFIG_TYPES, data["__dataclass__"], "config type", where)
        fields = {k: config_from_json(v, where) for k, v in data.items() if k != "__dataclass__"}
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise FormatError(f"{where}: {cls.__name__} has no fields {sorted(unknown)}")
        return cls(**fields)
    return {k: config_from_json(v, where) for k, v in data.items()}


def _allowed(table, name, what: str, where: str):
    if not isinstance(name, str) or name not in table:
        raise FormatError(f"{where}: {what} {name!r} is not one of ours ({', '.join(sorted(table))})")
    return table[name] if isinstance(table, dict) else name


def read_meta(path: Path) -> tuple[type, object]:
    """(model class, config) of a folder in our format, from its model.json, through the allow-lists only."""
    meta_file = path / MODEL_JSON
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: not a llava_jax checkpoint folder (no {MODEL_JSON})")
    meta = read_json(meta_file, FormatError)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise FormatError(f"{meta_file}: expected {{\"model\": ..., \"config\": {{...}}}}")
    cls = _allowed(MODEL_TYPES, meta.get("model"), "model type", str(meta_file))
    config = config_from_json(meta["config"], str(meta_file))
    if not isinstance(config, _CONFIG_OF[cls]):
        raise FormatError(f"{meta_file}: a {cls.__name__} needs a {_CONFIG_OF[cls].__name__}, got "
                          f"{type(config).__name__}")
    return cls, config


def read_quantization(path: Path) -> QuantConfig | None:
    """The `quantization` entry of a folder's model.json (a `QuantConfig`), None for a float model."""
    meta = read_json(path / MODEL_JSON, FormatError)
    entry = meta.get("quantization") if isinstance(meta, dict) else None
    config = None if entry is None else config_from_json(entry, str(path / MODEL_JSON))
    if config is not None and not isinstance(config, QuantConfig):
        raise FormatError(f"{path / MODEL_JSON}: quantization must be a QuantConfig, got {type(config).__name__}")
    return config


def save(model: nnx.Module, out_dir: str | os.PathLike) -> Path:
    """Writes our format: `model.json` (model type + config as plain JSON, and the `QuantConfig` of a quantized
    model) and `params/` (an Orbax checkpoint).

    The model must be one of `MODEL_TYPES`. The folder is written as a temporary sibling and renamed into
    place: a previous save there is replaced whole, or left intact when this one fails.
    """
    out_dir = Path(out_dir).absolute()
    name = _qualname(type(model))
    if name not in MODEL_TYPES:
        raise TypeError(f"save: {type(model).__name__} is not one of {', '.join(sorted(MODEL_TYPES))}")
    check_stacked(model, "save")
    meta = {"model": name, "config": config_to_json(model.config)}
    if quantization_of(model) is not None:
        meta["quantization"] = config_to_json(quantization_of(model))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with replaced_directory(out_dir) as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, params, force=True)
        (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def load(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, **runtime) -> nnx.Module:
    """Reads a model written by `save`; `runtime` overrides config fields (dtype, param_dtype, scan_layers,
    remat) of the model and of its nested sub-configs that have them. Parameters restored into a different
    `param_dtype` are cast by Orbax. With `mesh`, each parameter is restored directly into its sharding."""
    path = Path(path).absolute()
    cls, config = read_meta(path)
    config = with_runtime(config, **runtime)
    quantization = read_quantization(path)

    def create():
        model = cls(config, rngs=nnx.Rngs(0))
        return model if quantization is None else quantize_model(model, quantization)

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
