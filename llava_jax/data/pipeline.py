"""The grain training pipeline: sources -> per-epoch order -> decode + tokenize -> static-shape batches.

Stages (grain dataset API):

1. Each source's sample stream, epoch after epoch, in a deterministic per-epoch order (a permutation,
   or LLaVA's `group_by_modality_length`), cut into global batches of sample indices.
2. Several sources are mixed by weight (`grain.MapDataset.mix`) one global batch at a time, so a
   global batch never mixes sources (nor, when grouped, modalities).
3. Each JAX process keeps only its rows `[p * b, (p + 1) * b)` of every global batch.
4. Read, decode, preprocess and tokenize each sample (in worker processes with `worker_count > 0`,
   `mp_prefetch`); a `BadSample` becomes a `Rejected` marker instead of an exception.
5. In the main process: drop the markers, counting them by reason (strict mode raises instead), and
   batch `b` samples padded to the smallest length bucket that fits, or pack samples several to a row
   (`packing`, see `llava_jax.data.packing`) and batch `b` rows. AnyRes models (`PipelineConfig.anyres`:
   LLaVA-NeXT / OneVision, see `llava_jax.data.anyres_samples`) fill tile slots instead of image slots and
   carry each sample's feature taps moved to its slots.

The order depends only on (seed, sources, global batch size, process count), never on the number of
workers. `TrainIterator.get_state()` / `set_state()` (and grain's Orbax `CheckpointSave` /
`CheckpointRestore`) resume at the exact next batch, bad-sample counts included.

Worker processes are spawned (grain `mp_prefetch`): a training script that sets `worker_count > 0`
needs the usual `if __name__ == "__main__":` guard.

A bad sample's slot is refilled by the next sample of the same process, so a process stream that met
bad samples runs slightly ahead of the others.

A finite pass (`num_epochs` set) sees every sample exactly once: its last batch is filled up with padding
rows (every field at its `llava_jax.data.batch` fill value: no token attends, no label counts) and keeps
`b` rows, so a jitted step does not recompile. One process stops after its last sample. Several processes
each yield as many batches as the sample order has global batches (a count every process knows), a process
whose samples end early (bad samples, a short last global batch) going on with padding-only batches;
packed, that count is the bound for one sample a row, so the last batches of a multi-process packed pass
are mostly padding.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import grain
import numpy as np

from llava_jax.data import batch as batch_spec
from llava_jax.data import packing
from llava_jax.data.batch import bucket_length  # noqa: F401  (re-exported)
from llava_jax.data.errors import BadSample, DataFileError
from llava_jax.data.grouping import group_by_modality_length
from llava_jax.data import tokenize
from llava_jax.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    from llava_jax.data.anyres_samples import AnyResLayouts

logger = logging.getLogger(__name__)

# Block count of a source stream that repeats forever (effectively infinite, safe for grain's lengths).
_FOREVER_BLOCKS = 2**40


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that defines the training batches.

    Attributes:
      sources: grain random-access sources giving `dict(id, conversations, images: list[bytes],
        image_paths)` records (`LlavaJsonSource`, `TfdsLlavaSource`, ...).
      weights: mixing weights, one per source (None: uniform). The mixture ends when any source's
        stream ends.
      template: conversation template name (`conversation.get_template`).
      max_length: token budget of a sample, image tokens included.
      length_buckets: the padded lengths T a batch may have (the smallest that fits is used);
        empty means `(max_length,)`. The largest must be >= max_length.
      global_batch_size: samples per step over all processes.
      seed: the order of every epoch follows from it.
      num_epochs: passes over each source; None repeats forever.
      group_by_modality_length: LLaVA's grouped order (needs `source.lengths()`).
      image_config: `images.ImageConfig` (None: the default CLIP-336 `pad` config).
      image_seq_length: image tokens per image in the prompt.
      max_images_per_sample: I, the image slots of a row; samples with more are skipped.
      image_token_id: the `<image>` token; None adds it to the tokenizer if missing.
      pad_token_id: None: `tokenize.pad_token_id(tokenizer)` (its pad, else unk as LLaVA, else eos token).
      strict: raise the first BadSample instead of skipping and counting.
      max_bad_in_row: that many bad samples in a row stop the run (DataFileError): a dataset whose samples
        are all bad would otherwise be skipped through forever.
      worker_count: processes that read and preprocess (0: threads of the main process).
      worker_buffer_size: samples each worker prepares ahead.
      read_threads, read_buffer_size: threads and look-ahead (samples) of each reading process.
      report_every: log padding and bad-sample counts every that many batches (0: never).
      log_first_bad: sample ids logged per bad-sample reason.
      packing: "none" (each row one sample, padded to a length bucket), "first_fit" or "best_fit": several
        samples per row of `pack_length` tokens with their images (`llava_jax.data.packing`); then
        `global_batch_size` counts rows, not samples.
      pack_length: tokens per packed row (0: the largest length bucket); >= max_length.
      pack_window: samples the packer sees at a time.
      max_images_per_row: image slots I of a packed row (0: max_images_per_sample; AnyRes: unused, rows
        have max_tiles_per_row tile slots).
      anyres: `anyres_samples.AnyResLayouts` for an AnyRes model (LLaVA-NeXT / OneVision): images become tiles
        and token-aligned feature taps (`data.batch`'s anyres fields), each image its own token count
        (`image_seq_length` unused). None: LLaVA-1.5 batches.
      max_tiles_per_row: AnyRes only: P, the tile slots of a row (packed or not; 0: the most tiles a sample
        can have); a sample with more tiles is skipped ("too_many_tiles").
    """

    sources: tuple[Any, ...]
    weights: tuple[float, ...] | None = None
    template: str = "v1"
    max_length: int = 2048
    length_buckets: tuple[int, ...] = ()
    global_batch_size: int = 128
    seed: int = 0
    num_epochs: int | None = 1
    group_by_modality_length: bool = False
    image_config: Any = None
    image_seq_length: int = 576
    max_images_per_sample: int = 1
    image_token_id: int | None = None
    pad_token_id: int | None = None
    strict: bool = False
    max_bad_in_row: int = 1000
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 4
    read_buffer_size: int = 64
    report_every: int = 100
    log_first_bad: int = 5
    packing: str = "none"
    pack_length: int = 0
    pack_window: int = 256
    max_images_per_row: int = 0
    anyres: "AnyResLayouts | None" = None
    max_tiles_per_row: int = 0

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources:
            raise ValueError("PipelineConfig.sources is empty")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != len(self.sources) or min(self.weights) <= 0:
                raise ValueError(f"PipelineConfig.weights needs one positive weight per source "
                                 f"({len(self.sources)}), got {self.weights}")
        buckets = tuple(sorted(int(b) for b in self.length_buckets)) or (self.max_length,)
        if buckets[-1] < self.max_length:
            raise ValueError(f"PipelineConfig.length_buckets {buckets}: the largest must be >= max_length "
                             f"{self.max_length}")
        object.__setattr__(self, "length_buckets", buckets)
        if self.global_batch_size <= 0 or self.max_images_per_sample <= 0:
            raise ValueError("PipelineConfig.global_batch_size and max_images_per_sample must be positive")
        if self.max_bad_in_row < 1:
            raise ValueError(f"PipelineConfig.max_bad_in_row must be >= 1, got {self.max_bad_in_row}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"PipelineConfig.num_epochs must be positive or None, got {self.num_epochs}")
        if self.packing not in packing.METHODS:
            raise ValueError(f"PipelineConfig.packing {self.packing!r} is not one of {packing.METHODS}")
        object.__setattr__(self, "pack_length", self.pack_length or buckets[-1])
        object.__setattr__(self, "max_images_per_row", self.max_images_per_row or self.max_images_per_sample)
        image_slots_short = self.anyres is None and self.max_images_per_row < self.max_images_per_sample
        if self.packing != "none" and (self.pack_length < self.max_length or self.pack_window <= 0
                                       or image_slots_short):  # AnyRes rows count tiles (max_tiles_per_row)
            raise ValueError(f"PipelineConfig: packing needs pack_length ({self.pack_length}) >= max_length "
                             f"({self.max_length}), a positive pack_window ({self.pack_window}) and "
                             f"max_images_per_row ({self.max_images_per_row}) >= max_images_per_sample "
                             f"({self.max_images_per_sample})")
        self._check_anyres()

    def _check_anyres(self) -> None:
        if self.anyres is None:
            if self.max_tiles_per_row:
                raise ValueError("PipelineConfig.max_tiles_per_row is an AnyRes option (set anyres)")
            return
        bound = self.anyres.max_sample_tiles(self.max_images_per_sample)
        object.__setattr__(self, "max_tiles_per_row", self.max_tiles_per_row or bound)
        if self.max_tiles_per_row < 1:
            raise ValueError(f"PipelineConfig.max_tiles_per_row must be positive, got {self.max_tiles_per_row}")
        crop = self.resolved_image_config().crop_size
        if crop != self.anyres.tile_size:
            raise ValueError(f"PipelineConfig.image_config: crop_size {crop} differs from the AnyRes tile_size "
                             f"{self.anyres.tile_size} (use ImageConfig.for_tower)")

    @property
    def image_size(self) -> int:
        """S, the side of the preprocessed square images (AnyRes: of the tiles)."""
        return self.resolved_image_config().crop_size

    @property
    def image_slots(self) -> int:
        """The `images` axis of a batch row: image slots I, or AnyRes tile slots P."""
        if self.anyres is not None:
            return self.max_tiles_per_row
        return self.max_images_per_row if self.packing != "none" else self.max_images_per_sample

    @property
    def tile_tokens(self) -> int:
        """AnyRes: feature rows per tile slot (the taps' unit); 0 for LLaVA-1.5 batches."""
        return 0 if self.anyres is None else self.anyres.tile_tokens

    def resolved_image_config(self):
        if self.image_config is not None:
            return self.image_config
        from llava_jax.data.images import ImageConfig

        return ImageConfig()


class Rejected(NamedTuple):
    """A sample that could not be used, travelling down the pipeline in place of the sample."""

    reason: str
    message: str
    sample_id: str | None


# ----------------------------------------------------------------------------------------------------
# Sample order
# ----------------------------------------------------------------------------------------------------


class SourceBlocks:
    """One source's sample stream over epochs, as global batches: block k = stream[k*G : (k+1)*G].

    `self[k]` is int64 [<=G, 2] of (source id, record index); shorter only at the stream's end.
    Epoch e's order is a permutation (or, grouped, LLaVA's modality-grouped order) drawn from
    (seed, source id, e).
    """

    def __init__(self, source_id: int, num_records: int, *, global_batch_size: int, process_count: int,
                 seed: int, num_epochs: int | None, modality_lengths: np.ndarray | None = None):
        if num_records <= 0:
            raise ValueError(f"source {source_id} has no samples")
        self.source_id = source_id
        self.num_records = num_records
        self.global_batch_size = global_batch_size
        self.process_count = process_count
        self.seed = seed
        self.num_epochs = num_epochs
        self.modality_lengths = modality_lengths
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _cache={}, _lock=threading.Lock())

    def __len__(self) -> int:
        if self.num_epochs is None:
            return _FOREVER_BLOCKS
        return -(-self.num_records * self.num_epochs // self.global_batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [N]: the record order of `epoch`."""
        with self._lock:
            order = self._cache.get(epoch)
            if order is None:
                randperm = np.random.default_rng([self.seed, self.source_id, epoch]).permutation
                if self.modality_lengths is None:
                    order = randperm(self.num_records).astype(np.int64)
                else:
                    order = group_by_modality_length(self.modality_lengths,
                                                     self.global_batch_size // self.process_count,
                                                     self.process_count, randperm=randperm)
                if len(self._cache) >= 2:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = order
            return order

    def __getitem__(self, block: int) -> np.ndarray:
        total = None if self.num_epochs is None else self.num_records * self.num_epochs
        start = int(block) * self.global_batch_size
        stop = start + self.global_batch_size if total is None else min(start + self.global_batch_size, total)
        positions = np.arange(start, stop, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_records)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            selected = epochs == epoch
            indices[selected] = self.epoch_order(int(epoch))[offsets[selected]]
        return np.stack([np.full_like(indices, self.source_id), indices], axis=1)


@dataclasses.dataclass(frozen=True)
class ProcessRows(grain.experimental.FlatMapTransform):
    """This process's rows of a global batch: rows [p*b, (p+1)*b) as separate (source, index) pairs."""

    process_index: int
    local_batch_size: int

    @property
    def max_fan_out(self) -> int:
        return self.local_batch_size

    def flat_map(self, block: np.ndarray) -> list[np.ndarray]:
        start = self.process_index * self.local_batch_size
        return list(block[start : start + self.local_batch_size])


# ----------------------------------------------------------------------------------------------------
# Per-sample work (runs in worker processes)
# ----------------------------------------------------------------------------------------------------


class LlavaSampleProcessor:
    """record -> example: images decoded and preprocessed, conversation tokenized.

    The example is `dict(id, input_ids int32 [T], labels int32 [T], pixel_values float32 [n, 3, S, S])`.
    Raises BadSample for unusable samples.
    """

    def __init__(self, tokenizer, *, template: str, image_config, image_token_id: int, image_seq_length: int,
                 max_length: int, max_images: int):
        self.tokenizer = tokenizer
        self.template_name = template
        self.image_config = image_config
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.max_length = max_length
        self.max_images = max_images

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        from llava_jax.data.conversation import get_template
        from llava_jax.data.images import load_image, preprocess
        from llava_jax.data.tokenize import tokenize_conversation

        sample_id = record["id"]
        num_images = len(record["images"])
        if num_images > self.max_images:
            raise BadSample("too_many_images", f"{num_images} images, at most {self.max_images} per sample",
                            sample_id)
        tokens = tokenize_conversation(record["conversations"], self.tokenizer, get_template(self.template_name),
                                       image_token_id=self.image_token_id,
                                       image_seq_length=self.image_seq_length, max_length=self.max_length,
                                       sample_id=sample_id)
        if tokens.num_images != num_images:
            raise BadSample("image_count_mismatch", f"{num_images} image files but {tokens.num_images} "
                            "<image> placeholders in the conversation", sample_id)
        pixels = [preprocess(load_image(data, sample_id=sample_id, name=name,
                                        max_pixels=self.image_config.max_pixels), self.image_config,
                             sample_id=sample_id)
                  for data, name in zip(record["images"], record.get("image_paths") or [None] * num_images)]
        size = self.image_config.crop_size
        return {
            "id": sample_id,
            "input_ids": np.asarray(tokens.input_ids, np.int32),
            "labels": np.asarray(tokens.labels, np.int32),
            "pixel_values": np.stack(pixels) if pixels else np.zeros((0, 3, size, size), np.float32),
        }


class PrepareSample:
    """(source id, record index) -> example, or `Rejected` for a sample that raised BadSample."""

    def __init__(self, sources: Sequence[Any], processor: Callable[[Mapping[str, Any]], dict], max_tokens: int):
        self.sources = tuple(sources)
        self.processor = processor
        self.max_tokens = max_tokens

    def __call__(self, pair: np.ndarray) -> dict | Rejected:
        source_id, index = (int(x) for x in pair)
        try:
            example = self.processor(self.sources[source_id][index])
        except BadSample as error:
            sample_id = error.sample_id if error.sample_id is not None else f"source{source_id}[{index}]"
            return Rejected(error.reason, str(error), sample_id)
        except Exception as error:
            error.add_note(f"while preparing record {index} of source {source_id} ({self.sources[source_id]!r})")
            raise
        labels = example["labels"]
        if not np.any(labels != IGNORE_INDEX):
            return Rejected("no_supervised_tokens", f"sample {example['id']!r}: every label is ignored "
                            "[no_supervised_tokens]", example["id"])
        if len(example["input_ids"]) > self.max_tokens or len(labels) != len(example["input_ids"]):
            raise ValueError(f"sample {example['id']!r}: {len(example['input_ids'])} input_ids and {len(labels)} "
                             f"labels; expected equal lengths <= {self.max_tokens}")
        return example


# ----------------------------------------------------------------------------------------------------
# Main-process stages
# ----------------------------------------------------------------------------------------------------


class BadSampleCounter:
    """grain filter of the main process: passes examples, counts (or, strict, raises) `Rejected`."""

    def __init__(self, *, strict: bool, log_first: int, max_in_row: int = 1000):
        self.strict = strict
        self.log_first = log_first
        self.max_in_row = max_in_row
        self.in_row = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.first_ids: dict[str, list[str]] = {}

    def __call__(self, element: dict | Rejected) -> bool:
        if not isinstance(element, Rejected):
            self.in_row = 0
            return True
        if self.strict:
            error = BadSample(element.reason, element.message, element.sample_id)
            error.args = (element.message,)  # the text the worker's BadSample had, not wrapped twice
            raise error
        self.in_row += 1
        self.counts[element.reason] += 1
        if self.in_row >= self.max_in_row:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
            raise DataFileError(f"{self.in_row} bad samples in a row (so far: {counts}; last: {element.message}); "
                                "check the data with python -m llava_jax.data.check")
        ids = self.first_ids.setdefault(element.reason, [])
        if len(ids) < self.log_first:
            ids.append(str(element.sample_id))
            logger.warning("skipping bad sample: %s", element.message)
        return False

    def state(self) -> dict:
        return {"counts": dict(self.counts), "first_ids": {k: list(v) for k, v in self.first_ids.items()}}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.counts = collections.Counter({k: int(v) for k, v in state["counts"].items()})
        self.first_ids = {k: list(v) for k, v in state["first_ids"].items()}


def collate(examples: Sequence[dict], *, buckets: Sequence[int], pad_token_id: int, max_images: int,
            image_size: int, rows: int | None = None, tile_tokens: int = 0) -> dict[str, np.ndarray]:
    """Right-pads examples into one batch of static shape (the fields of `llava_jax.data.batch`).

    Returns:
      input_ids int32 [b, T], labels int32 [b, T] (-100 on padding), attention_mask int32 [b, T],
      pixel_values float32 [b, I, 3, S, S] (zeros in empty slots), image_mask bool [b, I];
      T = the smallest bucket holding the longest example, I = max_images, b = `rows` (padding rows after
      the examples; default len(examples)). With `tile_tokens` (AnyRes) I counts tile slots and
      image_taps_index / image_taps_weight [b, T, TAPS] hold each example's taps moved to its row's slots.
    """
    t = bucket_length(max(len(e["input_ids"]) for e in examples), buckets)
    layout = batch_spec.Layout(len(examples) if rows is None else rows, t, max_images, (3, image_size, image_size),
                               anyres=bool(tile_tokens))
    batch = batch_spec.empty(layout, pad_token_id)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][row, :n] = example["input_ids"]
        batch["labels"][row, :n] = example["labels"]
        batch["attention_mask"][row, :n] = 1
        num_images = len(example["pixel_values"])
        batch["pixel_values"][row, :num_images] = example["pixel_values"]
        batch["image_mask"][row, :num_images] = True
        if tile_tokens:
            batch["image_taps_index"][row, :n] = batch_spec.place_taps(
                example["image_taps_index"], example["image_taps_weight"], tiles=num_images, slot=0,
                slots=max_images, tile_tokens=tile_tokens)
            batch["image_taps_weight"][row, :n] = example["image_taps_weight"]
    return batch


