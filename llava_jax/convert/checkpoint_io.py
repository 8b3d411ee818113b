"""Checkpoint files: read Hugging Face weights tensor by tensor, write sharded safetensors.

Reading: `CheckpointReader` opens a folder (`model.safetensors`, sharded `model.safetensors.index.json`,
or PyTorch `pytorch_model.bin(.index.json)`) or a single `.safetensors` file, and hands out one tensor at a
time from memory-mapped files.

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
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"

Rename = Callable[[str], "str | None"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names file and tensor."""


# ----------------------------------------------------------------------------------------------- reading


def read_json(file: Path, error: type[Exception]):
    """The parsed JSON of `file`; `error` naming the file when it is not valid JSON text."""
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{file}: not valid JSON ({e})") from None


def read_config(path: str | os.PathLike) -> dict:
    """The config.json of a checkpoint folder as a dict."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json in the checkpoint folder {path}")
    config = read_json(file, CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


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
