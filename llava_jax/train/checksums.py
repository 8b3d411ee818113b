"""Checksums of a checkpoint: what Orbax reads back must be what was saved.

On save, each process hashes (xxh3-64) the array shards it writes (replica 0 of each of its addressable
shards), the run metadata (process 0) and its own data position, into its part of the manifest,
`checksums/process_<i>-of-<n>.json`: one more item of the checkpoint, written inside Orbax's atomic save, so
a finished checkpoint always holds it. After a restore, each process hashes what it read back for every
saved shard it holds (any mesh or process count), and `verify` raises ChecksumMismatch naming the array.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import xxhash
from etils import epath

ITEM = "checksums"


class ChecksumMismatch(ValueError):
    """A checkpoint reads back different from what was saved (the message names the array or file)."""


def digest(array) -> str:
    """xxh3-64 of an array's bytes (C order)."""
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def json_digest(value) -> str:
    """xxh3-64 of a JSON value, independent of key order and formatting."""
    return xxhash.xxh3_64_hexdigest(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def array_name(path: tuple) -> str:
    return "/".join(map(str, path))


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> str:
    """A shard's place in its global array, e.g. "0:64,32:64" ("" for a scalar)."""
    bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
    return ",".join(f"{start}:{stop}" for start, stop in bounds)


def _index_bounds(key: str) -> list[tuple[int, int]]:
    return [tuple(map(int, part.split(":"))) for part in key.split(",")] if key else []


def _written_here(leaf) -> dict[str, Any]:
    """{index key: shard data} of the shards of `leaf` this process writes."""
    if isinstance(leaf, jax.Array):
        return {_index_key(s.index, leaf.shape): s.data for s in leaf.addressable_shards if s.replica_id == 0}
    leaf = np.asarray(leaf)
    return {_index_key((slice(None),) * leaf.ndim, leaf.shape): leaf} if jax.process_index() == 0 else {}


def manifest(state, *, meta: dict | None, data_state: dict | None) -> dict:
    """This process's part of the manifest of a checkpoint of `state`, `meta` and `data_state` ("bytes": the
    size of the array shards it writes)."""
    arrays, written = {}, 0
    for path, leaf in ocp.tree.to_flat_dict(state).items():
        host = jax.device_get(_written_here(leaf))  # one array at a time: host memory stays bounded
        arrays[array_name(path)] = {"dtype": str(np.dtype(leaf.dtype)), "shape": list(np.shape(leaf)),
                                    "shards": {k: digest(v) for k, v in host.items()}}
        written += sum(v.nbytes for v in host.values())
    part = {"arrays": arrays, "data": {}, "bytes": written}
    if data_state is not None:
        part["data"][data_file_name()] = json_digest(data_state)
    if jax.process_index() == 0:
        part["meta"] = json_digest(meta or {})
    return part


def data_file_name() -> str:
    """The data position file this process saves (grain's name for it)."""
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def merged(parts: list[dict]) -> dict:
    """The manifest of a checkpoint from every process's part."""
    whole = {"arrays": {}, "data": {}, "meta": None}
    for part in parts:
        for name, entry in part["arrays"].items():
            whole["arrays"].setdefault(name, {**entry, "shards": {}})["shards"].update(entry["shards"])
        whole["data"].update(part["data"])
        whole["meta"] = part.get("meta", whole["meta"])
    return whole


def verify(whole: dict, *, state, meta: dict | None = None, data_dir: epath.Path | None = None) -> None:
    """Raises ChecksumMismatch where what was read back (`state`, `meta`, the data position files in
    `data_dir`) differs from the manifest `whole`. Arrays restored to another dtype (a cast) are not checked."""
    _verify_arrays(whole["arrays"], state)
    if meta is not None and whole["meta"] is not None and json_digest(meta) != whole["meta"]:
        raise ChecksumMismatch("the run metadata (meta/metadata) reads back different from what was saved")
    for name, expected in whole["data"].items() if data_dir is not None else ():
        path = data_dir / name
        if not path.exists():
            raise ChecksumMismatch(f"the data position data/{name} is missing")
        if json_digest(json.loads(path.read_text())) != expected:
            raise ChecksumMismatch(f"the data position data/{name} reads back different from what was saved")


def _verify_arrays(arrays: dict, state) -> None:
    for path, leaf in ocp.tree.to_flat_dict(state).items():
        name = array_name(path)
        saved = arrays.get(name)
        if saved is None:
            raise ChecksumMismatch(f"array {name} has no checksum in the manifest")
        if saved["dtype"] != str(np.dtype(leaf.dtype)) or tuple(saved["shape"]) != tuple(np.shape(leaf)):
            continue
        for key, expected in saved["shards"].items():
            data = _read_back(leaf, _index_bounds(key))
            if data is not None and digest(data) != expected:
                raise ChecksumMismatch(f"array {name} [{key}] reads back different from what was saved "
                                       f"(xxh3 {digest(data)}, saved {expected})")


def _read_back(leaf, bounds: list[tuple[int, int]]):
    """The slice `bounds` of a restored array, from a shard of this process that holds it whole (None when
    none does and the array is not fully addressable here: another process checks it)."""
    want = tuple(slice(a, b) for a, b in bounds)
    if not isinstance(leaf, jax.Array):
        return np.asarray(leaf)[want]
    for shard in leaf.addressable_shards:
        have = [s.indices(n)[:2] for s, n in zip(shard.index, leaf.shape)]
        if all(lo <= a and b <= hi for (lo, hi), (a, b) in zip(have, bounds)):
            return np.asarray(shard.data)[tuple(slice(a - lo, b - lo) for (lo, _), (a, b) in zip(have, bounds))]
    return np.asarray(leaf[want]) if leaf.is_fully_addressable else None


class ManifestHandler(ocp.CheckpointHandler):
    """The Orbax handler of the manifest item: each process writes its part, a restore merges them all."""

    def save(self, directory: epath.Path, args: ManifestSave) -> None:
        (directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json").write_text(
            json.dumps(args.part))

    def restore(self, directory: epath.Path, args: ManifestRestore | None = None) -> dict:
        files = sorted(directory.glob("process_*-of-*.json"))
        expected = int(files[0].stem.rsplit("-of-", 1)[1]) if files else 1
        if len(files) != expected:
            raise ChecksumMismatch(f"{directory}: {len(files)} of the {expected} manifest parts")
        return merged([json.loads(f.read_text()) for f in files])


@ocp.args.register_with_handler(ManifestHandler, for_save=True)
@dataclasses.dataclass
class ManifestSave(ocp.args.CheckpointArgs):
    part: dict


@ocp.args.register_with_handler(ManifestHandler, for_restore=True)
@dataclasses.dataclass
class ManifestRestore(ocp.args.CheckpointArgs):
    pass
