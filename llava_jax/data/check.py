"""Scan a LLaVA dataset before training: every image decoded, every conversation validated (and tokenized).

    python -m llava_jax.data.check --data llava_v1_5_mix665k.json --images playground/data \\
        [--tokenizer DIR] [--template v1] [--max-length 2048] [--image-seq-length 576] [--limit N] \\
        [--workers N] [--aspect pad|resize] [--max-images N] [--strict] [--json REPORT.json]

Prints totals, bad samples by reason (with the first few sample ids and the first message), image and
text-only counts, the modes of the image files, word counts and, with a tokenizer, token length
percentiles. The reasons are the pipeline's: a sample reported here is a sample training would skip.
Exit code 1 with --strict when any sample is bad, 2 when the dataset cannot be read at all.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import multiprocessing
import os
import sys
from typing import Any, Sequence

import numpy as np
from etils import epath
from PIL import Image

from llava_jax import atomic_files, cli
from llava_jax.data.conversation import IMAGE_TOKEN, get_template
from llava_jax.data.errors import BadSample
from llava_jax.data.images import DEFAULT_MAX_PIXELS, ImageConfig, check_image_size, load_image
from llava_jax.data.sources import LlavaJsonSource
from llava_jax.data.tokenize import add_image_token, tokenize_conversation, validate_conversations

PERCENTILES = (50, 90, 99, 100)


@dataclasses.dataclass(frozen=True)
class SampleCheck:
    """The verdict on one sample; `reason` is None for a usable sample."""

    sample_id: str
    has_image: bool
    image_modes: tuple[str, ...] = ()
    token_length: int | None = None  # before truncation to max_length
    reason: str | None = None
    message: str | None = None


@dataclasses.dataclass
class Report:
    """What `check_dataset` found.

    Attributes:
      bad: reason -> number of samples. examples: reason -> the first sample ids. messages: reason -> the
      first error message. token_lengths: [N_ok] untruncated token counts of the good samples (empty
      without a tokenizer). words: [N] word counts of all scanned samples (the official length estimate).
    """

    data: str
    images: str | None
    total: int
    scanned: int = 0
    ok: int = 0
    image_samples: int = 0
    text_only_samples: int = 0
    image_files: int = 0
    image_modes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    messages: dict[str, str] = dataclasses.field(default_factory=dict)
    words: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    token_lengths: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    max_length: int | None = None
    template: str | None = None
    token_has_image: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, bool))

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def add(self, result: SampleCheck, examples_per_reason: int = 5) -> None:
        self.scanned += 1
        self.image_samples += result.has_image
        self.text_only_samples += not result.has_image
        self.image_files += len(result.image_modes)
        self.image_modes.update(result.image_modes)
        if result.reason is None:
            self.ok += 1
            return
        self.bad[result.reason] += 1
        self.messages.setdefault(result.reason, result.message)
        ids = self.examples.setdefault(result.reason, [])
        if len(ids) < examples_per_reason:
            ids.append(result.sample_id)

    def truncated(self) -> int:
        """Good samples longer than max_length (cut at the end by training)."""
        return int((self.token_lengths > self.max_length).sum()) if self.max_length else 0

    def token_efficiency(self) -> dict[str, float]:
        """Real tokens per computed token of the good samples (truncated to max_length, in a seeded shuffle):
        the recipes' length buckets (1024, 1536, 2048) with batches of 128 samples, and packing (best fit,
        window 256) into rows of 2048 tokens (<= 3 images) and 4096 tokens (<= 6 images)."""
        if not len(self.token_lengths) or not self.max_length:
            return {}
        from llava_jax.data import packing

        order = np.random.default_rng(0).permutation(len(self.token_lengths))
        lengths, images = np.minimum(self.token_lengths, self.max_length)[order], self.token_has_image[order]
        buckets = tuple(b for b in (1024, 1536, 2048) if b < self.max_length) + (self.max_length,)
        out = {"bucketing": packing.bucketing_efficiency(lengths, min(128, len(lengths)), buckets)}
        for length, max_images in ((self.max_length, 3), (2 * self.max_length, 6)):
            out[f"packed_{length}"] = packing.packing_efficiency(lengths, images, method="best_fit", length=length,
                                                                 max_images=max_images, window=256)[0]
        return out

    def to_dict(self) -> dict:
        """JSON-ready summary (percentiles instead of the per-sample arrays)."""
        def percentiles(values):
            return ({f"p{p}": int(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES,
                                                                              method="nearest"))}
                    if len(values) else {})
        return {"data": self.data, "images": self.images, "total": self.total, "scanned": self.scanned,
                "ok": self.ok, "bad": dict(self.bad), "examples": self.examples, "messages": self.messages,
                "image_samples": self.image_samples, "text_only_samples": self.text_only_samples,
                "image_files": self.image_files, "image_modes": dict(self.image_modes),
                "words": percentiles(np.abs(self.words)), "tokens": percentiles(self.token_lengths),
                "truncated": self.truncated(), "max_length": self.max_length, "template": self.template,
                "token_efficiency": self.token_efficiency()}

    def format(self) -> str:
        """The human-readable report."""
        lines = [f"dataset {self.data} (images: {self.images})",
                 f"  scanned {self.scanned} of {self.total} samples: {self.ok} ok, {self.num_bad} bad"
                 f" ({100 * self.num_bad / max(self.scanned, 1):.2f}%)",
                 f"  {self.image_samples} with images, {self.text_only_samples} text-only; "
                 f"{self.image_files} image files read",
                 "  image modes: " + (", ".join(f"{m} {n}" for m, n in self.image_modes.most_common()) or "-")]
        if self.bad:
            lines.append("  bad samples by reason:")
            for reason, count in self.bad.most_common():
                lines.append(f"    {reason:<24} {count:>8}   e.g. {', '.join(self.examples[reason])}")
                lines.append(f"      first: {self.messages[reason]}")
        lines.append("  words per sample: " + _percentile_text(np.abs(self.words)))
        if len(self.token_lengths):
            lines.append(f"  tokens per good sample ({self.template}, images counted): "
                         + _percentile_text(self.token_lengths)
                         + f"; {self.truncated()} longer than max_length {self.max_length} (truncated)")
            lines.append("  real/computed tokens: " + ", ".join(f"{k} {v:.3f}"
                                                               for k, v in self.token_efficiency().items()))
        return "\n".join(lines)


def _percentile_text(values: np.ndarray) -> str:
    if not len(values):
        return "-"
    points = np.percentile(values, PERCENTILES, method="nearest")
    return " ".join(f"{'max' if p == 100 else f'p{p}'} {int(v)}" for p, v in zip(PERCENTILES, points))


class SampleChecker:
    """Checks one sample of `source` the way the training pipeline reads it."""

    def __init__(self, source: LlavaJsonSource, *, tokenizer=None, template: str = "v1", max_length: int = 2048,
                 image_seq_length: int = 576, max_pixels: int = DEFAULT_MAX_PIXELS, aspect: str = "pad",
                 max_images: int | None = None):
        self.source = source
        self.max_images = max_images
        self.image_config = ImageConfig(aspect=aspect, max_pixels=max_pixels)
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.max_length = max_length
        self.image_seq_length = image_seq_length
        self.image_token_id = add_image_token(tokenizer) if tokenizer is not None else None

    def __call__(self, index: int) -> SampleCheck:
        record = self.source.record(index)
        has_image = isinstance(record, dict) and "image" in record
        sample_id = str(record.get("id", index)) if isinstance(record, dict) else str(index)
        modes: list[str] = []
        try:
            sample = self.source[index]
            sample_id = sample["id"]
            if self.max_images is not None and len(sample["images"]) > self.max_images:
                raise BadSample("too_many_images", f"{len(sample['images'])} images, at most {self.max_images} "
                                "per sample", sample_id)
            for data, name in zip(sample["images"], sample["image_paths"]):
                modes.append(_file_mode(data))
                image = load_image(data, sample_id=sample_id, name=name, max_pixels=self.image_config.max_pixels)
                check_image_size(image.size, self.image_config, sample_id=sample_id, name=name)
            token_length = self._check_text(sample)
        except BadSample as error:
            sample_id = sample_id if error.sample_id is None else error.sample_id
            return SampleCheck(sample_id, has_image, tuple(modes), None, error.reason, str(error))
        return SampleCheck(sample_id, has_image, tuple(modes), token_length)

    def _check_text(self, sample: dict) -> int | None:
        """Validates (and tokenizes) the conversation; returns the untruncated token count."""
        conversations, sample_id, num_files = sample["conversations"], sample["id"], len(sample["images"])
        if self.tokenizer is None:
            validate_conversations(conversations, sample_id)
            placeholders = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations)
            _check_image_count(num_files, placeholders, sample_id)
            return None
        tokens = self._tokenize(conversations, sample_id, max_length=sys.maxsize)
        _check_image_count(num_files, tokens.num_images, sample_id)
        if len(tokens.input_ids) > self.max_length:  # training truncates: its own verdict on the cut sample
            self._tokenize(conversations, sample_id, max_length=self.max_length)
        return len(tokens.input_ids)

    def _tokenize(self, conversations, sample_id, max_length):
        return tokenize_conversation(conversations, self.tokenizer, self.template,
                                     image_token_id=self.image_token_id, image_seq_length=self.image_seq_length,
                                     max_length=max_length, sample_id=sample_id)


def _file_mode(data: bytes) -> str:
    """The PIL mode of an encoded file from its header ("?" when it is not an image)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.mode
    except Exception:  # noqa: BLE001 - load_image names the actual problem
        return "?"


