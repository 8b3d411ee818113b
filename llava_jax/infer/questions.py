"""Question files in, answer files out: the plumbing of `python -m llava_jax.eval`.

Formats are those of the official `llava.eval.model_vqa`:
- question file (JSONL): `{"question_id", "text", "image" (optional: text-only; a path or a list of paths),
  "video" (optional, LLaVA-OneVision: a file or a folder of frames), "category" (optional)}`;
- answer file (JSONL): `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`.

`run_questions` answers in batches and appends each batch with one `write` followed by `fsync`, so a
crash loses at most the batch in flight; a rerun first cuts off a line torn by the crash, then skips the
questions already answered, matched on (question_id, text = prompt) since MME repeats ids. With several
JAX processes each answers `questions[process_index::process_count]` into its own shard file
(`answers.shard-00001-of-00004.jsonl`), and `merge_answers` joins the shards into the answer file in
question order.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

QUESTION_FIELDS = {"question_id": (int, str), "text": (str,)}
OPTIONAL_QUESTION_FIELDS = {"image": (str, list), "video": (str,), "category": (str,)}
ANSWER_FIELDS = {"question_id": (int, str), "text": (str,)}
RESUME_FIELDS = {**ANSWER_FIELDS, "prompt": (str,)}

AnswerBatch = Callable[[list[dict]], Sequence[str]]


def read_jsonl(path: str | os.PathLike, required: dict[str, tuple[type, ...]] | None = None,
               optional: dict[str, tuple[type, ...]] | None = None) -> list[dict]:
    """Reads a JSONL file of objects, checking field presence and types.

    Blank lines are skipped. Errors name the file, the 1-based line and the field.
    """
    return [record for _, record in read_jsonl_lines(path, required, optional)]


def read_jsonl_lines(path: str | os.PathLike, required: dict[str, tuple[type, ...]] | None = None,
                     optional: dict[str, tuple[type, ...]] | None = None) -> list[tuple[int, dict]]:
    """`read_jsonl` with the 1-based line number of each record: [(line, record)]."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                records.append((line_no, _parse_record(line, path, line_no, required or {}, optional or {})))
    return records


def _parse_record(line: str, path, line_no: int, required: dict, optional: dict) -> dict:
    where = f"{path}:{line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field, types in required.items():
        if field not in record:
            raise ValueError(f"{where}: missing field {field!r}")
    for field, types in {**required, **optional}.items():
        value = record.get(field)
        if field in record and (not isinstance(value, types) or isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in types)
            raise ValueError(f"{where}: field {field!r} must be {names}, got {value!r}")
    return record


def question_key(question: dict) -> tuple:
    """What identifies a question: its id and text.

    Ids alone are not unique in every official file: MME gives both questions of an image the image's
    path as id. An answer carries the same key as (`question_id`, `prompt`).
    """
    return question["question_id"], question["text"]


def answer_key(answer: dict) -> tuple:
    return answer["question_id"], answer["prompt"]


def load_questions(path: str | os.PathLike, repeated_ids: bool = True) -> list[dict]:
    """Reads a `model_vqa` question file; no two questions may share both id and text, nor (unless
    `repeated_ids`: MME, MMBench's rounds) an id."""
    numbered = read_jsonl_lines(path, QUESTION_FIELDS, OPTIONAL_QUESTION_FIELDS)
    lines, questions = [n for n, _ in numbered], [q for _, q in numbered]
    first_index: dict[tuple, int] = {}
    for index, question in enumerate(questions):
        key = question_key(question)
        if key in first_index:
            raise ValueError(f"{path}: duplicate question (question_id {key[0]!r}, same text) as questions "
                             f"#{first_index[key] + 1} and #{index + 1} (lines {lines[first_index[key]]} and "
                             f"{lines[index]})")
        first_index[key] = index
    if not repeated_ids:
        refuse_repeated_ids(questions, [f"line {n}" for n in lines], path)
    return questions


