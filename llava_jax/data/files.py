"""Output files replaced atomically: written to a temporary file next to the target, flushed to disk, then
renamed over it, so a reader (or a run killed midway) sees the old file or the new one, never a torn one."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomically(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    write_text_atomically(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl_atomically(path: str | os.PathLike, records: Iterable[dict]) -> None:
    write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
