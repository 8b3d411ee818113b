"""Orbax checkpoints of the training state, the data iterator position and run metadata.

A checkpoint holds what changes during training: the trainable parameters (float32 master copy), the
optimizer state, the step and the non-finite counters (`TrainState`), the grain iterator state of every
process, and JSON metadata. Frozen parameters are not saved: they are rebuilt from the run's
initialization (the same Hugging Face checkpoints or seed) on resume. Saves are asynchronous and atomic
(Orbax writes to a temporary directory and renames it when complete); the last `keep` are kept.

Every checkpoint carries checksums of what it saved (`llava_jax.train.checksums`), checked on restore.
Resume heals itself: `restore_latest` restores the newest checkpoint that reads back whole, and the same as
it was saved, on every process. Newer damaged ones (a missing, truncated or altered file, a half-deleted
folder, bad metadata) are moved, never deleted, to `<workdir>/checkpoints.damaged/<step>` with a warning
naming them; when none reads back, it stops with `NoIntactCheckpoint`, one line saying what to do.
`restore_newest_state` (another run's state, e.g. stage 1's projector) runs the same search.

A save that fails (a full disk) raises `SaveFailed`, one line, after removing its unfinished folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from llava_jax.train import checksums, distributed


class NoIntactCheckpoint(RuntimeError):
    """Every checkpoint of a workdir failed to restore (the message is one line saying what to do)."""


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (the message is one line naming the step and the disk)."""


