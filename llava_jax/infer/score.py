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
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from llava_jax import atomic_files
from llava_jax.infer import scorers


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
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        atomic_files.write_text(args.output, text + "\n")
    return result


if __name__ == "__main__":
    main()
