"""Benchmark scorers: hand-worked scores on tiny files and side-by-side runs of the official LLaVA scripts.

The official scripts come from `llava-torch` (`llava/eval/*.py`). They are loaded by file path, which skips
`llava/__init__.py` and its heavy model imports; tests needing them skip where the package is absent.
"""

import contextlib
import functools
import importlib.util
import io
import json
import random
import re
import runpy
import sys
from pathlib import Path

import pytest

from llava_jax.infer import score as score_cli
from llava_jax.infer import scorers


# ---------------------------------------------------------------- helpers


@functools.cache
def official_eval_dir() -> Path | None:
    """`llava/eval/` of the installed official package, found without importing `llava/__init__.py`."""
    module = sys.modules.get("llava")
    paths = getattr(module, "__path__", None)
    if not paths:
        spec = importlib.util.find_spec("llava")
        paths = spec.submodule_search_locations if spec else None
    return Path(list(paths)[0]) / "eval" if paths else None


def official_script(name: str) -> Path:
    """Path of `llava/eval/<name>.py` (skips when llava-torch is not installed)."""
    eval_dir = official_eval_dir()
    if eval_dir is None or not (eval_dir / f"{name}.py").exists():
        pytest.skip("llava-torch (official LLaVA code) is not installed")
    return eval_dir / f"{name}.py"


def official_module(name: str):
    spec = importlib.util.spec_from_file_location(f"official_llava_eval_{name}", official_script(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_official(name: str, argv: list[str], monkeypatch) -> str:
    """Runs an official eval script as `__main__` with `argv`; returns what it printed."""
    path = official_script(name)
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(path), run_name="__main__")
    return out.getvalue()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def answer_lines(texts: dict, prompts: dict | None = None) -> list[dict]:
    return [{"question_id": qid, "prompt": (prompts or {}).get(qid, "q"), "text": text, "answer_id": "x",
             "model_id": "m", "metadata": {}} for qid, text in texts.items()]


def run_cli(argv: list[str]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = score_cli.main(argv)
    assert json.loads(out.getvalue()) == json.loads(json.dumps(result))
    return result


# ---------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("E", "E"), ("B. A cat", "B"), ("The answer is C.", "C"), ("I think The answer is D!", "D"),
    ("The answer is A. The answer is B.", None),  # two answers: unparsable
    ("F", None), ("b", None), ("C.", None), ("B.c", None), ("(A)", None), ("", None),
])
def test_parse_scienceqa_letter(text, letter):
    assert scorers.parse_scienceqa_letter(text) == letter


def scienceqa_problems():
    # id: (number of choices, index of the right one, has image)
    spec = {"1": (2, 0, True), "2": (3, 2, True), "3": (4, 1, False), "4": (2, 1, True), "5": (5, 4, False),
            "6": (3, 0, True), "7": (2, 1, False)}
    return {pid: {"choices": [f"c{i}" for i in range(n)], "answer": a, "image": "image.png" if img else None,
                  "split": "test"} for pid, (n, a, img) in spec.items()}


def test_score_scienceqa_hand_worked():
    predictions = {
        "1": "A",                     # right (A = 0)
        "2": "C. c2",                 # right (C = 2)
        "3": "The answer is B.",      # right (B = 1)
        "4": "C",                     # wrong: C is past the 2 choices
        "5": "E",                     # right (E = 4)
        # "6" missing: wrong
        "7": "b",                     # wrong: unparsable
    }
    result = scorers.score_scienceqa(predictions, scienceqa_problems(), ["1", "2", "3", "4", "5", "6", "7"])
    # 4 right of 7; with an image: 1, 2, 4, 6 of which 1 and 2 are right: 2 / 4.
    assert (result["correct"], result["count"], result["accuracy"]) == (4, 7, pytest.approx(4 / 7))
    assert (result["img_correct"], result["img_count"], result["img_accuracy"]) == (2, 4, 0.5)
    assert result["missing"] == 1
    assert result["parsed"] == {"1": "A", "2": "C", "3": "B", "4": "C", "5": "E", "6": None, "7": None}


