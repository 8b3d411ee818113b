"""MMBench and MMBench-CN: question files from the official TSV, the submission file, and local accuracy.

    python -m llava_jax.infer.mmbench --tsv mmbench_dev_20230712.tsv --out-dir mmbench/ [--all-rounds] [--lang cn]
    python -m llava_jax.eval --questions mmbench/questions.jsonl --images mmbench/images --answers ans.jsonl \\
        [--repeated-ids (with --all-rounds: the rounds share their row's id)]
    python -m llava_jax.infer.score mmbench --answers ans.jsonl --tsv mmbench_dev_20230712.tsv --upload up.xlsx

The TSV (columns index, question, hint, A-D, answer (dev), category, l2-category, source, image (base64),
comment, split) becomes a `model_vqa` question file and one image file per row. Questions are asked as
the official `llava/eval/model_vqa_mmbench.py` asks them: hint (when present) + "\\n" + question, then one
"\\n<letter>. <option>" line per option up to the first missing one, then the letter instruction
("请直接回答选项字母。" for `--lang cn`). `--all-rounds` adds one question per rotation of the options
(circular evaluation): round r lists option (j + r) mod n under letter j. Missing values are those pandas
reads as NaN (empty, "nan", "None", "NA", ...), as in the official script.

The submission (`convert_mmbench_for_submission.py`) is the TSV without hint, category, source, image,
comment and l2-category, with a `prediction` column inserted after the options (position 6), holding the
round-0 answer; written as `.xlsx` (the official upload) or `.tsv`. With `--all-rounds` the official
conversion keeps the last round's answer, whose letter names a rotated option, so the server would score it
against the wrong options; round 0 asks the TSV's own order, so its letter is the one to upload. Local
accuracy (dev split) reads the option letter of an answer (the whole answer, or its first character
followed by ".", ")", ":" or a space); circular accuracy counts a question right only when every round is
right. The MMBench server's own scoring (with its answer extraction) is the reference for published numbers.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import io
import json
import os
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from llava_jax import cli
from llava_jax.atomic_files import write_text

OPTIONS = ("A", "B", "C", "D")
INSTRUCTION = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}
DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
# What pandas.read_table reads as NaN by default: the official script sees these as missing.
PANDAS_NA = frozenset(["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"])
PathLike = str | os.PathLike


def is_none(value: str | None) -> bool:
    """Missing as the official `is_none` sees a pandas cell: NaN-like, or "nan" / "none" in any case."""
    return value is None or value in PANDAS_NA or value.lower() in ("nan", "none")


def read_tsv(path: PathLike) -> tuple[list[str], list[dict]]:
    """(columns, rows) of an MMBench TSV; errors name the file and the missing column."""
    csv.field_size_limit(sys.maxsize)  # base64 images
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    for column in ("index", "question", "hint", "A", "B"):
        if column not in columns:
            raise ValueError(f"{path}: no {column!r} column (not an MMBench TSV?)")
    return columns, rows


def options_of(row: Mapping) -> list[str]:
    """The option texts A, B, ... up to the first missing one."""
    options = []
    for letter in OPTIONS:
        if is_none(row.get(letter)):
            break
        options.append(row[letter])
    return options


def round_prompt(row: Mapping, options: Sequence[str], lang: str = "en") -> str:
    """The question text of one round: hint, question, lettered options, instruction."""
    question = row["question"]
    if not is_none(row.get("hint")):
        question = row["hint"] + "\n" + question
    for letter, option in zip(OPTIONS, options):
        question += "\n" + letter + ". " + option
    return question + "\n" + INSTRUCTION[lang]


def rounds(row: Mapping, all_rounds: bool, lang: str = "en") -> list[tuple[int, str]]:
    """(round, question text) per round; round r rotates the options left by r."""
    options = options_of(row)
    count = len(options) if all_rounds else 1
    return [(r, round_prompt(row, options[r:] + options[:r], lang)) for r in range(count)]


def build_questions(tsv: PathLike, out_dir: PathLike, *, all_rounds: bool = False, lang: str = "en") -> int:
    """Writes `out_dir/questions.jsonl` and `out_dir/images/<index>.<format>`; returns the question count."""
    if lang not in INSTRUCTION:
        raise ValueError(f"unknown language {lang!r}; choose from {sorted(INSTRUCTION)}")
    _, rows = read_tsv(tsv)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        image = _save_image(row, out_dir / "images", tsv)
        for round_id, text in rounds(row, all_rounds, lang):
            lines.append({"question_id": int(row["index"]), "text": text, "image": image, "round_id": round_id,
                          "category": row.get("category") or ""})
    write_text(out_dir / "questions.jsonl", "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in lines))
    return len(lines)


def _save_image(row: Mapping, folder: Path, tsv: PathLike) -> str:
    if not str(row["index"]).isdigit():
        raise ValueError(f"{tsv}: row index {row['index']!r} is not a non-negative integer")
    try:
        data = base64.b64decode(row["image"], validate=True)
        kind = Image.open(io.BytesIO(data)).format.lower()
    except (binascii.Error, OSError, ValueError, TypeError, AttributeError):
        raise ValueError(f"{tsv}: row index {row['index']}: 'image' is not a base64-encoded image") from None
    name = f"{int(row['index'])}.{'jpg' if kind == 'jpeg' else kind}"
    (folder / name).write_bytes(data)
    return name


def parse_letter(text: str, count: int = 4) -> str | None:
    """The option letter of an answer: a lone letter, or a first letter followed by '.', ')', ':' or ' '."""
    text = text.strip()
    letters = OPTIONS[:count]
    if text in letters:
        return text
    if len(text) >= 2 and text[0] in letters and text[1] in ".): ":
        return text[0]
    return None


def _answers_by_round(rows: Sequence[dict], answers: Sequence[dict], lang: str) -> dict[str, dict[int, str]]:
    """index -> {round: answer text}; an answer's round is found by its prompt (the question text asked)."""
    prompts = {}
    for row in rows:
        for round_id, text in rounds(row, all_rounds=True, lang=lang):
            prompts[(str(row["index"]), text)] = round_id
    by_index: dict[str, dict[int, str]] = defaultdict(dict)
    for answer in answers:
        key = (str(answer["question_id"]), answer.get("prompt", ""))
        if key not in prompts:
            raise ValueError(f"answer to question {key[0]!r}: its prompt is none of the question's rounds "
                             f"(another TSV or --lang?)")
        by_index[key[0]][prompts[key]] = answer["text"]
    return by_index


