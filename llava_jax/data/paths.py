"""Reading data files only inside their root, and writing outputs atomically.

`resolve_inside(root, relative)` is the one path check of every reader of data-named files (image folders,
zip archives, evaluation questions, served requests): the path must be relative, free of `..` and NUL
bytes, and, for local roots, its real path (symlinks resolved) must lie inside the real root. Anything
else raises `BadSample("unsafe_path")`.

`atomic_write_text` / `atomic_write_bytes` / `atomic_dir` write to a temporary sibling and rename it into
place, so a reader sees the old content or the new, never a mixture.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from etils import epath

from llava_jax.data.errors import BadSample


def safe_relative_path(path: Any, sample_id: str | None = None) -> str:
    """A normalized relative POSIX path, or BadSample("unsafe_path") if it is absolute, escapes the root or
    holds a NUL byte; BadSample("invalid_image_field") if it is not a non-empty string."""
    if not isinstance(path, str) or not path.strip():
        raise BadSample("invalid_image_field", f"image path must be a non-empty string, got {path!r}", sample_id)
    if "\x00" in path:
        raise BadSample("unsafe_path", f"image path {path!r} holds a NUL byte", sample_id)
    posix = path.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or "://" in posix:
        raise BadSample("unsafe_path", f"image path {path!r} is absolute", sample_id)
    if ".." in posix.split("/"):
        raise BadSample("unsafe_path", f"image path {path!r} escapes the image root", sample_id)
    return posixpath.normpath(posix)


def is_local(root: str | os.PathLike) -> bool:
    """Whether `root` is a path of this machine's file system (not gs://, s3://, ...)."""
    return "://" not in str(root)


def resolve_inside(root: str | os.PathLike, relative: Any, sample_id: str | None = None) -> str:
    """The path of `relative` below `root`, refused unless it stays inside the root.

    Local roots: the real path (every symlink resolved, loops included) must lie inside the real root.
    Remote roots (gs://, ...) have no symlinks: the lexical check alone applies.

    Raises:
      BadSample("unsafe_path"): absolute, `..`, NUL byte, or a symlink leading outside `root`.
      BadSample("invalid_image_field"): not a non-empty string.
    """
    relative = safe_relative_path(relative, sample_id)
    if not is_local(root):
        return str(epath.Path(root) / relative)
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relative))
    if os.path.commonpath([real_root, real]) != real_root:
        raise BadSample("unsafe_path", f"image path {relative!r} leads outside {root} (to {real})", sample_id)
    return real


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to a temporary sibling of `path`, fsyncs it and renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling folder to fill; on success it replaces `path` (an older `path` is removed
    only then), on failure it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
