"""Question-file IO and the resumable, sharded answer runner."""

import json

import pytest

from llava_jax.infer import questions as qa


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def make_questions(n):
    """n questions with mixed int ids, some text-only (no image)."""
    return [{"question_id": 100 + i, "text": f"What is {i}?", **({"image": f"{i}.jpg"} if i % 3 else {}),
             "category": "c" + str(i % 2)} for i in range(n)]


def echo_answers(batch):
    """Stand-in for the model: answers each question with its id."""
    return [f"answer {q['question_id']}" for q in batch]


def test_answers_with_unicode_line_separators_survive_a_resume(tmp_path):
    questions = [{"question_id": i, "text": f"Q{i}\u2028?"} for i in range(3)]
    out = tmp_path / "a.jsonl"
    qa.run_questions(questions[:2], lambda b: ["é\u2028\x85ü"] * len(b), out, batch_size=1, model_id="m",
                     progress=False)
    assert qa.answered_keys(out) == {(0, "Q0\u2028?"), (1, "Q1\u2028?")}
    assert qa.run_questions(questions, echo_answers, out, batch_size=1, model_id="m", progress=False) == 1
    assert [a["text"] for a in read_answers(out)] == ["é\u2028\x85ü", "é\u2028\x85ü", "answer 2"]


def read_answers(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


# ---------------------------------------------------------------- load_questions


def test_load_questions_reads_official_format(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [
        json.dumps({"question_id": 7, "image": "a.jpg", "text": "Is it red?", "category": "color"}),
        "",
        json.dumps({"question_id": "x/1.png", "text": "Text only?"}),
    ])
    questions = qa.load_questions(path)
    assert [q["question_id"] for q in questions] == [7, "x/1.png"]
    assert questions[0]["image"] == "a.jpg" and "image" not in questions[1]


@pytest.mark.parametrize("line, message", [
    ('{"question_id": 1, "text": "a"', "malformed JSON"),
    ('{"text": "a"}', "missing field 'question_id'"),
    ('{"question_id": 1}', "missing field 'text'"),
    ('{"question_id": 1, "text": 5}', "field 'text' must be str"),
    ('{"question_id": [1], "text": "a"}', "field 'question_id' must be int or str"),
    ('{"question_id": 1, "text": "a", "image": null}', "field 'image' must be str"),
    ('[1, 2]', "expected a JSON object"),
])
def test_load_questions_errors_name_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", ['{"question_id": 0, "text": "ok"}', line])
    with pytest.raises(ValueError, match=message) as info:
        qa.load_questions(path)
    assert f"{path}:2" in str(info.value)


def test_load_questions_rejects_duplicates_but_allows_repeated_ids(tmp_path):
    # MME style: both questions of an image share the image path as id.
    repeated = write_lines(tmp_path / "mme.jsonl", [json.dumps({"question_id": "OCR/1.jpg", "text": t}) for t in "ab"])
    assert [q["text"] for q in qa.load_questions(repeated)] == ["a", "b"]
    path = write_lines(tmp_path / "dup.jsonl", [json.dumps({"question_id": i % 2, "text": "t"}) for i in range(3)])
    with pytest.raises(ValueError, match=r"duplicate question \(question_id 0, same text\) as questions #1 and #3"):
        qa.load_questions(path)


def test_repeated_ids_are_refused_with_their_line_numbers(tmp_path):
    # Line 3 is blank; 7 and "7" are one id to the scorers (compared as strings).
    lines = [json.dumps({"question_id": 7, "text": "a"}), json.dumps({"question_id": 8, "text": "b"}), "",
             json.dumps({"question_id": "7", "text": "c"}), json.dumps({"question_id": 8, "text": "d"})]
    path = write_lines(tmp_path / "q.jsonl", lines)
    with pytest.raises(ValueError) as info:
        qa.load_question_file(path, repeated_ids=False)
    message = str(info.value)
    assert message.startswith(f"{path}: 2 repeated question_id(s): question_id '7' on line 1, line 4; "
                              "question_id '8' on line 2, line 5;")
    assert "\n" not in message and "--repeated-ids" in message
    assert [q["text"] for q in qa.load_question_file(path, repeated_ids=True)] == ["a", "b", "c", "d"]
    unique = write_lines(tmp_path / "u.jsonl", [json.dumps({"question_id": i, "text": "t"}) for i in range(3)])
    assert len(qa.load_question_file(unique, repeated_ids=False)) == 3


def test_eval_cli_refuses_repeated_ids_before_loading_the_model(tmp_path, capsys):
    from llava_jax.infer.evaluate import main

    path = write_lines(tmp_path / "q.jsonl", [json.dumps({"question_id": i % 2, "text": f"t{i}"}) for i in range(3)])
    (tmp_path / "images").mkdir()
    code = main(["--model", str(tmp_path / "no_model"), "--questions", str(path), "--images", str(tmp_path / "images"),
                 "--answers", str(tmp_path / "a.jsonl"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "question_id '0' on line 1, line 3" in err
    assert not (tmp_path / "a.jsonl").exists()


def test_load_scienceqa_questions_like_model_vqa_science(tmp_path):
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps([
        {"id": "4", "image": "4/image.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich is a mammal?\nContext: N/A\nOptions: (A) cat (B) fish"},
            {"from": "gpt", "value": "A"}]},
        {"id": "9", "conversations": [{"from": "human", "value": " What is 2+2?\nOptions: (A) 4 (B) 5 "}]},
    ]))
    letter = "Answer with the option's letter from the given choices directly."
    assert qa.load_scienceqa_questions(path) == [
        {"question_id": "4", "image": "4/image.png",
         "text": f"Which is a mammal?\nContext: N/A\nOptions: (A) cat (B) fish\n{letter}"},
        {"question_id": "9", "text": f"What is 2+2?\nOptions: (A) 4 (B) 5\n{letter}"},
    ]
    without_instruction = qa.load_scienceqa_questions(path, single_pred_prompt=False)
    assert without_instruction[1]["text"] == "What is 2+2?\nOptions: (A) 4 (B) 5"
    path.write_text(json.dumps([{"id": "1", "conversations": []}]))
    with pytest.raises(ValueError, match=r"llava_test_CQM-A.json: sample #1 needs an 'id' and a first"):
        qa.load_scienceqa_questions(path)


# ---------------------------------------------------------------- answered_ids


def test_answered_ids_ignores_only_a_torn_last_line(tmp_path):
    path = tmp_path / "a.jsonl"
    assert qa.answered_ids(path) == set()
    path.write_text('{"question_id": 1, "text": "x"}\n{"question_id": "b", "text": "y"}\n{"question_id": 3, "te')
    assert qa.answered_ids(path) == {1, "b"}
    path.write_text('{"question_id": 1, "text": "x"}\n{"question_id": 3, "te\n{"question_id": 4, "text": "z"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: malformed JSON"):
        qa.answered_ids(path)


# ---------------------------------------------------------------- run_questions


def test_run_questions_writes_official_answer_lines(tmp_path):
    questions = make_questions(5)
    out = tmp_path / "sub" / "answers.jsonl"
    calls = []

    def answer(batch):
        calls.append([q["question_id"] for q in batch])
        return echo_answers(batch)

    assert qa.run_questions(questions, answer, out, batch_size=2, model_id="llava-tiny", progress=False) == 5
    assert calls == [[100, 101], [102, 103], [104]]
    answers = read_answers(out)
    assert [a["question_id"] for a in answers] == [100, 101, 102, 103, 104]
    for question, answer in zip(questions, answers):
        assert set(answer) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert answer["prompt"] == question["text"]
        assert answer["text"] == f"answer {question['question_id']}"
        assert answer["model_id"] == "llava-tiny" and answer["metadata"] == {}
    assert len({a["answer_id"] for a in answers}) == 5
    # Everything answered: a rerun calls the model no more.
    assert qa.run_questions(questions, answer, out, batch_size=2, model_id="llava-tiny", progress=False) == 0
    assert len(calls) == 3


def test_run_questions_resumes_after_a_crash(tmp_path):
    questions = make_questions(7)
    out = tmp_path / "answers.jsonl"
    seen = []

    def crash_on_third_batch(batch):
        seen.append([q["question_id"] for q in batch])
        if len(seen) == 3:
            raise RuntimeError("device lost")
        return echo_answers(batch)

    with pytest.raises(RuntimeError, match="device lost"):
        qa.run_questions(questions, crash_on_third_batch, out, batch_size=2, model_id="m", progress=False)
    # Two full batches were flushed before the crash; the third is lost.
    assert [a["question_id"] for a in read_answers(out)] == [100, 101, 102, 103]
    # Simulate a write torn mid-line by the crash.
    with open(out, "a") as f:
        f.write('{"question_id": 104, "prompt": "What')

    resumed = []

    def answer(batch):
        resumed.append([q["question_id"] for q in batch])
        return echo_answers(batch)

    assert qa.run_questions(questions, answer, out, batch_size=2, model_id="m", progress=False) == 3
    assert resumed == [[104, 105], [106]]
    answers = read_answers(out)  # the torn line is gone, every line parses
    assert [a["question_id"] for a in answers] == [100 + i for i in range(7)]
    assert [a["text"] for a in answers] == [f"answer {100 + i}" for i in range(7)]


def test_resume_with_repeated_ids_matches_on_the_question_text(tmp_path):
    questions = [{"question_id": f"OCR/{i // 2}.jpg", "text": f"Question {i}?"} for i in range(5)]
    out = tmp_path / "answers.jsonl"
    qa.run_questions(questions[:3], echo_answers, out, batch_size=2, model_id="m", progress=False)
    assert qa.answered_ids(out) == {"OCR/0.jpg", "OCR/1.jpg"}
    assert qa.answered_keys(out) == {("OCR/0.jpg", "Question 0?"), ("OCR/0.jpg", "Question 1?"),
                                     ("OCR/1.jpg", "Question 2?")}
    asked = []

    def answer(batch):
        asked.extend(q["text"] for q in batch)
        return echo_answers(batch)

    # OCR/1.jpg already has an answer, but only to its first question.
    assert qa.run_questions(questions, answer, out, batch_size=2, model_id="m", progress=False) == 2
    assert asked == ["Question 3?", "Question 4?"]
    assert qa.merge_answers(out, questions) == 5
    assert [a["prompt"] for a in read_answers(out)] == [q["text"] for q in questions]


def test_run_questions_rejects_a_wrong_number_of_answers(tmp_path):
    with pytest.raises(ValueError, match=r"returned 1 answers for 2 questions \[100, 101\]"):
        qa.run_questions(make_questions(2), lambda b: ["only one"], tmp_path / "a.jsonl", batch_size=2,
                         model_id="m", progress=False)
    with pytest.raises(TypeError, match="returned NoneType for question 100"):
        qa.run_questions(make_questions(1), lambda b: [None], tmp_path / "a.jsonl", batch_size=2,
                         model_id="m", progress=False)


def test_sharded_run_then_merge_in_question_order(tmp_path):
    questions = make_questions(10)
    out = tmp_path / "answers.jsonl"
    counts = [qa.run_questions(questions, echo_answers, out, batch_size=3, model_id="m", process_index=i,
                               process_count=3, progress=False) for i in (2, 0, 1)]
    # Process i answers questions i, i+3, ...: 10 = 3 (i=2) + 4 (i=0) + 3 (i=1).
    assert counts == [3, 4, 3]
    shard = qa.shard_path(out, 1, 3)
    assert shard.name == "answers.shard-00001-of-00003.jsonl"
    assert [a["question_id"] for a in read_answers(shard)] == [101, 104, 107]
    assert not out.exists()

    assert qa.merge_answers(out, questions) == 10
    assert [a["question_id"] for a in read_answers(out)] == [100 + i for i in range(10)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl"]


def test_resume_with_a_different_process_count_skips_every_answered_id(tmp_path):
    questions = make_questions(6)
    out = tmp_path / "answers.jsonl"
    qa.run_questions(questions, echo_answers, out, batch_size=2, model_id="m", process_index=0, process_count=2,
                     progress=False)  # answers 100, 102, 104
    answered = []

    def answer(batch):
        answered.extend(q["question_id"] for q in batch)
        return echo_answers(batch)

    assert qa.run_questions(questions, answer, out, batch_size=4, model_id="m", progress=False) == 3
    assert answered == [101, 103, 105]
    assert qa.merge_answers(out, questions) == 6
    assert [a["question_id"] for a in read_answers(out)] == [100 + i for i in range(6)]


def test_merge_rejects_answers_to_unknown_questions(tmp_path):
    out = write_lines(tmp_path / "answers.jsonl", [json.dumps({"question_id": 999, "prompt": "Who?", "text": "?"})])
    with pytest.raises(ValueError, match=r"not in the question file: \[\"\(999, 'Who\?'\)\"\]"):
        qa.merge_answers(out, make_questions(2))


def test_run_questions_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        qa.run_questions([], echo_answers, tmp_path / "a.jsonl", batch_size=0, model_id="m")
    with pytest.raises(ValueError, match="process_index 2 is outside"):
        qa.run_questions([], echo_answers, tmp_path / "a.jsonl", batch_size=1, model_id="m", process_index=2,
                         process_count=2)
