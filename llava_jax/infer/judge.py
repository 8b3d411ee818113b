"""GPT-judged benchmarks through any OpenAI-compatible endpoint: `python -m llava_jax.infer.judge` (or
`python -m llava_jax.judge`).

    python -m llava_jax.infer.judge llava-bench --questions questions.jsonl --context context.jsonl \\
        --reference answers_gpt4.jsonl --answers answers.jsonl --reviews reviews.jsonl [--rules rule.json] \\
        [--coco] --model gpt-4-0314 [--base-url URL]
    python -m llava_jax.infer.judge mm-vet --answers answers.jsonl --mm-vet mm-vet.json --grades grades.json \\
        --model gpt-4-0613 [--base-url URL]

LLaVA-Bench (`llava/eval/eval_gpt_review_bench.py`; `--coco`: the COCO set of `eval_gpt_review_visual.py`,
context = captions and boxes): for each question the judge reads the image's text context, the question,
the reference answer (Assistant 1, text-only GPT-4) and the model's (Assistant 2) under the rule of the
question's category, and gives two scores on the first line (`parse_score`). The review file has the
official layout, and the relative scores are those of `summarize_gpt_review.py`. The default rules are
ours (`judge_rules.json`, the official `rule.json` layout); pass the official file with `--rules`.

MM-Vet (the grader of `mm-vet_evaluator.py`): a few-shot prompt asks for the correctness (0.0 to 1.0) of
the prediction against the ground truth (`<AND>`: every element needed, `<OR>`: any one); an answer that
is not a number in [0, 1] is asked again with a digit request at temperatures 0, 0.5, 1.0, 1.5, then
scored 0. Scores are the mean correctness x 100 per capability, per capability combination and in total.

Replies are cached (`<output>.cache.sqlite`): a rerun after a kill or failure calls only what is missing.
Exit status 1 when some requests failed after their retries (rerun to retry them), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from llava_jax import cli
from llava_jax.atomic_files import write_text
from llava_jax.data.llm_client import ChatClient, add_client_arguments, client_from_args, failure_line
from llava_jax.infer.questions import read_jsonl
from llava_jax.infer.scorers import load_json

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
PathLike = str | os.PathLike


# ---------------------------------------------------------------- LLaVA-Bench


def default_rules_path() -> Path:
    return Path(str(resources.files("llava_jax.infer") / "judge_rules.json"))


def parse_score(review: str) -> list[float]:
    """The two scores on the first line ("8 6" or "8, 6"); [-1, -1] when it is not exactly two numbers."""
    try:
        fields = review.split("\n")[0].replace(",", " ").split(" ")
        return [float(fields[0]), float(fields[1])] if len(fields) == 2 else [-1, -1]
    except (ValueError, AttributeError):
        return [-1, -1]


def context_text(record: Mapping, coco: bool) -> str:
    """The image's text context: the caption(s) (In-the-Wild), or captions and boxes (COCO)."""
    if coco:
        boxes = "\n".join(f'{box["category"]}: {box["bbox"]}' for box in record["instances"])
        return "\n".join(record["captions"]) + "\n\n" + boxes
    caption = record["caption"]
    return "\n".join(caption) if isinstance(caption, list) else caption


def review_content(context: str, question: str, answer1: str, answer2: str, rule: Mapping) -> str:
    role, prompt = rule["role"], rule["prompt"]
    return (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
            f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
            f"[System]\n{prompt}\n\n")


