"""GPT-judged benchmarks against a real local OpenAI-compatible server: LLaVA-Bench reviews equal to the official
`eval_gpt_review_bench.py` / `eval_gpt_review_visual.py` run side by side (their `openai` module stubbed with the
same deterministic judge), summaries equal to the official `summarize_gpt_review.py`, MM-Vet grading by hand."""

import hashlib
import json
import sys
import types

import pytest

from llava_jax.infer import judge
from tests.infer.test_scorers import run_cli, run_official, write_jsonl
from tests.llm_stub import StubLLM

MODEL = "gpt-4-0314"  # the official review script's judge


def judge_reply(messages: list[dict]) -> str:
    """A deterministic judge: two scores from a hash of the prompt; some replies in formats parse_score rejects."""
    content = messages[-1]["content"]
    if "MALFORMED" in content:
        return "Assistant 1 deserves a 7 and Assistant 2 a 5."
    digest = hashlib.sha256(content.encode()).digest()
    first, second = 1 + digest[0] % 10, 1 + digest[1] % 10
    separator = "," if digest[2] % 2 else " "
    return f"{first}{separator}{second}\nAssistant 1 is more detailed."


def official_openai(calls: list) -> types.ModuleType:
    """The pre-1.0 `openai` module the official review scripts call, answering with `judge_reply`."""
    module = types.ModuleType("openai")

    class ChatCompletion:
        @staticmethod
        def create(**kwargs):
            calls.append(kwargs)
            return {"choices": [{"message": {"content": judge_reply(kwargs["messages"])}}]}

    module.ChatCompletion = ChatCompletion
    module.error = types.SimpleNamespace(RateLimitError=type("RateLimitError", (Exception,), {}))
    return module


