"""Streaming checkpoint IO: read Hugging Face weights tensor by tensor, write sharded safetensors.

Reading: `CheckpointReader` opens a folder (`model.safetensors`, sharded `model.safetensors.index.json`,
or PyTorch `pytorch_model.bin(.index.json)`) or a single `.safetensors` file, and hands out one tensor at a
time from memory-mapped files. `load_params` fills an abstractly created model (`nnx.eval_shape`) leaf by
leaf, so the full model exists once in memory plus at most one (stacked) leaf being assembled.

Writing: `write_safetensors` plans shards from tensor sizes, then writes them one by one; tensors are
produced lazily, so at most one shard is held on the host at a time.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from llava_jax.convert import params as param_names

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"

Rename = Callable[[str], "str | None"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names file and tensor."""


# ----------------------------------------------------------------------------------------------- reading


def read_config(path: str | os.PathLike) -> dict:
    """The config.json of a checkpoint folder as a dict."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json in the checkpoint folder {path}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e


def _truncation_detail(file: Path) -> str:
    """Which tensor a damaged safetensors file cuts off, from its JSON header."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return f"the file has {size} bytes, fewer than the 8-byte header length"
        header_len = struct.unpack("<Q", raw)[0]
        header = f.read(header_len)
    if len(header) < header_len:
        return f"the header needs {header_len} bytes but the file has {size}"
    available = size - 8 - header_len
    entries = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
    cut = sorted((v["data_offsets"][1], k) for k, v in entries.items() if v["data_offsets"][1] > available)
    if cut:
        return (f"tensor '{cut[0][1]}' needs bytes up to {cut[0][0]} of the data section but only {available} "
                f"are present ({len(cut)} tensor(s) affected)")
    return "the data section does not match the header"


def _to_numpy(tensor) -> np.ndarray:
    """A torch CPU tensor -> numpy, keeping bfloat16 (as ml_dtypes.bfloat16) without a float copy."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class CheckpointReader:
    """Read-only, memory-mapped view over the weights of a checkpoint; tensors are loaded on demand.

    Args:
      path: a checkpoint folder or a single `.safetensors` / `.bin` file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handles: dict[Path, _SafetensorsFile | _TorchFile] = {}
        self._files = self._weight_map()

    # Locating files.
    def _weight_map(self) -> dict[str, Path]:
        p = self.path
        if not p.exists():
            raise FileNotFoundError(f"{p}: checkpoint path does not exist")
        if p.is_file():
            return {name: p for name in self._open(p).keys()}
        for index_name in (SAFE_INDEX, TORCH_INDEX):
            index = p / index_name
            if index.is_file():
                return self._from_index(index)
        for single in (SAFE_WEIGHTS, TORCH_WEIGHTS):
            if (p / single).is_file():
                return {name: p / single for name in self._open(p / single).keys()}
        raise FileNotFoundError(f"{p}: no weights found (looked for {SAFE_INDEX}, {SAFE_WEIGHTS}, {TORCH_INDEX}, "
                                f"{TORCH_WEIGHTS})")

    def _from_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid weight index ({e!r})") from e
        files = {name: index.parent / shard for name, shard in weight_map.items()}
        for name, file in files.items():
            if not file.is_file():
                raise FileNotFoundError(f"{file}: shard listed in {index} for tensor '{name}' does not exist")
        return files

    def _open(self, file: Path):
        if file in self._handles:
            return self._handles[file]
        if file.suffix == ".safetensors":
            try:
                handle = safe_open(str(file), framework="np")
            except SafetensorError as e:
                raise CheckpointError(f"{file}: damaged or truncated safetensors file: {_truncation_detail(file)} "
                                      f"({e})") from e
            handle = _SafetensorsFile(file, handle)
        else:
            handle = _TorchFile(file)
        self._handles[file] = handle
        return handle

    # Access.
    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def file_of(self, name: str) -> Path:
        if name not in self._files:
            raise KeyError(f"{self.path}: no tensor '{name}'")
        return self._files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._open(self.file_of(name)).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._open(self.file_of(name)).dtype(name)

    def get(self, name: str) -> np.ndarray:
        """One tensor as a host numpy array in its stored dtype (bfloat16 as ml_dtypes.bfloat16)."""
        return self._open(self.file_of(name)).get(name)

    def float_dtype(self) -> np.dtype:
        """The most common floating dtype of the stored tensors (bfloat16 stays bfloat16)."""
        counts = Counter(self.dtype(n) for n in self._files)
        floats = [d for d, _ in counts.most_common() if jnp.issubdtype(d, jnp.floating)]
        return floats[0] if floats else np.dtype(np.float32)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SAFE_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
                "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
                "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
                "BOOL": np.dtype(np.bool_)}


