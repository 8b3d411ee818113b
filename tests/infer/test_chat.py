"""`python -m llava_jax.chat` on a tiny exported LLaVA: one-shot and interactive, against the official CLI's
conversation rendering; bad input gives one line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_jax.infer import chat as chat_lib
from llava_jax.infer.generate import Generator, default_template, load_model
from tests.data import official_llava
from tests.infer.test_generate import save_tiny_llava

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = ("What color is the shape?", "How many shapes do you see?")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def generator(model_dir):
    model, tokenizer, image_config, template = load_model(model_dir)
    assert template == "llava_v1"
    return Generator(model, tokenizer, image_config=image_config, template=template)


def run_cli(*args, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "llava_jax.chat", *map(str, args)], input=stdin, text=True,
                          capture_output=True, env=env, cwd=REPO, timeout=300)


def official_answers(generator, image, questions):
    """Greedy answers to a conversation rendered turn by turn as the official CLI does."""
    messages, answers = [], []
    for i, question in enumerate(questions):
        messages.append(("<image>\n" + question) if i == 0 else question)
        prompt = official_llava.official_prompt("llava_v1", [*messages, None])
        answer = generator.generate([prompt], [[image]], max_new_tokens=6).pop().strip()
        messages.append(answer)
        answers.append(answer)
    return answers


def test_prompt_answers_once(model_dir, image_file, generator):
    result = run_cli("--model", model_dir, "--image", image_file, "--prompt", QUESTIONS[0], "--temperature", 0,
                     "--max-new-tokens", 6)
    assert result.returncode == 0, result.stderr
    image = Image.open(image_file).convert("RGB")
    expected = official_answers(generator, image, QUESTIONS[:1])
    assert expected[0]
    assert result.stdout == expected[0] + "\n"


def test_interactive_multi_turn_with_stdin(model_dir, image_file, generator):
    result = run_cli("--model", model_dir, "--image", image_file, "--temperature", 0, "--max-new-tokens", 6,
                     stdin="\n".join(QUESTIONS) + "\n\n")
    assert result.returncode == 0, result.stderr
    first, second = official_answers(generator, Image.open(image_file).convert("RGB"), QUESTIONS)
    assert result.stdout == f"USER: ASSISTANT: {first}\nUSER: ASSISTANT: {second}\nUSER: \n"


def test_chat_class_keeps_the_history(generator, image_file):
    chat = chat_lib.Chat(generator, Image.open(image_file).convert("RGB"), max_new_tokens=6, temperature=0)
    pieces = []
    answers = [chat.ask(q, stream=pieces.append) for q in QUESTIONS]
    assert chat.messages == ["<image>\n" + QUESTIONS[0], answers[0], QUESTIONS[1], answers[1]]
    assert "".join(pieces).replace(" ", "") == "".join(answers).replace(" ", "")


def test_missing_model_is_one_line_and_status_2(tmp_path):
    result = run_cli("--model", tmp_path / "nowhere", "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr == f"error: model folder not found: {tmp_path / 'nowhere'}\n"
    assert result.stdout == ""


def test_bad_image_and_too_long_prompt(model_dir, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    for image, reason in ((broken, "cannot decode image"), (tmp_path / "absent.png", "image file not found")):
        assert chat_lib.main(["--model", str(model_dir), "--image", str(image), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and reason in err and str(image) in err and err.count("\n") == 1

    short = tmp_path / "short-context"
    save_tiny_llava(short, max_positions=48)  # 25 image tokens + the system prompt do not fit
    image = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(image)
    capsys.readouterr()
    assert chat_lib.main(["--model", str(short), "--image", str(image), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the conversation is ") and "context is 48 tokens" in err
    assert err.count("\n") == 1

    assert chat_lib.main(["--model", str(model_dir), "--template", "nope", "--prompt", "hi"]) == 2
    assert "unknown conversation template 'nope'" in capsys.readouterr().err


def test_load_model_reads_our_format_and_training_workdirs(model_dir, generator, tmp_path):
    import json
    import shutil

    from llava_jax import convert
    from llava_jax.models.llava import LlavaForConditionalGeneration

    ours = tmp_path / "ours"
    convert.save(convert.from_hf(model_dir), ours)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, ours / name)
    model, tokenizer, _, template = load_model(ours)
    assert isinstance(model, LlavaForConditionalGeneration) and template == "llava_v1"
    assert len(model.language_model.model.layers) == 2  # the decode layout: one module per layer
    ids = np.arange(5, 40)[None]
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(generator.model(ids)))

    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"export_hf": str(model_dir), "data": {"template": "plain"}}))
    assert load_model(workdir)[3] == "plain"
    (workdir / "config.json").write_text(json.dumps({"export_hf": "", "data": {"template": "v1"}}))
    with pytest.raises(ValueError, match="training workdir without a finished Hugging Face export"):
        load_model(workdir)


def test_default_template_rule():
    assert default_template("llava-v1.5-7b-hf") == "llava_v1"
    assert default_template("llava-v1.6-mistral-7b") == "mistral_instruct"
    assert default_template("llava-llama-2-13b-chat") == "llama_2"
    assert default_template("llava-llama-3-8b") == "llama_3"
    assert default_template("my-run", text_model_type="mistral") == "mistral_instruct"
    assert default_template("llava-onevision-qwen2-7b-ov-hf") == "qwen_1_5"
    assert default_template("my-run", text_model_type="qwen2") == "qwen_1_5"

    class Chatml:  # a tokenizer with chatml's markers (the OneVision demo's)
        def get_vocab(self):
            return {"<|im_start|>": 5, "<|im_end|>": 6, "red": 7}

    assert default_template("hf", Chatml()) == "qwen_1_5"
