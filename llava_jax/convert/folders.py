"""What a model path may be, for every command that takes one (chat, serve, eval, bench, `convert export`):
a folder in our format (model.json + params/), a Hugging Face folder (config.json + weights), or a finished
training workdir (config.json + checkpoints/), which stands for the Hugging Face export its run wrote."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flax import nnx

from llava_jax.convert import importers, native
from llava_jax.convert.checkpoint_io import CheckpointError


class FolderError(CheckpointError):
    """A path that is no model folder, or a training workdir without a usable export; the message names it."""


def is_training_workdir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() and (path / "config.json").is_file()


def resolve_workdir(path: str | os.PathLike) -> tuple[Path, str | None]:
    """(model folder, the run's data template or None): a training workdir -> its `export_hf` folder and
    `data.template`; any other path -> itself and None. Raises FolderError naming the workdir."""
    path = Path(path)
    if not is_training_workdir(path):
        return path, None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise FolderError(f"{path}: unreadable training config.json ({e})") from None
    data = config.get("data") if isinstance(config, dict) else None
    export = config.get("export_hf") if isinstance(config, dict) else None
    template = data.get("template") if isinstance(data, dict) else None
    if not isinstance(template, (str, type(None))) or not isinstance(export, (str, type(None))):
        raise FolderError(f"{path / 'config.json'}: export_hf and data.template must be strings")
    if not export or not (Path(export) / "config.json").is_file():
        raise FolderError(f"{path}: a training workdir without a finished Hugging Face export (its config's "
                          f"export_hf is {export!r}); load the exported folder, or finish the run with "
                          "export_hf set")
    return Path(export), template


def load_folder(path: str | os.PathLike, **runtime) -> nnx.Module:
    """The model of a folder in our format (`native.load`) or a Hugging Face folder (`from_hf`); `runtime`
    (dtype, param_dtype, ...; None values ignored) as they take it. Raises FolderError for anything else."""
    path = Path(path)
    if (path / native.MODEL_JSON).is_file():
        return native.load(path, **runtime)
    if (path / "config.json").is_file():
        return importers.from_hf(path, **runtime)
    raise FolderError(f"{path}: not a model folder (no config.json or {native.MODEL_JSON})")