def _check_image_count(num_files: int, placeholders: int, sample_id: str) -> None:
    if num_files != placeholders:
        raise BadSample("image_count_mismatch", f"{num_files} image files but {placeholders} {IMAGE_TOKEN} "
                        "placeholders", sample_id)


_WORKER_CHECKER: SampleChecker | None = None


def _check_in_worker(index: int) -> SampleCheck:
    return _WORKER_CHECKER(index)


def check_dataset(data: str | os.PathLike, images: str | os.PathLike | None, *, tokenizer: Any = None,
                  template: str = "v1", max_length: int = 2048, image_seq_length: int = 576,
                  limit: int | None = None, workers: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS,
                  aspect: str = "pad", max_images: int | None = None, examples_per_reason: int = 5) -> Report:
    """Scans the first `limit` samples (all by default) of an annotation file.

    Args:
      data: the LLaVA JSON / JSONL annotation file.
      images: the image folder or .zip archive.
      tokenizer: a transformers tokenizer or the path of its folder; None validates without tokenizing.
      template, max_length, image_seq_length: as in training (`tokenize_conversation`).
      max_pixels, aspect: as in training (`load_image`, `ImageConfig.aspect`: "resize" rejects extreme
        aspect ratios).
      max_images: the image slots of a training row (the pipeline's `max_images_per_sample`); None: no cap.
      workers: processes (forked) that check samples; results keep the file's order.
    """
    source = LlavaJsonSource(data, images)
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
    checker = SampleChecker(source, tokenizer=tokenizer, template=template, max_length=max_length,
                            image_seq_length=image_seq_length, max_pixels=max_pixels, aspect=aspect,
                            max_images=max_images)
    count = len(source) if limit is None else min(limit, len(source))
    report = Report(data=str(data), images=None if images is None else str(images), total=len(source),
                    words=source.lengths()[:count], max_length=max_length if tokenizer is not None else None,
                    template=template if tokenizer is not None else None)
    lengths, has_image = [], []
    for result in _map(checker, count, workers):
        report.add(result, examples_per_reason)
        if result.reason is None and result.token_length is not None:
            lengths.append(result.token_length)
            has_image.append(result.has_image)
    report.token_lengths = np.asarray(lengths, np.int64)
    report.token_has_image = np.asarray(has_image, bool)
    return report