def test_scienceqa_matches_official_script(tmp_path, monkeypatch):
    problems = scienceqa_problems()
    problems["8"] = {"choices": ["x", "y"], "answer": 0, "image": None, "split": "val"}  # not in the split
    base = tmp_path / "sqa"
    base.mkdir()
    (base / "problems.json").write_text(json.dumps(problems))
    test_ids = ["1", "2", "3", "4", "5", "6", "7"]
    (base / "pid_splits.json").write_text(json.dumps({"test": test_ids, "val": ["8"]}))
    texts = {"1": "B", "2": "The answer is C.", "3": "B. c1", "4": "B", "5": "The answer is E. Or The answer is A.",
             "6": "A", "8": "A"}  # 7 unanswered
    prompts = {pid: ("<image>\n" if problems[pid]["image"] else "") + "Question" for pid in texts}
    answers = write_jsonl(tmp_path / "answers.jsonl", answer_lines(texts, prompts))

    printed = run_official("eval_science_qa", [
        "--base-dir", str(base), "--result-file", str(answers), "--output-file", str(tmp_path / "out.json"),
        "--output-result", str(tmp_path / "result.json")], monkeypatch)
    official = json.loads((tmp_path / "result.json").read_text())
    ours = scorers.score_scienceqa_files(answers, base, "test")

    assert ours["count"] == official["count"] == 7
    assert ours["correct"] == official["correct"]
    assert 100 * ours["accuracy"] == pytest.approx(official["acc"])
    assert f"IMG-Accuracy: {100 * ours['img_accuracy']:.2f}%" in printed
    letters = "ABCDE"
    assert {pid: letters.index(p) if p else -1 for pid, p in ours["parsed"].items()} == official["results"]