def score_mmbench(rows: Sequence[dict], answers: Sequence[dict], lang: str = "en") -> dict:
    """Accuracy of round 0 and circular accuracy (all answered rounds right), overall and per category."""
    if rows and "answer" not in rows[0]:
        raise ValueError("the TSV has no 'answer' column (a test split): submit the upload file instead")
    by_index = _answers_by_round(rows, answers, lang)
    hits: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for row in rows:
        given = by_index.get(str(row["index"]), {})
        n = len(options_of(row))
        gold = OPTIONS.index(row["answer"])
        right = {r: (letter := parse_letter(text, n)) is not None and (OPTIONS.index(letter) + r) % n == gold
                 for r, text in given.items()}
        pair = (right.get(0, False), bool(right) and all(right.values()))
        hits["all"].append(pair)
        hits[row.get("category") or ""].append(pair)
    result = {name: {"accuracy": sum(p[0] for p in v) / len(v), "circular_accuracy": sum(p[1] for p in v) / len(v),
                     "count": len(v)} for name, v in sorted(hits.items())}
    result["all"]["missing"] = sum(str(row["index"]) not in by_index for row in rows)
    return result


def submission(columns: Sequence[str], rows: Sequence[dict], answers: Sequence[dict], lang: str = "en"
               ) -> tuple[list[str], list[list]]:
    """The upload table: (header, rows) with the round-0 answer as `prediction` (None when unanswered)."""
    missing = [c for c in DROPPED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"the TSV lacks columns {missing} that the submission format drops")
    kept = [c for c in columns if c not in DROPPED_COLUMNS]
    header = kept[:6] + ["prediction"] + kept[6:]
    by_index = _answers_by_round(rows, answers, lang)
    table = []
    for row in rows:
        values = [int(row[c]) if c == "index" else (None if is_none(row[c]) else row[c]) for c in kept]
        table.append(values[:6] + [by_index.get(str(row["index"]), {}).get(0)] + values[6:])
    return header, table


def write_submission(path: PathLike, header: Sequence[str], table: Sequence[Sequence]) -> None:
    """`.xlsx` (openpyxl, one sheet, header row) or `.tsv`, replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".xlsx":
        from openpyxl import Workbook

        book = Workbook()
        sheet = book.active
        sheet.append(list(header))
        for values in table:
            sheet.append(list(values))
        tmp = path.with_name(f".{path.name}.tmp")
        book.save(tmp)
        os.replace(tmp, path)
    elif path.suffix == ".tsv":
        text = io.StringIO()
        writer = csv.writer(text, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in values] for values in table])
        write_text(path, text.getvalue())
    else:
        raise ValueError(f"{path}: the upload must end in .xlsx or .tsv")


@cli.command(OSError, ValueError)
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.infer.mmbench", description=__doc__.split("\n")[0])
    parser.add_argument("--tsv", required=True, help="the MMBench / MMBench-CN TSV")
    parser.add_argument("--out-dir", required=True, help="where questions.jsonl and images/ go")
    parser.add_argument("--all-rounds", action="store_true", help="one question per rotation of the options")
    parser.add_argument("--lang", default="en", choices=sorted(INSTRUCTION))
    args = parser.parse_args(argv)
    count = build_questions(args.tsv, args.out_dir, all_rounds=args.all_rounds, lang=args.lang)
    print(f"{count} questions -> {Path(args.out_dir) / 'questions.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
