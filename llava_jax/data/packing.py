"""Sample packing: several samples share one row of `length` tokens, each with its own images.

A grain iterator reads `window` samples of the stream (the shuffled or modality-grouped order), places them
longest first into rows (first-fit or best-fit decreasing) and emits the rows in a seeded random order.
Tokens and images are packed together: a row holds at most `max_images` images, listed in the order of its samples, so
the model's image merge (k-th image group of the row <- k-th image of the row) places each sample's images
in its own segment. The packer's state (its parent's position at the start of the current window and the
rows of it already emitted) is part of the pipeline state, so a resumed run continues at the exact next row.

A packed row holds the fields of `llava_jax.data.batch` without the rows axis: input_ids, labels (-100 on
padding), segment_ids (1, 2, ... per sample; 0 = padding), positions (restarting at 0 per sample),
attention_mask (segment_ids > 0) [L]; pixel_values [I, 3, S, S] and image_mask [I].

AnyRes rows (`tile_tokens` > 0: LLaVA-NeXT / OneVision) count tiles instead of images: `max_images` is the
row's tile slots P, a sample's `pixel_values` are its tiles, and its own feature taps move to its slots
(`batch.place_taps`) in image_taps_index / image_taps_weight [L, TAPS].

`python -m llava_jax.data.packing` measures real tokens per computed token on a synthetic mix665k-like
length mix, for length bucketing (the unpacked pipeline) and for packing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Mapping

import grain
import numpy as np

from llava_jax import cli
from llava_jax.data import batch as batch_spec

METHODS = ("none", "first_fit", "best_fit")


def pack(dataset: grain.IterDataset, *, method: str, length: int, max_images: int, window: int, seed: int,
         pad_token_id: int, tile_tokens: int = 0) -> grain.IterDataset:
    """Examples dict(input_ids [n], labels [n], pixel_values [k, 3, S, S], ...) -> packed rows (module doc)."""
    if method not in METHODS[1:]:
        raise ValueError(f"packing method {method!r} is not one of {METHODS[1:]}")
    if window <= 0 or length <= 0 or max_images <= 0:
        raise ValueError(f"packing needs a positive window, length and max_images, got {window}, {length}, "
                         f"{max_images}")
    return WindowPackIterDataset(dataset, method=method, length=length, max_images=max_images, window=window,
                                 seed=seed, pad_token_id=pad_token_id, tile_tokens=tile_tokens)


class WindowPackIterDataset(grain.IterDataset):
    """Reads `window` samples, packs them longest first (first-fit or best-fit decreasing), emits the rows in a
    seeded random order, then reads the next window. (grain's own packers emit every open row as soon as one
    sample fits none, which stays near 0.87 real tokens per computed token on a mix665k-like mix.)"""

    def __init__(self, parent: grain.IterDataset, **options):
        super().__init__(parent)
        self._options = options

    def __iter__(self) -> "WindowPackIterator":
        return WindowPackIterator(self._parent.__iter__(), **self._options)


class WindowPackIterator(grain.DatasetIterator):
    """State: the parent's position at the start of the current window, the window's index and the rows of it
    already emitted; restoring re-reads and re-packs that window (deterministic) and skips those rows."""

    def __init__(self, parent: grain.DatasetIterator, *, method: str, length: int, max_images: int, window: int,
                 seed: int, pad_token_id: int, tile_tokens: int = 0):
        super().__init__(parent)
        self._method, self._length, self._max_images = method, length, max_images
        self._tile_tokens = tile_tokens
        self._window, self._seed, self._pad = window, seed, pad_token_id
        self._window_start = self._parent.get_state()
        self._window_index = -1
        self._rows: list[dict] = []
        self._next_row = 0

    def __next__(self) -> dict[str, np.ndarray]:
        while self._next_row >= len(self._rows):
            self._fill(self._window_index + 1)
        row = self._rows[self._next_row]
        self._next_row += 1
        return row

    def _fill(self, index: int) -> None:
        start = self._parent.get_state()
        examples = []
        for example in self._parent:
            examples.append(example)
            if len(examples) == self._window:
                break
        if not examples:  # the stream ended: the state stays at the last window (restorable)
            raise StopIteration
        self._window_start = start
        rows = pack_window(examples, method=self._method, length=self._length, max_images=self._max_images,
                           pad_token_id=self._pad, tile_tokens=self._tile_tokens)
        order = np.random.default_rng([self._seed, index]).permutation(len(rows))
        self._rows, self._window_index, self._next_row = [rows[i] for i in order], index, 0

    def get_state(self) -> dict[str, Any]:
        return {"window_start": self._window_start, "window_index": self._window_index, "next_row": self._next_row}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["window_start"])
        self._rows, self._next_row = [], 0
        self._window_index = int(state["window_index"])
        if self._window_index >= 0:
            self._fill(self._window_index)
            self._next_row = int(state["next_row"])
        else:
            self._window_start = self._parent.get_state()


def assign_rows(lengths: np.ndarray, images: np.ndarray, *, method: str, length: int, max_images: int
                ) -> list[list[int]]:
    """Bins of sample indices, longest samples first: each holds <= `length` tokens and <= `max_images`."""
    rows: list[list[int]] = []
    free: list[int] = []
    room: list[int] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n, k = int(lengths[i]), int(images[i])
        if n > length or k > max_images:
            raise ValueError(f"a sample of {n} tokens and {k} images does not fit a packed row of {length} "
                             f"tokens and {max_images} images")
        fits = [r for r in range(len(rows)) if free[r] >= n and room[r] >= k]
        if not fits:
            rows.append([]), free.append(length), room.append(max_images)
            fits = [len(rows) - 1]
        r = min(fits, key=lambda j: free[j]) if method == "best_fit" else fits[0]
        rows[r].append(int(i))
        free[r] -= n
        room[r] -= k
    return rows


def pack_window(examples: list[Mapping[str, Any]], *, method: str, length: int, max_images: int,
                pad_token_id: int, tile_tokens: int = 0) -> list[dict[str, np.ndarray]]:
    """Packed rows (module doc) of `examples`; the samples of a row appear in the order they were placed."""
    lengths = np.asarray([len(e["input_ids"]) for e in examples])
    images = np.asarray([len(e["pixel_values"]) for e in examples])
    layout = batch_spec.Layout(None, length, max_images, np.shape(examples[0]["pixel_values"])[1:], packed=True,
                               anyres=bool(tile_tokens))
    out = []
    for members in assign_rows(lengths, images, method=method, length=length, max_images=max_images):
        row = batch_spec.empty(layout, pad_token_id)
        start = image = 0
        for segment, i in enumerate(members, start=1):
            e, n, k = examples[i], lengths[i], images[i]
            row["input_ids"][start:start + n] = e["input_ids"]
            row["labels"][start:start + n] = e["labels"]
            row["segment_ids"][start:start + n] = segment
            row["positions"][start:start + n] = np.arange(n)
            row["pixel_values"][image:image + k] = e["pixel_values"]
            row["image_mask"][image:image + k] = True
            if tile_tokens:
                _place_sample_taps(row, e, start=start, slot=image, slots=max_images, tile_tokens=tile_tokens)
            start, image = start + n, image + k
        row["attention_mask"] = (row["segment_ids"] > 0).astype(np.int32)
        out.append(row)
    return out


def _place_sample_taps(row: dict[str, np.ndarray], example: Mapping[str, Any], *, start: int, slot: int, slots: int,
                       tile_tokens: int) -> None:
    """Writes an AnyRes sample's taps into a packed row: its tokens from `start`, its tiles from slot `slot`."""
    weight = example["image_taps_weight"]
    row["image_taps_index"][start:start + len(weight)] = batch_spec.place_taps(
        example["image_taps_index"], weight, tiles=len(example["pixel_values"]), slot=slot, slots=slots,
        tile_tokens=tile_tokens)
    row["image_taps_weight"][start:start + len(weight)] = weight