def test_scienceqa_file_errors(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps({"1": {"choices": ["a"], "answer": 0}}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "9"]}))
    answers = write_jsonl(tmp_path / "a.jsonl", answer_lines({"1": "A"}))
    with pytest.raises(ValueError, match="no split 'val'"):
        scorers.score_scienceqa_files(answers, tmp_path, "val")
    with pytest.raises(ValueError, match="lists problem '9', which is absent"):
        scorers.score_scienceqa_files(answers, tmp_path, "test")
    (tmp_path / "pid_splits.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"pid_splits.json: malformed JSON"):
        scorers.score_scienceqa_files(answers, tmp_path, "test")


# ---------------------------------------------------------------- POPE


@pytest.mark.parametrize("text, answer", [
    ("Yes", "yes"), ("Yes, there is a dog.", "yes"), ("No", "no"), ("No.", "no"), ("no, there isn't", "no"),
    ("There is not a dog in the image.", "no"),
    ("Yes. There is no cat.", "yes"),  # only the first sentence counts
    ("Not really", "yes"),             # "Not" is not in the official word list
    ("NO", "yes"), ("Nope", "yes"), ("", "yes"),
])
def test_parse_pope_answer(text, answer):
    assert scorers.parse_pope_answer(text) == answer


def test_score_pope_hand_worked():
    texts = ["Yes", "Yes.", "No", "Yes, a cat.", "No.", "There is not.", "no", "Yes"]
    labels = ["yes", "yes", "yes", "no", "no", "no", "yes", "no"]
    # preds:  yes   yes   no    yes   no    no    no    yes
    # TP = 2 (#0, #1), FN = 2 (#2, #6), FP = 2 (#3, #7), TN = 2 (#4, #5)
    result = scorers.score_pope(texts, labels)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (2, 2, 2, 2)
    assert result["accuracy"] == 4 / 8
    assert result["precision"] == 2 / (2 + 2) and result["recall"] == 2 / (2 + 2)
    assert result["f1"] == pytest.approx(2 * 0.5 * 0.5 / (0.5 + 0.5))
    assert result["yes_ratio"] == 4 / 8  # yes predicted on #0, #1, #3, #7
    # Nothing predicted yes: precision, recall and F1 are 0 (the official script divides by zero).
    none_yes = scorers.score_pope(["No"] * 3, ["yes", "no", "no"])
    assert (none_yes["precision"], none_yes["recall"], none_yes["f1"], none_yes["accuracy"]) == (0, 0, 0, 2 / 3)


def pope_files(tmp_path, seed=5):
    """Splits of 13, 11 and 7 questions with random labels and answers.

    Returns (question file, annotation dir, answer file, answer records).
    """
    rng = random.Random(seed)
    phrasings = ["Yes", "No", "Yes, there is.", "No, there is not.", "There is not a cup.", "I see a cup.",
                 "no", "Yes. no", "not sure"]
    questions, answers = [], []
    annotation_dir = tmp_path / "coco"
    annotation_dir.mkdir()
    qid = 0
    for split, n in (("adversarial", 13), ("popular", 11), ("random", 7)):
        labels = []
        for i in range(n):
            qid += 1
            questions.append({"question_id": qid, "image": f"{i}.jpg", "text": "Is there a cup?", "category": split})
            labels.append({"question_id": i + 1, "image": f"{i}.jpg", "text": "Is there a cup?",
                           "label": rng.choice(["yes", "no"])})
            answers.append({"question_id": qid, "prompt": "Is there a cup?", "text": rng.choice(phrasings)})
        if split == "random":  # make sure every count is non-zero for the official divisions
            labels[0]["label"], answers[-n]["text"] = "yes", "Yes"
        write_jsonl(annotation_dir / f"coco_pope_{split}.json", labels)
    return (write_jsonl(tmp_path / "questions.jsonl", questions), annotation_dir,
            write_jsonl(tmp_path / "answers.jsonl", answers), answers)


def parse_official_pope(printed: str) -> dict:
    results = {}
    for block in printed.split("Category: ")[1:]:
        split = block.split(",")[0]
        tp, fp, tn, fn = map(int, re.search(r"TP\tFP\tTN\tFN\t\n(\d+)\t(\d+)\t(\d+)\t(\d+)", block).groups())
        values = {key: float(re.search(rf"{label}: (\S+)", block).group(1)) for key, label in
                  [("accuracy", "Accuracy"), ("precision", "Precision"), ("recall", "Recall"), ("f1", "F1 score"),
                   ("yes_ratio", "Yes ratio")]}
        results[split] = {"tp": tp, "fp": fp, "tn": tn, "fn": fn, **values}
    return results


def test_pope_matches_official_script_per_split(tmp_path, monkeypatch):
    questions, annotation_dir, answers_path, answers = pope_files(tmp_path)
    printed = run_official("eval_pope", ["--annotation-dir", str(annotation_dir), "--question-file", str(questions),
                                         "--result-file", str(answers_path)], monkeypatch)
    official = parse_official_pope(printed)
    ours = scorers.score_pope_files(answers_path, questions, annotation_dir)
    assert sorted(official) == sorted(ours) == ["adversarial", "popular", "random"]
    for split, metrics in official.items():
        for key, value in metrics.items():
            assert ours[split][key] == pytest.approx(value, rel=1e-12), (split, key)

    # A resumed / sharded answer file in another order scores the same.
    random.Random(0).shuffle(answers)
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", answers)
    assert scorers.score_pope_files(shuffled, questions, annotation_dir) == ours


def test_pope_file_errors(tmp_path):
    questions, annotation_dir, answers_path, answers = pope_files(tmp_path)
    short = write_jsonl(tmp_path / "short.jsonl", answers[:-1])
    with pytest.raises(ValueError, match=r"POPE split 'random': .* 7 labels, .* 7 questions and .* 6 answers"):
        scorers.score_pope_files(short, questions, annotation_dir)
    write_jsonl(annotation_dir / "coco_pope_random.json", [{"label": "maybe"}])
    with pytest.raises(ValueError, match=r"coco_pope_random.json: record 1: label must be 'yes' or 'no'"):
        scorers.score_pope_files(answers_path, questions, annotation_dir)
    twice = write_jsonl(tmp_path / "twice.jsonl", answers + answers[:1])
    with pytest.raises(ValueError, match=r"question_id answered more than once: \['1'\]"):
        scorers.score_pope_files(twice, questions, annotation_dir)


# ---------------------------------------------------------------- VQA

TRICKY_ANSWERS = [
    "Two dogs.", "the Cat's toy", "1,000", "3.5", "Yes!", "isnt it", "a/b", "None", "dont know", "e.g. x.y.z",
    "hello - world", "x-ray", "(a) 10%", "An apple; a pear", "It's 2:30 p.m.", "ten,eleven", "whats up?",
    "I'm here", "Im here", "  spaced\tout\nanswer  ", "[red]", "\"quoted\"", "a_b_c", "50 / 50", "one-way",
    "." * 40 + "x", "1.5.", "Mr. Smith's", "no.", "Oclock", "somebody'd", "y'all'dve", "U.S.A.", "#1", "",
]


def test_normalize_vqa_answer_matches_official_processor():
    processor = official_module("m4c_evaluator").EvalAIAnswerProcessor()
    for text in TRICKY_ANSWERS:
        assert scorers.normalize_vqa_answer(text) == processor(text), text


def test_normalize_vqa_answer_hand_worked():
    assert scorers.normalize_vqa_answer("Two Dogs.") == "2 dogs"       # number word, period, case
    assert scorers.normalize_vqa_answer("The red one") == "red 1"      # article dropped
    assert scorers.normalize_vqa_answer("dont") == "don't"             # contraction restored
    assert scorers.normalize_vqa_answer("1,000") == "1000"             # digit comma removed
    assert scorers.normalize_vqa_answer("3.5") == "3.5"                # decimal point kept
    assert scorers.normalize_vqa_answer("x-ray") == "x ray"            # inner hyphen becomes a space


def test_vqa_accuracy_hand_worked():
    gt = ["Two", "2", "2.", "three", "3", "four", "five", "six", "seven", "eight"]  # "2" three times once normalized
    # c = 3 annotators say "2": dropping one of them leaves 2 matches (2/3), dropping another leaves 3 (1):
    # (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert scorers.vqa_accuracy("two", gt) == pytest.approx(0.9)
    # c = 2 ("3" and "three"): (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert scorers.vqa_accuracy("3", gt) == pytest.approx(0.6)
    # c = 1: (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert scorers.vqa_accuracy("Four.", gt) == pytest.approx(0.3)
    assert scorers.vqa_accuracy("nine", gt) == 0.0
    # c = 4 or more: every subset of 9 has at least 3 matches: 1
    assert scorers.vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0
    result = scorers.score_vqa({"q1": "two", "q2": "nine"}, {"q1": gt, "q2": gt, "q3": gt})
    # (0.9 + 0 + 0 (q3 unanswered)) / 3
    assert result == {"accuracy": pytest.approx(0.3), "count": 3, "missing": 1}


def test_vqa_accuracy_matches_official_evaluator():
    evaluator = official_module("m4c_evaluator").TextVQAAccuracyEvaluator()
    rng = random.Random(3)
    vocab = ["2", "two", "Two.", "yes", "Yes", "no", "a dog", "dog", "the dog", "dogs", "red", "Red!", "3.5"]
    entries = [{"pred_answer": rng.choice(vocab),
                "gt_answers": [rng.choice(vocab[:rng.randint(1, 13)]) for _ in range(10)]} for _ in range(61)]
    with contextlib.redirect_stderr(io.StringIO()):
        for entry in entries:
            expected = evaluator.eval_pred_list([entry])
            assert scorers.vqa_accuracy(entry["pred_answer"], entry["gt_answers"]) == pytest.approx(expected), entry
        expected_mean = evaluator.eval_pred_list(entries)
    predictions = {str(i): e["pred_answer"] for i, e in enumerate(entries)}
    gt = {str(i): e["gt_answers"] for i, e in enumerate(entries)}
    assert scorers.score_vqa(predictions, gt)["accuracy"] == pytest.approx(expected_mean)


def test_load_vqa_annotations_layouts(tmp_path):
    vqav2 = tmp_path / "vqav2.json"
    vqav2.write_text(json.dumps({"annotations": [
        {"question_id": 5, "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": 1}]}]}))
    textvqa = tmp_path / "textvqa.json"
    textvqa.write_text(json.dumps({"data": [{"question_id": 6, "image_id": "abc", "answers": ["nokia"]}]}))
    vizwiz = tmp_path / "vizwiz.json"
    vizwiz.write_text(json.dumps([{"image": "VizWiz_val_0.jpg", "answers": [{"answer": "unanswerable"}]}]))
    assert scorers.load_vqa_annotations(vqav2) == {"5": ["yes"]}
    assert scorers.load_vqa_annotations(textvqa) == {"6": ["nokia"]}
    assert scorers.load_vqa_annotations(vizwiz, id_field="image") == {"VizWiz_val_0.jpg": ["unanswerable"]}
    with pytest.raises(ValueError, match=r"vizwiz.json: annotation #1: needs 'question_id'"):
        scorers.load_vqa_annotations(vizwiz)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": 1, "answers": []}])
    with pytest.raises(ValueError, match=r"bad.jsonl: annotation #1: 'answers' must be a non-empty list"):
        scorers.load_vqa_annotations(bad)
    no_answer_key = write_jsonl(tmp_path / "bad2.jsonl", [{"question_id": 1, "answers": [{"text": "x"}]}])
    with pytest.raises(ValueError, match=r"bad2.jsonl: annotation #1: 'answers' must be a non-empty list"):
        scorers.load_vqa_annotations(no_answer_key)


