"""Orbax checkpoints of the training state, the data iterator position and run metadata.

A checkpoint holds what changes during training: the trainable parameters (float32 master copy), the
optimizer state, the step and the non-finite counters (`TrainState`), the grain iterator state of every
process, and JSON metadata. Frozen parameters are not saved: they are rebuilt from the run's
initialization (the same Hugging Face checkpoints or seed) on resume. Saves are asynchronous and atomic
(Orbax writes to a temporary directory and renames it when complete); the last `keep` are kept.

Resume heals itself: `restore_latest` restores the newest checkpoint that reads back whole. Newer damaged
ones (a missing or truncated file, a half-deleted folder, bad metadata) are moved, never deleted, to
`<workdir>/checkpoints.damaged/<step>` with a warning naming them; when none reads back, it stops with
`NoIntactCheckpoint`, one line saying what to do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class NoIntactCheckpoint(RuntimeError):
    """Every checkpoint of a workdir failed to restore (the message is one line saying what to do)."""


class Checkpointer:
    """Periodic, asynchronous, atomic checkpoints in `<workdir>/checkpoints` (local path or bucket)."""

    def __init__(self, workdir: str | epath.Path, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"Checkpointer keep must be >= 1, got {keep}")
        self.directory = epath.Path(workdir) / "checkpoints"
        self.damaged_directory = epath.Path(workdir) / "checkpoints.damaged"
        self._keep, self._async_save = keep, async_save
        self.manager = self._open_manager()

    def _open_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                                 enable_async_checkpointing=self._async_save),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, data_iterator=None, meta: dict | None = None) -> bool:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, *, data_iterator=None,
                global_batch_size: int | None = None) -> tuple[Any, dict]:
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state` (jax.ShapeDtypeStruct
        leaves with `.sharding`; any mesh or process count); sets `data_iterator`'s position in place.

        A data position saved by a different number of processes is translated (needs `global_batch_size`).
        -> (state, meta)."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        translate = data_iterator is not None and not self._data_file(step).exists()
        if data_iterator is not None and not translate:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if translate:
            data_iterator.set_state(self._translated_data_state(step, global_batch_size))
        return restored["state"], dict(restored["meta"] or {})

    def restore_latest(self, abstract_state: Any, *, data_iterator=None,
                       global_batch_size: int | None = None) -> tuple[int, Any, dict] | None:
        """Restores the newest checkpoint that reads back whole (see `restore`) -> (step, state, meta), or
        None when there is no checkpoint.

        Newer checkpoints that fail to restore are moved to `checkpoints.damaged/<step>` (by process 0) with
        a warning naming them. Raises NoIntactCheckpoint when every checkpoint fails; nothing is moved then.
        """
        failures = []
        for step in self.candidate_steps():
            try:
                state, meta = self.restore(step, abstract_state, data_iterator=data_iterator,
                                           global_batch_size=global_batch_size)
                reason = None
            except Exception as error:  # noqa: BLE001 - any failure to read a checkpoint back is damage
                reason = _one_line(error)
            reason = _agreed(reason)
            if reason is not None:
                logging.warning("checkpoint %s is damaged and cannot be restored (%s); trying an older one",
                                self.directory / str(step), reason)
                failures.append((step, reason))
                continue
            if failures:
                self._set_aside([s for s, _ in failures], step)
            return step, state, meta
        if failures:
            steps = ", ".join(str(s) for s, _ in failures)
            raise NoIntactCheckpoint(
                f"no checkpoint in {self.directory} can be restored (steps {steps}; newest: {failures[0][1]}). "
                f"If the run's config changed, rerun with the original one; otherwise move {self.directory} "
                f"away (nothing is deleted) to start from step 0, or use another --workdir")
        return None

    def restore_newest_state(self) -> tuple[int, Any]:
        """The raw saved `state` of the newest checkpoint that reads back (another run's, e.g. stage 1's
        projector): damaged newer ones are skipped with a warning and left in place.

        Raises FileNotFoundError without checkpoints, NoIntactCheckpoint when none reads back."""
        failures = []
        for step in self.candidate_steps():
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
                return step, restored["state"]
            except Exception as error:  # noqa: BLE001 - any failure to read a checkpoint back is damage
                logging.warning("checkpoint %s is damaged and cannot be restored (%s); trying an older one",
                                self.directory / str(step), _one_line(error))
                failures.append(str(step))
        if failures:
            raise NoIntactCheckpoint(f"no checkpoint in {self.directory} can be restored (steps "
                                     f"{', '.join(failures)}); rerun the run that wrote them to save new ones")
        raise FileNotFoundError(f"{self.directory}: no checkpoint")

    def candidate_steps(self) -> list[int]:
        """Every step with a folder, finished by Orbax or not (a damaged one may not list), newest first."""
        steps = set(self.manager.all_steps())
        if self.directory.is_dir():
            steps.update(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())
        return sorted(steps, reverse=True)

    def _set_aside(self, steps: list[int], restored: int) -> None:
        """Moves damaged step folders out of Orbax's way (a later save of that step must not collide)."""
        if jax.process_index() == 0:
            self.damaged_directory.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = self.damaged_directory / str(step)
                suffix = 1
                while target.exists():
                    target, suffix = self.damaged_directory / f"{step}.{suffix}", suffix + 1
                shutil.move(os.fspath(self.directory / str(step)), os.fspath(target))
                logging.warning("resumed from step %d; damaged checkpoint %s moved to %s (not deleted)", restored,
                                self.directory / str(step), target)
        _barrier("llava_jax checkpoints set aside")
        self.manager.close()
        self.manager = self._open_manager()

    def _data_file(self, step: int) -> epath.Path:
        return self.directory / str(step) / "data" / \
            f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def _translated_data_state(self, step: int, global_batch_size: int | None) -> dict:
        """Process 0's saved data position, re-expressed for this process count.

        The pipeline state counts this process's rows: `batches` batches of global_batch / process_count rows.
        """
        saved = sorted((self.directory / str(step) / "data").glob("process_0-of-*.json"))
        if not saved or global_batch_size is None:
            raise FileNotFoundError(f"{self._data_file(step)}: no data position for this process layout")
        state = json.loads(saved[0].read_text())
        old_count = int(saved[0].stem.rsplit("-of-", 1)[1])
        if set(state.get("pipeline", {})) != {"next_index"}:
            raise ValueError(f"{saved[0]}: cannot translate data state {state.get('pipeline')} saved by "
                             f"{old_count} processes to {jax.process_count()} processes")
        if state["pipeline"]["next_index"] != state["batches"] * (global_batch_size // old_count):
            logging.warning("%s: samples were skipped before step %d; the translated data position is "
                            "approximate", saved[0], step)
        new_local = global_batch_size // jax.process_count()
        logging.warning("data position of step %d saved by %d processes, restored in %d", step, old_count,
                        jax.process_count())
        return {**state, "pipeline": {"next_index": state["batches"] * new_local},
                "real_tokens": 0, "positions": 0}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _agreed(reason: str | None) -> str | None:
    """A restore failed on any process fails on all (every process resumes from the same step)."""
    if jax.process_count() == 1:
        return reason
    from jax.experimental import multihost_utils
    failed = multihost_utils.process_allgather(np.int32(reason is not None))
    return reason or ("restored here but not on every process" if np.any(failed) else None)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a concrete pytree (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
