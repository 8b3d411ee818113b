"""Random-access data sources over LLaVA annotation files (grain `RandomAccessDataSource`).

An annotation file is a JSON list or JSONL of records
`{"id", "image": "rel/path.jpg" | [paths...] (absent for text-only), "conversations": [...]}`
(LCS-558K, CC3M-595K chat.json, LLaVA-Instruct-158K, llava_v1_5_mix665k). Images are read from a folder
or straight from a .zip archive, local or any etils epath (gs://...). A LLaVA-NeXT video record has
`"video": "rel/clip.mp4" | "rel/frame_folder"` instead (its `<image>` stands for the video), read from a
folder (`data.video`: `video_frames` frames sampled uniformly).

The records are parsed once and kept as one packed bytes buffer of their JSON text plus offsets: about the
size of the file in memory, cheap to pickle into grain worker processes (no open handles are pickled; the
zip archive is opened lazily in each process).
"""

from __future__ import annotations

import json
import os
import re
import threading
import zipfile
from typing import Any, Iterator

import numpy as np
from etils import epath

from llava_jax.data.errors import BadSample, DataFileError
from llava_jax.data.images import DEFAULT_MAX_IMAGE_BYTES, read_image_bytes
from llava_jax.data.paths import resolve_inside, safe_relative_path
from llava_jax.data.video import DEFAULT_MAX_VIDEO_BYTES, decode_frames, decode_video, read_frame_folder


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class InvalidLine:
    """A JSONL line that is not JSON, kept in its place so that the source rejects it as one bad sample."""

    def __init__(self, message: str):
        self.message = message


def read_records(path: str | os.PathLike) -> Iterator[tuple[Any, str]]:
    """Yields (record, its JSON text) from a JSON list or JSONL file; errors name the file and the place.

    Records that are not objects are yielded too: sources reject them one by one (BadSample "invalid_record").
    A JSONL line that is not JSON yields (InvalidLine, "null"): skipped and counted as "invalid_json". A JSON
    list that does not parse cannot be split into samples: DataFileError.
    """
    try:
        text = epath.Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text ({e})") from e
    if text.lstrip().startswith("["):
        for index, (record, raw) in enumerate(_json_list_items(text, path)):
            yield record, raw
        return
    for line_number, line in enumerate(text.split("\n"), start=1):  # text may hold U+2028, NEL, ...
        if not line.strip():
            continue
        try:
            yield json.loads(line), line
        except json.JSONDecodeError as e:
            yield InvalidLine(f"{path}: invalid JSON on line {line_number} column {e.colno}: {e.msg}"), "null"


def _json_list_items(text: str, path) -> Iterator[tuple[Any, str]]:
    """The items of a top-level JSON list with their source text, parsed one at a time."""
    position = _WHITESPACE.match(text, 0).end() + 1  # after "["
    expect_item = None  # None: first item or "]"; True: after ","; False: after an item
    while True:
        position = _WHITESPACE.match(text, position).end()
        char = text[position:position + 1]
        if char == "]" and expect_item is not True:
            break
        if expect_item is False:
            if char != ",":
                raise _error(path, text, position, "expected ',' or ']' after a record")
            position, expect_item = position + 1, True
            continue
        try:
            item, end = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
        yield item, text[position:end]
        position, expect_item = end, False
    if text[position + 1:].strip():
        raise _error(path, text, position + 1, "extra data after the list")


def _error(path, text: str, position: int, message: str) -> DataFileError:
    line = text.count("\n", 0, position) + 1
    column = position - text.rfind("\n", 0, position)
    return DataFileError(f"{path}: invalid JSON at line {line} column {column}: {message}")


def modality_length(record: Any) -> int:
    """The official `modality_lengths` entry: the word count of all turns, negative for text-only.

    Malformed records and turns (no string `value`) count 0 words, and 0 counts as 1 (the official grouping
    rejects 0): such samples are rejected later by validation, they must not stop the grouping first.
    """
    record = record if isinstance(record, dict) else {}
    turns = record.get("conversations")
    turns = turns if isinstance(turns, list) else []
    words = sum(len(turn["value"].split()) for turn in turns
                if isinstance(turn, dict) and isinstance(turn.get("value"), str))
    words = max(words, 1)
    return words if "image" in record or "video" in record else -words


