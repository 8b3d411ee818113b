"""Orbax checkpoints of the training state, the data iterator position and run metadata.

A checkpoint holds what changes during training: the trainable parameters (float32 master copy), the
optimizer state, the step and the non-finite counters (`TrainState`), the grain iterator state of every
process, and JSON metadata. Frozen parameters are not saved: they are rebuilt from the run's
initialization (the same Hugging Face checkpoints or seed) on resume. Saves are asynchronous and atomic
(Orbax writes to a temporary directory and renames it when complete); the last `keep` are kept.
"""

from __future__ import annotations

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

    def restore(self, step: int, abstract_state: Any, *, data_iterator=None) -> tuple[Any, dict]:
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state` (jax.ShapeDtypeStruct
        leaves with `.sharding`); sets `data_iterator`'s position in place. -> (state, meta)."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], dict(restored["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a concrete pytree (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
