"""evaluate() and `python -m llava_jax.eval` on the demo data's held-out questions with a tiny LLaVA: answers as
the official model_vqa asks them, resuming, image_transform, process shards, and the GQA scorer after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import synthetic
from llava_jax.infer import questions as questions_lib
from llava_jax.infer import scorers
from llava_jax.infer.evaluate import evaluate
from llava_jax.infer.generate import Generator, load_model
from tests.data import official_llava
from tests.infer.test_generate import save_tiny_llava

REPO = Path(__file__).resolve().parents[2]
BATCH, MAX_NEW = 4, 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, demo paths, model, tokenizer, image config)."""
    root = tmp_path_factory.mktemp("eval")
    paths = synthetic.generate(root / "demo", num_stage1=0, num_stage2=0, num_eval=7, image_size=32)
    save_tiny_llava(root / "model", seed=5)
    model, tokenizer, image_config, _ = load_model(root / "model")
    return root / "model", paths, model, tokenizer, image_config


def run_eval(setup, answers, **kw):
    _, paths, model, tokenizer, image_config = setup
    kw = {"image_root": paths.images, **kw}
    return evaluate(model, tokenizer, paths.eval_questions, kw.pop("image_root"), answers, template="vicuna_v1",
                    image_config=image_config, batch_size=BATCH, max_new_tokens=MAX_NEW, model_id="tiny",
                    progress=False, **kw)


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def answers(setup, tmp_path_factory):
    return read(run_eval(setup, tmp_path_factory.mktemp("answers") / "answers.jsonl"))


def test_answers_are_the_official_model_vqa_prompts_answered_one_by_one(setup, answers):
    _, paths, model, tokenizer, image_config = setup
    questions = questions_lib.load_questions(paths.eval_questions)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert [a["prompt"] for a in answers] == [q["text"] for q in questions]
    assert all(a["model_id"] == "tiny" and a["metadata"] == {} for a in answers)
    generator = Generator(model, tokenizer, image_config=image_config)
    for question, answer in zip(questions, answers):
        prompt = official_llava.official_prompt("vicuna_v1", ["<image>\n" + question["text"], None])
        image = Image.open(paths.images / question["image"]).convert("RGB")
        single = generator.generate([prompt], [[image]], max_new_tokens=MAX_NEW, stop=["</s>"])[0].strip()
        assert answer["text"] == single
    assert len({a["text"] for a in answers}) > 1


def test_resume_keeps_finished_answers(setup, answers, tmp_path):
    out = tmp_path / "answers.jsonl"
    lines = [json.dumps(a) for a in answers[:3]]
    out.write_text("\n".join(lines) + "\n" + lines[0][:17])  # three answers and a write torn by a crash
    resumed = read(run_eval(setup, out))
    assert [a["answer_id"] for a in resumed[:3]] == [a["answer_id"] for a in answers[:3]]
    assert [a["text"] for a in resumed] == [a["text"] for a in answers]
    assert len({a["answer_id"] for a in resumed}) == len(answers)


def test_image_transform_replaces_every_image(setup, answers, tmp_path):
    _, paths, *_ = setup
    blank_root = tmp_path / "blank"
    blank_root.mkdir()
    for question in questions_lib.load_questions(paths.eval_questions):
        synthetic.blank_image(32).save(blank_root / question["image"])
    transformed = read(run_eval(setup, tmp_path / "t.jsonl", image_transform=lambda im: synthetic.blank_image(32)))
    on_disk = read(run_eval(setup, tmp_path / "d.jsonl", image_root=blank_root))
    assert [a["text"] for a in transformed] == [a["text"] for a in on_disk]
    assert [a["text"] for a in transformed] != [a["text"] for a in answers]


def test_process_shards_merge_into_the_single_process_answers(setup, answers, tmp_path):
    _, paths, *_ = setup
    out = tmp_path / "answers.jsonl"
    for index in range(2):
        run_eval(setup, out, process_index=index, process_count=2)
    shard = read(questions_lib.shard_path(out, 1, 2))
    assert [a["question_id"] for a in shard] == [1, 3, 5]
    questions_lib.merge_answers(out, questions_lib.load_questions(paths.eval_questions))
    assert [a["text"] for a in read(out)] == [a["text"] for a in answers]


def test_gqa_exact_match_on_the_demo_answers(setup, answers, tmp_path):
    _, paths, *_ = setup
    gold = [json.loads(line) for line in paths.eval_answers.read_text().splitlines()]
    score = scorers.score_gqa_files(_write(tmp_path / "a.jsonl", answers), paths.eval_answers)
    hits = [a["text"].rstrip(".").lower() == g["answer"] for a, g in zip(answers, gold)]
    assert score["count"] == len(gold) == 7
    assert score["accuracy"] == pytest.approx(np.mean(hits))
    # The same path with the gold answers as model output ("Red." style) scores 1, one wrong answer 6/7.
    perfect = [{**a, "text": g["answer"].capitalize() + "."} for a, g in zip(answers, gold)]
    assert scorers.score_gqa_files(_write(tmp_path / "p.jsonl", perfect), paths.eval_answers)["accuracy"] == 1.0
    perfect[2]["text"] = "banana"
    assert scorers.score_gqa_files(_write(tmp_path / "q.jsonl", perfect), paths.eval_answers)["accuracy"] == \
        pytest.approx(6 / 7)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "llava_jax.eval", *map(str, args)], text=True,
                          capture_output=True, env=env, cwd=REPO, timeout=300)


def test_cli_writes_the_same_answers(setup, answers, tmp_path):
    model_dir, paths, *_ = setup
    out = tmp_path / "cli.jsonl"
    result = run_cli("--model", model_dir, "--questions", paths.eval_questions, "--images", paths.images,
                     "--answers", out, "--template", "v1", "--batch-size", BATCH, "--max-new-tokens", MAX_NEW,
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    cli = read(out)
    assert [a["text"] for a in cli] == [a["text"] for a in answers]
    assert {a["model_id"] for a in cli} == {"model"}

    (paths.root / "missing").mkdir(exist_ok=True)
    result = run_cli("--model", model_dir, "--questions", paths.eval_questions, "--images", paths.root / "missing",
                     "--answers", tmp_path / "x.jsonl", "--no-progress")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "sample '0': image file not found" in result.stderr and "eval_000000.png" in result.stderr
