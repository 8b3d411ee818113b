"""A TFDS builder writing a LLaVA JSON dataset to ArrayRecord shards with the images embedded.

Millions of small image files on a bucket are slow to read; ArrayRecord shards are few, large and
random-access. tensorflow-datasets builds and reads `file_format="array_record"` without TensorFlow
(features are plain bytes / text / ints, serialized by TFDS' numpy example writer).

Build (CLI):  python -m llava_jax.data.tfds_builder --data mix665k.json --images images.zip --out DIR
Read:         TfdsLlavaSource(DIR, "mix665k")  -> the same records as `LlavaJsonSource`.

Records keep the JSON order (shuffling is disabled); samples whose images are missing or unsafe are
skipped, counted in the dataset metadata (`skipped`) and logged. The metadata also holds the official
`modality_lengths`, so modality grouping never reads the shards.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from llava_jax import cli
from llava_jax.data.errors import BadSample

logger = logging.getLogger(__name__)

BUILDER_NAME = "llava_dataset"
SPLIT = "train"
_LOG_FIRST_SKIPPED = 5


class LlavaConfig(tfds.core.BuilderConfig):
    """One LLaVA JSON / JSONL dataset: the annotation file and its image folder or zip archive."""

    def __init__(self, *, data: str | os.PathLike, images: str | os.PathLike | None = None, name: str | None = None,
                 **kwargs):
        kwargs.setdefault("version", LlavaDataset.VERSION if "LlavaDataset" in globals() else None)
        super().__init__(name=name or config_name(data), **kwargs)
        self.data = str(data)
        self.images = None if images is None else str(images)


def config_name(data: str | os.PathLike) -> str:
    """A TFDS config name from the annotation file name: `llava_v1_5_mix665k.json` -> `llava_v1_5_mix665k`."""
    stem = epath.Path(data).name.split(".")[0]
    return re.sub(r"[^a-z0-9_]", "_", stem.lower()) or "data"


class LlavaDataset(tfds.core.GeneratorBasedBuilder):
    """LLaVA-format samples with their image files embedded (ArrayRecord)."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "LLaVA JSON records with embedded image bytes."}
    BUILDER_CONFIGS: list[LlavaConfig] = []
    # TFDS finds a builder's code path with the `importlib_resources` backport, not installed here.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLaVA conversations with their image files (encoded bytes) embedded.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "conversations": tfds.features.Text(doc="the JSON list of {from, value} turns"),
                "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_),
                                                 doc="encoded image files"),
                "image_paths": tfds.features.Sequence(tfds.features.Text()),
            }),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        from llava_jax.data.sources import LlavaJsonSource

        source = LlavaJsonSource(self.builder_config.data, self.builder_config.images)
        all_lengths = source.lengths()
        lengths, skipped, skipped_ids = [], collections.Counter(), {}
        for index in range(len(source)):
            try:
                record = source[index]
            except BadSample as error:
                skipped[error.reason] += 1
                if skipped[error.reason] <= _LOG_FIRST_SKIPPED:
                    skipped_ids.setdefault(error.reason, []).append(str(error.sample_id))
                    logger.warning("skipping sample %d of %s: %s", index, self.builder_config.data, error)
                continue
            lengths.append(int(all_lengths[index]))
            yield index, {
                "id": record["id"],
                "conversations": json.dumps(record["conversations"], ensure_ascii=False),
                "images": list(record["images"]),
                "image_paths": list(record["image_paths"]),
            }
        self.info.metadata["modality_lengths"] = lengths
        self.info.metadata["skipped"] = dict(skipped)
        self.info.metadata["skipped_ids"] = skipped_ids


def build(data: str | os.PathLike, images: str | os.PathLike | None, out_dir: str | os.PathLike, *,
          name: str | None = None) -> epath.Path:
    """Writes the ArrayRecord dataset of `data` under `out_dir`; returns its version folder."""
    builder = LlavaDataset(config=LlavaConfig(data=data, images=images, name=name), data_dir=str(out_dir),
                           file_format="array_record")
    builder.download_and_prepare(download_dir=str(epath.Path(out_dir) / "downloads"))
    return epath.Path(builder.data_dir)


