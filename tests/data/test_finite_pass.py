"""A finite pass (`num_epochs` set) sees every sample exactly once: its last batch is filled up with padding
rows that carry no loss and keeps the batch's shape; every process yields the same number of batches."""

import numpy as np
import pytest

from llava_jax.data import batch as batch_spec
from llava_jax.data.pipeline import IGNORE_INDEX
from llava_jax.train import loss as loss_lib
from tests.data.test_pipeline import ID_BASE, ListSource, assert_batches_equal, iterator_for, make_records, take
from tests.data.test_packing import PACKED, markers


def sample_keys(batches) -> list[int]:
    """The record index of every real (unpacked) row of source 0, from its marker token."""
    return [int(b["input_ids"][row, 0]) - ID_BASE for b in batches
            for row in np.flatnonzero(~batch_spec.padding_rows(b))]


def check_padding_rows_carry_no_loss(batch, pad_token_id=0):
    padding = batch_spec.padding_rows(batch)
    weights = np.asarray(loss_lib.target_mask(batch["labels"], batch.get("segment_ids")))
    assert not weights[padding].any()                      # zero loss weight
    assert (batch["labels"][padding] == IGNORE_INDEX).all() and (batch["input_ids"][padding] == pad_token_id).all()
    assert not batch["image_mask"][padding].any() and not batch["pixel_values"][padding].any()
    if "segment_ids" in batch:
        assert not batch["segment_ids"][padding].any()
    return int(padding.sum())


def test_one_epoch_of_3000_samples_sees_every_sample_once():
    """3000 text-only samples in global batches of 331: 9 full batches and a last one of 21 samples."""
    source = ListSource(make_records(3000, text_every=1))
    batches = list(iterator_for([source], global_batch_size=331, num_epochs=1, read_threads=1))
    assert len(batches) == 10 and all(b["input_ids"].shape[0] == 331 for b in batches)
    assert sorted(sample_keys(batches)) == list(range(3000))
    assert [check_padding_rows_carry_no_loss(b) for b in batches] == [0] * 9 + [331 - 21]


def test_processes_yield_as_many_batches_and_every_sample_once():
    """An odd count over 2 processes, bad samples on one process only: same batch count, shape and samples."""
    records = make_records(41, text_every=4)
    bad = frozenset({1, 3, 5, 7, 9, 11, 13})
    source = ListSource(records, missing=bad)
    streams = [list(iterator_for([source], process_index=p, process_count=2, num_epochs=2)) for p in (0, 1)]
    assert len(streams[0]) == len(streams[1]) == -(-41 * 2 // 6)
    assert all(b["input_ids"].shape[0] == 3 for stream in streams for b in stream)
    seen = sorted(sample_keys(streams[0]) + sample_keys(streams[1]))
    assert seen == sorted(2 * [i for i in range(41) if i not in bad])       # two epochs, each sample twice
    assert sum(check_padding_rows_carry_no_loss(b) for stream in streams for b in stream) > 0


def test_packed_finite_pass_sees_every_sample_once():
    source = ListSource(make_records(61, text_every=4))
    single = list(iterator_for([source], num_epochs=1, **PACKED))
    assert markers(single) == list(range(61))
    assert all(b["input_ids"].shape == (3, 40) for b in single)
    assert check_padding_rows_carry_no_loss(single[-1]) >= 0
    streams = [list(iterator_for([source], process_index=p, process_count=2, num_epochs=1,
                                 **{**PACKED, "global_batch_size": 2})) for p in (0, 1)]
    assert len(streams[0]) == len(streams[1])
    assert sorted(markers(streams[0]) + markers(streams[1])) == list(range(61))
    for stream in streams:
        for b in stream:
            check_padding_rows_carry_no_loss(b)


@pytest.mark.parametrize("packed", [False, True])
def test_a_finite_pass_resumes_at_the_exact_next_batch(packed):
    source = ListSource(make_records(29, text_every=3), missing=frozenset({4}))
    options = dict(PACKED, global_batch_size=2) if packed else {}
    options["process_count"] = 2
    reference = list(iterator_for([source], num_epochs=1, **options))
    for cut in (len(reference) - 2, len(reference) - 1):
        iterator = iterator_for([source], num_epochs=1, **options)
        take(iterator, cut)
        resumed = iterator_for([source], num_epochs=1, **options)
        resumed.set_state(iterator.get_state())
        assert_batches_equal(list(resumed), reference[cut:])