class Checkpointer:
    """Periodic, asynchronous, atomic checkpoints in `<workdir>/checkpoints` (local path or bucket)."""

    def __init__(self, workdir: str | epath.Path, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"Checkpointer keep must be >= 1, got {keep}")
        self.directory = epath.Path(workdir) / "checkpoints"
        self.damaged_directory = epath.Path(workdir) / "checkpoints.damaged"
        self._keep, self._async_save = keep, async_save
        self._saving, self._failed = None, False  # the step of the save not known finished yet
        self.manager = self._open_manager()
        # Reads run on each process alone (no Orbax barrier): a failure on one process is agreed on by the
        # restore search, where every process takes the same collectives.
        here = jax.process_index()
        self._reader = ocp.Checkpointer(
            ocp.CompositeCheckpointHandler(**_item_handlers()),
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=here, active_processes={here}))
        _quiet_orbax_save_tracebacks()

    def _open_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                                 enable_async_checkpointing=self._async_save),
            item_handlers=_item_handlers())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, data_iterator=None, meta: dict | None = None) -> bool:
        """Starts saving `step` (in the background when asynchronous) with the checksums of what it saves.
        Raises SaveFailed when this save, or the previous one, fails."""
        self._finish_saving()
        meta = meta or {}
        data_state = data_iterator.get_state() if data_iterator is not None else None
        part = checksums.manifest(state, meta=meta, data_state=data_state)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta),
                 checksums.ITEM: checksums.ManifestSave(part)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._saving = step
        try:
            self._check_room(part["bytes"])
            return self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:  # noqa: BLE001 - whatever stopped the write, the run stops on it
            raise self._save_failed(error) from error

    def _check_room(self, needed: int) -> None:
        """A local disk without room for the arrays a process is about to write fails the save on every
        process before it starts (a disk that fills during the save fails it in the background)."""
        mount = _mount(self.directory)
        short = mount is not None and shutil.disk_usage(mount).free < needed
        if distributed.on_any_process(short):
            raise OSError(errno.ENOSPC, f"no space left on device for its {needed / 2**20:.1f} MiB of arrays"
                          if short else "no space left on the disk of another process")

    def check_saves(self) -> None:
        """Raises SaveFailed when a background save has failed (cheap: call it every step)."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self._finish_saving()

    def _finish_saving(self) -> None:
        """Waits for the save in flight; raises SaveFailed if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - whatever stopped the write, the run stops on it
            raise self._save_failed(error) from error
        self._saving = None

    def _save_failed(self, error: BaseException) -> SaveFailed:
        """Removes the unfinished step folder and says which step failed, on which disk, and what is left."""
        step, self._failed = self._saving, True
        removed = []
        if jax.process_index() == 0 and self.directory.is_dir():
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(os.fspath(tmp), ignore_errors=True)
                removed.append(tmp.name)
        intact = [s for s in self.candidate_steps() if s != step]
        left = f"checkpoints up to step {intact[0]} are intact (rerun the same command to resume from there)" \
            if intact else "there is no earlier checkpoint (a rerun starts from step 0)"
        return SaveFailed(
            f"the checkpoint of step {step} could not be saved to {self.directory / str(step)}: "
            f"{_save_error(error)}{_disk(self.directory)}; "
            f"{'removed the partial ' + ', '.join(removed) + '; ' if removed else ''}{left}")

    def restore(self, step: int, abstract_state: Any, *, data_iterator=None,
                global_batch_size: int | None = None) -> tuple[Any, dict]:
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state` (jax.ShapeDtypeStruct
        leaves with `.sharding`; any mesh or process count); sets `data_iterator`'s position in place.

        A data position saved by a different number of processes is translated (needs `global_batch_size`).
        What was read back is checked against the checkpoint's checksums. -> (state, meta)."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        translate = data_iterator is not None and not self._data_file(step).exists()
        if data_iterator is not None and not translate:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._read(step, items, check_data=data_iterator is not None)
        if translate:
            data_iterator.set_state(self._translated_data_state(step, global_batch_size))
        return restored["state"], dict(restored["meta"] or {})

    def _read(self, step: int, items: dict, *, check_data: bool = False):
        """The `items` of `step`, read on this process alone and verified against its checksums (a
        checkpoint saved without them is read with a warning)."""
        folder = self.directory / str(step)
        verified = (folder / checksums.ITEM).is_dir()
        if verified:
            items[checksums.ITEM] = checksums.ManifestRestore()
        restored = self._reader.restore(folder, args=ocp.args.Composite(**items))
        if verified:
            checksums.verify(restored[checksums.ITEM], state=restored["state"],
                             meta=restored["meta"] if "meta" in items else None,
                             data_dir=folder / "data" if check_data else None)
        else:
            logging.warning("checkpoint %s has no checksums (saved by an older version): not verified", folder)
        return restored

    def restore_latest(self, abstract_state: Any, *, data_iterator=None,
                       global_batch_size: int | None = None) -> tuple[int, Any, dict] | None:
        """Restores the newest checkpoint that reads back whole on every process (see `restore`) ->
        (step, state, meta), or None when there is no checkpoint.

        Newer checkpoints that fail to restore are moved to `checkpoints.damaged/<step>` (by process 0) with
        a warning naming them. Raises NoIntactCheckpoint when every checkpoint fails; nothing is moved then.
        """
        found = self._search(
            lambda step: self.restore(step, abstract_state, data_iterator=data_iterator,
                                      global_batch_size=global_batch_size),
            set_aside=True, advice=f"If the run's config changed, rerun with the original one; otherwise move "
                                   f"{self.directory} away (nothing is deleted) to start from step 0, or use "
                                   f"another --workdir")
        if found is None:
            return None
        step, (state, meta) = found
        return step, state, meta

    def restore_newest_state(self) -> tuple[int, Any]:
        """The raw saved `state` of the newest checkpoint that reads back on every process (another run's,
        e.g. stage 1's projector): damaged newer ones are skipped with a warning and left in place.

        Raises FileNotFoundError without checkpoints, NoIntactCheckpoint when none reads back."""
        found = self._search(lambda step: self._read(step, {"state": ocp.args.StandardRestore()})["state"],
                             set_aside=False, advice="Rerun the run that wrote them to save new ones")
        if found is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        return found

    def _search(self, read: Callable[[int], Any], *, set_aside: bool, advice: str) -> tuple[int, Any] | None:
        """(step, read(step)) of the newest step that `read` reads on every process, or None without any.

        Every process tries the same steps (those any of them sees), newest first, and skips a step that
        failed on any of them. Raises NoIntactCheckpoint (ending with `advice`) when none reads back."""
        failures = []
        for step in reversed(distributed.union_over_processes(self.candidate_steps())):
            try:
                value, reason = read(step), None
            except Exception as error:  # noqa: BLE001 - any failure to read a checkpoint back is damage
                value, reason = None, _one_line(error)
            if distributed.on_any_process(reason is not None):
                reason = reason or "restored here but not on every process"
                logging.warning("checkpoint %s is damaged and cannot be restored (%s); trying an older one",
                                self.directory / str(step), reason)
                failures.append((step, reason))
                continue
            if failures and set_aside:
                self._set_aside([s for s, _ in failures], step)
            return step, value
        if failures:
            steps = ", ".join(str(s) for s, _ in failures)
            raise NoIntactCheckpoint(f"no checkpoint in {self.directory} can be restored (steps {steps}; "
                                     f"newest: {failures[0][1]}). {advice}")
        return None

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
            for step in (s for s in steps if (self.directory / str(s)).exists()):
                target = self.damaged_directory / str(step)
                suffix = 1
                while target.exists():
                    target, suffix = self.damaged_directory / f"{step}.{suffix}", suffix + 1
                shutil.move(os.fspath(self.directory / str(step)), os.fspath(target))
                logging.warning("resumed from step %d; damaged checkpoint %s moved to %s (not deleted)", restored,
                                self.directory / str(step), target)
        distributed.barrier("llava_jax checkpoints set aside")
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
        """Waits for the save in flight; raises SaveFailed if it failed."""
        self._finish_saving()

    def close(self) -> None:
        """Waits for the save in flight (raises SaveFailed if it failed) and closes."""
        try:
            if not self._failed:
                self._finish_saving()
        finally:
            self._reader.close()
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - a failed save was raised once, as SaveFailed
                if not self._failed:
                    raise


def _item_handlers() -> dict:
    return {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(), checksums.ITEM: checksums.ManifestHandler()}


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _save_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC and error.strerror:
        return error.strerror
    if "No space left on device" in str(error):  # Orbax / TensorStore wrap the system's error
        return "no space left on device"
    return _one_line(error, limit=200)


def _mount(directory: epath.Path) -> str | None:
    """The mount point of a local folder (None for a bucket)."""
    if "://" in os.fspath(directory):
        return None
    path = os.path.abspath(os.fspath(directory))
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _disk(directory: epath.Path) -> str:
    """" (disk DIR: N MiB free of M MiB)" for a local folder, "" for a bucket."""
    mount = _mount(directory)
    if mount is None:
        return ""
    usage = shutil.disk_usage(mount)
    return f" (disk {mount}: {usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.0f} MiB)"


class _DropSaveTracebacks(logging.Filter):
    """Orbax logs the traceback of a failed background save itself, from several threads, and re-raises the
    error to the Checkpointer, which raises SaveFailed (one line): those log copies are dropped."""

    RERAISED_FROM = ("async_checkpointer.py", "future.py", "checkpoint_manager.py")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and "orbax" in record.pathname
                    and os.path.basename(record.pathname) in self.RERAISED_FROM)


_SAVE_TRACEBACKS = _DropSaveTracebacks()


def _quiet_orbax_save_tracebacks() -> None:
    absl_logger = logging.getLogger("absl")  # Orbax logs through absl
    if _SAVE_TRACEBACKS not in absl_logger.filters:
        absl_logger.addFilter(_SAVE_TRACEBACKS)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a concrete pytree (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