def _map(checker: SampleChecker, count: int, workers: int):
    """checker(i) for i < count, in order, in this process or in `workers` forked processes."""
    global _WORKER_CHECKER
    if workers <= 1:
        yield from map(checker, range(count))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers each tokenize on one thread
    _WORKER_CHECKER = checker  # inherited by the forked workers, never pickled
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield from pool.imap(_check_in_worker, range(count), chunksize=max(1, min(64, count // workers // 8)))
    finally:
        _WORKER_CHECKER = None


@cli.command(OSError, ValueError, KeyError)
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.data.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="LLaVA annotation file (.json list or .jsonl)")
    parser.add_argument("--images", help="image folder or .zip archive (local or gs://)")
    parser.add_argument("--tokenizer", help="tokenizer folder; tokenizes every sample as training does")
    parser.add_argument("--template", default="v1", help="conversation template (plain for stage 1)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--image-seq-length", type=int, default=576)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--aspect", choices=["pad", "resize"], default="pad",
                        help="image aspect mode of training (resize: stage 1)")
    parser.add_argument("--max-images", type=int, help="most images per sample (the pipeline's slots)")
    parser.add_argument("--limit", type=int, help="check only the first N samples")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--strict", action="store_true", help="exit with code 1 when any sample is bad")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    _check_arguments(args)
    report = check_dataset(args.data, args.images, tokenizer=args.tokenizer, template=args.template,
                           max_length=args.max_length, image_seq_length=args.image_seq_length,
                           limit=args.limit, workers=args.workers, max_pixels=args.max_pixels,
                           aspect=args.aspect, max_images=args.max_images)
    if report.total == 0:
        raise ValueError(f"{args.data}: no samples")
    print(report.format())
    if args.json:
        write_json(args.json, report.to_dict())
    return 1 if args.strict and report.num_bad else 0


def _check_arguments(args) -> None:
    """Paths given on the command line exist (or can be written) before the scan starts."""
    if args.tokenizer and "://" not in args.tokenizer and not os.path.isdir(args.tokenizer):
        raise FileNotFoundError(f"tokenizer folder not found: {args.tokenizer}")
    if args.json and "://" not in args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent) or os.path.isdir(args.json):
            raise NotADirectoryError(f"--json {args.json}: cannot write a file there")
    for name in ("limit", "workers", "max_length", "max_pixels"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "limit" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def write_json(path: str, obj) -> None:
    """Writes the report atomically (a local file) or in one write (a bucket)."""
    text = json.dumps(obj, indent=2)
    if "://" in path:
        epath.Path(path).write_text(text)
    else:
        atomic_files.write_text(path, text)


if __name__ == "__main__":
    sys.exit(main())
