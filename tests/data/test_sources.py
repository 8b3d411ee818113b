"""LlavaJsonSource: JSON / JSONL annotations, images from folders and zip archives, official lengths."""

import io
import json
import multiprocessing
import os
import pickle
import types
import zipfile

import grain
import numpy as np
import pytest
from PIL import Image

from llava_jax.data.errors import BadSample
from llava_jax.data.sources import LlavaJsonSource


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


IMAGES = {
    "coco/train2017/000000033471.jpg": jpeg(1),
    "gqa/images/2354786.jpg": jpeg(2),
    "00453/004539375.jpg": jpeg(3),
    "vg/VG_100K/2.jpg": jpeg(4),
}

RECORDS = [
    {"id": "004539375", "image": "00453/004539375.jpg",  # LCS-558K
     "conversations": [{"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                       {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam"}]},
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",  # Instruct-158K, mix665k
     "conversations": [{"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                       {"from": "gpt", "value": "The bus in the image is white and red."},
                       {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                       {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
    {"id": "i6IyJda_0", "model": "",  # mix665k text-only (ShareGPT)
     "conversations": [{"from": "human", "value": "How to tell if a customer segment is well segmented?"},
                       {"from": "gpt", "value": "Check that it is homogeneous, distinct and   sizable."}]},
    {"id": 2354786, "image": ["gqa/images/2354786.jpg", "vg/VG_100K/2.jpg"],  # integer id, image list
     "conversations": [{"from": "human", "value": "<image>\n<image>\nCompare the two pictures."},
                       {"from": "gpt", "value": "Both show — naïvely — a street.\u2028\x85\r\nSee?"}]},
]


def write_annotations(tmp_path, records, jsonl: bool = False):
    path = tmp_path / ("data.jsonl" if jsonl else "data.json")
    if jsonl:  # Windows line ends and a byte order mark, as some tools write them
        text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n"
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    else:
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def write_folder(root, images=IMAGES):
    for name, data in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_zip(path, images: dict):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in images.items():
            archive.writestr(name, data)
    return path


def check_samples(source):
    assert len(source) == len(RECORDS)
    for index, record in enumerate(RECORDS):
        sample = source[index]
        assert sample["id"] == str(record["id"])
        assert sample["conversations"] == record["conversations"]
        paths = record.get("image", [])
        paths = paths if isinstance(paths, list) else [paths]
        assert sample["image_paths"] == paths
        assert sample["images"] == [IMAGES[p] for p in paths]


@pytest.mark.parametrize("jsonl", [False, True])
def test_json_and_jsonl_with_image_folder(tmp_path, jsonl):
    source = LlavaJsonSource(write_annotations(tmp_path, RECORDS, jsonl), write_folder(tmp_path / "images"))
    check_samples(source)
    assert source[-1]["id"] == "2354786"
    assert isinstance(source, grain.sources.RandomAccessDataSource)
    assert [s["id"] for s in grain.MapDataset.source(source)] == [str(r["id"]) for r in RECORDS]
    with pytest.raises(IndexError):
        source[len(RECORDS)]


def test_images_from_zip_archives_with_a_top_folder(tmp_path):
    annotations = write_annotations(tmp_path, RECORDS)
    # The whole image root packed below one top folder, as the distributed archives are.
    check_samples(LlavaJsonSource(annotations, write_zip(tmp_path / "a.zip", {f"data/{k}": v
                                                                            for k, v in IMAGES.items()})))
    # COCO's train2017.zip holds "train2017/...": "coco/train2017/x.jpg" is found by dropping "coco/".
    coco = {k.removeprefix("coco/"): v for k, v in IMAGES.items()}
    check_samples(LlavaJsonSource(annotations, write_zip(tmp_path / "b.zip", coco)))


def test_lengths_match_official_modality_lengths(tmp_path):
    from tests.data.official_llava import _modules  # llava-torch with its model stack stubbed
    train = _modules()[1]
    records = RECORDS + [{"id": "x", "image": "00453/004539375.jpg",
                          "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": ""}]}]
    source = LlavaJsonSource(write_annotations(tmp_path, records), tmp_path)
    official = train.LazySupervisedDataset.modality_lengths.fget(types.SimpleNamespace(list_data_dict=records))
    assert source.lengths().tolist() == official
    assert source.lengths().dtype == np.int64 and (source.lengths() < 0).sum() == 1


def test_missing_and_unsafe_image_paths(tmp_path):
    records = [{"id": "a", "image": "coco/train2017/nope.jpg", "conversations": RECORDS[0]["conversations"]},
               {"id": "b", "image": "../secret.jpg", "conversations": RECORDS[0]["conversations"]},
               {"id": "c", "image": "/etc/passwd", "conversations": RECORDS[0]["conversations"]},
               {"id": "d", "image": "coco/../../x.jpg", "conversations": RECORDS[0]["conversations"]},
               {"id": "e", "image": ["ok.jpg", 3], "conversations": RECORDS[0]["conversations"]},
               {"id": "f", "image": "x.jpg"}]
    annotations = write_annotations(tmp_path, records)
    (tmp_path / "secret.jpg").write_bytes(jpeg(0))
    for root in (write_folder(tmp_path / "images"), write_zip(tmp_path / "images.zip", IMAGES)):
        source = LlavaJsonSource(annotations, root)
        reasons = []
        for index in range(len(source)):
            with pytest.raises(BadSample) as error:
                source[index]
            assert error.value.sample_id == records[index]["id"]
            reasons.append(error.value.reason)
        assert reasons == ["missing_image", "unsafe_path", "unsafe_path", "unsafe_path", "invalid_image_field",
                           "empty_text"]
        with pytest.raises(BadSample, match="nope.jpg"):
            source[0]


def test_a_bare_file_name_never_matches_another_folder(tmp_path):
    annotations = write_annotations(tmp_path, [{"id": "v", "image": "VG_100K_2/2.jpg",
                                                "conversations": RECORDS[0]["conversations"]}])
    archive = write_zip(tmp_path / "vg.zip", {"vg/VG_100K/2.jpg": IMAGES["vg/VG_100K/2.jpg"]})
    with pytest.raises(BadSample) as error:  # the archive only has VG_100K/2.jpg
        LlavaJsonSource(annotations, archive)[0]
    assert error.value.reason == "missing_image"


def test_missing_or_broken_image_root_fails_at_construction(tmp_path):
    annotations = write_annotations(tmp_path, RECORDS)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LlavaJsonSource(annotations, tmp_path / "nowhere")
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.zip"):
        LlavaJsonSource(annotations, tmp_path / "broken.zip")
    with pytest.raises(ValueError, match="absent.zip"):
        LlavaJsonSource(annotations, tmp_path / "absent.zip")


def test_malformed_annotation_files_name_file_and_place(tmp_path):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(json.dumps(RECORDS[0]) + "\n{\"id\": 1,\n")
    with pytest.raises(BadSample, match=r"bad.jsonl: invalid JSON on line 2 .*\[invalid_json\]"):
        LlavaJsonSource(bad_jsonl, tmp_path)[1]  # a JSONL line is one sample: skipped and counted
    truncated = tmp_path / "cut.json"
    truncated.write_text(json.dumps(RECORDS, indent=1)[:-40])
    with pytest.raises(ValueError, match=r"cut.json: invalid JSON at line \d+"):
        LlavaJsonSource(truncated, tmp_path)
    trailing_comma = tmp_path / "comma.json"
    trailing_comma.write_text(json.dumps(RECORDS[:1])[:-1] + ",\n]")
    with pytest.raises(ValueError, match=r"comma.json: invalid JSON at line 2 column 1"):
        LlavaJsonSource(trailing_comma, tmp_path)
    (tmp_path / "empty.json").write_text(" [ ]\n")
    assert len(LlavaJsonSource(tmp_path / "empty.json", tmp_path)) == 0
    not_objects = tmp_path / "list.json"  # a record that is not an object is one bad sample, not a bad file
    not_objects.write_text(json.dumps([RECORDS[0], ["not", "a", "record"]]))
    source = LlavaJsonSource(not_objects, tmp_path)
    with pytest.raises(BadSample, match=r"'list:1'.*\[invalid_record\]") as error:
        source[1]
    assert error.value.reason == "invalid_record" and source.lengths()[1] == -1


def _read_all(source):
    return [source[i] for i in range(len(source))]


_INHERITED = {}


def _keep_inherited(source):
    _INHERITED["source"] = source


def _read_inherited(index):
    sample = _INHERITED["source"][index]
    opened_in = _INHERITED["source"]._images._opened[0]  # the process that opened the archive it read
    # A text-only sample reads no archive, so a worker whose first task is one still holds the parent's.
    return sample if not sample["images"] or opened_in == os.getpid() else "read through the parent's archive handle"


def test_picklable_and_fork_safe_after_opening_the_zip(tmp_path):
    source = LlavaJsonSource(write_annotations(tmp_path, RECORDS), write_zip(tmp_path / "i.zip", IMAGES))
    expected = _read_all(source)  # opens the archive in this process
    clone = pickle.loads(pickle.dumps(source))
    assert _read_all(clone) == expected and clone.lengths().tolist() == source.lengths().tolist()
    assert b"PK\x03\x04" not in pickle.dumps(source)  # no archive content or handle travels
    # Forked workers inherit the open archive unpickled; each must reopen it rather than share its offset.
    with multiprocessing.get_context("fork").Pool(2, _keep_inherited, (source,)) as pool:
        assert pool.map(_read_inherited, list(range(len(source))) * 3, chunksize=1) == expected * 3
    assert repr(source).startswith("LlavaJsonSource(name='data'")
