"""ScienceQA to LLaVA training JSON: `python -m llava_jax.data.scienceqa`.

    python -m llava_jax.data.scienceqa --base-dir data/scienceqa --split train [--prompt-format QCM-LEA] [--out F]

The output is what the official `scripts/convert_sqa_to_llava.py convert_to_llava` writes
(`<base-dir>/llava_<split>_<format>.json` by default): for every problem of `pid_splits.json[split]`, in
that order, `{"id", "image": "<id>/<image>" (when the problem has one), "conversations"}` with the prompt of
`build_prompt_chatbot` (`scripts/convert_sqa_to_llava_base_prompt.py`) as the human turn, `"\\n<image>"`
appended when there is an image, and the answer as the gpt turn. Its text quirks are kept, as they are
what LLaVA was trained and evaluated on: double spaces are halved once, a trailing "BECAUSE:" is removed,
and the leading "Question: " / "Answer: " are removed wherever they occur. Input formats: CQM, QCM,
QCML, QCME, QCMLE, QCLM, QCEM, QCLEM; outputs: A, AL, AE, ALE, AEL, LA, EA, LEA, ELA, LEPA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from llava_jax import cli
from llava_jax.atomic_files import write_text

OPTIONS = ("A", "B", "C", "D", "E")

_INPUTS = {
    "CQM": "Context: {c}\nQuestion: {q}\nOptions: {m}\n",
    "QCM": "Question: {q}\nContext: {c}\nOptions: {m}\n",
    "QCML": "Question: {q}\nContext: {c}\nOptions: {m}\nBECAUSE: {l}\n",
    "QCME": "Question: {q}\nContext: {c}\nOptions: {m}\nBECAUSE: {e}\n",
    "QCMLE": "Question: {q}\nContext: {c}\nOptions: {m}\nBECAUSE: {l} {e}\n",
    "QCLM": "Question: {q}\nContext: {c}\nBECAUSE: {l}\nOptions: {m}\n",
    "QCEM": "Question: {q}\nContext: {c}\nBECAUSE: {e}\nOptions: {m}\n",
    "QCLEM": "Question: {q}\nContext: {c}\nBECAUSE: {l} {e}\nOptions: {m}\n",
}
_OUTPUTS = {
    "A": "Answer: The answer is {a}.",
    "AL": "Answer: The answer is {a}. BECAUSE: {e}",
    "AE": "Answer: The answer is {a}. BECAUSE: {l}",
    "ALE": "Answer: The answer is {a}. BECAUSE: {l} {e}",
    "AEL": "Answer: The answer is {a}. BECAUSE: {e} {l}",
    "LA": "Answer: {l} The answer is {a}.",
    "EA": "Answer: {e} The answer is {a}.",
    "LEA": "Answer: {l} {e} The answer is {a}.",
    "ELA": "Answer: {e} {l} The answer is {a}.",
}


def check_format(prompt_format: str) -> tuple[str, str]:
    parts = prompt_format.split("-")
    if len(parts) != 2 or parts[0] not in _INPUTS or parts[1] not in (*_OUTPUTS, "LEPA"):
        raise ValueError(f"unknown prompt format {prompt_format!r}: INPUT-OUTPUT with INPUT in {sorted(_INPUTS)} "
                         f"and OUTPUT in {sorted((*_OUTPUTS, 'LEPA'))}")
    return parts[0], parts[1]


def _multiline(text: str) -> str:
    # the official get_*_text escapes newlines and build_prompt_chatbot unescapes every "\n" sequence
    return text.replace("\n", "\\n").replace("\\n", "\n")


def _fields(problem: Mapping) -> dict:
    context = " ".join([problem["hint"], ""]).strip() or "N/A"
    choices = " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"]))
    return {"q": problem["question"], "c": context, "m": choices, "a": OPTIONS[problem["answer"]],
            "l": _multiline(problem["lecture"]), "e": _multiline(problem["solution"])}


def _output(output_format: str, f: dict) -> str:
    if output_format != "LEPA":
        return _OUTPUTS[output_format].format(**f)
    text = f"LECTURE: {f['l']}\n" if f["l"].strip() else ""
    text += f"SOLUTION: {f['e']}\n" if f["e"].strip() else ""
    return text + f"###\nANSWER: {f['a']}."


def _tidy(text: str) -> str:
    text = text.replace("  ", " ").strip()
    return text.replace("BECAUSE:", "").strip() if text.endswith("BECAUSE:") else text


def prompt_pair(problem: Mapping, prompt_format: str = "QCM-LEA") -> tuple[str, str]:
    """(human text, gpt text) of one problem, before the image placeholder."""
    input_format, output_format = check_format(prompt_format)
    f = _fields(problem)
    text_in, text_out = _tidy(_INPUTS[input_format].format(**f)), _tidy(_output(output_format, f))
    if text_in.startswith("Question: "):
        text_in = text_in.replace("Question: ", "")
    if text_out.startswith("Answer: "):
        text_out = text_out.replace("Answer: ", "")
    return text_in, text_out


def convert(problems: Mapping[str, dict], split_ids: Sequence[str], prompt_format: str = "QCM-LEA") -> list[dict]:
    """The LLaVA samples of the problems `split_ids`, in that order."""
    samples = []
    for pid in split_ids:
        problem = problems[pid]
        text_in, text_out = prompt_pair(problem, prompt_format)
        sample = {"id": pid}
        if problem["image"] is not None:
            sample["image"] = os.path.join(pid, problem["image"])
            text_in += "\n<image>"
        sample["conversations"] = [{"from": "human", "value": text_in}, {"from": "gpt", "value": text_out}]
        samples.append(sample)
    return samples


def load_split(base_dir: str | os.PathLike, split: str) -> tuple[dict, list[str]]:
    """(problems, split ids) from `problems.json` and `pid_splits.json`; errors name the file and problem."""
    base = Path(base_dir)
    with open(base / "pid_splits.json", encoding="utf-8") as f:
        splits = json.load(f)
    with open(base / "problems.json", encoding="utf-8") as f:
        problems = json.load(f)
    if split not in splits:
        raise ValueError(f"{base / 'pid_splits.json'}: no split {split!r} (has {sorted(splits)})")
    fields = ("question", "hint", "choices", "answer", "lecture", "solution", "image")
    for pid in splits[split]:
        missing = [k for k in fields if k not in problems.get(pid, {})]
        if missing:
            raise ValueError(f"{base / 'problems.json'}: problem {pid!r} of split {split!r} lacks {missing}")
    return problems, list(splits[split])


@cli.command(OSError, ValueError)  # json.JSONDecodeError is a ValueError
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.data.scienceqa", description=__doc__.split("\n")[0])
    parser.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    parser.add_argument("--split", default="train", help="train, val, minival, test or minitest")
    parser.add_argument("--prompt-format", default="QCM-LEA", help="training QCM-LEA; the evaluation file is CQM-A")
    parser.add_argument("--out", help="output JSON (default <base-dir>/llava_<split>_<format>.json)")
    args = parser.parse_args(argv)
    check_format(args.prompt_format)
    problems, split_ids = load_split(args.base_dir, args.split)
    samples = convert(problems, split_ids, args.prompt_format)
    out = Path(args.out or Path(args.base_dir) / f"llava_{args.split}_{args.prompt_format}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
    print(f"{len(samples)} samples -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
