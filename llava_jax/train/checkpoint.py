"""Orbax checkpoints of the training state, the data iterator position and run metadata.

A checkpoint holds what changes during training: the trainable parameters (float32 master copy), the
optimizer state, the step and the non-finite counters (`TrainState`), the grain iterator state of every
process, and JSON metadata. Frozen parameters are not saved: they are rebuilt from the run's
initialization (the same Hugging Face checkpoints or seed) on resume. Saves are asynchronous and atomic
(Orbax writes to a temporary directory and renames it when complete); the last `keep` are kept.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
    """Periodic, asynchronous, atomic checkpoints in `<workdir>/checkpoints` (local path or bucket)."""

    def __init__(self, workdir: str | epath.Path, *, keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(workdir) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

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


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a concrete pytree (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