def bench_files(tmp_path, coco: bool):
    images = ["a.jpg", "b.jpg"]
    questions = [{"question_id": i, "image": images[i % 2], "text": f"Question {i}?",
                  "category": ("conv", "detail", "complex")[i % 3]} for i in range(7)]
    if coco:
        contexts = [{"image": image, "captions": [f"{image} one.", f"{image} two."],
                     "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]}]} for image in images]
    else:
        contexts = [{"image": "a.jpg", "caption": ["A dog.", "On grass."]}, {"image": "b.jpg", "caption": "A cat."}]
    reference = [{"question_id": i, "text": f"Reference answer {i}.", "answer_id": f"ref{i}"} for i in range(7)]
    answers = [{"question_id": i, "text": "MALFORMED" if i == 4 else f"Model answer {i}.", "answer_id": f"m{i}",
                "prompt": f"Question {i}?", "model_id": "llava_jax", "metadata": {}} for i in range(7)]
    paths = {}
    for name, records in (("questions", questions), ("context", contexts), ("reference", reference),
                          ("answers", answers)):
        paths[name] = write_jsonl(tmp_path / f"{name}.jsonl", records)
    return paths


def parse_official_summary(printed: str) -> dict:
    """`category relative reference model` lines of summarize_gpt_review.py."""
    rows = {}
    for line in printed.splitlines():
        fields = line.split()
        if len(fields) == 4:
            rows[fields[0]] = {"relative": float(fields[1]), "reference": float(fields[2]), "model": float(fields[3])}
    return rows


@pytest.mark.parametrize("coco", [False, True], ids=["in_the_wild", "coco"])
def test_llava_bench_reviews_and_summary_equal_the_official_scripts(tmp_path, monkeypatch, coco):
    paths = bench_files(tmp_path, coco)
    rules = judge.default_rules_path()
    official_reviews = tmp_path / "official_reviews.jsonl"
    calls = []
    monkeypatch.setitem(sys.modules, "openai", official_openai(calls))
    run_official("eval_gpt_review_visual" if coco else "eval_gpt_review_bench",
                 ["--question", str(paths["questions"]), "--context", str(paths["context"]), "--rule", str(rules),
                  "--answer-list", str(paths["reference"]), str(paths["answers"]), "--output", str(official_reviews)],
                 monkeypatch)
    monkeypatch.undo()  # the real openai client for our side

    ours = tmp_path / "reviews.jsonl"
    args = ["llava-bench", "--questions", str(paths["questions"]), "--context", str(paths["context"]),
            "--reference", str(paths["reference"]), "--answers", str(paths["answers"]), "--reviews", str(ours),
            "--base-url", "", "--no-progress", "--concurrency", "3"] + (["--coco"] if coco else [])
    with StubLLM(lambda request: judge_reply(request["messages"])) as stub:
        args[args.index("--base-url") + 1] = stub.url
        assert judge.main(args) == 0
        assert stub.total_answered() == 7
        assert judge.main(args) == 0 and stub.total_answered() == 7  # a rerun is answered from the cache

    ours_lines = [json.loads(line) for line in ours.read_text().splitlines()]
    assert ours_lines == [json.loads(line) for line in official_reviews.read_text().splitlines()]
    assert ours_lines[4]["tuple"] == [-1, -1]
    assert sorted(json.dumps(c, sort_keys=True) for c in calls) == sorted(
        json.dumps(r, sort_keys=True) for r in stub.requests.values())
    assert all(c["model"] == MODEL and c["temperature"] == 0.2 and c["max_tokens"] == 1024 for c in calls)

    printed = run_official("summarize_gpt_review", ["-f", str(ours)], monkeypatch)
    summary = judge.summarize_review_file(ours)
    official = parse_official_summary(printed)
    assert set(official) == set(summary) and len(official) == 4  # three categories and "all"
    for category, row in official.items():
        assert {k: summary[category][k] for k in row} == row
    assert summary["all"]["count"] == 7 and summary["all"]["unparsed"] == 1
    assert run_cli(["llava-bench", "--answers", str(ours)]) == summary  # python -m llava_jax.infer.score


def test_parse_score_matches_the_official_function():
    from tests.infer.test_scorers import official_module

    official = official_module("eval_gpt_review_bench")
    cases = ["8 6\nbecause", "8, 6", "7.5 9", "8  6", "8 6 7", "Score: 8", "", "x y", "10 3"]
    expected = {"8 6\nbecause": [8.0, 6.0], "8, 6": [-1, -1], "7.5 9": [7.5, 9.0], "8  6": [-1, -1],
                "8 6 7": [-1, -1], "Score: 8": [-1, -1], "": [-1, -1], "x y": [-1, -1], "10 3": [10.0, 3.0]}
    for case in cases:
        assert judge.parse_score(case) == expected[case] == official.parse_score(case), case


def test_llava_bench_input_errors_name_the_question(tmp_path):
    paths = bench_files(tmp_path, coco=False)
    rules = {"llava_bench_conv": {"role": "Assistant", "prompt": "p"}}
    from llava_jax.infer.questions import read_jsonl

    client = types.SimpleNamespace(request=lambda messages, **p: {"messages": messages, **p})
    read = {name: read_jsonl(path) for name, path in paths.items()}
    with pytest.raises(ValueError, match=r"question 1: category 'llava_bench_detail' not in the rule file"):
        judge.llava_bench_requests(client, read["questions"], read["context"], read["reference"], read["answers"],
                                   rules)
    with pytest.raises(ValueError, match=r"question 6: not answered in the answers file"):
        judge.llava_bench_requests(client, read["questions"], read["context"], read["reference"],
                                   read["answers"][:6], json.loads(judge.default_rules_path().read_text()))


def test_cli_bad_input_exits_2_naming_the_record(tmp_path, capsys):
    paths = bench_files(tmp_path, coco=False)
    args = ["llava-bench", "--questions", str(paths["questions"]), "--context", str(paths["context"]),
            "--reference", str(paths["reference"]), "--answers", str(paths["answers"]), "--reviews",
            str(tmp_path / "r.jsonl"), "--base-url", "http://127.0.0.1:9/v1", "--coco"]
    assert judge.main(args) == 2
    assert "context of image 'a.jpg': needs 'captions' and 'instances'" in capsys.readouterr().err
    write_jsonl(paths["answers"], [{"question_id": 0, "text": "x"}, {"question_id": 0, "text": "y"}])
    assert judge.main(args[:-1]) == 2
    assert "answers: a question_id appears more than once" in capsys.readouterr().err


# ---------------------------------------------------------------- MM-Vet


def grader(request: dict) -> str:
    content = request["messages"][0]["content"]
    prediction = content.rsplit(" | ", 2)[-2]
    retry = content.endswith(judge.MMVET_RETRY_SUFFIX)
    return {"P0": "1.0", "P1": "0.5 since half", "P2": "0.4" if retry else "good", "P3": "n/a"}[prediction]


def test_mm_vet_grades_and_scores_hand_worked(tmp_path):
    data = {"v1_0": {"question": "Q0", "answer": "red<AND>white", "capability": ["rec"]},
            "v1_1": {"question": "Q1", "answer": "x", "capability": ["ocr", "rec"]},
            "v1_2": {"question": "Q2", "answer": "y<OR>z", "capability": ["ocr"]},
            "v1_3": {"question": "Q3", "answer": "w", "capability": ["math", "ocr"]}}
    mmvet = tmp_path / "mm-vet.json"
    mmvet.write_text(json.dumps(data))
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": i, "text": f"P{i}"} for i in range(4)])
    grades = tmp_path / "grades.json"
    with StubLLM(grader) as stub:
        assert judge.main(["mm-vet", "--answers", str(answers), "--mm-vet", str(mmvet), "--grades", str(grades),
                           "--base-url", stub.url, "--no-progress"]) == 0
        requests = sorted(stub.requests.values(), key=lambda r: (r["messages"][0]["content"], r["temperature"]))
    assert [g["score"] for g in json.loads(grades.read_text()).values()] == [[1.0], [0.5], [0.4], [0.0]]
    assert stub.total_answered() == 1 + 1 + 2 + 5  # P3: first ask and the four retries, then 0
    first = [r for r in requests if r["messages"][0]["content"].endswith("| P0 | ")][0]
    prompt = judge.MMVET_GRADER_PROMPT + "\nQ0 | red <AND> white | P0 | "
    assert first["messages"] == [{"role": "user", "content": prompt}]
    assert first["max_tokens"] == 3 and first["temperature"] == 0.0
    p3 = [r["temperature"] for r in stub.requests.values() if "| P3 | " in r["messages"][0]["content"]]
    assert sorted(p3) == [0.0, 0.0, 0.5, 1.0, 1.5]
    scores = judge.score_mmvet(data, json.loads(grades.read_text()))
    assert scores["total"] == 47.5  # (1 + .5 + .4 + 0) / 4
    assert scores["capabilities"] == {"ocr": 30.0, "rec": 75.0, "math": 0.0}
    assert scores["capability_combinations"] == {"rec": 100.0, "ocr_rec": 50.0, "ocr": 40.0, "math_ocr": 0.0}
    assert judge.mmvet_results([{"question_id": 0, "text": "P0"}, {"question_id": 12, "text": "x"}]) == {
        "v1_0": "P0", "v1_12": "x"}
