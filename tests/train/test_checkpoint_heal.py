"""Resume heals itself: a damaged latest checkpoint (missing or truncated file, half-deleted folder, bad
metadata, lost data position) falls back to the newest intact one, with a warning naming it, and is moved
aside, never deleted; with none intact, one line saying what to do (CLI exit 2)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.train.checkpoint import Checkpointer, NoIntactCheckpoint, abstract_like
from tests.train.test_loop import demo_data, jax_cache, losses, run_cli  # noqa: F401


def _largest(folder: Path) -> Path:
    """The largest array data file of the merged OCDBT store (the per-process ones are merged into it)."""
    return max((folder / "d").iterdir(), key=os.path.getsize)


DAMAGE = {
    "missing_array_file": lambda d: _largest(d / "state").unlink(),
    "truncated_array_file": lambda d: os.truncate(_largest(d / "state"), os.path.getsize(_largest(d / "state")) // 2),
    "half_deleted_folder": lambda d: shutil.rmtree(d / "state"),
    "empty_folder": lambda d: [shutil.rmtree(d), d.mkdir()],
    "bad_array_metadata": lambda d: (d / "state" / "_METADATA").write_text("{not json"),
    "missing_manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "bad_run_metadata": lambda d: (d / "meta" / "metadata").write_text("{not json"),
    "bad_data_position": lambda d: next((d / "data").glob("*.json")).write_text("{not json"),
    "missing_data_position": lambda d: shutil.rmtree(d / "data"),
}


def save_three(workdir: Path):
    """Checkpoints of steps 1, 2, 3 whose state and data position say which step they are."""
    checkpointer = Checkpointer(workdir, keep=5, async_save=False)
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    for step in (1, 2, 3):
        next(iterator)
        checkpointer.save(step, {"w": jnp.full((64,), float(step)), "step": jnp.int32(step)},
                          data_iterator=iterator, meta={"step": step})
    checkpointer.close()


def restore(workdir: Path):
    checkpointer = Checkpointer(workdir, keep=5, async_save=False)
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    target = abstract_like({"w": jnp.zeros((64,)), "step": jnp.int32(0)})
    try:
        return checkpointer.restore_latest(target, data_iterator=iterator), next(iterator), checkpointer
    finally:
        checkpointer.close()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_the_newest_intact_one(tmp_path, caplog, damage):
    save_three(tmp_path)
    DAMAGE[damage](tmp_path / "checkpoints" / "3")
    with caplog.at_level(logging.WARNING):
        (step, state, meta), next_item, checkpointer = restore(tmp_path)
    assert step == 2 and meta == {"step": 2} and int(state["step"]) == 2
    np.testing.assert_array_equal(state["w"], np.full((64,), 2.0))
    assert next_item == 2  # the data position of step 2: two items read
    damaged = tmp_path / "checkpoints" / "3"
    assert any(str(damaged) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert not damaged.exists() and (tmp_path / "checkpoints.damaged" / "3").is_dir()  # moved, not deleted
    # The run goes on: step 3 saves again where the damaged one was.
    checkpointer = Checkpointer(tmp_path, keep=5, async_save=False)
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    checkpointer.save(3, {"w": jnp.full((64,), 3.0), "step": jnp.int32(3)}, data_iterator=iterator,
                      meta={"step": 3})
    checkpointer.close()
    assert restore(tmp_path)[0][0] == 3


def test_two_damaged_checkpoints_fall_back_two_steps(tmp_path):
    save_three(tmp_path)
    DAMAGE["truncated_array_file"](tmp_path / "checkpoints" / "3")
    DAMAGE["half_deleted_folder"](tmp_path / "checkpoints" / "2")
    (step, _, _), next_item, _ = restore(tmp_path)
    assert step == 1 and next_item == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints.damaged").iterdir()) == ["2", "3"]


def test_none_intact_stops_with_one_line_and_moves_nothing(tmp_path):
    save_three(tmp_path)
    for step, damage in zip((1, 2, 3), ("missing_manifest", "bad_array_metadata", "half_deleted_folder")):
        DAMAGE[damage](tmp_path / "checkpoints" / str(step))
    with pytest.raises(NoIntactCheckpoint) as error:
        restore(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "steps 3, 2, 1" in message and "move" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2", "3"]
    assert not (tmp_path / "checkpoints.damaged").exists()


def test_no_checkpoint_is_a_fresh_start(tmp_path):
    assert restore(tmp_path)[0] is None


def test_keep_nothing_is_refused():
    with pytest.raises(ValueError, match="keep must be >= 1"):
        Checkpointer("/nonexistent", keep=0)


# The spike guard watches (its warm-up outlasts the run): its statistics go through the checkpoints too.
RUN = {"checkpoint_every": 2, "keep_checkpoints": 10, "train.spike_guard.enabled": True}


def test_cli_resumes_past_a_damaged_checkpoint_and_stops_when_none_is_intact(tmp_path, demo_data, jax_cache):
    """Steps 1-4 with checkpoints 2 and 4; step 4 damaged; the rerun to step 6 resumes from 2: its step-3 loss
    (step 2's parameters on step 2's data position) is bitwise the first run's. Then every checkpoint damaged:
    exit 2, one line."""
    workdir = tmp_path / "run"
    run_cli(1, workdir, {**RUN, "train.num_steps": 4}, demo_data=demo_data, jax_cache=jax_cache)
    first = losses(workdir)
    DAMAGE["truncated_array_file"](workdir / "checkpoints" / "4")
    done = run_cli(1, workdir, {**RUN, "train.num_steps": 6}, demo_data=demo_data, jax_cache=jax_cache)
    assert f"resumed from {workdir}/checkpoints step 2" in done.stdout
    assert f"{workdir}/checkpoints/4 is damaged" in done.stderr
    assert (workdir / "checkpoints.damaged" / "4").is_dir()
    again = losses(workdir)
    assert sorted(again) == [1, 2, 3, 4, 5, 6] and again[3] == first[3]
    result = json.loads((workdir / "result.json").read_text())
    assert result["step"] == 6 and result["spike_skipped_steps"] == 0
    from llava_jax.train.metrics import read_step_log
    assert [r["spike_skipped"] for r in read_step_log(workdir / "metrics.jsonl") if "loss" in r] == [False] * 6

    for step in (2, 4, 6):
        DAMAGE["half_deleted_folder"](workdir / "checkpoints" / str(step))
    done = run_cli(1, workdir, {**RUN, "train.num_steps": 8}, demo_data=demo_data, jax_cache=jax_cache,
                   check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cannot resume: no checkpoint in") and "steps 6, 4, 2" in last
    assert "Traceback" not in done.stderr


def test_another_runs_newest_intact_state_is_read_and_its_damage_left_in_place(tmp_path):
    """Stage 2 reads stage 1's projector this way: the newest state that reads back; nothing is moved."""
    save_three(tmp_path)
    DAMAGE["truncated_array_file"](tmp_path / "checkpoints" / "3")
    checkpointer = Checkpointer(tmp_path, keep=5, async_save=False)
    step, state = checkpointer.restore_newest_state()
    assert step == 2 and float(np.asarray(state["w"]).max()) == 2.0
    assert (tmp_path / "checkpoints" / "3").is_dir() and not (tmp_path / "checkpoints.damaged").exists()
    for step in (1, 2):
        DAMAGE["half_deleted_folder"](tmp_path / "checkpoints" / str(step))
    with pytest.raises(NoIntactCheckpoint, match="steps 3, 2, 1"):
        checkpointer.restore_newest_state()
    checkpointer.close()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").restore_newest_state()
