"""The grain training pipeline: order, sharding, mixtures, bad samples, static shapes, resumption.

Most tests use a small in-memory source and a stand-in sample processor whose tokens encode the
sample (so each batch row can be traced back to its record); `test_real_llava_processing` runs the
real decode + tokenize path on a synthetic dataset.
"""

from __future__ import annotations

import io
import json
import logging
import types

import numpy as np
import pytest
from PIL import Image

from llava_jax.data.errors import BadSample
from llava_jax.data.grouping import padding_fraction
from llava_jax.data.pipeline import (
    IGNORE_INDEX,
    PipelineConfig,
    TrainIterator,
    make_train_iterator,
)

IMAGE_SIZE = 5
IMAGE_TOKEN = 7
IMAGE_SEQ = 3
PAD = 0
ID_BASE = 1000  # input_ids[0] = ID_BASE * (source + 1) + record index


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (9, 7), color).save(buffer, format="PNG")
    return buffer.getvalue()


class ListSource:
    """An in-memory LLaVA-format source; records listed in `missing` raise BadSample("missing_image")."""

    def __init__(self, records: list[dict], missing: frozenset[int] = frozenset()):
        self.records = records
        self.missing = missing

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        if index in self.missing:
            raise BadSample("missing_image", f"image file {record.get('image')!r} not found", record["id"])
        images = [] if "image" not in record else [_png(record["color"])]
        paths = [] if "image" not in record else [record["image"]]
        return {"id": record["id"], "conversations": record["conversations"], "images": images,
                "image_paths": paths}

    def lengths(self):
        return np.asarray([sum(len(turn["value"].split()) for turn in r["conversations"]) * (1 if "image" in r else -1)
                           for r in self.records])