class PaddedEnd(grain.IterDataset):
    """A finite stream of batches made exactly `count` batches long by padding batches after its end
    (`count` None: as long as it is)."""

    def __init__(self, parent: grain.IterDataset, count: int | None, padding: Mapping[str, np.ndarray]):
        super().__init__(parent)
        self._count, self._padding = count, padding

    def __iter__(self) -> "PaddedEndIterator":
        return PaddedEndIterator(self._parent.__iter__(), self._count, self._padding)


class PaddedEndIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, count: int | None, padding: Mapping[str, np.ndarray]):
        super().__init__(parent)
        self._count, self._padding = count, padding
        self._yielded, self._ended = 0, False

    def __next__(self) -> dict[str, np.ndarray]:
        if self._count is not None and self._yielded >= self._count:
            raise StopIteration
        batch = None
        if not self._ended:
            try:
                batch = next(self._parent)
            except StopIteration:
                self._ended = True
        if batch is None:
            if self._count is None:
                raise StopIteration
            batch = {k: v.copy() for k, v in self._padding.items()}
        self._yielded += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "yielded": self._yielded, "ended": self._ended}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._yielded, self._ended = int(state["yielded"]), bool(state["ended"])


class TrainIterator(grain.DatasetIterator):
    """The per-process batch iterator: checkpointable, with bad-sample and padding statistics.

    `get_state()` / `set_state()` are JSON-compatible; grain's Orbax handler
    (`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`) saves them per process.
    """

    def __init__(self, parent: grain.DatasetIterator, counter: BadSampleCounter, *, report_every: int):
        super().__init__(parent)
        self._counter = counter
        self._report_every = report_every
        self._batches = 0
        self._real_tokens = 0
        self._positions = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        self._batches += 1
        self._real_tokens += int(np.count_nonzero(batch["attention_mask"]))
        self._positions += batch["attention_mask"].size
        if self._report_every and self._batches % self._report_every == 0:
            logger.info("%s", self.report())
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "pipeline": self._parent.get_state(),
            "bad_samples": self._counter.state(),
            "batches": self._batches,
            "real_tokens": self._real_tokens,
            "positions": self._positions,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._counter.restore(state["bad_samples"])
        self._batches = int(state["batches"])
        self._real_tokens = int(state["real_tokens"])
        self._positions = int(state["positions"])

    def bad_sample_counts(self) -> dict[str, int]:
        """Skipped samples by reason, since the start of training (restored with the state)."""
        return dict(self._counter.counts)

    def bad_sample_ids(self) -> dict[str, list[str]]:
        """The first few skipped sample ids per reason."""
        return {k: list(v) for k, v in self._counter.first_ids.items()}

    def padding_fraction(self) -> float:
        """Padded / all token positions over every batch yielded so far."""
        return 0.0 if self._positions == 0 else 1.0 - self._real_tokens / self._positions

    def token_efficiency(self) -> float:
        """Real tokens / computed token positions over every batch yielded so far (1 - padding fraction)."""
        return 1.0 - self.padding_fraction()

    def report(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self._counter.counts.items())) or "none"
        return (f"{self._batches} batches: padding fraction {self.padding_fraction():.3f} (real/computed tokens "
                f"{self.token_efficiency():.3f}); "
                f"bad samples skipped: {counts}")

    def __str__(self) -> str:
        return f"TrainIterator({self.report()})"


