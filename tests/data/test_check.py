"""The dataset checker: every kind of bad sample found and counted, token lengths as training sees them."""

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from llava_jax.data.check import check_dataset, main
from llava_jax.data.conversation import get_template
from llava_jax.data.tokenize import add_image_token, tokenize_conversation


def encode(mode: str, size=(13, 11), fmt="PNG") -> bytes:
    pixels = np.random.default_rng(len(mode)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


IMAGES = {"a/rgb.jpg": encode("RGB", fmt="JPEG"), "a/gray.png": encode("L"), "b/cmyk.jpg": encode("CMYK", fmt="JPEG"),
          "b/cut.jpg": encode("RGB", (101, 67), "JPEG")[:200], "b/big.png": encode("RGB", (301, 211))}
LONG_ANSWER = " ".join(["word"] * 700)
RECORDS = [
    {"id": "ok1", "image": "a/rgb.jpg", "conversations": turns("<image>\nWhat is it?", "A cat.")},
    {"id": "ok2", "image": "a/gray.png", "conversations": turns("Describe.\n<image>", "Gray.", "More?", "No.")},
    {"id": "ok3", "image": "b/cmyk.jpg", "conversations": turns("<image>\nColour?", "Print colours.")},
    {"id": "text1", "conversations": turns("Hello there", "Hi.")},
    {"id": "long_text", "conversations": turns("Say it all.", LONG_ANSWER)},
    {"id": "missing", "image": "a/none.jpg", "conversations": turns("<image>\nHi", "Yo.")},
    {"id": "corrupt", "image": "b/cut.jpg", "conversations": turns("<image>\nHi", "Yo.")},
    {"id": "huge", "image": "b/big.png", "conversations": turns("<image>\nHi", "Yo.")},
    {"id": "escape", "image": "../b/rgb.jpg", "conversations": turns("<image>\nHi", "Yo.")},
    {"id": "order", "image": "a/rgb.jpg", "conversations": turns("<image>\nHi", "Yo.")[::-1]},
    {"id": "no_placeholder", "image": "a/rgb.jpg", "conversations": turns("What is it?", "A cat.")},
    {"id": "unanswered", "conversations": turns("Only a question")},
    {"id": "missing2", "image": "c/none.jpg", "conversations": turns("<image>\nHi", "Yo.")},
]
EXPECTED_BAD = {"missing_image": ["missing", "missing2"], "corrupt_image": ["corrupt"],
                "image_too_large": ["huge"], "unsafe_path": ["escape"], "roles_out_of_order": ["order"],
                "image_count_mismatch": ["no_placeholder"], "no_assistant_turn": ["unanswered"]}


@pytest.fixture
def dataset(tmp_path):
    for name, data in IMAGES.items():
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / name).write_bytes(data)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    return data, tmp_path / "images"


def check_bad_samples(report):
    assert report.total == report.scanned == len(RECORDS)
    assert {reason: report.examples[reason] for reason in report.bad} == EXPECTED_BAD
    assert dict(report.bad) == {reason: len(ids) for reason, ids in EXPECTED_BAD.items()}
    assert report.ok == 5 and report.num_bad == len(RECORDS) - 5
    assert (report.image_samples, report.text_only_samples) == (10, 3)
    assert "a/none.jpg" in report.messages["missing_image"] and "cut.jpg" in report.messages["corrupt_image"]
    assert dict(report.image_modes) == {"RGB": 4, "L": 1, "CMYK": 1, "?": 1}


def test_finds_every_kind_of_bad_sample(dataset):
    data, images = dataset
    report = check_dataset(data, images, max_pixels=300 * 200)
    check_bad_samples(report)
    words = [sum(len(t["value"].split()) for t in r["conversations"]) for r in RECORDS]
    assert np.abs(report.words).tolist() == words
    assert len(report.token_lengths) == 0 and "tokens per good sample" not in report.format()