def test_vqa_submission_files(tmp_path):
    questions = write_jsonl(tmp_path / "test-dev.jsonl", [
        {"question_id": 3, "image": "COCO_test2015_3.jpg", "text": "How many?"},
        {"question_id": 1, "image": "COCO_test2015_1.jpg", "text": "What color?"},
        {"question_id": 2, "image": "COCO_test2015_2.jpg", "text": "Is it?"}])
    answers = write_jsonl(tmp_path / "answers.jsonl", answer_lines({1: "The Red one.", 3: "Two"}))
    # Question-file order, answers normalized ("The Red one." -> "red 1"), the unanswered question 2 empty.
    assert scorers.vqa_submission(answers, questions) == [
        {"question_id": 3, "answer": "2"}, {"question_id": 1, "answer": "red 1"}, {"question_id": 2, "answer": ""}]
    with pytest.raises(ValueError, match="no answer to question 2; VizWiz needs every question answered"):
        scorers.vqa_submission(answers, questions, "vizwiz")
    full = write_jsonl(tmp_path / "full.jsonl", answer_lines({1: "Unanswerable", 2: "yes", 3: "A can."}))
    assert scorers.vqa_submission(full, questions, "vizwiz") == [
        {"image": "COCO_test2015_3.jpg", "answer": "can"}, {"image": "COCO_test2015_1.jpg", "answer": "unanswerable"},
        {"image": "COCO_test2015_2.jpg", "answer": "yes"}]
    upload = tmp_path / "upload.json"
    summary = run_cli(["vqa-submission", "--answers", str(answers), "--questions", str(questions),
                       "--upload", str(upload)])
    assert summary == {"upload": str(upload), "questions": 3, "empty_answers": 1}
    assert json.loads(upload.read_text()) == scorers.vqa_submission(answers, questions)


