"""Benchmark scorers with the answer normalization of the official LLaVA evaluation.

Each benchmark has a pure function over in-memory predictions (`score_*`) and a file-level entry point
(`score_*_files`) over an answer JSONL written by `run_questions` and the benchmark's own annotation
files, used by `python -m llava_jax.infer.score`. Accuracies are fractions in [0, 1]; MME scores are the
official points (accuracy + accuracy+ in percent, at most 200 per category). A question without an
answer counts as wrong and is reported under `missing`.

References reproduced here:
- ScienceQA: `llava/eval/eval_science_qa.py` (letter parsing; IMG = problems with an image).
- POPE: `llava/eval/eval_pope.py` (first sentence, "no"/"not"/"No" means no).
- VQAv2 / TextVQA / VizWiz: `EvalAIAnswerProcessor` and `TextVQAAccuracyEvaluator` of
  `llava/eval/m4c_evaluator.py`: the answer is scored against each of the 10 leave-one-annotator-out
  subsets of 9 answers as min(#matches / 3, 1), and the 10 scores are averaged. Both the prediction and
  the annotators' answers are normalized. TextVQA answers can also be matched to annotations on
  (image id, question) as `llava/eval/eval_textvqa.py` does. (VQAv2 test-dev and VizWiz test are scored
  by their EvalAI servers; these scorers serve the val splits.)
- GQA: `scripts/convert_gqa_for_eval.py` (prediction.rstrip(".").lower()) then exact match as in the GQA
  `eval.py` (balanced questions; binary / open by structural type).
- MME: `convert_answer_to_mme.py` (ground-truth lookup) and the MME `calculation.py` (yes/no parsing,
  accuracy and accuracy+ per category, perception and cognition totals).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llava_jax.atomic_files import write_text
from llava_jax.infer.questions import ANSWER_FIELDS, load_questions, read_jsonl

PathLike = str | os.PathLike


# ---------------------------------------------------------------- shared IO


def load_json(path: PathLike) -> Any:
    """Reads a JSON file; a malformed file is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def load_answers(path: PathLike) -> list[dict]:
    """Reads an answer JSONL; every line needs `question_id` and `text`."""
    return read_jsonl(path, ANSWER_FIELDS)


def predictions_by_id(answers: Sequence[dict], source: PathLike = "answers") -> dict[str, str]:
    """question_id (as a string, so 7 and "7" match) -> answer text; an id answered twice is an error."""
    predictions = {str(a["question_id"]): a["text"] for a in answers}
    if len(predictions) != len(answers):
        repeated = [qid for qid, n in Counter(str(a["question_id"]) for a in answers).items() if n > 1]
        raise ValueError(f"{source}: question_id answered more than once: {repeated[:10]}")
    return predictions