class TfdsLlavaSource:
    """grain RandomAccessDataSource over a built dataset: records as `LlavaJsonSource` gives them.

    `source[i]` is `{"id": str, "conversations": list, "images": list[bytes], "image_paths": list[str]}`.
    `TfdsLlavaSource(data_dir, name)` opens `data_dir/llava_dataset/name/<latest version>`; with `name`
    omitted, `data_dir` may also be that version folder, its config folder, or a data_dir holding a
    single config.
    """

    def __init__(self, data_dir: str | os.PathLike, name: str | None = None, *, split: str = SPLIT):
        data_dir, name, version_dir = _locate(epath.Path(data_dir), name)
        self.data_dir = str(data_dir)
        self.name = name
        self.split = split
        self.version_dir = str(version_dir)
        self._source = tfds.data_source(f"{BUILDER_NAME}/{name}:{version_dir.name}", data_dir=self.data_dir,
                                        split=split)
        self._length = len(self._source)

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"TfdsLlavaSource(data_dir={self.data_dir!r}, name={self.name!r}, split={self.split!r}, len={len(self)})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self._source[int(index)]
        return {
            "id": _text(raw["id"]),
            "conversations": json.loads(_text(raw["conversations"])),
            "images": [bytes(image) for image in raw["images"]],
            "image_paths": [_text(path) for path in raw["image_paths"]],
        }

    def lengths(self) -> np.ndarray:
        """[N] int64: the official `modality_lengths` stored at build time."""
        metadata = json.loads((epath.Path(self.version_dir) / "metadata.json").read_text())
        return np.asarray(metadata["modality_lengths"], np.int64)

    def skipped(self) -> dict[str, int]:
        """Samples left out at build time, by reason."""
        metadata = json.loads((epath.Path(self.version_dir) / "metadata.json").read_text())
        return dict(metadata.get("skipped", {}))

    def skipped_ids(self) -> dict[str, list[str]]:
        """The first few ids of the samples left out at build time, by reason."""
        metadata = json.loads((epath.Path(self.version_dir) / "metadata.json").read_text())
        return dict(metadata.get("skipped_ids", {}))


def _versions(config_dir: epath.Path) -> list[epath.Path]:
    if not config_dir.is_dir():
        return []
    found = [p for p in config_dir.iterdir() if re.fullmatch(r"\d+\.\d+\.\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: tuple(int(x) for x in p.name.split(".")))


def _locate(path: epath.Path, name: str | None) -> tuple[epath.Path, str, epath.Path]:
    """(data_dir, config name, version folder) of a built dataset."""
    if name is None:
        if re.fullmatch(r"\d+\.\d+\.\d+", path.name) and path.parent.parent.name == BUILDER_NAME:
            return path.parent.parent.parent, path.parent.name, path
        if path.parent.name == BUILDER_NAME:
            return _locate(path.parent.parent, path.name)
        builder_dir = path / BUILDER_NAME
        configs = sorted(p.name for p in builder_dir.iterdir() if p.is_dir()) if builder_dir.is_dir() else []
        if len(configs) != 1:
            raise FileNotFoundError(f"{path}: expected one built dataset under {builder_dir}, found "
                                    f"{configs or 'none'}; pass its name (TfdsLlavaSource(data_dir, name))")
        name = configs[0]
    versions = _versions(path / BUILDER_NAME / name)
    if not versions:
        raise FileNotFoundError(f"no built dataset {BUILDER_NAME}/{name} under {path} "
                                f"(build it with python -m llava_jax.data.tfds_builder)")
    return path, name, versions[-1]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@cli.command(OSError, ValueError, exits=True)  # unreadable inputs, unwritable output
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a LLaVA JSON dataset to ArrayRecord shards (TFDS layout) "
                                     "with the images embedded.")
    parser.add_argument("--data", required=True, help="LLaVA JSON / JSONL annotation file (local or gs://...)")
    parser.add_argument("--images", default=None, help="image folder or .zip archive (absent: text-only data)")
    parser.add_argument("--out", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--name", default=None, help="config name (default: from the annotation file name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    version_dir = build(args.data, args.images, args.out, name=args.name)
    name = version_dir.parent.name
    source = TfdsLlavaSource(args.out, name)
    print(f"wrote {len(source)} samples to {version_dir}; skipped: {source.skipped() or 'none'}")
    print(f"read with: TfdsLlavaSource({args.out!r}, {name!r})")


if __name__ == "__main__":
    main()