TEXTVQA_SUFFIX = "Answer the question using a single word or phrase."


def test_textvqa_question_from_official_prompts():
    assert scorers.textvqa_question(f"What brand is this?\n{TEXTVQA_SUFFIX}") == "what brand is this?"
    with_ocr = f"What Brand?\nReference OCR token: NOKIA, 3310\n{TEXTVQA_SUFFIX}"
    assert scorers.textvqa_question(with_ocr) == "what brand?"
    assert scorers.textvqa_question(f"Reference OCR token: a\nWhat Is It?\n{TEXTVQA_SUFFIX}") == "what is it?"
    assert scorers.textvqa_question("OCR tokens: a b. Question: Which One? Short answer:") == "which one?"
    with pytest.raises(ValueError, match="not a TextVQA prompt"):
        scorers.textvqa_question("one line only")


def test_textvqa_matches_official_eval_single(tmp_path, monkeypatch):
    # eval_textvqa.py imports llava.eval.m4c_evaluator: serve it without running llava/__init__.py.
    m4c = official_module("m4c_evaluator")
    for name in ("llava", "llava.eval"):
        monkeypatch.setitem(sys.modules, name, type(sys)(name))
    monkeypatch.setitem(sys.modules, "llava.eval.m4c_evaluator", m4c)
    eval_textvqa = official_module("eval_textvqa")

    rng = random.Random(11)
    vocab = ["nokia", "Nokia.", "samsung", "the sign", "sign", "3", "three", "stop", "STOP!"]
    data, answers = [], []
    for i in range(17):
        image_id, question = f"img{i // 3}", f"What is written #{i}?"  # 3 questions per image
        data.append({"image_id": image_id, "question": question, "question_id": 1000 + i,
                     "answers": [rng.choice(vocab) for _ in range(10)]})
        ocr = "\nReference OCR token: NOKIA" if i % 2 else ""
        answers.append({"question_id": image_id, "prompt": f"{question}{ocr}\n{TEXTVQA_SUFFIX}",
                        "text": rng.choice(vocab)})
    annotations = tmp_path / "TextVQA_0.5.1_val.json"
    annotations.write_text(json.dumps({"data": data}))
    answers_path = write_jsonl(tmp_path / "answers.jsonl", answers)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        eval_textvqa.eval_single(str(annotations), str(answers_path))
        official = m4c.TextVQAAccuracyEvaluator().eval_pred_list(
            [{"pred_answer": a["text"], "gt_answers": d["answers"]} for a, d in zip(answers, data)])
    ours = scorers.score_textvqa_files(answers_path, annotations)
    assert ours["count"] == 17
    assert f"Samples: 17\nAccuracy: {100 * ours['accuracy']:.2f}%" in printed.getvalue()
    assert ours["accuracy"] == pytest.approx(official)
    assert run_cli(["textvqa", "--answers", str(answers_path), "--annotations", str(annotations)]) == ours


