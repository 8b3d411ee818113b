"""Packing: rows hold whole samples with their images in order, every sample once, exact resumption, and the
efficiency against length bucketing on the synthetic mix665k-like length mix."""

import numpy as np
import pytest

from llava_jax.data import packing
from llava_jax.data.pipeline import IGNORE_INDEX
from tests.data.test_pipeline import (IMAGE_SIZE, IMAGE_TOKEN, PAD, ListSource, StandInProcessor, assert_batches_equal,
                                      iterator_for, make_records, take)

PACKED = dict(packing="best_fit", pack_length=40, pack_window=8, max_images_per_row=2, global_batch_size=3)


def segments_of(batch, row):
    """[(start, stop)] of each sample in a packed row."""
    seg = batch["segment_ids"][row]
    return [(int(np.argmax(seg == s)), int(np.argmax(seg == s)) + int((seg == s).sum()))
            for s in range(1, seg.max() + 1)]


def test_packed_rows_hold_whole_samples_with_their_images_in_order():
    source = ListSource(make_records(60, text_every=4))
    batches = list(iterator_for([source], **PACKED))
    assert len(batches) >= 5
    seen = []
    for batch in batches:
        assert batch["input_ids"].shape == (3, 40) and batch["pixel_values"].shape == (3, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
        for row in range(3):
            image = 0
            for start, stop in segments_of(batch, row):
                index = int(batch["input_ids"][row, start]) % 1000
                record = source.records[index]
                expected = StandInProcessor({record["id"]: record})(source[index])
                np.testing.assert_array_equal(batch["input_ids"][row, start:stop], expected["input_ids"])
                np.testing.assert_array_equal(batch["labels"][row, start:stop], expected["labels"])
                np.testing.assert_array_equal(batch["positions"][row, start:stop], np.arange(stop - start))
                k = len(expected["pixel_values"])
                np.testing.assert_array_equal(batch["pixel_values"][row, image:image + k], expected["pixel_values"])
                assert batch["image_mask"][row, image:image + k].all()
                image += k
                seen.append(index)
            assert not batch["image_mask"][row, image:].any()
            pad = batch["segment_ids"][row] == 0
            assert (batch["input_ids"][row][pad] == PAD).all() and (batch["labels"][row][pad] == IGNORE_INDEX).all()
            np.testing.assert_array_equal(batch["attention_mask"][row], ~pad)
            assert (batch["input_ids"][row] == IMAGE_TOKEN).sum() == 3 * image
    assert len(seen) == len(set(seen))          # no sample twice
    assert len(seen) >= 60 - 8                   # at most the last window's leftover rows dropped


def test_packing_resumes_at_the_exact_next_row():
    source = ListSource(make_records(80, text_every=3), missing=frozenset({5, 30}))
    reference = list(iterator_for([source], num_epochs=2, **PACKED))
    for cut in (1, 4, 7):                        # mid-window and at other rows of a window
        iterator = iterator_for([source], num_epochs=2, **PACKED)
        take(iterator, cut)
        resumed = iterator_for([source], num_epochs=2, **PACKED)
        resumed.set_state(iterator.get_state())
        assert_batches_equal(list(resumed), reference[cut:])
        assert resumed.bad_sample_counts() == {"missing_image": 4}


def test_packing_config_errors_are_clear():
    source = ListSource(make_records(5))
    with pytest.raises(ValueError, match="pack_length"):
        iterator_for([source], packing="best_fit", pack_length=20)
    with pytest.raises(ValueError, match="packing 'tight'"):
        iterator_for([source], packing="tight")


def test_packing_beats_bucketing_on_the_mix665k_like_mix():
    lengths, has_image = packing.LengthMix().draw(3000, seed=1)
    bucketed = packing.bucketing_efficiency(lengths, 128, (1024, 1536, 2048))
    packed_2k, per_row = packing.packing_efficiency(lengths, has_image, method="best_fit", length=2048, max_images=3,
                                                    window=256)
    packed_4k, _ = packing.packing_efficiency(lengths, has_image, method="best_fit", length=4096, max_images=6,
                                              window=256)
    assert bucketed < 0.6 and packed_2k > 0.85 and packed_4k >= 0.94 and per_row > 1.5


def test_segment_lengths():
    seg = np.asarray([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(packing.segment_lengths(seg), [2, 3, 6])


def markers(batches):
    return sorted(int(batch["input_ids"][row, start]) % 1000 for batch in batches
                  for row in range(len(batch["input_ids"])) for start, _ in segments_of(batch, row))


def test_each_process_packs_its_own_samples_with_or_without_grouping():
    source = ListSource(make_records(96, text_every=4))
    for grouped in (False, True):
        streams = [list(iterator_for([source], process_index=p, process_count=2, group_by_modality_length=grouped,
                                     **{**PACKED, "global_batch_size": 2})) for p in range(2)]
        first, second = markers(streams[0]), markers(streams[1])
        assert first and second and not set(first) & set(second)
