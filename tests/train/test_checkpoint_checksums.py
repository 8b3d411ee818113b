"""Checksummed checkpoints: a flipped byte anywhere in what a checkpoint saved (an array, the run metadata, a
data position, the manifest) makes it damaged: reported naming the step and what differs, moved aside, and
the newest intact one restored. One restore search serves both entry points and agrees across processes."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.train.checkpoint import Checkpointer, abstract_like
from tests.train.test_checkpoint_heal import RUN
from tests.train.test_loop import REPO, demo_data, jax_cache, losses, run_cli  # noqa: F401


def weights(step: int) -> np.ndarray:
    """64 x 64 float32 (16 KB, not compressible away): the largest array file holds array data."""
    return np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 7 + step


def save_three(workdir: Path) -> None:
    checkpointer = Checkpointer(workdir, keep=5, async_save=False)
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    for step in (1, 2, 3):
        next(iterator)
        checkpointer.save(step, {"w": jnp.asarray(weights(step)), "step": jnp.int32(step)},
                          data_iterator=iterator, meta={"step": step, "bad_samples": {"too_long": 12345}})
    checkpointer.close()


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=os.path.getsize)


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def flip_digit(path: Path, key: str) -> None:
    """Flips the last digit of the number after `key` (the JSON stays valid: 3 <-> 2, 16 <-> 17)."""
    match = re.search(rf'"{key}":\s*-?\d+', path.read_text())
    flip_byte(path, match.end() - 1)


FLIPS = {
    "array_file": lambda d: flip_byte(largest_file(d / "state")),
    "run_metadata": lambda d: flip_digit(d / "meta" / "metadata", "too_long"),
    "data_position": lambda d: flip_digit(next((d / "data").glob("*.json")), "next_index"),
    "manifest": lambda d: flip_byte(next((d / "checksums").glob("*.json"))),
}
NAMED = {"array_file": "array w [0:64,0:64]", "run_metadata": "run metadata", "data_position": "data position",
         "manifest": "checkpoints/3"}


def restore(workdir: Path):
    checkpointer = Checkpointer(workdir, keep=5, async_save=False)
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    target = abstract_like({"w": jnp.zeros((64, 64)), "step": jnp.int32(0)})
    try:
        return checkpointer.restore_latest(target, data_iterator=iterator), next(iterator)
    finally:
        checkpointer.close()


@pytest.mark.parametrize("flip", sorted(FLIPS))
def test_a_flipped_byte_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog, flip):
    save_three(tmp_path)
    FLIPS[flip](tmp_path / "checkpoints" / "3")
    with caplog.at_level(logging.WARNING):
        (step, state, meta), next_item = restore(tmp_path)
    assert step == 2 and int(state["step"]) == 2 and meta["step"] == 2 and next_item == 2
    np.testing.assert_array_equal(state["w"], weights(2))
    damaged = [r.getMessage() for r in caplog.records if "checkpoints/3 is damaged" in r.getMessage()]
    assert len(damaged) == 1 and NAMED[flip] in damaged[0] and "\n" not in damaged[0], damaged
    assert (tmp_path / "checkpoints.damaged" / "3").is_dir() and not (tmp_path / "checkpoints" / "3").exists()


def test_another_runs_state_is_verified_too(tmp_path):
    """Stage 2 reads stage 1's projector with restore_newest_state: a flipped byte there is damage too."""
    save_three(tmp_path)
    FLIPS["array_file"](tmp_path / "checkpoints" / "3")
    checkpointer = Checkpointer(tmp_path, keep=5, async_save=False)
    step, state = checkpointer.restore_newest_state()
    checkpointer.close()
    assert step == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), weights(2))
    assert (tmp_path / "checkpoints" / "3").is_dir()  # another run's damage is left in place


def test_a_checkpoint_saved_without_checksums_restores_with_a_warning(tmp_path, caplog):
    import shutil

    save_three(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "3" / "checksums")
    with caplog.at_level(logging.WARNING):
        (step, _, _), _ = restore(tmp_path)
    assert step == 3
    assert any("checkpoints/3 has no checksums" in r.getMessage() for r in caplog.records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_seeing_different_damage_restore_the_same_step(tmp_path):
    """Two processes (one CPU device each) save a state sharded over both; process 1 cannot read its shard of
    step 3 (truncated), process 0 reads a flipped byte in its shard of step 2. Both entry points restore
    step 1 on both processes, each with its own half of step 1's array."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO))
    script, port = REPO / "tests" / "train" / "restore_agreement_script.py", free_port()
    processes = [subprocess.Popen([sys.executable, str(script), str(port), str(i), str(tmp_path)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    try:
        outputs = [p.communicate(timeout=240) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    values = np.arange(4 * 4096, dtype=np.float64).reshape(4, 4096) + 100_000
    for process, result in enumerate(results):
        assert result["newest_state_step"] == result["latest_step"] == 1, result
        half = values[2 * process:2 * process + 2].sum()
        assert result["newest_state_w"] == result["latest_w"] == half
        assert result["meta"] == {"step": 1} and result["next_item"] == 1
    assert "array w [0:2,0:4096] reads back different" in outputs[0][1]
    assert "checkpoints/3 is damaged" in outputs[1][1]
    assert sorted(p.name for p in (tmp_path / "checkpoints.damaged").iterdir()) == ["2", "3"]


def test_cli_resumes_past_a_flipped_byte_in_an_array_and_in_the_metadata(tmp_path, demo_data, jax_cache):
    """Steps 1-6 with checkpoints 2, 4, 6; a byte flipped in the middle of checkpoint 6's largest array file
    and a digit of checkpoint 4's data position: the rerun resumes from step 2 and its step-3 loss is
    bitwise the first run's."""
    workdir = tmp_path / "run"
    run_cli(1, workdir, {**RUN, "train.num_steps": 6}, demo_data=demo_data, jax_cache=jax_cache)
    first = losses(workdir)
    flip_byte(largest_file(workdir / "checkpoints" / "6"))
    flip_digit(workdir / "checkpoints" / "4" / "data" / "process_0-of-1.json", "next_index")
    done = run_cli(1, workdir, {**RUN, "train.num_steps": 6}, demo_data=demo_data, jax_cache=jax_cache)
    assert f"resumed from {workdir}/checkpoints step 2" in done.stdout
    lines = done.stderr.splitlines()
    assert any(f"{workdir}/checkpoints/6 is damaged" in line and "ChecksumMismatch: array " in line
               for line in lines), done.stderr[-3000:]
    assert any(f"{workdir}/checkpoints/4 is damaged" in line and "data position data/process_0-of-1.json"
               in line for line in lines), done.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "checkpoints.damaged").iterdir()) == ["4", "6"]
    again = losses(workdir)
    assert sorted(again) == [1, 2, 3, 4, 5, 6] and again[3] == first[3]
