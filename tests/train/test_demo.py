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


def test_demo_prints_each_phase_with_its_time_then_the_outputs(tmp_path, jax_cache):
    import re
    from pathlib import Path

    workdir = tmp_path / "demo"
    done = run_cli(2, workdir, {"train.num_steps": 3, "demo.evaluate": True, "demo.eval_batch_size": 2,
                                "export_hf": workdir / "hf"}, demo_data=None, jax_cache=jax_cache)
    took = r"in (\d+\.\d s|\d+ s|\d+ min \d\d s)"
    phases = [line for line in done.stdout.splitlines() if re.match(r"(data|compile|train|evaluate|export): ", line)]
    assert [line.split(":")[0] for line in phases] == ["data", "compile", "train", "export", "evaluate"], done.stdout
    assert all(re.search(took, line) for line in phases), phases
    assert phases[0].startswith("data: 100 samples (48 stage-1, 48 stage-2, 4 held-out questions) in ")
    assert phases[0].endswith(f"-> {workdir / 'data'}")
    assert re.fullmatch(r"train: 3 steps in .* \(\d+\.\d\d s a step\)", phases[2]), phases[2]
    assert phases[3].endswith(f"-> {workdir / 'hf'}")
    assert done.stdout.index("held-out accuracy") < done.stdout.index(phases[4])
    # Last: where everything is, each path there.
    outputs = done.stdout[done.stdout.rindex("outputs:"):].splitlines()[1:]
    paths = [Path(p.strip(" ,")) for line in outputs for p in re.findall(r"(/[^ ,()]+)", line)]
    assert {p.name for p in paths} >= {"result.json", "eval_answers_images.jsonl", "eval_answers_blank.jsonl",
                                      "demo_eval.json", "checkpoints", "metrics.jsonl", "hf"}
    assert all(p.exists() for p in paths), [p for p in paths if not p.exists()]
