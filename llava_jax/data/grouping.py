"""LLaVA's length / modality grouped sample order, and the padding-fraction report.

`group_by_modality_length` reproduces `get_modality_length_grouped_indices` of the official
`llava/train/llava_trainer.py` step for step: given the same random permutations it returns the same
order. Lengths follow the official `modality_lengths`: word counts, positive for samples with an
image and negative for text-only samples. Every megabatch (`world_size * batch_size` samples, one
global batch) is then all-image or all-text, sorted by length and split into `world_size` chunks of
about equal total length; only the leftovers of both modalities share the final megabatch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

# randperm(n) -> a permutation of range(n) as an integer array [n].
RandPerm = Callable[[int], np.ndarray]


def numpy_randperm(seed: int, epoch: int = 0) -> RandPerm:
    """A deterministic `randperm` for (seed, epoch); successive calls draw from one stream."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Splits `indices` into `num_chunks` chunks of about equal total length (greedy, as LLaVA).

    When the chunks cannot be equal in size the indices are dealt round-robin instead.
    """
    if len(indices) % num_chunks != 0:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def group_by_length(lengths: Sequence[int], batch_size: int, world_size: int, randperm: RandPerm) -> list[int]:
    """LLaVA's `get_length_grouped_indices`: shuffle, then sort each megabatch by length (descending).

    Args:
      lengths: positive lengths [N].
      batch_size: samples per device (or per process) and step.
      world_size: devices (or processes) x gradient accumulation steps.
      randperm: the source of randomness (one call).
    Returns:
      the sample order, a permutation of range(N).
    """
    indices = np.asarray(randperm(len(lengths))).tolist()
    megabatch_size = world_size * batch_size
    order: list[int] = []
    for start in range(0, len(lengths), megabatch_size):
        megabatch = sorted(indices[start : start + megabatch_size], key=lambda i: lengths[i], reverse=True)
        for chunk in split_to_even_chunks(megabatch, lengths, world_size):
            order.extend(chunk)
    return order


def group_by_modality_length(
    lengths: Sequence[int],
    batch_size: int,
    world_size: int = 1,
    *,
    seed: int = 0,
    epoch: int = 0,
    randperm: RandPerm | None = None,
) -> np.ndarray:
    """LLaVA's `get_modality_length_grouped_indices`: megabatches all-image or all-text, by length.

    Args:
      lengths: official `modality_lengths` [N]: > 0 for samples with images, < 0 for text-only; never 0.
      batch_size: samples per device (or per process) and step.
      world_size: devices (or processes) x gradient accumulation steps; a megabatch is
        `batch_size * world_size` samples.
      seed, epoch: select the permutations when `randperm` is not given (deterministic).
      randperm: the source of randomness, called in the official order (image permutation, text
        permutation, megabatch permutation); pass a torch-backed one to reproduce the official order.
    Returns:
      the sample order, int64 [N], a permutation of range(N).
    """
    lengths = [int(length) for length in lengths]
    if any(length == 0 for length in lengths):
        raise ValueError(f"modality lengths must be non-zero; sample {lengths.index(0)} has length 0")
    if randperm is None:
        randperm = numpy_randperm(seed, epoch)
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return np.asarray(group_by_length(lengths, batch_size, world_size, randperm), np.int64)

    image_indices = [i for i, length in enumerate(lengths) if length > 0]
    text_indices = [i for i, length in enumerate(lengths) if length < 0]
    image_order = [image_indices[i] for i in
                   group_by_length([lengths[i] for i in image_indices], batch_size, world_size, randperm)]
    text_order = [text_indices[i] for i in
                  group_by_length([-lengths[i] for i in text_indices], batch_size, world_size, randperm)]

    megabatch_size = world_size * batch_size
    image_megabatches = [image_order[i : i + megabatch_size] for i in range(0, len(image_order), megabatch_size)]
    text_megabatches = [text_order[i : i + megabatch_size] for i in range(0, len(text_order), megabatch_size)]
    leftovers = image_megabatches[-1] + text_megabatches[-1]
    megabatches = image_megabatches[:-1] + text_megabatches[:-1]
    megabatches = [megabatches[i] for i in np.asarray(randperm(len(megabatches))).tolist()]
    if leftovers:
        megabatches.append(sorted(leftovers))
    return np.asarray([i for megabatch in megabatches for i in megabatch], np.int64)


def padding_fraction(batches: Iterable[Mapping[str, np.ndarray] | np.ndarray]) -> float:
    """The fraction of token positions that are padding, over all `batches`.

    Args:
      batches: batches with an `attention_mask` [B, T] (1 = real token), or the masks themselves.
    Returns:
      padded positions / all positions (0.0 for no positions).
    """
    real = total = 0
    for batch in batches:
        mask = np.asarray(batch["attention_mask"] if isinstance(batch, Mapping) else batch)
        real += int(np.count_nonzero(mask))
        total += mask.size
    return 0.0 if total == 0 else 1.0 - real / total