def _fraction(numerator: float, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


# ---------------------------------------------------------------- ScienceQA

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_scienceqa_letter(text: str, options: Sequence[str] = SCIENCEQA_OPTIONS) -> str | None:
    """The option letter of an answer: "B", "B. cat" or a single "The answer is B." (else None)."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def score_scienceqa(predictions: Mapping[str, str], problems: Mapping[str, dict], split_ids: Sequence[str],
                    options: Sequence[str] = SCIENCEQA_OPTIONS) -> dict:
    """Option-letter accuracy over `split_ids`, overall and on the problems with an image (IMG).

    Args:
      predictions: problem id -> answer text.
      problems: `problems.json`: id -> {"choices": [...], "answer": index, "image": file or None}.
      split_ids: the problem ids of the split (`pid_splits.json[split]`).
    """
    correct = img_correct = img_count = 0
    parsed = {}
    for pid in split_ids:
        problem = problems[pid]
        letter = parse_scienceqa_letter(predictions[pid], options) if pid in predictions else None
        parsed[pid] = letter
        hit = letter in options[:len(problem["choices"])] and options.index(letter) == problem["answer"]
        correct += hit
        if problem.get("image"):
            img_count += 1
            img_correct += hit
    return {
        "accuracy": _fraction(correct, len(split_ids)), "correct": correct, "count": len(split_ids),
        "img_accuracy": _fraction(img_correct, img_count), "img_correct": img_correct, "img_count": img_count,
        "missing": sum(pid not in predictions for pid in split_ids), "parsed": parsed,
    }


def score_scienceqa_files(answers_path: PathLike, base_dir: PathLike, split: str = "test") -> dict:
    """Scores an answer file against `base_dir/problems.json` and `base_dir/pid_splits.json`."""
    base_dir = Path(base_dir)
    problems = load_json(base_dir / "problems.json")
    splits = load_json(base_dir / "pid_splits.json")
    if split not in splits:
        raise ValueError(f"{base_dir / 'pid_splits.json'}: no split {split!r} (has {sorted(splits)})")
    split_ids = [str(pid) for pid in splits[split]]
    problems_path = base_dir / "problems.json"
    for pid in split_ids:
        problem = problems.get(pid)
        if problem is None:
            raise ValueError(f"{problems_path}: split {split!r} lists problem {pid!r}, which is absent")
        if not isinstance(problem.get("choices"), list) or not isinstance(problem.get("answer"), int):
            raise ValueError(f"{problems_path}: problem {pid!r} needs a 'choices' list and an int 'answer'")
    return score_scienceqa(predictions_by_id(load_answers(answers_path), answers_path), problems, split_ids)


# ---------------------------------------------------------------- POPE


def parse_pope_answer(text: str) -> str:
    """"yes" or "no": only the first sentence counts, and "No" / "no" / "not" as a word means no."""
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def score_pope(texts: Sequence[str], labels: Sequence[str]) -> dict:
    """Binary metrics with "yes" as the positive class; `texts[i]` answers the question of `labels[i]`.

    Precision (recall, F1) is 0 when nothing is predicted (labelled, found) positive.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} answers for {len(labels)} labels")
    preds = [parse_pope_answer(t) == "yes" for t in texts]
    gold = [label == "yes" for label in labels]
    tp = sum(p and g for p, g in zip(preds, gold))
    fp = sum(p and not g for p, g in zip(preds, gold))
    tn = sum(not p and not g for p, g in zip(preds, gold))
    fn = sum(not p and g for p, g in zip(preds, gold))
    precision, recall = _fraction(tp, tp + fp), _fraction(tp, tp + fn)
    return {
        "accuracy": _fraction(tp + tn, len(preds)), "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": _fraction(sum(preds), len(preds)), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "count": len(preds),
    }


def score_pope_files(answers_path: PathLike, questions_path: PathLike, annotation_dir: PathLike) -> dict[str, dict]:
    """POPE metrics per split, like `eval_pope.py`.

    Each `annotation_dir/coco_pope_{split}.json` (JSONL with a "yes"/"no" `label`) is matched in order with
    the questions of category `split` in the question file; answers are put in question-file order first,
    so a resumed or sharded answer file scores the same.
    """
    questions = load_questions(questions_path)
    position = {str(q["question_id"]): i for i, q in enumerate(questions)}
    answers = load_answers(answers_path)
    predictions_by_id(answers, answers_path)  # ids must be unique
    unknown = [a["question_id"] for a in answers if str(a["question_id"]) not in position]
    if unknown:
        raise ValueError(f"{answers_path}: answers to question ids not in {questions_path}: {unknown[:10]}")
    answers.sort(key=lambda a: position[str(a["question_id"])])
    label_files = sorted(Path(annotation_dir).glob("coco_pope_*.json"))
    if not label_files:
        raise ValueError(f"{annotation_dir}: no coco_pope_<split>.json annotation files")
    results = {}
    for label_file in label_files:
        split = label_file.name[len("coco_pope_"):-len(".json")]
        labels = _pope_labels(label_file)
        expected = [q["question_id"] for q in questions if q.get("category") == split]
        texts = [a["text"] for a in answers if questions[position[str(a["question_id"])]].get("category") == split]
        if len(texts) != len(labels) or len(expected) != len(labels):
            raise ValueError(f"POPE split {split!r}: {label_file} has {len(labels)} labels, {questions_path} "
                             f"{len(expected)} questions and {answers_path} {len(texts)} answers of that category")
        results[split] = score_pope(texts, labels)
    return results