def image_paths_of(record: dict, sample_id: str | None) -> list[str]:
    """The record's "image" field as a list of safe relative paths ([] for text-only samples)."""
    if "image" not in record:
        return []
    field = record["image"]
    paths = field if isinstance(field, list) else [field]
    return [safe_relative_path(path, sample_id) for path in paths]


class ImageFolder:
    """Reads images below a folder (local or etils epath); never outside it (`resolve_inside`)."""

    def __init__(self, root: str, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.root = root
        self.max_bytes = max_bytes

    def read(self, relative: str, sample_id: str | None) -> bytes:
        path = resolve_inside(self.root, relative, sample_id)
        return read_image_bytes(path, max_bytes=self.max_bytes, name=f"{relative!r} under {self.root}",
                                sample_id=sample_id)


def read_video(root: str, relative: str, sample_id: str | None, *, num_frames: int,
               max_bytes: int = DEFAULT_MAX_VIDEO_BYTES) -> np.ndarray:
    """A video below `root` (a file, or a folder of frame images) -> uint8 [T <= num_frames, H, W, 3]."""
    path = epath.Path(resolve_inside(root, relative, sample_id))
    name = f"{relative!r} under {root}"
    if path.is_dir():
        frames = read_frame_folder(path, [p.name for p in path.iterdir()], num_frames=num_frames,
                                   sample_id=sample_id)
        return decode_frames(frames, name=name, sample_id=sample_id)
    data = read_image_bytes(path, max_bytes=max_bytes, name=name, sample_id=sample_id)
    return decode_video(data, num_frames=num_frames, name=name, sample_id=sample_id)


class ImageZip:
    """Reads images from a .zip archive, opened lazily (again after a fork) in each process.

    A path is looked up as given, then below the archive's single top folder if it has one, then by
    dropping its leading folders one at a time down to its own folder: "coco/train2017/1.jpg" finds
    "train2017/1.jpg" in COCO's train2017.zip, "00000/1.jpg" finds "images/00000/1.jpg".
    """

    def __init__(self, archive: str, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.archive = archive
        self.max_bytes = max_bytes
        self._opened: tuple[int, zipfile.ZipFile, frozenset[str], str] | None = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"archive": self.archive, "max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["archive"], max_bytes=state["max_bytes"])

    def _open(self) -> tuple[zipfile.ZipFile, frozenset[str], str]:
        with self._lock:
            if self._opened is None or self._opened[0] != os.getpid():
                archive = zipfile.ZipFile(epath.Path(self.archive).open("rb"))
                names = frozenset(info.filename for info in archive.infolist() if not info.is_dir())
                tops = {name.split("/", 1)[0] for name in names}
                top = f"{tops.pop()}/" if len(tops) == 1 and all("/" in n for n in names) else ""
                self._opened = (os.getpid(), archive, names, top)
            return self._opened[1:]

    def resolve(self, relative: str) -> str | None:
        """The archive member holding `relative`, or None."""
        _, names, top = self._open()
        parts = relative.split("/")
        for start in range(max(1, len(parts) - 1)):  # keep the file's own folder: never match a bare name
            suffix = "/".join(parts[start:])
            for candidate in (suffix, top + suffix):
                if candidate in names:
                    return candidate
        return None

    def read(self, relative: str, sample_id: str | None) -> bytes:
        member = self.resolve(relative)
        if member is None:
            raise BadSample("missing_image", f"image {relative!r} not found in {self.archive}", sample_id)
        archive, _, _ = self._open()
        info = archive.getinfo(member)
        if info.file_size > self.max_bytes:  # checked before inflating anything
            raise BadSample("image_too_large", f"{member!r} in {self.archive} inflates to {info.file_size} bytes, "
                            f"over {self.max_bytes}", sample_id)
        # Bounded even if the header lies.
        return read_image_bytes(lambda: archive.open(info), max_bytes=self.max_bytes,
                                name=f"{member!r} in {self.archive}", sample_id=sample_id)


def image_store(image_root: str | os.PathLike, *,
                max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> ImageFolder | ImageZip:
    """The reader of a folder or a .zip archive; raises when it does not exist or is not a zip archive.

    `max_bytes` bounds what one image costs in memory before decoding (BadSample "image_too_large")."""
    root = str(image_root)
    path = epath.Path(root)
    if root.lower().endswith(".zip") and not path.is_dir():
        store = ImageZip(root, max_bytes=max_bytes)
        try:
            store.resolve("")  # opens the archive once: a missing or broken one fails here, not per sample
        except (OSError, zipfile.BadZipFile) as e:
            raise DataFileError(f"image archive {root}: {e}") from e
        return store
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return ImageFolder(root, max_bytes=max_bytes)


class LlavaJsonSource:
    """grain RandomAccessDataSource over a LLaVA JSON / JSONL annotation file.

    `source[i]` is `{"id": str, "conversations": list, "images": list[bytes], "image_paths": list[str]}`
    (encoded image files; empty lists for text-only samples). Raises BadSample "invalid_record" (not a
    JSON object), "invalid_json" (a JSONL line that does not parse), "empty_text" (no conversations list,
    or an empty one), "missing_image", "unsafe_path", "invalid_image_field", "unreadable_image",
    "image_too_large" (file over `max_image_bytes`) or "corrupt_image" (unreadable zip member).

    A video record (`"video"`) adds `"video": uint8 [T, H, W, 3]` (`video_frames` frames sampled uniformly)
    and `"video_path"`, read below `video_root` (default: `image_root`, a folder); errors are `data.video`'s.
    """

    def __init__(self, annotation_path: str | os.PathLike, image_root: str | os.PathLike | None, *,
                 name: str | None = None, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 video_root: str | os.PathLike | None = None, video_frames: int = 8):
        if video_frames < 1:
            raise ValueError(f"LlavaJsonSource.video_frames must be >= 1, got {video_frames}")
        self.annotation_path = str(annotation_path)
        self.image_root = None if image_root is None else str(image_root)
        self.video_root = self.image_root if video_root is None else str(video_root)
        self.video_frames = video_frames
        self.name = name or epath.Path(annotation_path).stem
        packed, lengths, self._invalid_lines = [], [], {}
        for record, raw in read_records(annotation_path):
            if isinstance(record, InvalidLine):
                self._invalid_lines[len(packed)] = record.message
            packed.append(raw.encode("utf-8"))
            lengths.append(modality_length(record))
        self._offsets = np.cumsum([0] + [len(p) for p in packed], dtype=np.int64)
        self._buffer = b"".join(packed)
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._images = None if image_root is None else image_store(image_root, max_bytes=max_image_bytes)

    def __len__(self) -> int:
        return len(self._lengths)

    def __repr__(self) -> str:
        return (f"LlavaJsonSource(name={self.name!r}, annotation_path={self.annotation_path!r}, "
                f"image_root={self.image_root!r}, len={len(self)})")

    def record(self, index: int) -> Any:
        """The raw annotation record at `index`."""
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} samples")
        index %= len(self)
        return json.loads(self._buffer[self._offsets[index]:self._offsets[index + 1]])

    def __getitem__(self, index: int) -> dict:
        record = self.record(index)
        position = int(index) % len(self)
        fallback_id = f"{self.name}:{position}"
        if position in self._invalid_lines:
            raise BadSample("invalid_json", self._invalid_lines[position], fallback_id)
        if not isinstance(record, dict):
            raise BadSample("invalid_record", f"record is a {type(record).__name__}, expected an object with "
                            "'id' and 'conversations'", fallback_id)
        sample_id = str(record.get("id", fallback_id))
        conversations = record.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise BadSample("empty_text", "'conversations' must be a non-empty list of turns, got "
                            f"{conversations!r:.60}", sample_id)
        paths = image_paths_of(record, sample_id)
        if paths and self._images is None:
            raise BadSample("missing_image", f"sample has images but {self.name} has no image root", sample_id)
        images = [self._images.read(path, sample_id) for path in paths]
        out = {"id": sample_id, "conversations": conversations, "images": images, "image_paths": paths}
        if "video" in record:
            out.update(self._video(record["video"], sample_id))
        return out

    def _video(self, relative: Any, sample_id: str) -> dict:
        if self.video_root is None:
            raise BadSample("missing_image", f"sample has a video but {self.name} has no video root", sample_id)
        relative = safe_relative_path(relative, sample_id)
        frames = read_video(self.video_root, relative, sample_id, num_frames=self.video_frames)
        return {"video": frames, "video_path": relative}

    def lengths(self) -> np.ndarray:
        """[N] int64: the official `modality_lengths` (word counts; negative for text-only samples)."""
        return self._lengths.copy()
