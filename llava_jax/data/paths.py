"""Reading data files only inside their root.

`resolve_inside(root, relative)` is the one path check of every reader of data-named files (image folders,
zip archives, evaluation questions, served requests): the path must be relative, free of `..` and NUL
bytes, and, for local roots, its real path (symlinks resolved) must lie inside the real root. Anything
else raises `BadSample("unsafe_path")`.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

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
