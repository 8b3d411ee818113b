"""Scores an answer file: `python -m llava_jax.infer.score BENCHMARK --answers A ...`.

Prints the metrics as JSON and writes them to `--output` when given (`vqa-submission` writes the EvalAI
upload file to `--upload`). Examples:

  python -m llava_jax.infer.score scienceqa --answers ans.jsonl --base-dir scienceqa/ --split test
  python -m llava_jax.infer.score pope --answers ans.jsonl --questions llava_pope_test.jsonl --annotation-dir coco/
  python -m llava_jax.infer.score vqa --answers ans.jsonl --annotations v2_mscoco_val2014_annotations.json
  python -m llava_jax.infer.score vqa-submission --answers ans.jsonl --questions llava_vqav2_mscoco_test-dev2015.jsonl \
      --upload upload.json
  python -m llava_jax.infer.score textvqa --answers ans.jsonl --annotations TextVQA_0.5.1_val.json
  python -m llava_jax.infer.score gqa --answers ans.jsonl --questions testdev_balanced_questions.json
  python -m llava_jax.infer.score mme --answers ans.jsonl --benchmark-dir MME_Benchmark_release_version/
  python -m llava_jax.infer.score mmbench --answers ans.jsonl --tsv mmbench_dev_20230712.tsv --upload up.xlsx
  python -m llava_jax.infer.score seed --answers ans.jsonl --annotations SEED-Bench.json --upload up.jsonl
  python -m llava_jax.infer.score mm-vet-results --answers ans.jsonl --results llava-mm-vet-results.json
  python -m llava_jax.infer.score llava-bench --answers reviews.jsonl      (a review file of llava_jax.infer.judge)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from llava_jax import atomic_files, cli
from llava_jax.infer import scorers
from llava_jax.infer.questions import read_jsonl


def _scienceqa(args) -> dict:
    result = scorers.score_scienceqa_files(args.answers, args.base_dir, args.split)
    result.pop("parsed")
    return result


def _pope(args) -> dict:
    return scorers.score_pope_files(args.answers, args.questions, args.annotation_dir)


def _vqa(args) -> dict:
    return scorers.score_vqa_files(args.answers, args.annotations, args.id_field)


def _textvqa(args) -> dict:
    return scorers.score_textvqa_files(args.answers, args.annotations)


def _vqa_submission(args) -> dict:
    upload = scorers.vqa_submission(args.answers, args.questions, args.style)
    atomic_files.write_text(args.upload, json.dumps(upload))
    return {"upload": args.upload, "questions": len(upload), "empty_answers": sum(not u["answer"] for u in upload)}


def _gqa(args) -> dict:
    return scorers.score_gqa_files(args.answers, args.questions)


def _mme(args) -> dict:
    return scorers.score_mme_files(args.answers, args.benchmark_dir)


def _mmbench(args) -> dict:
    from llava_jax.infer import mmbench

    columns, rows = mmbench.read_tsv(args.tsv)
    if not args.upload and "answer" not in columns:
        raise ValueError(f"{args.tsv} has no answers (a test split): pass --upload to write the submission")
    answers = read_jsonl(args.answers, {"question_id": (int, str), "text": (str,), "prompt": (str,)})
    result = {}
    if args.upload:
        header, table = mmbench.submission(columns, rows, answers, args.lang)
        mmbench.write_submission(args.upload, header, table)
        result = {"upload": args.upload, "questions": len(table), "unanswered": sum(r[6] is None for r in table)}
    if "answer" in columns:
        result.update(mmbench.score_mmbench(rows, answers, args.lang))
    return result


def _seed(args) -> dict:
    return scorers.score_seed_files(args.answers, args.annotations, args.upload)


def _mm_vet_results(args) -> dict:
    from llava_jax.infer.judge import mmvet_results

    results = mmvet_results(read_jsonl(args.answers, {"question_id": (int, str), "text": (str,)}))
    atomic_files.write_text(args.results, json.dumps(results, indent=2) + "\n")
    return {"results": args.results, "answers": len(results)}


def _llava_bench(args) -> dict:
    from llava_jax.infer.judge import summarize_review_file

    return summarize_review_file(args.answers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.infer.score",
                                     description="Scores an answer file against a benchmark's annotations.",
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="benchmark", required=True)

    def command(name: str, run, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--answers", required=True, help="answer JSONL written by the question runner")
        sub.add_argument("--output", help="also write the metrics to this JSON file")
        sub.set_defaults(run=run)
        return sub

    sqa = command("scienceqa", _scienceqa, "ScienceQA option-letter accuracy (overall and IMG)")
    sqa.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    sqa.add_argument("--split", default="test")
    pope = command("pope", _pope, "POPE accuracy, precision, recall, F1 and yes-ratio per split")
    pope.add_argument("--questions", required=True, help="question JSONL whose `category` is the split")
    pope.add_argument("--annotation-dir", required=True, help="folder of coco_pope_<split>.json label files")
    vqa = command("vqa", _vqa, "VQA accuracy (VQAv2 / TextVQA / VizWiz)")
    vqa.add_argument("--annotations", required=True, help="annotation JSON / JSONL with 10 answers per question")
    vqa.add_argument("--id-field", default="question_id", help="annotation field matching question_id (VizWiz: image)")
    upload = command("vqa-submission", _vqa_submission, "VQAv2 test-dev / VizWiz test upload file for EvalAI")
    upload.add_argument("--questions", required=True, help="the question JSONL that was answered")
    upload.add_argument("--style", choices=("vqav2", "vizwiz"), default="vqav2")
    upload.add_argument("--upload", required=True, help="where to write the JSON to upload")
    textvqa = command("textvqa", _textvqa, "TextVQA accuracy, answers matched on (image id, question) as LLaVA does")
    textvqa.add_argument("--annotations", required=True, help="TextVQA_0.5.1_val.json")
    gqa = command("gqa", _gqa, "GQA exact-match accuracy (balanced questions; binary / open)")
    gqa.add_argument("--questions", required=True, help="GQA questions JSON ({id: {answer, ...}}) or JSONL")
    mme = command("mme", _mme, "MME accuracy and accuracy+ per category, perception / cognition totals")
    mme.add_argument("--benchmark-dir", required=True, help="MME_Benchmark_release_version folder")
    mmb = command("mmbench", _mmbench, "MMBench / MMBench-CN upload file; accuracy and circular accuracy (dev)")
    mmb.add_argument("--tsv", required=True, help="the MMBench TSV the questions came from")
    mmb.add_argument("--upload", help="submission file to write (.xlsx as the official upload, or .tsv)")
    mmb.add_argument("--lang", default="en", choices=("en", "cn"), help="the --lang the questions were built with")
    seed = command("seed", _seed, "SEED-Bench accuracy per question type, image / video; upload JSONL")
    seed.add_argument("--annotations", required=True, help="SEED-Bench.json")
    seed.add_argument("--upload", help="submission JSONL to write")
    mmvet = command("mm-vet-results", _mm_vet_results, "MM-Vet result JSON for the official grader")
    mmvet.add_argument("--results", required=True, help="where to write {v1_<id>: answer}")
    command("llava-bench", _llava_bench, "LLaVA-Bench relative scores of a review file (--answers: the reviews)")
    return parser


@cli.command(OSError, ValueError, exits=True)
def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    result = args.run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        atomic_files.write_text(args.output, text + "\n")
    return result


if __name__ == "__main__":
    main()