# ---------------------------------------------------------------- GQA


def test_score_gqa_hand_worked():
    questions = {
        "1": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
        "2": {"answer": "left", "isBalanced": True, "types": {"structural": "query"}},
        "3": {"answer": "red", "isBalanced": True, "types": {"structural": "query"}},
        "4": {"answer": "no", "isBalanced": True, "types": {"structural": "logical"}},
        "5": {"answer": "cat", "isBalanced": False, "types": {"structural": "query"}},  # not scored
        "6": {"answer": "table", "isBalanced": True, "types": {"structural": "query"}},
    }
    predictions = {"1": "Yes.", "2": "Left", "3": "dark red", "4": "yes", "5": "cat", "6": "Table.."}
    # Normalized: yes (right), left (right), dark red (wrong), yes (wrong), table (right; both periods go).
    result = scorers.score_gqa(predictions, questions)
    assert result["accuracy"] == 3 / 5 and result["count"] == 5 and result["missing"] == 0
    assert result["binary"] == 1 / 2   # 1 right, 4 wrong
    assert result["open"] == 2 / 3     # 2 right, 3 wrong, 6 right
    del predictions["6"]
    assert scorers.score_gqa(predictions, questions)["accuracy"] == 2 / 5
    assert scorers.normalize_gqa_prediction(" The Dog.") == " the dog"  # nothing else is normalized


def test_gqa_files_official_and_jsonl_layouts(tmp_path):
    official = tmp_path / "testdev_balanced_questions.json"
    official.write_text(json.dumps({"201": {"answer": "no", "isBalanced": True, "types": {"structural": "verify"}},
                                    "202": {"answer": "blue", "isBalanced": True, "types": {"structural": "query"}}}))
    answers = write_jsonl(tmp_path / "a.jsonl", answer_lines({"201": "No", "202": "Green."}))
    assert scorers.score_gqa_files(answers, official) == {"accuracy": 0.5, "binary": 1.0, "open": 0.0,
                                                          "count": 2, "missing": 0}
    simple = write_jsonl(tmp_path / "gqa.jsonl", [{"question_id": 201, "answer": "no"},
                                                  {"question_id": 202, "answer": "green"}])
    assert scorers.score_gqa_files(answers, simple) == {"accuracy": 1.0, "count": 2, "missing": 0}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": 1, "answer": 3}])
    with pytest.raises(ValueError, match=r"bad.jsonl: question '1' needs a string 'answer'"):
        scorers.score_gqa_files(answers, bad)


# ---------------------------------------------------------------- MME


@pytest.mark.parametrize("text, answer", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No, it is not.", "no"), ("Nope", "no"),
    ("It is yes", "other"),  # "yes" only counts within the first 4 characters
    ("I don't know", "other"), ("", "other"), ("Not sure", "no"),
])
def test_parse_mme_answer(text, answer):
    assert scorers.parse_mme_answer(text) == answer