def segment_lengths(segment_ids: np.ndarray) -> np.ndarray:
    """The real-token count of every sample in packed rows [..., L] (for FLOP counting), int64 [samples]."""
    rows = np.asarray(segment_ids).reshape(-1, np.shape(segment_ids)[-1])
    counts = [np.bincount(row[row > 0])[1:] for row in rows]
    return np.concatenate([c[c > 0] for c in counts]).astype(np.int64) if counts else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------------------------------------
# Efficiency on a synthetic length mix


@dataclasses.dataclass(frozen=True)
class LengthMix:
    """A mix665k-like length mix: image samples are `image_tokens` + text tokens drawn log-uniformly in
    [text_min, text_max]; a `text_only` fraction are ShareGPT-like text-only samples, log-uniform in
    [text_min, max_length]."""

    image_tokens: int = 576
    text_min: int = 100
    text_max: int = 1500
    text_only: float = 0.06
    max_length: int = 2048

    def draw(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(token lengths int64 [n], has_image bool [n])."""
        rng = np.random.default_rng(seed)
        log_uniform = lambda lo, hi: np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(np.int64)
        has_image = rng.random(n) >= self.text_only
        lengths = np.where(has_image, self.image_tokens + log_uniform(self.text_min, self.text_max),
                           log_uniform(self.text_min, self.max_length))
        return np.minimum(lengths, self.max_length), has_image


def bucketing_efficiency(lengths: np.ndarray, batch: int, buckets: tuple[int, ...]) -> float:
    """Real / computed tokens when every batch of `batch` consecutive samples is padded to the smallest
    bucket holding its longest sample (the unpacked pipeline)."""
    n = len(lengths) // batch * batch
    real = computed = 0
    for start in range(0, n, batch):
        chunk = lengths[start:start + batch]
        real += int(chunk.sum())
        computed += batch * batch_spec.bucket_length(int(chunk.max()), buckets)
    return real / computed


def packing_efficiency(lengths: np.ndarray, has_image: np.ndarray, *, method: str, length: int, max_images: int,
                       window: int, seed: int = 0) -> tuple[float, float]:
    """(real / computed tokens, mean samples per row) when the samples, in this order, go through `pack`."""
    def example(i):
        n, k = int(lengths[i]), int(has_image[i])
        return {"input_ids": np.ones(n, np.int32), "labels": np.ones(n, np.int32),
                "pixel_values": np.zeros((k, 1, 1, 1), np.float32)}

    rows = pack(grain.MapDataset.range(len(lengths)).map(example).to_iter_dataset(), method=method, length=length,
                max_images=max_images, window=window, seed=seed, pad_token_id=0)
    real = computed = samples = 0
    for row in rows:
        real += int(row["attention_mask"].sum())
        computed += length
        samples += int(row["segment_ids"].max())
    return real / computed, samples / max(computed // length, 1)


@cli.command()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Real tokens per computed token: length bucketing against packing, "
                                            "on a synthetic mix665k-like length mix (see LengthMix).")
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--batch", type=int, default=128, help="global batch of the bucketed pipeline (samples)")
    p.add_argument("--buckets", type=int, nargs="+", default=[1024, 1536, 2048])
    p.add_argument("--length", type=int, default=2048, help="packed row length")
    p.add_argument("--max-images", type=int, default=3, help="images per packed row")
    p.add_argument("--windows", type=int, nargs="+", default=[64, 256, 1024], help="packing windows (samples)")
    p.add_argument("--method", choices=METHODS[1:], default="best_fit")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    mix = LengthMix()
    lengths, has_image = mix.draw(args.samples, args.seed)
    print(f"length mix: {mix} ({args.samples} samples, mean {lengths.mean():.0f} tokens, "
          f"{100 * (~has_image).mean():.1f}% text-only)")
    print(f"bucketing {tuple(args.buckets)}, batch {args.batch}: real/computed "
          f"{bucketing_efficiency(lengths, args.batch, tuple(args.buckets)):.3f}")
    for window in args.windows:
        eff, per_row = packing_efficiency(lengths, has_image, method=args.method, length=args.length,
                                          max_images=args.max_images, window=window, seed=args.seed)
        print(f"packing {args.method}, rows of {args.length}, <= {args.max_images} images per row, window "
              f"{window} samples: real/computed {eff:.3f} ({per_row:.2f} samples per row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