def refuse_repeated_ids(questions: Sequence[dict], places: Sequence[str], path) -> None:
    """ValueError naming every question_id (7 and "7" alike: scorers compare them as strings) asked more
    than once and where (`places[i]` of question i), since answers are scored and resumed by id."""
    where: dict[str, list[str]] = {}
    for question, place in zip(questions, places):
        where.setdefault(str(question["question_id"]), []).append(place)
    repeated = [(qid, spots) for qid, spots in where.items() if len(spots) > 1]
    if repeated:
        shown = "; ".join(f"question_id {qid!r} on {', '.join(spots)}" for qid, spots in repeated[:5])
        more = f" (and {len(repeated) - 5} more)" if len(repeated) > 5 else ""
        raise ValueError(f"{path}: {len(repeated)} repeated question_id(s): {shown}{more}; answers are scored "
                         "by question_id, so give each question its own id (files that ask several questions "
                         "per id, MME or MMBench's rounds, take --repeated-ids)")


SCIENCEQA_LETTER_PROMPT = "Answer with the option's letter from the given choices directly."


def load_scienceqa_questions(path: str | os.PathLike, single_pred_prompt: bool = True) -> list[dict]:
    """Questions from the official ScienceQA file (`llava_test_CQM-A.json`), as `model_vqa_science` asks them.

    The file is a JSON list of `{"id", "image" (optional), "conversations": [{"from": "human", "value"}, ...]}`;
    the question is the first turn without `<image>`, followed by the letter instruction when
    `single_pred_prompt` (LLaVA-1.5 evaluates with it).
    """
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of ScienceQA samples")
    questions = []
    for index, record in enumerate(records):
        try:
            text = record["conversations"][0]["value"].replace("<image>", "").strip()
            question = {"question_id": record["id"], "text": text}
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ValueError(f"{path}: sample #{index + 1} needs an 'id' and a first conversation turn "
                             "with a string 'value'") from None
        if single_pred_prompt:
            question["text"] += "\n" + SCIENCEQA_LETTER_PROMPT
        if "image" in record:
            question["image"] = record["image"]
        questions.append(question)
    return questions


def load_question_file(path: str | os.PathLike, repeated_ids: bool = True) -> list[dict]:
    """A `model_vqa` JSONL, or the official ScienceQA JSON (`.json`, asked as `model_vqa_science` asks);
    `repeated_ids=False` refuses a question_id asked twice, naming the lines (samples in ScienceQA)."""
    if Path(path).suffix != ".json":
        return load_questions(path, repeated_ids)
    questions = load_scienceqa_questions(path)
    if not repeated_ids:
        refuse_repeated_ids(questions, [f"sample #{i + 1}" for i in range(len(questions))], path)
    return questions


def answered_ids(answers_path: str | os.PathLike) -> set:
    """The question ids already in an answer file (empty when the file does not exist).

    A last line without its newline is a write torn by a crash and is ignored; any other malformed
    line is an error naming the file and line.
    """
    return {record["question_id"] for record in _complete_answers(answers_path, ANSWER_FIELDS)}


def answered_keys(answers_path: str | os.PathLike) -> set[tuple]:
    """The (question_id, prompt) pairs already in an answer file; see `answered_ids`."""
    return {answer_key(record) for record in _complete_answers(answers_path, RESUME_FIELDS)}