# ----------------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------------


def _process_index_and_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    return process_index, process_count


def _use_default_absl_flags() -> None:
    """grain's worker processes read absl flags: outside an absl app, take their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def batch_layout(config: PipelineConfig, rows: int) -> batch_spec.Layout:
    """The layout of this process's batches (`rows` rows; T the smallest length bucket when unpacked)."""
    packed = config.packing != "none"
    return batch_spec.Layout(rows, config.pack_length if packed else config.length_buckets[0], config.image_slots,
                             (3, config.image_size, config.image_size), packed=packed,
                             anyres=config.anyres is not None)


def batches(config: PipelineConfig, examples: grain.IterDataset, *, rows: int, pad_token_id: int,
            seed: int) -> grain.IterDataset:
    """Batches of `rows` rows: padded samples, or packed rows. An endless stream drops its remainder (there
    is none); a finite one fills its last batch up with padding rows."""
    drop = config.num_epochs is None
    if config.packing == "none":
        batch_fn = functools.partial(collate, buckets=config.length_buckets, pad_token_id=pad_token_id,
                                     max_images=config.image_slots, image_size=config.image_size,
                                     rows=rows, tile_tokens=config.tile_tokens)
        return examples.batch(rows, drop_remainder=drop, batch_fn=batch_fn)
    packed = packing.pack(examples, method=config.packing, length=config.pack_length,
                          max_images=config.image_slots, window=config.pack_window, seed=seed,
                          pad_token_id=pad_token_id, tile_tokens=config.tile_tokens)
    if drop:
        return packed.batch(rows, drop_remainder=True)
    layout = dataclasses.replace(batch_layout(config, rows), rows=None)
    return packed.batch(rows, drop_remainder=False, batch_fn=functools.partial(
        batch_spec.with_rows, num_rows=rows, layout=layout, pad_token_id=pad_token_id))