def llava_bench_requests(client: ChatClient, questions: Sequence[dict], contexts: Sequence[dict],
                         reference: Sequence[dict], answers: Sequence[dict], rules: Mapping, *,
                         coco: bool = False, max_tokens: int = 1024) -> list[tuple[dict, dict]]:
    """(review without its judgement, judge request) per question, in question order.

    Answers are matched to questions by `question_id`; the review fields are the official ones.
    """
    by_image = {c["image"]: c for c in contexts}
    ref_by_id, ans_by_id = _by_question_id(reference, "reference"), _by_question_id(answers, "answers")
    items = []
    for index, question in enumerate(questions):
        qid = question["question_id"]
        if question.get("image") not in by_image:
            raise ValueError(f"question {qid!r}: no context for image {question.get('image')!r}")
        for name, table in (("reference", ref_by_id), ("answers", ans_by_id)):
            if str(qid) not in table:
                raise ValueError(f"question {qid!r}: not answered in the {name} file")
        ans1, ans2 = ref_by_id[str(qid)], ans_by_id[str(qid)]
        category = ("" if coco else "llava_bench_") + question["category"]
        if category not in rules:
            raise ValueError(f"question {qid!r}: category {category!r} not in the rule file (has {sorted(rules)})")
        try:
            context = context_text(by_image[question["image"]], coco)
        except (KeyError, TypeError):
            needs = "'captions' and 'instances' ({category, bbox})" if coco else "'caption'"
            raise ValueError(f"context of image {question['image']!r}: needs {needs}") from None
        content = review_content(context, question["text"], ans1["text"], ans2["text"], rules[category])
        review = {"id": index + 1, "question_id": qid, "answer1_id": ans1.get("answer_id", ans1["question_id"]),
                  "answer2_id": ans2.get("answer_id", ans2["question_id"]), "category": category}
        messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]
        items.append((review, client.request(messages, temperature=0.2, max_tokens=max_tokens)))
    return items


def _by_question_id(records: Sequence[dict], name: str) -> dict[str, dict]:
    table = {str(r["question_id"]): r for r in records}
    if len(table) != len(records):
        raise ValueError(f"{name}: a question_id appears more than once")
    return table


