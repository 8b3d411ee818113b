"""Hostile datasets: every bad sample is skipped and counted with its id, alike in the checker, the training
pipeline (modality grouping on) and the TFDS builder; nothing is read outside the image root; memory stays
bounded on image and archive bombs; strict mode stops with one line naming the sample."""

import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from llava_jax.data.check import check_dataset
from llava_jax.data.errors import BadSample
from llava_jax.data.pipeline import PipelineConfig, make_train_iterator
from llava_jax.data.sources import LlavaJsonSource

REPO = Path(__file__).resolve().parents[2]


def png(size, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def turns(with_image=True):
    return [{"from": "human", "value": ("<image>\n" if with_image else "") + "What color is the shape?"},
            {"from": "gpt", "value": "red"}]


GOOD = [{"id": f"good{i}", "image": f"g{i}.png", "conversations": turns()} for i in range(6)] + \
       [{"id": f"text{i}", "conversations": turns(False)} for i in range(2)]


def hostile_records(outside: Path) -> tuple[list, dict[str, list[str]]]:
    """(records, reason -> sample ids): one record per hostile case."""
    cases = [
        ("no_conversations", {"image": "g0.png"}, "empty_text"),
        ("empty_conversations", {"conversations": []}, "empty_text"),
        ("text_conversations", {"conversations": "hello"}, "empty_text"),
        ("turns_not_objects", {"conversations": [1, 2]}, "empty_text"),
        ("nul_byte", {"image": "g\x000.png"}, "unsafe_path"),
        ("symlink_loop", {"image": "loop1.png"}, "unreadable_image"),
        ("symlink_out", {"image": "escape.png"}, "unsafe_path"),
        ("symlinked_dir_out", {"image": "outdir/secret.png"}, "unsafe_path"),
        ("absolute", {"image": str(outside / "secret.png")}, "unsafe_path"),
        ("dotdot", {"image": "../outside/secret.png"}, "unsafe_path"),
        ("strip_1x100000", {"image": "strip.png"}, "image_too_large"),
        ("strip_100000x1", {"image": "wide.png"}, "image_too_large"),
        ("folder", {"image": "folder.png"}, "missing_image"),
        ("number_path", {"image": 7}, "invalid_image_field"),
        ("huge_file", {"image": "huge.png"}, "image_too_large"),
    ]
    records, expected = [], {}
    for sample_id, fields, reason in cases:
        record = {"id": sample_id, **fields}
        if "conversations" not in fields and sample_id != "no_conversations":
            record["conversations"] = turns()
        records.append(record)
        expected.setdefault(reason, []).append(sample_id)
    records.append(["not", "an", "object"])
    expected["invalid_record"] = [f"data:{len(GOOD) + len(records) - 1}"]
    records.append(CUT_LINE)
    expected["invalid_json"] = [f"data:{len(GOOD) + len(records) - 1}"]
    return records, expected


CUT_LINE = '{"id": "cut", "conversations": [{"from": "human", "value": "<image>'  # a line cut short


@pytest.fixture
def hostile(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(png((9, 7)))
    for i in range(6):
        (root / f"g{i}.png").write_bytes(png((9, 7), (40 * i, 90, 200)))
    (root / "strip.png").write_bytes(png((1, 100_000)))   # a few hundred bytes; padded: 30 GB
    (root / "wide.png").write_bytes(png((100_000, 1)))
    (root / "folder.png").mkdir()
    os.symlink("loop2.png", root / "loop1.png")
    os.symlink("loop1.png", root / "loop2.png")
    os.symlink(outside / "secret.png", root / "escape.png")
    os.symlink(outside, root / "outdir")
    with open(root / "huge.png", "wb") as f:  # sparse, over the 64 MiB read limit
        f.truncate((64 << 20) + 1)
    records, expected = hostile_records(outside)
    data = tmp_path / "data.jsonl"  # JSONL: one line per record, the cut one as it is
    data.write_text("".join((r if r is CUT_LINE else json.dumps(r)) + "\n" for r in GOOD + records))
    assert sum(len(ids) for ids in expected.values()) == 17
    return data, root, expected


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from llava_jax.data.synthetic import build_tokenizer

    return AutoTokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


def pipeline(data, root, tokenizer, **overrides):
    from llava_jax.data.images import ImageConfig

    config = dict(sources=(LlavaJsonSource(data, root),) if data else (), template="v1", max_length=64,
                  global_batch_size=4, num_epochs=1, group_by_modality_length=True, image_seq_length=4, report_every=0,
                  image_config=ImageConfig(size=16, crop_size=16), read_threads=2)
    config.update(overrides)
    return make_train_iterator(PipelineConfig(**config), tokenizer, process_index=0, process_count=1)


def test_checker_counts_every_hostile_sample_by_id(hostile):
    data, root, expected = hostile
    report = check_dataset(data, root)
    assert report.scanned == len(GOOD) + 17 and report.ok == len(GOOD)
    assert dict(report.bad) == {reason: len(ids) for reason, ids in expected.items()}
    assert report.examples == expected
    assert "NUL byte" in report.messages["unsafe_path"]


def test_training_pipeline_skips_and_counts_them_alike_with_modality_grouping(hostile, tokenizer):
    data, root, expected = hostile
    iterator = pipeline(data, root, tokenizer)
    batches = list(iterator)
    assert len(batches) == len(GOOD) // 4  # every good sample trained, nothing else
    assert sum(int(b["attention_mask"].any(axis=1).sum()) for b in batches) == len(GOOD)
    assert iterator.bad_sample_counts() == {reason: len(ids) for reason, ids in expected.items()}
    assert {k: sorted(v) for k, v in iterator.bad_sample_ids().items()} == \
        {k: sorted(v) for k, v in expected.items()}


def test_strict_mode_stops_with_one_line_naming_the_sample(hostile, tokenizer):
    data, root, _ = hostile
    with pytest.raises(BadSample) as error:
        list(pipeline(data, root, tokenizer, strict=True, group_by_modality_length=False, seed=3))
    assert "\n" not in str(error.value) and str(error.value).startswith("sample ")
    assert error.value.sample_id in str(error.value)


def test_tfds_builder_and_training_from_it_skip_and_count_them_alike(hostile, tmp_path, tokenizer):
    """The builder leaves out what the source refuses (paths, files, records); training from the shards
    skips the rest (decoded sizes, turns): together the same counts and ids as the checker."""
    from llava_jax.data.tfds_builder import TfdsLlavaSource, build

    data, root, expected = hostile
    build(data, root, tmp_path / "tfds")
    source = TfdsLlavaSource(tmp_path / "tfds")
    iterator = pipeline(None, None, tokenizer, sources=(source,))
    assert len(list(iterator)) == len(GOOD) // 4
    counts, ids = dict(source.skipped()), {k: list(v) for k, v in source.skipped_ids().items()}
    for reason, count in iterator.bad_sample_counts().items():
        counts[reason] = counts.get(reason, 0) + count
        ids.setdefault(reason, []).extend(iterator.bad_sample_ids()[reason])
    assert counts == {reason: len(v) for reason, v in expected.items()}
    assert {k: sorted(v) for k, v in ids.items()} == {k: sorted(v) for k, v in expected.items()}
    assert 0 not in source.lengths()


def _zip_bomb(path: Path, good: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.png", good)
        with zf.open("bomb.png", "w", force_zip64=True) as member:  # 96 MiB of zeros in ~100 kB
            for _ in range(96):
                member.write(bytes(1 << 20))
        zf.writestr("strip.png", png((1, 100_000)))


def test_zip_bomb_member_is_refused_from_its_header(tmp_path):
    archive = tmp_path / "images.zip"
    _zip_bomb(archive, png((9, 7)))
    assert archive.stat().st_size < 1 << 20
    records = [{"id": name, "image": f"{name}.png", "conversations": turns()} for name in ("ok", "bomb", "strip")]
    (tmp_path / "d.json").write_text(json.dumps(records))
    source = LlavaJsonSource(tmp_path / "d.json", archive)
    assert source[0]["images"][0] == png((9, 7))
    with pytest.raises(BadSample, match="inflates to 100663296 bytes") as error:
        source[1]
    assert error.value.reason == "image_too_large"
    report = check_dataset(tmp_path / "d.json", archive)
    assert report.examples == {"image_too_large": ["bomb", "strip"]} and report.ok == 1


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # the padded strip alone would be 30 GB
    from transformers import AutoTokenizer
    from llava_jax.data.images import ImageConfig
    from llava_jax.data.pipeline import PipelineConfig, make_train_iterator
    from llava_jax.data.sources import LlavaJsonSource
    data, root, tokenizer = sys.argv[1:4]
    config = PipelineConfig(sources=(LlavaJsonSource(data, root),), template="v1", max_length=64,
                            global_batch_size=2, num_epochs=3, image_seq_length=4, report_every=0,
                            image_config=ImageConfig(size=16, crop_size=16), read_threads=1)
    iterator = make_train_iterator(config, AutoTokenizer.from_pretrained(tokenizer), process_index=0,
                                   process_count=1)
    batches = sum(1 for _ in iterator)
    # This process's own high-water mark (VmHWM): Linux carries ru_maxrss over from the forking parent (pytest).
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    peak_mb = int(status["VmHWM"].split()[0]) / 1024
    print(json.dumps({"batches": batches, "bad": iterator.bad_sample_counts(), "peak_mb": peak_mb}))
""")


def test_peak_memory_stays_bounded_on_image_and_archive_bombs(tmp_path, tokenizer):
    archive = tmp_path / "images.zip"
    _zip_bomb(archive, png((9, 7)))
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("wide.png", png((100_000, 1)))
    records = [{"id": name, "image": f"{name}.png", "conversations": turns()}
               for name in ("ok", "bomb", "strip", "wide")]
    (tmp_path / "d.json").write_text(json.dumps(records))
    tokenizer.save_pretrained(tmp_path / "tok")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "d.json"), str(archive),
                          str(tmp_path / "tok")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["bad"] == {"image_too_large": 9}  # 3 epochs x (bomb, strip, wide)
    assert result["batches"] == 2  # 3 good samples over 3 epochs: batches of 2, the last filled up with padding
    assert result["peak_mb"] < 1500, result


def test_an_unreadable_annotation_file_is_one_data_file_error_and_a_bad_jsonl_line_one_sample(tmp_path):
    from llava_jax.data.errors import DataFileError

    (tmp_path / "cut.json").write_text(json.dumps([{"id": "a", "conversations": turns(False)}])[:-1] + ", {")
    with pytest.raises(DataFileError, match=r"cut.json: invalid JSON at line 1"):
        LlavaJsonSource(tmp_path / "cut.json", None)  # a list that does not parse has no samples to keep
    (tmp_path / "cut.jsonl").write_text(json.dumps({"id": "a", "conversations": turns(False)}) + "\n{\"id\": ")
    source = LlavaJsonSource(tmp_path / "cut.jsonl", None)  # a JSONL line that does not parse is one bad sample
    assert len(source) == 2 and source[0]["id"] == "a"
    with pytest.raises(BadSample, match=r"sample 'cut:1': .*cut.jsonl: invalid JSON on line 2 column 8") as e:
        source[1]
    assert e.value.reason == "invalid_json"
    (tmp_path / "ok.jsonl").write_text(json.dumps({"id": "a", "conversations": turns(False)}) + "\n")
    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    with pytest.raises(DataFileError, match="bad.zip"):
        LlavaJsonSource(tmp_path / "ok.jsonl", tmp_path / "bad.zip")


def test_a_dataset_of_only_bad_samples_stops_instead_of_skipping_forever(tmp_path, tokenizer):
    """Every sample bad, repeated epochs: the run stops after max_bad_in_row rejections in a row, one line."""
    from llava_jax.data.errors import DataFileError

    (tmp_path / "bad.json").write_text(json.dumps([{"id": f"b{i}", "conversations": []} for i in range(3)]))
    iterator = pipeline(tmp_path / "bad.json", None, tokenizer, num_epochs=None, max_bad_in_row=50)
    with pytest.raises(DataFileError, match=r"^50 bad samples in a row \(so far: empty_text=50; last: sample 'b"):
        next(iterator)
