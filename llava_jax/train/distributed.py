"""Several processes: start-up, the mesh of a run, barriers, preemption notices, gathering for export."""

from __future__ import annotations

import logging
import os
import signal

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from llava_jax import sharding
from llava_jax.train import recipes

logger = logging.getLogger(__name__)


def maybe_initialize_distributed(c: mlc.ConfigDict) -> None:
    """jax.distributed.initialize when several processes run: explicit flags (`distributed.coordinator=
    HOST:PORT`, `num_processes`, `process_id`), or auto-detection (`coordinator=auto`, and by default on SLURM
    jobs with several tasks and on TPU pods)."""
    d = c.distributed
    check_distributed(d)
    if d.coordinator == "auto":
        jax.distributed.initialize()
    elif d.coordinator:
        jax.distributed.initialize(d.coordinator, num_processes=d.num_processes, process_id=d.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def check_distributed(d: mlc.ConfigDict) -> None:
    """An explicit coordinator needs the process count and this process's id."""
    if not d.coordinator or d.coordinator == "auto":
        return
    if d.num_processes < 1:
        raise ValueError(f"config.distributed.num_processes: set it (>= 1) with distributed.coordinator="
                         f"{d.coordinator!r}, got {d.num_processes}")
    if not 0 <= d.process_id < d.num_processes:
        raise ValueError(f"config.distributed.process_id: must be in [0, {d.num_processes}), got {d.process_id}")


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def on_any_process(flag: bool) -> bool:
    """Whether `flag` holds on some process (a collective: every process gets the same answer)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def union_over_processes(values: list[int]) -> list[int]:
    """The sorted union of every process's non-negative ints (a collective)."""
    if jax.process_count() == 1:
        return sorted(set(values))
    longest = int(np.max(multihost_utils.process_allgather(np.int32(len(values)))))
    padded = np.full(max(longest, 1), -1, np.int32)
    padded[:len(values)] = values
    return sorted({int(v) for v in np.ravel(multihost_utils.process_allgather(padded)) if v >= 0})


def from_main_process(value: int) -> int:
    """Process 0's `value` on every process (a collective)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def make_run_mesh(c: mlc.ConfigDict):
    try:
        return sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    except ValueError as e:
        raise ValueError(f"config.{e}") from None


def check_batch_layout(c: mlc.ConfigDict, mesh) -> None:
    """The global batch must split evenly over processes, batch shards and microbatches."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for name, n in (("processes", jax.process_count()), ("data*fsdp batch shards", shards),
                    ("train.microbatches * data*fsdp shards", c.train.microbatches * shards)):
        if c.train.global_batch_size % n:
            raise ValueError(f"config.train.global_batch_size: {c.train.global_batch_size} is not divisible by "
                             f"{n} ({name}){recipes.batch_split_hint(c)}")


class Preemption:
    """SIGTERM -> save a checkpoint after the current step, then exit cleanly.

    One process: our own SIGTERM handler sets a flag. Several processes: JAX's preemption service (started by
    jax.distributed.initialize) spreads the notice and picks the same step on every process.
    """

    def __init__(self):
        self.requested = False
        self._multihost = jax.process_count() > 1
        self._previous = None if self._multihost else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logger.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (call once per step, on every process)."""
        if self._multihost:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def gather_to_host(model: nnx.Module) -> nnx.Module:
    """The model with parameters sharded across processes gathered onto every host (a collective on
    several hosts; a no-op where this process can read every shard)."""
    if jax.process_count() == 1:
        return model
    graphdef, state = nnx.split(model)
    gather = lambda x: (multihost_utils.process_allgather(x, tiled=True)
                        if isinstance(x, jax.Array) and not x.is_fully_addressable else x)
    return nnx.merge(graphdef, jax.tree.map(gather, state))