def test_score_mme_hand_worked():
    def rec(category, image, gold, text):
        return {"category": category, "image": image, "answer": gold, "text": text}

    records = [
        # existence: 3 images, 6 questions
        rec("existence", "1.jpg", "Yes", "Yes"), rec("existence", "1.jpg", "No", "No"),        # both right
        rec("existence", "2.jpg", "Yes", "Yes"), rec("existence", "2.jpg", "No", "Yes"),       # one right
        rec("existence", "3.jpg", "Yes", "Maybe"), rec("existence", "3.jpg", "No", "No"),      # one right
        # count: 1 image, both right
        rec("count", "9.jpg", "No", "No."), rec("count", "9.jpg", "Yes", "Yes, two."),
        # code_reasoning (cognition): 2 images, 2 + 0 right
        rec("code_reasoning", "a.png", "Yes", "yes"), rec("code_reasoning", "a.png", "No", "no"),
        rec("code_reasoning", "b.png", "Yes", "no"), rec("code_reasoning", "b.png", "No", "yes"),
    ]
    result = scorers.score_mme(records)
    existence = result["categories"]["existence"]
    # accuracy 4 / 6, accuracy+ 1 / 3 images: score 100 * 4/6 + 100 * 1/3 = 100
    assert existence["accuracy"] == pytest.approx(4 / 6) and existence["accuracy_plus"] == pytest.approx(1 / 3)
    assert existence["score"] == pytest.approx(100.0) and existence["other"] == 1
    assert (existence["questions"], existence["images"]) == (6, 3)
    assert result["categories"]["count"]["score"] == 200.0                # 100 + 100
    assert result["categories"]["code_reasoning"]["score"] == pytest.approx(100 * 2 / 4 + 100 * 1 / 2)  # 100
    assert result["perception"] == pytest.approx(300.0) and result["cognition"] == pytest.approx(100.0)
    assert "position" in result["missing_categories"] and "existence" not in result["missing_categories"]
    with pytest.raises(ValueError, match=r"MME count/x.jpg: gold answer must be yes or no, got 'maybe'"):
        scorers.score_mme([rec("count", "x.jpg", "maybe", "yes")])


def mme_benchmark(tmp_path):
    """A tiny MME_Benchmark_release_version: `artwork` with images/ + questions_answers_YN/, `OCR` flat."""
    root = tmp_path / "MME_Benchmark_release_version"
    (root / "artwork" / "images").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN").mkdir()
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by X? Please answer yes or no.\tYes\n"
        "Is this artwork created by Y? Please answer yes or no.\tNo\n")
    (root / "OCR").mkdir()
    (root / "OCR" / "0001.txt").write_text(
        "Is the word in the logo \"A\"?  Please answer yes or no.\tYes\n"   # two spaces, as in the release
        "Is the word in the logo \"B\"?  Please answer yes or no.\tNo\n")
    return root


def test_mme_files_match_questions_like_the_official_conversion(tmp_path):
    root = mme_benchmark(tmp_path)
    suffix = "\nAnswer the question using a single word or phrase."
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "artwork/10002.jpg", "prompt": "Is this artwork created by X?" + suffix, "text": "Yes"},
        {"question_id": "artwork/10002.jpg", "prompt": "Is this artwork created by Y? Please answer yes or no.",
         "text": "Yes"},
        {"question_id": "OCR/0001.jpg", "prompt": "Is the word in the logo \"A\"?" + suffix, "text": "Yes"},
        {"question_id": "OCR/0001.jpg", "prompt": "Is the word in the logo \"B\"?", "text": "No"},
    ])
    # The two questions of an image share its id; each is matched on its text (the instruction suffix
    # dropped, "Please answer yes or no." added with one or, as the release has it for OCR, two spaces).
    records = scorers.mme_records(scorers.load_answers(answers), scorers.load_mme_ground_truth(root))
    assert [r["answer"] for r in records] == ["Yes", "No", "Yes", "No"]
    result = scorers.score_mme_files(answers, root)
    # artwork: 1 of 2 right, the image not fully right: 50 + 0; OCR: 2 of 2 right: 100 + 100.
    assert result["categories"]["artwork"]["score"] == 50.0
    assert result["categories"]["OCR"]["score"] == 200.0
    assert result["perception"] == 250.0 and result["cognition"] == 0


def test_mme_errors_name_the_question(tmp_path):
    root = mme_benchmark(tmp_path)
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "artwork/10002.jpg", "prompt": "Is this a cat?", "text": "Yes"}])
    with pytest.raises(ValueError, match=r"MME answer 'artwork/10002.jpg': no ground truth for question "
                                         r"'Is this a cat\?  Please answer yes or no.' in artwork/10002.txt"):
        scorers.score_mme_files(answers, root)
    (root / "OCR" / "0001.txt").write_text("no tab here\n")
    with pytest.raises(ValueError, match=r"0001.txt:1: expected 'question<TAB>answer'"):
        scorers.load_mme_ground_truth(root)


