"""One of the two processes of test_checkpoint_checksums' multi-host restore test (jax.distributed on
127.0.0.1, one CPU device each).

    python tests/train/restore_agreement_script.py PORT PROCESS_ID WORKDIR

Saves checkpoints 1-3 of a state sharded over both processes, damages a file only this process reads
(process 1: its shard of step 3 truncated; process 0: one flipped byte in its shard of step 2), then restores
with both entry points and prints what it restored as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax


def state(step: int, sharding):
    import numpy as np

    values = np.arange(4 * 4096, dtype=np.float32).reshape(4, 4096) + 100_000 * step
    return {"w": jax.make_array_from_callback(values.shape, sharding, lambda index: values[index]),
            "step": jax.make_array_from_callback((), replicated(sharding), lambda index: np.int32(step))}


def replicated(sharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=os.path.getsize)


def damage(workdir: Path, process: int) -> None:
    """Process 1 truncates its shard of step 3, process 0 flips a byte in its shard of step 2."""
    if process == 1:
        path = largest_file(workdir / "checkpoints" / "3" / "state" / "ocdbt.process_1")
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        path = largest_file(workdir / "checkpoints" / "2" / "state" / "ocdbt.process_0")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


def main(port: str, process: int, workdir: Path) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
    import grain
    import numpy as np
    from jax.experimental import multihost_utils

    from llava_jax.train.checkpoint import Checkpointer, abstract_like

    sharding = jax.sharding.NamedSharding(jax.make_mesh((2,), ("x",)), jax.sharding.PartitionSpec("x"))
    checkpointer = Checkpointer(workdir, keep=5, async_save=False)
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    for step in (1, 2, 3):
        next(iterator)
        checkpointer.save(step, state(step, sharding), data_iterator=iterator, meta={"step": step})
    checkpointer.close()
    multihost_utils.sync_global_devices("saved")
    damage(workdir, process)
    multihost_utils.sync_global_devices("damaged")

    checkpointer = Checkpointer(workdir, keep=5, async_save=False)
    newest_step, raw = checkpointer.restore_newest_state()
    local_w = lambda w: float(sum(np.asarray(s.data, np.float64).sum() for s in w.addressable_shards))
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    latest_step, restored, meta = checkpointer.restore_latest(abstract_like(state(0, sharding)),
                                                              data_iterator=iterator)
    checkpointer.close()
    print(json.dumps({"process": process, "newest_state_step": newest_step, "newest_state_w": local_w(raw["w"]),
                      "latest_step": latest_step, "latest_w": local_w(restored["w"]), "meta": meta,
                      "next_item": int(next(iterator))}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
