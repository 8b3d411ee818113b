"""Evaluation reads images only inside --images: question files are data, so absolute, `..`, NUL-byte and
symlinked-out image paths are refused as unsafe_path (before any model work in the CLI)."""

from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image

from llava_jax.data.errors import BadSample
from llava_jax.infer.evaluate import answer_batch_fn, check_image_paths, main


@pytest.fixture
def folders(tmp_path):
    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(png, format="PNG")
    for folder in (images, outside):
        (folder / "ok.png").write_bytes(png.getvalue())
    os.symlink(outside / "ok.png", images / "link.png")
    os.symlink(outside, images / "linked_dir")
    return images, outside


def hostile_questions(outside):
    paths = {"absolute": str(outside / "ok.png"), "dotdot": "../outside/ok.png", "symlink_out": "link.png",
             "symlinked_dir_out": "linked_dir/ok.png", "nul_byte": "ok\x00.png"}
    return [{"question_id": qid, "text": "What?", "image": path} for qid, path in paths.items()]


def test_unsafe_image_paths_are_refused_and_counted(folders):
    images, outside = folders
    safe = [{"question_id": "fine", "text": "What?", "image": "ok.png"}, {"question_id": "text", "text": "Hi"}]
    check_image_paths(safe, images)
    with pytest.raises(ValueError) as error:
        check_image_paths(safe + hostile_questions(outside), images)
    message = str(error.value)
    assert message.startswith("5 question(s) with image paths outside") and "[unsafe_path]" in message
    assert "'absolute', 'dotdot', 'symlink_out', 'symlinked_dir_out', 'nul_byte'" in message


def test_answering_never_opens_an_image_outside_the_root(folders):
    images, outside = folders
    answer = answer_batch_fn(None, images, max_new_tokens=1)  # refused before the generator is used
    for question in hostile_questions(outside):
        with pytest.raises(BadSample) as error:
            answer([question])
        assert error.value.reason == "unsafe_path" and error.value.sample_id == question["question_id"]


def test_cli_refuses_before_loading_the_model_with_one_line(folders, tmp_path, capsys):
    images, outside = folders
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in hostile_questions(outside)))
    code = main(["--model", str(tmp_path / "no_model"), "--questions", str(questions), "--images", str(images),
                 "--answers", str(tmp_path / "a.jsonl"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "5 question(s)" in err and "[unsafe_path]" in err
    assert not (tmp_path / "a.jsonl").exists()