def judge_llava_bench(client: ChatClient, items: Sequence[tuple[dict, dict]], reviews_path: PathLike,
                      progress: bool = True) -> tuple[list[dict], int]:
    """Asks the judge for every item; writes the review JSONL (question order); returns (reviews, failed)."""
    reviews: list[dict | None] = [None] * len(items)
    failed = 0
    tagged = ((index, request) for index, (_, request) in enumerate(items))
    for index, reply in client.complete_all(tagged, desc="judging", total=len(items), progress=progress):
        if reply.error is not None:
            failed += 1
            continue
        reviews[index] = {**items[index][0], "content": reply.content, "tuple": parse_score(reply.content or "")}
    kept = [r for r in reviews if r is not None]
    write_text(reviews_path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept, failed


def summarize_reviews(reviews: Sequence[Mapping]) -> dict:
    """Relative scores as `summarize_gpt_review.py` prints them, per category and "all".

    Returns {category: {"relative": model mean / reference mean x 100 (1 decimal), "reference" and
    "model": mean score x 10 (1 decimal), "count", "unparsed" (reviews scored [-1, -1], which the official
    summary averages in as they are)}}. Means are rounded to 3 decimals first, as the official script does.
    """
    scores = defaultdict(list)
    for review in reviews:
        if "category" in review:
            scores[review["category"]].append(review["tuple"])
        scores["all"].append(review["tuple"] if "tuple" in review else review["score"])
    summary = {}
    for category, pairs in sorted(scores.items()):
        reference, model = (round(float(x), 3) for x in np.asarray(pairs, dtype=np.float64).mean(0))
        summary[category] = {"relative": round(model / reference * 100, 1), "reference": round(reference * 10, 1),
                             "model": round(model * 10, 1), "count": len(pairs),
                             "unparsed": sum(list(p) == [-1, -1] for p in pairs)}
    return summary


def summarize_review_file(path: PathLike) -> dict:
    return summarize_reviews(read_jsonl(path, {"question_id": (int, str), "tuple": (list,)}))


# ---------------------------------------------------------------- MM-Vet

MMVET_GRADER_PROMPT = """\
Rate how correct an AI model's prediction is compared with the ground truth. In the ground truth, <AND> means the prediction is fully correct only if it contains every listed element, and <OR> means it is fully correct if it contains any one of them. The correctness is one of 0.0 (wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9 or 1.0 (fully correct). Fill in only the last cell: the correctness of the last row.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
How many apples are on the plate? | 3 | There are three apples. | 1.0
How many apples are on the plate? | 3 | There are four apples. | 0.0
Which two colors does the flag have? | red <AND> white | The flag is red. | 0.5
Which two colors does the flag have? | red <AND> white | It is red and white. | 1.0
What is the sign's language? | French <OR> German | The sign is in German. | 1.0
Why is the photo funny? | A cat sits in a box far too small for it, yet looks perfectly comfortable, which contrasts with how cramped it must be. | The cat is in a box. | 0.3
Why is the photo funny? | A cat sits in a box far too small for it, yet looks perfectly comfortable, which contrasts with how cramped it must be. | It is funny because the cat has squeezed into a tiny box that clearly does not fit it, but acts as if it were a comfortable bed. | 1.0
"""
MMVET_RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
MMVET_RETRY_TEMPERATURES = (0.0, 0.5, 1.0, 1.5)


def mmvet_results(answers: Sequence[dict]) -> dict[str, str]:
    """The MM-Vet result file of an answer file: {"v1_<question_id>": text} (`convert_mmvet_for_eval.py`)."""
    return {f"v1_{a['question_id']}": a["text"] for a in answers}


def mmvet_query(prompt: str, item: Mapping, prediction: str) -> str:
    ground_truth = item["answer"].replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return prompt + "\n" + " | ".join([item["question"], ground_truth, prediction, ""])


def parse_correctness(content: str | None) -> float | None:
    """The first word as a number in [0, 1], else None."""
    try:
        score = float((content or "").split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def grade_mmvet(client: ChatClient, data: Mapping[str, dict], results: Mapping[str, str], *,
                prompt: str = MMVET_GRADER_PROMPT, progress: bool = True) -> tuple[dict, int]:
    """Grades every MM-Vet item; returns ({id: {"model", "content", "score"} (one run)}, failed requests).

    Round 0 asks every item at temperature 0; items whose answer is not a correctness are asked again
    with the digit request, round after round at the retry temperatures, then scored 0.
    """
    missing = [k for k in data if k not in results]
    if missing:
        raise ValueError(f"MM-Vet items without an answer: {missing[:10]} ({len(missing)} in all)")
    grades, failed, todo = {}, 0, list(data)
    order = {key: index for index, key in enumerate(data)}
    for round_index in range(1 + len(MMVET_RETRY_TEMPERATURES)):
        suffix, temperature = ("", 0.0) if round_index == 0 else (MMVET_RETRY_SUFFIX,
                                                                  MMVET_RETRY_TEMPERATURES[round_index - 1])
        tagged = ((key, client.request([{"role": "user", "content": mmvet_query(prompt, data[key], results[key])
                                         + suffix}], max_tokens=3, temperature=temperature)) for key in todo)
        retry = []
        for key, reply in client.complete_all(tagged, desc=f"grading (round {round_index})", total=len(todo),
                                              progress=progress):
            if reply.error is not None:
                failed += 1
                continue
            score = parse_correctness(reply.content)
            grades[key] = {"model": [client.model], "content": [reply.content], "score": [score or 0.0]}
            if score is None:
                retry.append(key)
        todo = sorted(retry, key=order.__getitem__)
    return {key: grades[key] for key in data if key in grades}, failed


def score_mmvet(data: Mapping[str, dict], grades: Mapping[str, dict]) -> dict:
    """Mean correctness x 100 (1 decimal) per capability, per capability combination and in total.

    As `export_result` of the MM-Vet evaluator (one run): an item counts in every capability it has, and
    the denominators are the item counts of the whole benchmark. Combinations are named by their sorted
    capabilities joined with "_".
    """
    counts, combo_counts = Counter(), Counter()
    sums, combo_sums = defaultdict(float), defaultdict(float)
    for key, item in data.items():
        caps = sorted(set(item["capability"]))
        counts.update(caps)
        combo_counts["_".join(caps)] += 1
        score = grades[key]["score"][0] if key in grades else 0.0
        for cap in caps:
            sums[cap] += score
        combo_sums["_".join(caps)] += score
    total = sum(grades[k]["score"][0] for k in data if k in grades)
    return {"total": round(total / len(data) * 100, 1),
            "capabilities": {c: round(sums[c] / n * 100, 1) for c, n in counts.most_common()},
            "capability_combinations": {c: round(combo_sums[c] / n * 100, 1) for c, n in combo_counts.most_common()},
            "graded": len(grades), "items": len(data)}


# ---------------------------------------------------------------- CLI


def _llava_bench(args, client: ChatClient) -> tuple[dict, int]:
    questions = read_jsonl(args.questions, {"question_id": (int, str), "text": (str,), "category": (str,)})
    answer_fields = {"question_id": (int, str), "text": (str,)}
    items = llava_bench_requests(client, questions, read_jsonl(args.context), read_jsonl(args.reference, answer_fields),
                                 read_jsonl(args.answers, answer_fields), load_json(args.rules or default_rules_path()),
                                 coco=args.coco, max_tokens=args.max_tokens)
    reviews, failed = judge_llava_bench(client, items, args.reviews, progress=not args.no_progress)
    return summarize_reviews(reviews), failed


def _mm_vet(args, client: ChatClient) -> tuple[dict, int]:
    data = load_json(args.mm_vet)
    answers = read_jsonl(args.answers, {"question_id": (int, str), "text": (str,)})
    prompt = Path(args.grader_prompt).read_text(encoding="utf-8") if args.grader_prompt else MMVET_GRADER_PROMPT
    grades, failed = grade_mmvet(client, data, mmvet_results(answers), prompt=prompt, progress=not args.no_progress)
    write_text(args.grades, json.dumps(grades, indent=4) + "\n")
    return score_mmvet(data, grades), failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.judge",
                                     description="GPT-judged LLaVA-Bench and MM-Vet through an OpenAI-compatible endpoint.",
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="benchmark", required=True)
    bench = commands.add_parser("llava-bench", help="LLaVA-Bench (In-the-Wild, or COCO with --coco)")
    bench.add_argument("--questions", required=True)
    bench.add_argument("--context", required=True, help="context.jsonl ({image, caption}); --coco: {image, captions, "
                       "instances}")
    bench.add_argument("--reference", required=True, help="reference answers (answers_gpt4.jsonl): Assistant 1")
    bench.add_argument("--answers", required=True, help="the model's answers: Assistant 2")
    bench.add_argument("--reviews", required=True, help="review JSONL to write")
    bench.add_argument("--rules", help="rule file in the official rule.json layout (default: ours)")
    bench.add_argument("--coco", action="store_true", help="the COCO set: captions and boxes, categories unprefixed")
    bench.add_argument("--max-tokens", type=int, default=1024)
    add_client_arguments(bench, default_model="gpt-4-0314")
    bench.set_defaults(run=_llava_bench, output_arg="reviews")
    mmvet = commands.add_parser("mm-vet", help="MM-Vet graded by the judge")
    mmvet.add_argument("--answers", required=True, help="answer JSONL for llava-mm-vet.jsonl")
    mmvet.add_argument("--mm-vet", required=True, help="mm-vet.json (question, answer and capabilities per item)")
    mmvet.add_argument("--grades", required=True, help="grade JSON to write")
    mmvet.add_argument("--grader-prompt", help="file with the few-shot grader prompt (default: ours)")
    add_client_arguments(mmvet, default_model="gpt-4-0613")
    mmvet.set_defaults(run=_mm_vet, output_arg="grades")
    return parser


@cli.command(OSError, ValueError, KeyError)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = client_from_args(args, str(getattr(args, args.output_arg)) + ".cache.sqlite")
    try:
        summary, failed = args.run(args, client)
    finally:
        client.close()
    usage = client.usage.report(args.input_price, args.output_price)
    print(json.dumps({**summary, "usage": usage}, indent=2))
    if failed:
        print(failure_line(usage), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