def _pope_labels(path: Path) -> list[str]:
    labels = []
    for line_no, record in enumerate(read_jsonl(path, {"label": (str,)}), start=1):
        if record["label"] not in ("yes", "no"):
            raise ValueError(f"{path}: record {line_no}: label must be 'yes' or 'no', got {record['label']!r}")
        labels.append(record["label"])
    return labels


# ---------------------------------------------------------------- VQAv2 / TextVQA / VizWiz

# The standard VQA answer-normalization tables (EvalAI).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: drops every "." not followed by a digit
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The reference calls `PERIOD_STRIP.sub("", text, re.UNICODE)`, i.e. count=32: at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _strip_punctuation(text: str) -> str:
    """Removes punctuation next to a space (or anywhere when digits are comma-separated), else spaces it."""
    out = text
    digit_commas = _COMMA_STRIP.search(text) is not None
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or digit_commas:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI VQA normalization: lower case, punctuation, number words to digits, articles, contractions."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA soft accuracy of one answer against the annotators' answers (both normalized).

    For each annotator, the others' answers matching the prediction give min(matches / 3, 1); the result
    is the mean over annotators (the 10-choose-9 average for the usual 10 answers).
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in gt_answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


def score_vqa(predictions: Mapping[str, str], gt_answers: Mapping[str, Sequence[str]]) -> dict:
    """Mean VQA accuracy over every question in `gt_answers` (question id -> annotators' answers)."""
    scores = [vqa_accuracy(predictions[qid], answers) if qid in predictions else 0.0
              for qid, answers in gt_answers.items()]
    return {"accuracy": _fraction(sum(scores), len(scores)), "count": len(scores),
            "missing": sum(qid not in predictions for qid in gt_answers)}