def default_sample_processor(config: PipelineConfig, tokenizer) -> Callable[[Mapping[str, Any]], dict]:
    """The processor of `config`: template, image config, image token, max length; AnyRes tiles and taps
    when `config.anyres` is set."""
    image_token_id = config.image_token_id
    if image_token_id is None:
        from llava_jax.data.tokenize import add_image_token

        image_token_id = add_image_token(tokenizer)
    if config.anyres is not None:
        from llava_jax.data.anyres_samples import AnyResSampleProcessor

        return AnyResSampleProcessor(tokenizer, template=config.template, layouts=config.anyres,
                                     image_config=config.resolved_image_config(), image_token_id=image_token_id,
                                     max_length=config.max_length, max_images=config.max_images_per_sample,
                                     max_tiles=config.max_tiles_per_row)
    return LlavaSampleProcessor(tokenizer, template=config.template, image_config=config.resolved_image_config(),
                                image_token_id=image_token_id, image_seq_length=config.image_seq_length,
                                max_length=config.max_length, max_images=config.max_images_per_sample)


def sample_dataset(config: PipelineConfig, processor: Callable[[Mapping[str, Any]], dict], *,
                   process_index: int, process_count: int) -> grain.MapDataset:
    """This process's stream of prepared samples (examples or `Rejected`), before batching."""
    if config.global_batch_size % process_count:
        raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by process_count "
                         f"{process_count}")
    blocks = []
    for source_id, source in enumerate(config.sources):
        lengths = None
        if config.group_by_modality_length:
            if not hasattr(source, "lengths"):
                raise ValueError(f"group_by_modality_length needs source.lengths(); {source!r} has none")
            lengths = np.asarray(source.lengths(), np.int64)
        blocks.append(grain.MapDataset.source(SourceBlocks(
            source_id, len(source), global_batch_size=config.global_batch_size, process_count=process_count,
            seed=config.seed, num_epochs=config.num_epochs, modality_lengths=lengths)))
    mixed = blocks[0] if len(blocks) == 1 else grain.MapDataset.mix(blocks, config.weights)
    rows = grain.experimental.FlatMapMapDataset(
        mixed, ProcessRows(process_index, config.global_batch_size // process_count))
    return rows.map(PrepareSample(config.sources, processor, config.length_buckets[-1]))


def make_train_iterator(config: PipelineConfig, tokenizer=None, *, process_index: int | None = None,
                        process_count: int | None = None,
                        sample_processor: Callable[[Mapping[str, Any]], dict] | None = None) -> TrainIterator:
    """The training batches of this JAX process.

    Args:
      config: the pipeline.
      tokenizer: a transformers tokenizer (needed unless `sample_processor` is given).
      process_index, process_count: this process's shard (default: jax.process_index/process_count).
      sample_processor: record -> dict(id, input_ids [T], labels [T], pixel_values [n, 3, S, S]),
        raising BadSample; default `LlavaSampleProcessor` (decode, preprocess, tokenize). Must be
        picklable when `worker_count > 0`.
    Returns:
      an iterator of dicts with input_ids int32 [b, T], labels int32 [b, T], attention_mask int32 [b, T],
      pixel_values float32 [b, I, 3, S, S], image_mask bool [b, I]; b = global_batch_size /
      process_count, T one of `config.length_buckets`, I = max_images_per_sample. Packed
      (`config.packing`): T = pack_length, I = max_images_per_row, plus segment_ids and positions [b, T]
      (the fields of `llava_jax.data.batch`). AnyRes (`config.anyres`): I = max_tiles_per_row tile slots, plus
      image_taps_index / image_taps_weight [b, T, 4]. With finite `num_epochs` every sample comes once and the last
      batches are filled up with padding rows (module doc); `batch.padding_rows(batch)` tells them apart.
    """
    process_index, process_count = _process_index_and_count(process_index, process_count)
    if sample_processor is None:
        if tokenizer is None:
            raise ValueError("make_train_iterator needs a tokenizer (or a sample_processor)")
        sample_processor = default_sample_processor(config, tokenizer)
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else tokenize.pad_token_id(tokenizer)
    samples = sample_dataset(config, sample_processor, process_index=process_index, process_count=process_count)
    dataset = samples.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                         prefetch_buffer_size=config.read_buffer_size))
    if config.worker_count > 0:
        _use_default_absl_flags()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    counter = BadSampleCounter(strict=config.strict, log_first=config.log_first_bad,
                               max_in_row=config.max_bad_in_row)
    rows = config.global_batch_size // process_count
    dataset = batches(config, dataset.filter(counter), rows=rows, pad_token_id=pad_token_id,
                      seed=config.seed + process_index)
    if config.num_epochs is not None:
        count = None if process_count == 1 else len(samples) // rows
        dataset = PaddedEnd(dataset, count, batch_spec.empty(batch_layout(config, rows), pad_token_id))
    return TrainIterator(iter(dataset), counter, report_every=config.report_every)