class _SafetensorsFile:
    def __init__(self, file: Path, handle):
        self.file, self.handle = file, handle

    def keys(self):
        return self.handle.keys()

    def shape(self, name):
        return tuple(self.handle.get_slice(name).get_shape())

    def dtype(self, name):
        code = self.handle.get_slice(name).get_dtype()
        if code not in _SAFE_DTYPES:
            raise CheckpointError(f"{self.file}: tensor '{name}' has unsupported dtype {code}")
        return _SAFE_DTYPES[code]

    def get(self, name):
        try:
            return self.handle.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.file}: cannot read tensor '{name}' ({e})") from e


class _TorchFile:
    def __init__(self, file: Path):
        import torch

        self.file = file
        try:
            self.tensors = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises RuntimeError / pickle errors / EOFError on damaged files.
            raise CheckpointError(f"{file}: cannot read PyTorch checkpoint ({e})") from e

    def keys(self):
        return self.tensors.keys()

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        return _to_numpy(self.tensors[name].flatten()[:0]).dtype

    def get(self, name):
        return _to_numpy(self.tensors[name])


# ------------------------------------------------------------------------------------- filling a model


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
    from llava_jax.sharding import state_shardings

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


# ----------------------------------------------------------------------------------------------- writing


def model_tensors(model: nnx.Module) -> dict[str, Callable[[], np.ndarray]]:
    """{Hugging Face name: thunk producing that tensor on the host}; stacked leaves are sliced lazily."""
    leaves = _leaves(model)
    out = {}
    for name, (path, layer) in param_names.hf_names(model).items():
        var = leaves[path]
        if layer is None:
            out[name] = lambda var=var: np.asarray(jax.device_get(var.get_value()))
        else:
            out[name] = lambda var=var, layer=layer: np.asarray(jax.device_get(var.get_value()[layer]))
    return out


def tensor_specs(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """{Hugging Face name: shape and dtype} without touching the values."""
    leaves = _leaves(model)
    out = {}
    for name, (path, layer) in param_names.hf_names(model).items():
        value = leaves[path].get_value()
        shape = value.shape if layer is None else value.shape[1:]
        out[name] = jax.ShapeDtypeStruct(shape, value.dtype)
    return out


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '100KiB' / 1000 -> bytes (decimal units like transformers, binary for 'iB')."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"))
    if not match:
        raise ValueError(f"max shard size {size!r}: expected e.g. 5GB, 500MB or a number of bytes")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


def plan_shards(sizes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Groups tensor names (sorted) into consecutive shards of at most `max_shard_size` bytes each.

    A tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(sizes):
        if shards[-1] and used + sizes[name] > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def write_safetensors(tensors: Mapping[str, Callable[[], np.ndarray]], specs: Mapping[str, jax.ShapeDtypeStruct],
                      out_dir: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> list[Path]:
    """Writes `model.safetensors` or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`.

    Args:
      tensors: {name: thunk returning the array}; called once, shard by shard.
      specs: {name: shape/dtype}, used to plan shards before any tensor is produced.
      max_shard_size: bytes or a string like '5GB'.
    Returns:
      The files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {n: int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for n, s in specs.items()}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    if len(shards) == 1:
        files = [SAFE_WEIGHTS]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for stale in [out_dir / SAFE_INDEX, out_dir / SAFE_WEIGHTS, *out_dir.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    for names, file in zip(shards, files):
        shard = {}
        for n in names:
            value = np.ascontiguousarray(tensors[n]())
            if value.shape != tuple(specs[n].shape) or value.dtype != specs[n].dtype:
                raise ValueError(f"tensor '{n}': produced {value.shape} {value.dtype}, planned "
                                 f"{specs[n].shape} {specs[n].dtype}")
            shard[n] = value
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        del shard
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": int(sum(int(np.prod(s.shape)) for s in specs.values())),
                              "total_size": int(sum(sizes.values()))},
                 "weight_map": {n: f for names, f in zip(shards, files) for n in names}}
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [out_dir / f for f in files] + [out_dir / SAFE_INDEX]
    return [out_dir / files[0]]


def iter_checkpoint(reader: CheckpointReader) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of a checkpoint, one at a time."""
    for name in reader.names():
        yield name, reader.get(name)


# ------------------------------------------------------------------------------ our format (Orbax + JSON)

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
    import dataclasses

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
    import orbax.checkpoint as ocp

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
    import orbax.checkpoint as ocp

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
        from llava_jax.sharding import state_shardings

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
    import dataclasses

    names = set()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        names |= _field_names(value) if dataclasses.is_dataclass(value) else {f.name}
    return names


def _replace_fields(config, runtime: dict):
    import dataclasses

    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _replace_fields(value, runtime)
        elif f.name in runtime:
            changes[f.name] = runtime[f.name]
    return dataclasses.replace(config, **changes) if changes else config