def load_vqa_annotations(path: PathLike, id_field: str = "question_id") -> dict[str, list[str]]:
    """question id -> list of answer strings, from any of the common layouts.

    Accepts VQAv2 (`{"annotations": [...]}`), TextVQA (`{"data": [...]}`), VizWiz (a JSON list; use
    `id_field="image"`) or JSONL; answers are strings or `{"answer": str}` objects.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        records = read_jsonl(path)
    else:
        data = load_json(path)
        records = data.get("annotations", data.get("data")) if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a list of annotations, or an object with 'annotations' or 'data'")
    gt = {}
    for index, record in enumerate(records):
        where = f"{path}: annotation #{index + 1}"
        if not isinstance(record, dict) or id_field not in record or not isinstance(record.get("answers"), list):
            raise ValueError(f"{where}: needs {id_field!r} and an 'answers' list")
        answers = [a.get("answer") if isinstance(a, dict) else a for a in record["answers"]]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings or {{'answer': str}} objects")
        gt[str(record[id_field])] = answers
    return gt


def score_vqa_files(answers_path: PathLike, annotations_path: PathLike, id_field: str = "question_id") -> dict:
    """VQA accuracy of an answer file over the annotated questions."""
    return score_vqa(predictions_by_id(load_answers(answers_path), answers_path),
                     load_vqa_annotations(annotations_path, id_field))


def vqa_submission(answers_path: PathLike, questions_path: PathLike, style: str = "vqav2") -> list[dict]:
    """The EvalAI upload of an answer file: normalized answers in question-file order.

    `style` "vqav2": `[{"question_id", "answer"}]`, unanswered questions get "" (as LLaVA's
    `convert_vqav2_for_submission.py`); "vizwiz": `[{"image", "answer"}]`, every question must be answered.
    """
    if style not in ("vqav2", "vizwiz"):
        raise ValueError(f"unknown submission style {style!r} (vqav2 or vizwiz)")
    predictions = predictions_by_id(load_answers(answers_path), answers_path)
    upload = []
    for question in load_questions(questions_path):
        qid = question["question_id"]
        text = predictions.get(str(qid))
        if style == "vqav2":
            upload.append({"question_id": qid, "answer": "" if text is None else normalize_vqa_answer(text)})
            continue
        if text is None:
            raise ValueError(f"{answers_path}: no answer to question {qid!r}; VizWiz needs every question answered")
        if "image" not in question:
            raise ValueError(f"{questions_path}: question {qid!r} has no 'image', which VizWiz uploads key on")
        upload.append({"image": question["image"], "answer": normalize_vqa_answer(text)})
    return upload


_TEXTVQA_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def textvqa_question(prompt: str) -> str:
    """The lower-cased question inside an official LLaVA TextVQA prompt (with or without OCR tokens)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _TEXTVQA_OCR_QUESTION.search(prompt)
        if match is None:
            raise ValueError(f"TextVQA prompt with OCR tokens but no 'Question: ... Short answer:': {prompt!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"not a TextVQA prompt (question line, optional OCR line, instruction): {prompt!r}")
    return question.lower()


def score_textvqa_files(answers_path: PathLike, annotations_path: PathLike) -> dict:
    """VQA accuracy on TextVQA with the official LLaVA matching.

    The LLaVA TextVQA question file uses the image id as `question_id` (repeated across an image's
    questions), so answers are matched to `TextVQA_0.5.1_val.json` entries on (image_id, question in
    the prompt, lower-cased), as `eval_textvqa.py` does. Only the answered questions are scored.
    """
    annotations = load_json(annotations_path)
    if not isinstance(annotations, dict) or not isinstance(annotations.get("data"), list):
        raise ValueError(f"{annotations_path}: expected a TextVQA annotation file ({{'data': [...]}})")
    gt = {(str(a["image_id"]), a["question"].lower()): a["answers"] for a in annotations["data"]}
    scores = []
    for answer in read_jsonl(answers_path, {**ANSWER_FIELDS, "prompt": (str,)}):
        key = (str(answer["question_id"]), textvqa_question(answer["prompt"]))
        if key not in gt:
            raise ValueError(f"{answers_path}: no annotation in {annotations_path} for image {key[0]!r}, "
                             f"question {key[1]!r}")
        scores.append(vqa_accuracy(answer["text"], gt[key]))
    return {"accuracy": _fraction(sum(scores), len(scores)), "count": len(scores)}


# ---------------------------------------------------------------- GQA


def normalize_gqa_prediction(text: str) -> str:
    """Trailing periods off, lower case; the gold answer is compared as is."""
    return text.rstrip(".").lower()


def score_gqa(predictions: Mapping[str, str], questions: Mapping[str, dict]) -> dict:
    """Exact-match accuracy over the balanced questions, also split into binary and open.

    Args:
      predictions: question id -> answer text.
      questions: id -> {"answer", optional "isBalanced" (default true), optional "types": {"structural"}};
        structural type "query" is open, any other binary.
    """
    hits: dict[str, list[bool]] = defaultdict(list)
    for qid, question in questions.items():
        if not question.get("isBalanced", True):
            continue
        hit = qid in predictions and normalize_gqa_prediction(predictions[qid]) == question["answer"]
        hits["accuracy"].append(hit)
        structural = question.get("types", {}).get("structural")
        if structural is not None:
            hits["open" if structural == "query" else "binary"].append(hit)
    result = {name: _fraction(sum(v), len(v)) for name, v in hits.items()}
    result.setdefault("accuracy", 0.0)
    result["count"] = len(hits["accuracy"])
    result["missing"] = sum(q.get("isBalanced", True) and qid not in predictions for qid, q in questions.items())
    return result


def load_gqa_questions(path: PathLike) -> dict[str, dict]:
    """GQA questions: the official `{id: {...}}` JSON, or a JSON list / JSONL of `{"question_id", "answer"}`."""
    path = Path(path)
    data = read_jsonl(path) if path.suffix == ".jsonl" else load_json(path)
    if isinstance(data, list):
        for index, record in enumerate(data):
            if not isinstance(record, dict) or "question_id" not in record:
                raise ValueError(f"{path}: question #{index + 1} has no 'question_id'")
        data = {str(record["question_id"]): record for record in data}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of questions by id, or a list of questions")
    for qid, question in data.items():
        if not isinstance(question, dict) or not isinstance(question.get("answer"), str):
            raise ValueError(f"{path}: question {qid!r} needs a string 'answer'")
    return {str(qid): q for qid, q in data.items()}


def score_gqa_files(answers_path: PathLike, questions_path: PathLike) -> dict:
    return score_gqa(predictions_by_id(load_answers(answers_path), answers_path), load_gqa_questions(questions_path))


# ---------------------------------------------------------------- MME

MME_CATEGORIES = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
_SINGLE_WORD_PROMPT = "Answer the question using a single word or phrase."
_YES_NO_PROMPT = "Please answer yes or no."


def parse_mme_answer(text: str) -> str:
    """"yes", "no" or "other": the whole answer, else "yes" / "no" within its first 4 characters."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def score_mme(records: Iterable[Mapping[str, str]]) -> dict:
    """MME accuracy and accuracy+ per category and the perception / cognition totals.

    Args:
      records: {"category", "image", "answer" (gold "yes"/"no"), "text" (the model's answer)} per question.
        accuracy+ is the fraction of images whose questions (2 each in MME) are all answered right.

    Returns:
      {"categories": {name: {"accuracy", "accuracy_plus", "score" (= 100 * (accuracy + accuracy+)),
      "questions", "images", "other" (answers neither yes nor no)}}, "perception", "cognition" (sums of
      the scores of the categories present), "missing_categories"}.
    """
    by_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    other: Counter = Counter()
    for r in records:
        gold, pred = r["answer"].lower(), parse_mme_answer(r["text"])
        if gold not in ("yes", "no"):
            raise ValueError(f"MME {r['category']}/{r['image']}: gold answer must be yes or no, got {r['answer']!r}")
        by_image[r["category"]][r["image"]].append(pred == gold)
        other[r["category"]] += pred == "other"
    categories = {}
    for name, images in by_image.items():
        hits = [hit for image_hits in images.values() for hit in image_hits]
        accuracy = sum(hits) / len(hits)
        accuracy_plus = sum(all(h) for h in images.values()) / len(images)
        categories[name] = {"accuracy": accuracy, "accuracy_plus": accuracy_plus,
                            "score": 100 * accuracy + 100 * accuracy_plus, "questions": len(hits),
                            "images": len(images), "other": other[name]}
    totals = {kind: sum(categories[c]["score"] for c in names if c in categories)
              for kind, names in MME_CATEGORIES.items()}
    missing = [c for names in MME_CATEGORIES.values() for c in names if c not in categories]
    return {"categories": categories, **totals, "missing_categories": missing}


def load_mme_ground_truth(benchmark_dir: PathLike) -> dict[tuple[str, str, str], str]:
    """(category, question file name, question) -> "Yes"/"No", from `MME_Benchmark_release_version`.

    A category folder holds `<image>.txt` files of `question<TAB>answer` lines, either next to the
    images or in `questions_answers_YN/` (when the images are in `images/`).
    """
    gt = {}
    for category_dir in sorted(p for p in Path(benchmark_dir).iterdir() if p.is_dir()):
        qa_dir = category_dir / "questions_answers_YN" if (category_dir / "images").exists() else category_dir
        if not qa_dir.is_dir():
            raise ValueError(f"{category_dir}: has images/ but no questions_answers_YN/")
        for qa_file in sorted(qa_dir.glob("*.txt")):
            for line_no, line in enumerate(qa_file.read_text(encoding="utf-8").split("\n"), start=1):
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                if len(fields) != 2:
                    raise ValueError(f"{qa_file}:{line_no}: expected 'question<TAB>answer', got {line!r}")
                gt[(category_dir.name, qa_file.name, fields[0])] = fields[1]
    if not gt:
        raise ValueError(f"{benchmark_dir}: no MME question files found")
    return gt


def mme_records(answers: Iterable[dict], ground_truth: Mapping[tuple[str, str, str], str]) -> list[dict]:
    """Joins answers (question_id "category/image.ext", prompt = question) with the ground truth.

    The image of a record is the id's file name up to its first "." (the official question files give
    both questions of an image the same id).

    The prompt is matched as the official conversion does: the single-word instruction is removed and
    "Please answer yes or no." appended when absent (with one or two spaces before it).
    """
    records = []
    for answer in answers:
        qid = str(answer["question_id"])
        category, image = qid.split("/")[0], qid.split("/")[-1].split(".")[0]
        qa_file = image + ".txt"
        key = (category, qa_file, _mme_question(answer.get("prompt", ""), category, qa_file, ground_truth))
        if key not in ground_truth:
            raise ValueError(f"MME answer {qid!r}: no ground truth for question {key[2]!r} in {category}/{qa_file}")
        records.append({"category": category, "image": image, "answer": ground_truth[key], "text": answer["text"]})
    return records


def _mme_question(prompt: str, category: str, qa_file: str, ground_truth: Mapping) -> str:
    if _SINGLE_WORD_PROMPT in prompt:
        prompt = prompt.replace(_SINGLE_WORD_PROMPT, "").strip()
    if _YES_NO_PROMPT not in prompt:
        prompt = f"{prompt} {_YES_NO_PROMPT}"
        if (category, qa_file, prompt) not in ground_truth:
            prompt = prompt.replace(f" {_YES_NO_PROMPT}", f"  {_YES_NO_PROMPT}")
    return prompt


def score_mme_files(answers_path: PathLike, benchmark_dir: PathLike) -> dict:
    return score_mme(mme_records(load_answers(answers_path), load_mme_ground_truth(benchmark_dir)))


# ---------------------------------------------------------------- SEED-Bench


def load_seed_annotations(path: PathLike) -> tuple[list[dict], dict[int, str]]:
    """(questions, question_type_id -> name) of `SEED-Bench.json`."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list) \
            or not isinstance(data.get("question_type"), dict):
        raise ValueError(f"{path}: expected SEED-Bench.json ({{'questions': [...], 'question_type': {{...}}}})")
    for index, question in enumerate(data["questions"]):
        if not all(k in question for k in ("question_id", "answer", "data_type", "question_type_id")):
            raise ValueError(f"{path}: question #{index + 1} needs question_id, answer, data_type and question_type_id")
    return data["questions"], {type_id: name for name, type_id in data["question_type"].items()}


def score_seed(predictions: Mapping[str, str], questions: Sequence[dict], type_names: Mapping[int, str]) -> dict:
    """SEED-Bench accuracy as `convert_seed_for_submission.py`: the answer text must equal the gold letter.

    Returns {"accuracy" (all questions), "image_accuracy", "video_accuracy", "by_type": {name: accuracy}
    (all data types), "count", "missing"}; a question without an answer counts as wrong.
    """
    by_type: dict[int, list[bool]] = defaultdict(list)
    by_data: dict[str, list[bool]] = defaultdict(list)
    for question in questions:
        qid = str(question["question_id"])
        hit = qid in predictions and predictions[qid] == question["answer"]
        by_type[question["question_type_id"]].append(hit)
        by_data[question["data_type"]].append(hit)
    hits = [h for v in by_type.values() for h in v]
    return {"accuracy": _fraction(sum(hits), len(hits)),
            "image_accuracy": _fraction(sum(by_data["image"]), len(by_data["image"])),
            "video_accuracy": _fraction(sum(by_data["video"]), len(by_data["video"])),
            "by_type": {type_names.get(t, str(t)): _fraction(sum(v), len(v)) for t, v in sorted(by_type.items())},
            "count": len(hits), "missing": sum(str(q["question_id"]) not in predictions for q in questions)}


def seed_submission(predictions: Mapping[str, str], questions: Sequence[dict]) -> list[dict]:
    """The upload lines `{"question_id", "prediction"}` in annotation order, for the answered questions."""
    return [{"question_id": q["question_id"], "prediction": predictions[str(q["question_id"])]}
            for q in questions if str(q["question_id"]) in predictions]


def score_seed_files(answers_path: PathLike, annotation_path: PathLike, upload_path: PathLike | None = None) -> dict:
    questions, type_names = load_seed_annotations(annotation_path)
    predictions = predictions_by_id(load_answers(answers_path), answers_path)
    result = score_seed(predictions, questions, type_names)
    if upload_path:
        lines = seed_submission(predictions, questions)
        write_text(upload_path, "".join(json.dumps(line) + "\n" for line in lines))
        result["upload"], result["uploaded"] = str(upload_path), len(lines)
    return result