def _complete_answers(answers_path: str | os.PathLike, required: dict) -> list[dict]:
    path = Path(answers_path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    return [_parse_record(line, path, line_no, required, {})
            for line_no, line in enumerate(complete.split("\n"), start=1) if line.strip()]


def shard_path(out_path: str | os.PathLike, process_index: int, process_count: int) -> Path:
    """Where process `process_index` of `process_count` writes; the answer file itself for one process."""
    out_path = Path(out_path)
    if process_count == 1:
        return out_path
    return out_path.with_name(f"{out_path.stem}.shard-{process_index:05d}-of-{process_count:05d}{out_path.suffix}")


def _answer_files(out_path: Path) -> list[Path]:
    """The answer file and every shard of it on disk, whatever process count wrote them."""
    pattern = re.compile(re.escape(out_path.stem) + r"\.shard-\d{5}-of-\d{5}" + re.escape(out_path.suffix) + "$")
    shards = [p for p in out_path.parent.glob(f"{out_path.stem}.shard-*") if pattern.match(p.name)]
    return [out_path, *sorted(shards)]


def _cut_torn_line(path: Path) -> None:
    """Truncates a last line that lacks its newline (a write interrupted by a crash)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _append(path: Path, records: Iterable[dict]) -> None:
    """Appends JSON lines with a single O_APPEND write and fsyncs them."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def answer_record(question: dict, text: str, model_id: str) -> dict:
    """One answer line in the official `model_vqa` layout (`answer_id` is a random uuid4 hex)."""
    return {
        "question_id": question["question_id"],
        "prompt": question["text"],
        "text": text,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": {},
    }


def run_questions(questions: Sequence[dict], answer_batch: AnswerBatch, out_path: str | os.PathLike, *,
                  batch_size: int, model_id: str, process_index: int = 0, process_count: int = 1,
                  progress: bool = True) -> int:
    """Answers this process's share of `questions` not yet answered; returns how many it answered.

    Args:
      questions: question dicts (`load_questions`); this process takes `questions[process_index::process_count]`.
      answer_batch: maps a list of at most `batch_size` question dicts to as many answer texts.
      out_path: the answer file; with several processes each writes `shard_path(out_path, ...)`.
      batch_size: questions per `answer_batch` call.
      model_id: written into every answer line.
      process_index, process_count: this process's place among the JAX processes.
      progress: show a tqdm bar.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    out_path = Path(out_path)
    own_path = shard_path(out_path, process_index, process_count)
    own_path.parent.mkdir(parents=True, exist_ok=True)
    _cut_torn_line(own_path)
    done = set().union(*(answered_keys(p) for p in _answer_files(out_path)))
    share = list(questions[process_index::process_count])
    todo = [q for q in share if question_key(q) not in done]
    with tqdm(total=len(share), initial=len(share) - len(todo), disable=not progress,
              desc=f"answering {out_path.name}", unit="q") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            texts = _checked_texts(answer_batch(batch), batch)
            _append(own_path, (answer_record(q, t, model_id) for q, t in zip(batch, texts)))
            bar.update(len(batch))
    return len(todo)


def _checked_texts(texts: Sequence[str], batch: list[dict]) -> list[str]:
    texts = list(texts)
    ids = [q["question_id"] for q in batch]
    if len(texts) != len(batch):
        raise ValueError(f"answer_batch returned {len(texts)} answers for {len(batch)} questions {ids}")
    for qid, text in zip(ids, texts):
        if not isinstance(text, str):
            raise TypeError(f"answer_batch returned {type(text).__name__} for question {qid!r}, expected str")
    return texts


def merge_answers(out_path: str | os.PathLike, questions: Sequence[dict]) -> int:
    """Joins the answer file and its shards into the answer file, in question order; returns the count.

    Call it on one process once every process has finished `run_questions`. The answer file is replaced
    atomically and the shards are removed; answers to questions absent from `questions` are an error,
    and a question answered twice keeps its first answer.
    """
    out_path = Path(out_path)
    files = _answer_files(out_path)
    by_key: dict[tuple, dict] = {}
    for path in files:
        if path.exists():
            for record in read_jsonl(path, RESUME_FIELDS):
                by_key.setdefault(answer_key(record), record)
    order = [question_key(q) for q in questions]
    unknown = set(by_key) - set(order)
    if unknown:
        raise ValueError(f"{out_path}: answers to questions not in the question file: {sorted(map(str, unknown))[:10]}")
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    _append(tmp, (by_key[key] for key in order if key in by_key))
    os.replace(tmp, out_path)
    for path in files[1:]:
        path.unlink()
    return len(by_key)