def test_extreme_aspect_ratio_only_with_resize(tmp_path):
    banner = io.BytesIO()
    Image.new("RGB", (1, 211)).save(banner, format="PNG")
    (tmp_path / "banner.png").write_bytes(banner.getvalue())
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "b", "image": "banner.png", "conversations": turns("<image>", "Tall.")}]))
    assert check_dataset(data, tmp_path).ok == 1
    assert check_dataset(data, tmp_path, aspect="resize").examples == {"extreme_aspect_ratio": ["b"]}
    assert check_dataset(data, tmp_path, max_images=0).examples == {"too_many_images": ["b"]}


def test_reads_zip_archives_and_workers_keep_the_order(dataset, tmp_path):
    data, _ = dataset
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, blob in IMAGES.items():
            zf.writestr(f"images/{name}", blob)
    report = check_dataset(data, archive, max_pixels=300 * 200, workers=2)
    check_bad_samples(report)
    limited = check_dataset(data, archive, max_pixels=300 * 200, limit=7)
    assert limited.scanned == 7 and limited.total == len(RECORDS) and dict(limited.bad) == {
        "missing_image": 1, "corrupt_image": 1}


def test_token_lengths_and_truncation_with_a_real_tokenizer(dataset, llama2_tokenizer_dir):
    from transformers import AutoTokenizer
    data, images = dataset
    tokenizer = AutoTokenizer.from_pretrained(llama2_tokenizer_dir)
    report = check_dataset(data, images, tokenizer=tokenizer, max_length=600, image_seq_length=101,
                           max_pixels=300 * 200)
    image_token_id = add_image_token(tokenizer)
    expected = [len(tokenize_conversation(r["conversations"], tokenizer, get_template("v1"),
                                          image_token_id=image_token_id, image_seq_length=101,
                                          max_length=10**6).input_ids) for r in RECORDS[:5]]
    assert report.ok == 5 and report.token_lengths.tolist() == expected
    assert min(expected[:3]) > 101 and max(expected[:4]) < 600 < expected[4]  # long_text gets truncated
    assert report.truncated() == 1 and "1 longer than max_length 600" in report.format()
    efficiency = report.token_efficiency()   # 5 samples: one batch padded to 600, or packed rows
    real = sum(min(n, 600) for n in expected)
    assert efficiency["bucketing"] == pytest.approx(real / (5 * 600))
    assert efficiency["packed_600"] >= efficiency["bucketing"] and 0 < efficiency["packed_1200"] <= 1
    assert "real/computed tokens: bucketing" in report.format()
    # An image cut by max_length makes a bad sample, as in training; the long text-only one is kept.
    short = check_dataset(data, images, tokenizer=tokenizer, max_length=109, image_seq_length=101,
                          max_pixels=300 * 200, limit=5)
    assert dict(short.bad) == {"image_tokens_truncated": 3} and short.examples["image_tokens_truncated"] == [
        "ok1", "ok2", "ok3"]
    assert short.token_lengths.tolist() == expected[3:] and short.truncated() == 1


def test_command_line(dataset, capsys, tmp_path):
    data, images = dataset
    args = ["--data", str(data), "--images", str(images), "--max-pixels", str(300 * 200)]
    assert main(args + ["--json", str(tmp_path / "report.json")]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["bad"] == {reason: len(ids) for reason, ids in EXPECTED_BAD.items()}
    assert saved["examples"] == EXPECTED_BAD and saved["ok"] == 5 and saved["words"]["p100"] == 703
    assert f"scanned {len(RECORDS)} of {len(RECORDS)} samples: 5 ok, 8 bad" in printed
    assert "missing_image" in printed and "missing, missing2" in printed
    assert main(args + ["--strict"]) == 1
    assert main(args + ["--strict", "--limit", "5"]) == 0
    assert main(["--data", str(data.parent / "absent.json"), "--images", str(images)]) == 2
    assert "absent.json" in capsys.readouterr().err
