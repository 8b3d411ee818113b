"""The TFDS ArrayRecord builder and its grain source, against the JSON source it was built from."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_jax.data.sources import LlavaJsonSource
from llava_jax.data.tfds_builder import TfdsLlavaSource, build, config_name, main


def _write_dataset(root: Path, num: int = 11) -> tuple[Path, Path, list[dict]]:
    """LLaVA JSON with PNG / JPEG images, text-only samples, unicode, a multi-image sample, one missing image."""
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    records = []
    for i in range(num):
        record = {"id": f"sample-{i}", "conversations": [
            {"from": "human", "value": ("<image>\n" if i % 4 else "") + f"Décris l'image {i} ✓"},
            {"from": "gpt", "value": "un chat " * (i + 1)}]}
        if i % 4:
            name = f"sub/{i}.{'png' if i % 2 else 'jpg'}"
            Image.new("RGB", (13 + i, 7), (20 * i, 3, 200)).save(images / name)
            record["image"] = name
        records.append(record)
    records[5]["image"] = ["sub/5.png", "sub/6.jpg"]
    records[5]["conversations"][0]["value"] = "<image>\n<image>\nCompare."
    records[9]["image"] = "sub/absent.png"
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return data, images, records


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    data, images, records = _write_dataset(root)
    version_dir = build(data, images, root / "out")
    return root, data, images, records, version_dir


def test_records_equal_the_json_source(built):
    root, data, images, records, version_dir = built
    assert version_dir == Path(root / "out" / "llava_dataset" / "data" / "1.0.0")
    assert list(version_dir.glob("llava_dataset-train.array_record-*"))
    json_source = LlavaJsonSource(data, images)
    tfds_source = TfdsLlavaSource(root / "out", "data")
    kept = [i for i in range(len(records)) if i != 9]
    assert len(tfds_source) == len(kept)
    for position, index in enumerate(kept):
        assert tfds_source[position] == json_source[index]
    assert tfds_source.skipped() == {"missing_image": 1}
    np.testing.assert_array_equal(tfds_source.lengths(), json_source.lengths()[kept])
    two_images = tfds_source[kept.index(5)]
    assert len(two_images["images"]) == 2 and Image.open(io.BytesIO(two_images["images"][1])).format == "JPEG"


def test_source_pickles_for_worker_processes(built):
    root, *_ = built
    source = TfdsLlavaSource(root / "out", "data")
    clone = pickle.loads(pickle.dumps(source))
    assert len(clone) == len(source) and clone[3] == source[3]


def test_zip_archive_and_cli(built, tmp_path, capsys):
    root, data, images, records, _ = built
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(images.rglob("*.*")):
            zf.write(path, "images/" + path.relative_to(images).as_posix())  # distributed zips have a top folder
    main(["--data", str(data), "--images", str(archive), "--out", str(tmp_path / "out"), "--name", "from_zip"])
    assert "wrote 10 samples" in capsys.readouterr().out
    from_zip = TfdsLlavaSource(tmp_path / "out", "from_zip")
    from_folder = TfdsLlavaSource(root / "out", "data")
    assert [from_zip[i] for i in range(len(from_zip))] == [from_folder[i] for i in range(len(from_folder))]


def test_open_by_data_dir_config_dir_or_version_dir(built):
    root, *_, version_dir = built
    by_name = TfdsLlavaSource(root / "out", "data")
    for path in (root / "out", version_dir.parent, version_dir):
        source = TfdsLlavaSource(path)
        assert (source.name, source.version_dir) == ("data", str(version_dir))
        assert [source[i] for i in range(len(source))] == [by_name[i] for i in range(len(by_name))]


def test_missing_or_ambiguous_dataset_errors_name_the_place(tmp_path):
    with pytest.raises(FileNotFoundError, match="llava_dataset/nothing_here"):
        TfdsLlavaSource(tmp_path, "nothing_here")
    for name in ("a", "b"):
        (tmp_path / "llava_dataset" / name / "1.0.0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"expected one built dataset .* found \['a', 'b'\]"):
        TfdsLlavaSource(tmp_path)


def test_config_name():
    assert config_name("gs://bucket/LLaVA/llava_v1_5_mix665k.json") == "llava_v1_5_mix665k"
    assert config_name("/data/blip-laion cc.jsonl") == "blip_laion_cc"


def test_pipeline_batches_identical_from_json_and_from_tfds(tmp_path):
    from transformers import AutoTokenizer

    from llava_jax.data.images import ImageConfig
    from llava_jax.data.pipeline import PipelineConfig, make_train_iterator
    from llava_jax.data.synthetic import generate

    paths = generate(tmp_path / "demo", num_stage1=0, num_stage2=23, num_eval=0, image_size=16, seed=2)
    build(paths.stage2, paths.images, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)

    def batches(source):
        config = PipelineConfig(sources=(source,), template="v1", max_length=61, length_buckets=(37, 61),
                                global_batch_size=4, num_epochs=1, group_by_modality_length=True,
                                image_config=ImageConfig(size=7, crop_size=7), image_seq_length=3,
                                read_threads=1, report_every=0)
        return list(make_train_iterator(config, tokenizer, process_index=0, process_count=1))

    from_json = batches(LlavaJsonSource(paths.stage2, paths.images))
    from_tfds = batches(TfdsLlavaSource(tmp_path / "out", "stage2"))
    assert len(from_json) == len(from_tfds) == -(-23 // 4)  # the last batch filled up with padding rows
    for a, b in zip(from_json, from_tfds):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