def make_records(num: int, *, source: int = 0, text_every: int = 0, seed: int = 0) -> list[dict]:
    """Records with 1..23-word answers; every `text_every`-th one text-only."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(num):
        answer = " ".join(["word"] * int(rng.integers(1, 24)))
        with_image = not (text_every and i % text_every == 0)
        human = ("<image>\n" if with_image else "") + "What is shown here?"
        record = {"id": f"src{source}-{i}", "source": source, "index": i,
                  "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
        if with_image:
            record.update(image=f"img/{i}.png", color=(i % 256, (7 * i) % 256, 50))
        records.append(record)
    return records


class StandInProcessor:
    """record -> example: [marker, image tokens, 2 prompt tokens, answer tokens]; answers supervised."""

    def __init__(self, records_by_id: dict[str, dict]):
        self.records_by_id = records_by_id

    def __call__(self, record):
        meta = self.records_by_id[record["id"]]
        turns = record["conversations"]
        if len(turns) < 2 or turns[1]["from"] != "gpt":
            raise BadSample("no_assistant_turn", "no gpt turn", record["id"])
        answer = [11 + len(w) for w in turns[1]["value"].split()]
        image_tokens = [IMAGE_TOKEN] * IMAGE_SEQ * len(record["images"])
        prompt = [ID_BASE * (meta["source"] + 1) + meta["index"]] + image_tokens + [3, 4]
        pixels = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), np.float32)
                  .transpose(2, 0, 1) / 255 for b in record["images"]]
        return {
            "id": record["id"],
            "input_ids": np.asarray(prompt + answer, np.int32),
            "labels": np.asarray([IGNORE_INDEX] * len(prompt) + answer, np.int32),
            "pixel_values": np.stack(pixels) if pixels else np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32),
        }


def config_for(sources, **overrides) -> PipelineConfig:
    settings = dict(sources=tuple(sources), global_batch_size=6, max_length=40, length_buckets=(16, 29, 40),
                    image_seq_length=IMAGE_SEQ, image_config=types.SimpleNamespace(crop_size=IMAGE_SIZE),
                    pad_token_id=PAD, seed=3, num_epochs=1, read_threads=2, read_buffer_size=8, report_every=0)
    settings.update(overrides)
    return PipelineConfig(**settings)


def iterator_for(sources, *, process_index=0, process_count=1, **overrides) -> TrainIterator:
    records = {r["id"]: r for source in sources for r in source.records}
    return make_train_iterator(config_for(sources, **overrides), process_index=process_index,
                               process_count=process_count, sample_processor=StandInProcessor(records))


def row_keys(batch) -> list[tuple[int, int]]:
    """(source, record index) of each row, from the marker token."""
    return [divmod(int(m), ID_BASE) for m in batch["input_ids"][:, 0]]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_static_shapes_padding_and_content():
    source = ListSource(make_records(31, text_every=4))
    batches = list(iterator_for([source]))
    assert len(batches) == -(-31 // 6)  # one epoch, the last batch filled up with padding rows
    seen = []
    for batch in batches:
        b, t = batch["input_ids"].shape
        assert b == 6 and t in (16, 29, 40)
        assert batch["labels"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
        assert batch["pixel_values"].shape == (6, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["image_mask"].shape == (6, 1) and batch["image_mask"].dtype == bool
        lengths = batch["attention_mask"].sum(axis=1)
        assert t == min(bucket for bucket in (16, 29, 40) if bucket >= lengths.max())
        for row, (src, index) in enumerate(row_keys(batch)):
            if lengths[row] == 0:  # a padding row (the last batch)
                continue
            record = source.records[index]
            expected = StandInProcessor({record["id"]: record})(source[index])
            n = len(expected["input_ids"])
            assert lengths[row] == n
            np.testing.assert_array_equal(batch["input_ids"][row, :n], expected["input_ids"])
            np.testing.assert_array_equal(batch["labels"][row, :n], expected["labels"])
            assert (batch["input_ids"][row, n:] == PAD).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
            assert (batch["attention_mask"][row, :n] == 1).all() and (batch["attention_mask"][row, n:] == 0).all()
            has_image = "image" in record
            assert batch["image_mask"][row, 0] == has_image
            np.testing.assert_array_equal(batch["pixel_values"][row, :1], expected["pixel_values"]
                                          if has_image else np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE)))
            assert (batch["labels"][row] != IGNORE_INDEX).any()
            seen.append(index)
    assert len(set(seen)) == len(seen) == 31  # each sample once per epoch


def test_deterministic_and_reshuffled_each_epoch():
    source = ListSource(make_records(24))
    first = [row_keys(b) for b in iterator_for([source], num_epochs=2)]
    again = [row_keys(b) for b in iterator_for([source], num_epochs=2)]
    other_seed = [row_keys(b) for b in iterator_for([source], num_epochs=2, seed=4)]
    assert first == again and first != other_seed
    epoch0 = [k for batch in first[:4] for k in batch]
    epoch1 = [k for batch in first[4:] for k in batch]
    assert sorted(epoch0) == sorted(epoch1) == [(1, i) for i in range(24)]
    assert epoch0 != epoch1


def test_processes_read_disjoint_shards_of_the_global_batch():
    source = ListSource(make_records(37, text_every=5))
    whole = list(iterator_for([source], global_batch_size=6))
    halves = [list(iterator_for([source], global_batch_size=6, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(whole)
    for step, batch in enumerate(whole):
        assert halves[0][step]["input_ids"].shape[0] == 3
        assert row_keys(halves[0][step]) + row_keys(halves[1][step]) == row_keys(batch)


def test_group_by_modality_length_gives_single_modality_global_batches():
    source = ListSource(make_records(61, text_every=3))
    shards = [list(iterator_for([source], group_by_modality_length=True, process_index=p, process_count=2))
              for p in (0, 1)]
    modalities = [np.concatenate([shards[0][s]["image_mask"][:, 0], shards[1][s]["image_mask"][:, 0]])
                  for s in range(len(shards[0]))]
    # All but the final global batches (LLaVA's mixed leftovers, up to two global batches) hold one modality.
    assert all(m.all() or not m.any() for m in modalities[:-2])
    assert any(not m.any() for m in modalities) and any(m.all() for m in modalities)
    # Short text-only samples no longer share batches with long image samples: less padding.
    for record in source.records:
        if "image" not in record:
            record["conversations"][1]["value"] = "yes"

    def padding(grouped):
        return padding_fraction(iterator_for([source], group_by_modality_length=grouped,
                                             length_buckets=tuple(range(8, 41))))
    assert padding(True) < padding(False)


def test_mixture_follows_weights_one_source_per_global_batch():
    sources = [ListSource(make_records(40, source=0)), ListSource(make_records(40, source=1, seed=1))]
    iterator = iterator_for(sources, weights=(3.0, 1.0), num_epochs=None, global_batch_size=4)
    picked = [row_keys(batch) for batch in take(iterator, 16)]
    from_source = [{src for src, _ in keys} for keys in picked]
    assert all(len(s) == 1 for s in from_source)
    counts = np.bincount([s.pop() - 1 for s in from_source], minlength=2)
    assert counts.tolist() == [12, 4]


def test_bad_samples_are_skipped_counted_and_logged(caplog):
    records = make_records(30)
    records[4]["conversations"] = records[4]["conversations"][:1]  # no assistant turn
    records[9]["conversations"][1]["value"] = ""  # nothing to supervise
    source = ListSource(records, missing=frozenset({2, 17, 25}))
    with caplog.at_level(logging.INFO, logger="llava_jax.data.pipeline"):
        iterator = iterator_for([source], log_first_bad=2, report_every=2)
        batches = list(iterator)
    assert iterator.bad_sample_counts() == {"missing_image": 3, "no_assistant_turn": 1, "no_supervised_tokens": 1}
    assert len(iterator.bad_sample_ids()["missing_image"]) == 2
    assert set(iterator.bad_sample_ids()["missing_image"]) <= {"src0-2", "src0-17", "src0-25"}
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("missing_image" in m for m in logged) == 2 and any("src0-4" in m for m in logged)
    reports = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(reports) == 2 and reports[0].startswith("2 batches: padding fraction")
    used = [index for batch in batches for _, index in row_keys(batch)]
    assert len(batches) == 30 // 6 and not {2, 4, 9, 17, 25} & set(used)  # the last one filled up with padding
    assert all(((batch["labels"] != IGNORE_INDEX).any(axis=1) == batch["attention_mask"].any(axis=1)).all()
               for batch in batches)
    assert iterator.padding_fraction() == pytest.approx(padding_fraction(batches))
    assert "missing_image=3" in iterator.report()


def test_strict_mode_fails_fast_with_the_sample_message():
    source = ListSource(make_records(12), missing=frozenset({0, 1, 2, 3, 4, 5, 6}))
    message = r"^sample 'src0-\d+': image file 'img/\d+.png' not found \[missing_image\]"
    with pytest.raises(BadSample, match=message) as error:
        list(iterator_for([source], strict=True))
    assert error.value.reason == "missing_image" and error.value.sample_id.startswith("src0-")
    assert str(error.value).count("missing_image") == 1


def test_unexpected_errors_name_the_record():
    class Broken(ListSource):
        def __getitem__(self, index):
            raise KeyError("conversations")

    with pytest.raises(KeyError) as error:
        next(iterator_for([Broken(make_records(6))]))
    assert any("of source 0" in note for note in error.value.__notes__)


def test_resume_from_state_gives_the_exact_next_batches():
    source = ListSource(make_records(50, text_every=3), missing=frozenset({5, 30}))
    reference = list(iterator_for([source], num_epochs=2))
    iterator = iterator_for([source], num_epochs=2)
    take(iterator, 5)
    state = iterator.get_state()
    resumed = iterator_for([source], num_epochs=2)
    resumed.set_state(state)
    assert_batches_equal(list(resumed), reference[5:])
    assert resumed.bad_sample_counts() == {"missing_image": 4}  # 2 per epoch


def test_orbax_checkpoint_with_worker_processes(tmp_path):
    """Workers give the same batches and counts as in-process reading; Orbax restores mid-stream."""
    import grain
    import orbax.checkpoint as ocp

    source = ListSource(make_records(41, text_every=4), missing=frozenset({3, 22}))
    reference = list(iterator_for([source]))
    iterator = iterator_for([source], worker_count=2)
    try:
        head = take(iterator, 3)
        with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
            manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
            manager.wait_until_finished()
        rest = list(iterator)
        assert_batches_equal(head + rest, reference)
        assert iterator.bad_sample_counts() == {"missing_image": 2}
    finally:
        iterator.close()
    restored = iterator_for([source], worker_count=2)
    try:
        with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
            manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
        assert_batches_equal(list(restored), reference[3:])
    finally:
        restored.close()


def test_config_errors_are_clear():
    source = ListSource(make_records(5))
    with pytest.raises(ValueError, match="length_buckets"):
        config_for([source], length_buckets=(16, 29), max_length=40)
    with pytest.raises(ValueError, match="weights"):
        config_for([source, source], weights=(1.0,))
    with pytest.raises(ValueError, match="not divisible by process_count"):
        iterator_for([source], global_batch_size=6, process_count=4)


def test_real_llava_processing_matches_the_data_functions(tmp_path):
    """Default processor on the synthetic demo data (plus two-image samples): rows equal tokenize +
    preprocess of their sample; image tokens line up with image slots."""
    from transformers import AutoTokenizer

    from llava_jax.data.conversation import get_template
    from llava_jax.data.images import ImageConfig, load_image, preprocess
    from llava_jax.data.sources import LlavaJsonSource
    from llava_jax.data.synthetic import generate
    from llava_jax.data.tokenize import add_image_token, tokenize_conversation

    paths = generate(tmp_path / "demo", num_stage1=0, num_stage2=29, num_eval=0, image_size=24, seed=5)
    pngs = sorted(p.name for p in paths.images.glob("*.png"))
    pairs = [{"id": f"pair-{i}", "image": [pngs[i], pngs[i + 1]], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]}
        for i in range(7)]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    sources = (LlavaJsonSource(paths.stage2, paths.images), LlavaJsonSource(tmp_path / "pairs.json", paths.images))
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
    image_token_id = add_image_token(tokenizer)
    image_config = ImageConfig(size=11, crop_size=11, aspect="pad")
    config = PipelineConfig(sources=sources, weights=(2.0, 1.0), template="v1", max_length=97,
                            length_buckets=(67, 97), global_batch_size=4, seed=1, num_epochs=None,
                            image_config=image_config, image_seq_length=5, max_images_per_sample=2,
                            read_threads=2, report_every=0)
    batches = take(make_train_iterator(config, tokenizer, process_index=0, process_count=1), 9)

    template = get_template("v1")
    expected = {}
    for source in sources:
        for i in range(len(source)):
            record = source[i]
            tokens = tokenize_conversation(record["conversations"], tokenizer, template, image_token_id=image_token_id,
                                           image_seq_length=5, max_length=97, sample_id=record["id"])
            pixels = [preprocess(load_image(b), image_config) for b in record["images"]]
            expected.setdefault(tokens.input_ids.tobytes(), []).append((tokens, pixels))
    pad = tokenizer.pad_token_id
    for batch in batches:
        assert batch["pixel_values"].shape == (4, 2, 3, 11, 11) and batch["input_ids"].shape[1] in (67, 97)
        for row in range(4):
            n = int(batch["attention_mask"][row].sum())
            tokens, pixels = expected[batch["input_ids"][row, :n].tobytes()][0]
            np.testing.assert_array_equal(batch["labels"][row, :n], tokens.labels)
            assert (batch["input_ids"][row, n:] == pad).all()
            assert batch["image_mask"][row].sum() == len(pixels) == tokens.num_images
            assert (batch["input_ids"][row] == image_token_id).sum() == 5 * len(pixels)
            # Samples with the same text differ by image: one of them has exactly these pixels.
            slots = [np.zeros((3, 11, 11), np.float32)] * 2
            assert any(np.array_equal(batch["pixel_values"][row], np.stack((p + slots)[:2]))
                       for _, p in expected[batch["input_ids"][row, :n].tobytes()])
    two_image_rows = sum(int(b["image_mask"].all(axis=1).sum()) for b in batches)
    assert two_image_rows == 4 * 3  # weights 2:1 -> every third global batch comes from the pairs


def test_data_package_exports_resolve():
    import llava_jax.data as data

    for name in data.__all__:
        assert getattr(data, name) is not None, name
    assert data.make_train_iterator is make_train_iterator
    with pytest.raises(AttributeError, match="no_such_name"):
        data.no_such_name