def test_sharded_runner_output_scores_like_a_single_run(tmp_path):
    from llava_jax.infer import questions as qa

    root = mme_benchmark(tmp_path)
    question_file = write_jsonl(tmp_path / "llava_mme.jsonl", [
        {"question_id": "artwork/10002.jpg", "image": "artwork/images/10002.jpg",
         "text": f"Is this artwork created by {who}? Please answer yes or no.\n{TEXTVQA_SUFFIX}"} for who in "XY"
    ] + [{"question_id": "OCR/0001.jpg", "image": "OCR/0001.jpg", "text": f"Is the word in the logo \"{w}\"?"}
         for w in "AB"])
    questions = qa.load_questions(question_file)

    def always_yes(batch):  # stand-in for the model
        return ["Yes"] * len(batch)

    out = tmp_path / "answers" / "mme.jsonl"
    for index in range(3):
        qa.run_questions(questions, always_yes, out, batch_size=1, model_id="m", process_index=index,
                         process_count=3, progress=False)
    assert qa.merge_answers(out, questions) == 4
    result = scorers.score_mme_files(out, root)
    # Each image: gold Yes (right) and No (wrong): accuracy 1/2, accuracy+ 0 -> 50 points per category.
    assert result["categories"]["artwork"]["score"] == 50.0 and result["categories"]["OCR"]["score"] == 50.0
    assert result["perception"] == 100.0


# ---------------------------------------------------------------- CLI


def test_cli_scienceqa_and_output_file(tmp_path):
    base = tmp_path / "sqa"
    base.mkdir()
    (base / "problems.json").write_text(json.dumps(scienceqa_problems()))
    (base / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4"]}))
    answers = write_jsonl(tmp_path / "a.jsonl", answer_lines({"1": "A", "2": "A", "3": "B", "4": "B"}))
    out = tmp_path / "metrics.json"
    result = run_cli(["scienceqa", "--answers", str(answers), "--base-dir", str(base), "--output", str(out)])
    # right: 1 (A), 3 (B), 4 (B); wrong: 2 (answer C). Images: 1, 2, 4 -> 2 of 3.
    assert result["accuracy"] == 3 / 4 and result["img_accuracy"] == 2 / 3
    assert json.loads(out.read_text()) == result


def test_cli_other_benchmarks(tmp_path):
    questions, annotation_dir, answers_path, _ = pope_files(tmp_path)
    pope = run_cli(["pope", "--answers", str(answers_path), "--questions", str(questions),
                    "--annotation-dir", str(annotation_dir)])
    assert pope == scorers.score_pope_files(answers_path, questions, annotation_dir)

    gt = write_jsonl(tmp_path / "vqa.jsonl", [{"question_id": 1, "answers": ["Two"] * 10}])
    vqa_answers = write_jsonl(tmp_path / "vqa_answers.jsonl", answer_lines({1: "2"}))
    assert run_cli(["vqa", "--answers", str(vqa_answers), "--annotations", str(gt)])["accuracy"] == 1.0

    gqa = write_jsonl(tmp_path / "gqa.jsonl", [{"question_id": 1, "answer": "two"}])
    assert run_cli(["gqa", "--answers", str(vqa_answers), "--questions", str(gqa)])["accuracy"] == 0.0

    root = mme_benchmark(tmp_path)
    mme_answers = write_jsonl(tmp_path / "mme.jsonl", [
        {"question_id": "OCR/0001.jpg", "prompt": "Is the word in the logo \"A\"?", "text": "Yes"}])
    assert run_cli(["mme", "--answers", str(mme_answers), "--benchmark-dir", str(root)])["perception"] == 200.0


def test_cli_reports_bad_input_by_file_and_line(tmp_path):
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"question_id": 1, "text": "x"}\n{"question_id": 2}\n')
    gqa = write_jsonl(tmp_path / "gqa.jsonl", [{"question_id": 1, "answer": "x"}])
    with pytest.raises(SystemExit, match=rf"error: {answers}:2: missing field 'text'"):
        score_cli.main(["gqa", "--answers", str(answers), "--questions", str(gqa)])
