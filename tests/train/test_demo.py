"""Smoke version of the README's demo: a few steps of configs/stage2.py:demo, then the held-out evaluation
with real and blank images through the eval runner and scorer."""

from __future__ import annotations

import json

from tests.train.test_loop import demo_data, jax_cache, run_cli  # noqa: F401 (fixtures)


def test_demo_trains_then_evaluates_with_images_and_blank_images(tmp_path, demo_data, jax_cache):
    workdir = tmp_path / "demo"
    done = run_cli(2, workdir, {"train.num_steps": 3, "demo.evaluate": True, "demo.eval_batch_size": 2},
                   demo_data=demo_data, jax_cache=jax_cache)
    assert "held-out accuracy" in done.stdout
    result = json.loads((workdir / "demo_eval.json").read_text())
    questions = [json.loads(line) for line in (demo_data / "eval_questions.jsonl").read_text().splitlines()]
    gold = {a["question_id"]: a["answer"]
            for a in map(json.loads, (demo_data / "eval_answers.jsonl").read_text().splitlines())}
    for name in ("images", "blank"):
        answers = [json.loads(line) for line in (workdir / f"eval_answers_{name}.jsonl").read_text().splitlines()]
        assert sorted(a["question_id"] for a in answers) == sorted(q["question_id"] for q in questions)
        hits = [a["text"].rstrip(".").lower() == gold[a["question_id"]] for a in answers]
        assert result[name]["accuracy"] == sum(hits) / len(hits)
    assert {q["category"] for q in questions} <= set(result["chance"])
