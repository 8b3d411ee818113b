"""`python -m llava_jax.chat` and `python -m llava_jax.eval` (their mains) on a tiny LLaVA-OneVision folder (SigLIP
"full" + Qwen2): two images and a video folder in one message, answers equal to the Generator's on the same
inputs; question files whose "image" is a list and with a "video"."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.data.conversation import generation_prompt
from llava_jax.data.video import sample_frame_indices
from llava_jax.infer import chat as chat_lib
from llava_jax.infer import evaluate
from llava_jax.infer.generate import Video, load_generator
from tests.infer import anyres_models as M
from tests.models import anyres_helpers as H


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ov") / "llava-onevision-tiny"
    M.save_onevision(path, seed=2)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two odd-size PNG images and a folder of 6 PNG frames; -> (root, image names, frame folder, the video of
    the 4 frames sampled from it)."""
    root = tmp_path_factory.mktemp("media")
    names = ["a.png", "b.png"]
    for name, image in zip(names, H.images((23, 61), (41, 19), seed=8)):
        image.save(root / name)
    frames = M.frames(6, seed=9)
    (root / "clip").mkdir()
    for k, frame in enumerate(frames):
        Image.fromarray(frame).save(root / "clip" / f"{k:03d}.png")
    return root, names, root / "clip", Video(frames[sample_frame_indices(6, 4)])


@pytest.fixture(scope="module")
def generator(folder):
    return load_generator(folder, dtype="float32")


def _images(root, names):
    return [Image.open(root / n).convert("RGB") for n in names]


def test_chat_main_two_images_and_a_video(folder, media, generator, capsys, monkeypatch):
    monkeypatch.setenv("LLAVA_JAX_COMPILE_CACHE", "")
    root, names, clip, video = media
    code = chat_lib.main(["--model", str(folder), "--image", str(root / names[0]), "--image", str(root / names[1]),
                          "--video", str(clip), "--video-frames", "4", "--prompt", "Same?", "--temperature", "0",
                          "--max-new-tokens", "6", "--dtype", "float32"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert generator.template.name == "qwen_1_5"
    prompt = generation_prompt(generator.template, ["<image><image><video>\nSame?"])
    expected = generator.generate([prompt], [_images(root, names) + [video]], max_new_tokens=6)[0].strip()
    assert expected and out.out == expected + "\n"


def test_chat_main_refuses_a_bad_video_frames_count(folder, capsys):
    assert chat_lib.main(["--model", str(folder), "--video-frames", "0", "--prompt", "hi"]) == 2
    assert "--video-frames" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_main_image_lists_and_videos(folder, media, generator, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_JAX_COMPILE_CACHE", "")
    root, names, _, video = media
    questions = [{"question_id": 1, "text": "Same?", "image": names, "video": "clip"},
                 {"question_id": 2, "text": "What?", "image": names[1]},
                 {"question_id": 3, "text": "Hello"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = tmp_path / "a.jsonl"
    assert evaluate.main(["--model", str(folder), "--questions", str(tmp_path / "q.jsonl"), "--images", str(root),
                          "--answers", str(answers), "--template", "qwen_1_5", "--batch-size", "2",
                          "--max-new-tokens", "5", "--video-frames", "4", "--no-progress", "--dtype", "float32"]) == 0
    got = {r["question_id"]: r["text"] for r in map(json.loads, answers.read_text().splitlines())}
    images = _images(root, names)
    rows = [(generator.prompt("Same?", 2, 1), images + [video]), (generator.prompt("What?", 1), images[1:]),
            (generator.prompt("Hello"), [])]
    expected = [generator.generate([p], [m], max_new_tokens=5)[0].strip() for p, m in rows]
    assert [got[1], got[2], got[3]] == expected


def test_eval_refuses_unsafe_and_malformed_media_paths(tmp_path):
    with pytest.raises(ValueError, match="unsafe_path"):
        evaluate.check_image_paths([{"question_id": 1, "text": "x", "image": ["a.png", "../b.png"]}], tmp_path)
    with pytest.raises(ValueError, match="unsafe_path"):
        evaluate.check_image_paths([{"question_id": 1, "text": "x", "video": "/etc"}], tmp_path)
    with pytest.raises(ValueError, match="field 'image' must be a path or a list of paths"):
        evaluate.image_paths({"question_id": 7, "image": ["a.png", 3]})


def test_frames_are_sampled_from_the_folder(media):
    root, _, clip, video = media
    from llava_jax.infer.media import read_video

    np.testing.assert_array_equal(read_video(clip, 4).frames, video.frames)
