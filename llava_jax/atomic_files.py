"""Writes that a reader never sees half done: a file or a folder is written under a temporary sibling name,
then renamed into place (ground floor: any part of the project may use it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

# What a folder may hold for `replaced_directory` to replace it: an export (ours or Hugging Face), or nothing.
_EXPORT_MARKERS = ("config.json", "model.json")
_NEVER_REPLACED = ("checkpoints",)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to a temporary sibling, fsyncs it, and renames it onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_replaceable(path: Path) -> None:
    """Raises FileExistsError unless `path` is absent, an empty folder, or a folder holding an export."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a folder; choose a new or empty output folder")
    names = {p.name for p in path.iterdir()}
    if names & set(_NEVER_REPLACED) or (names and not names & set(_EXPORT_MARKERS)):
        raise FileExistsError(f"{path}: a non-empty folder that is not an export (it has no config.json or "
                              f"model.json, or it has checkpoints/); choose a new or empty output folder")


@contextlib.contextmanager
def replaced_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a new temporary sibling folder of `path` to fill. When the block completes, the folder takes
    `path`'s place (a previous export there is moved aside, then deleted); when it raises, the temporary
    folder is deleted and `path` is left as it was. Readers see the old folder or the new one, never a mix.
    Refuses to replace a folder that is not an export (`check_replaceable`)."""
    path = Path(path).absolute()
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = path.with_name(f".{path.name}.tmp-{tag}"), path.with_name(f".{path.name}.old-{tag}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
