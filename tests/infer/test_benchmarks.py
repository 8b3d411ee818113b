"""MMBench, SEED-Bench, MM-Vet results and VizWiz: our question files and uploads against the official scripts.

`llava/eval/model_vqa_mmbench.py` (in llava-torch) runs side by side with its model stubbed by a deterministic
answerer; the submission converters that llava-torch does not ship are checked against their official logic
transcribed below (from github.com/haotian-liu/LLaVA `scripts/`) and by hand-worked values.
"""

import base64
import hashlib
import io
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from llava_jax.infer import mmbench
from llava_jax.infer.questions import answer_record, load_questions
from tests.infer.test_scorers import official_module, run_cli, run_official, write_jsonl

pd = pytest.importorskip("pandas")

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
           "l2-category", "comment", "split"]


def png_base64(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (6, 5, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def mmbench_tsv(tmp_path, with_answer: bool = True):
    rows = [
        [10, "What is shown?", "", "a cat", "a dog", "a bird", "a fish", "B", "object", png_base64(0), "s", "l2", "",
         "dev"],
        [11, "Which season?", "The photo was taken outdoors.", "winter", "summer", "autumn", "", "C", "scene",
         png_base64(1), "s", "l2", "c", "dev"],
        [12, "How many?", "nan", "one", "two", "", "", "A", "object", png_base64(2), "s", "l2", "", "dev"],
        [13, "Is it NA?", "None", "NA", "yes", "no", "maybe", "D", "scene", png_base64(3), "s", "l2", "", "dev"],
    ]
    columns = COLUMNS if with_answer else [c for c in COLUMNS if c != "answer"]
    if not with_answer:
        rows = [r[:7] + r[8:] for r in rows]
    path = tmp_path / "mmbench.tsv"
    path.write_text("\t".join(columns) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")
    return path


def answer_for(question_text: str) -> str:
    """The deterministic "model": a letter, sometimes with a period, chosen from a hash of the question."""
    digest = hashlib.sha256(question_text.encode()).digest()
    return "ABCD"[digest[0] % 4] + ("." if digest[1] % 2 else "")


class _Fake:
    """A stand-in tensor: every tensor method returns itself."""

    def __init__(self, value=None):
        self.value = value

    def __getattr__(self, name):
        return lambda *args, **kwargs: self


def official_mmbench_answers(tsv, out, monkeypatch, all_rounds: bool, lang: str) -> tuple[list[dict], list]:
    """Runs the official model_vqa_mmbench.py with its model replaced by `answer_for`; (answers, images)."""
    from tests.data.official_llava import conversation_module

    conversation_module()  # stubs llava.model, imports llava.conversation
    images = []
    mm_utils = types.ModuleType("llava.mm_utils")
    mm_utils.tokenizer_image_token = lambda prompt, *a, **k: _Fake(prompt)
    mm_utils.process_images = lambda imgs, *a, **k: [_Fake()]
    mm_utils.load_image_from_base64 = lambda data: images.append(
        np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))) or Image.new("RGB", (2, 2))
    mm_utils.get_model_name_from_path = lambda path: "llava-v1.5-7b"

    class Model:
        config = types.SimpleNamespace(mm_use_im_start_end=False)

        def generate(self, input_ids, **kwargs):
            prompt = input_ids.value
            return [prompt.split("USER: <image>\n", 1)[1].rsplit(" ASSISTANT:", 1)[0]]

    tokenizer = types.SimpleNamespace(batch_decode=lambda ids, **k: [answer_for(ids[0])])
    builder = types.ModuleType("llava.model.builder")
    builder.load_pretrained_model = lambda *a, **k: (tokenizer, Model(), None, 2048)
    stubs = {"llava.mm_utils": mm_utils, "llava.model.builder": builder,
             "llava.utils": types.SimpleNamespace(disable_torch_init=lambda: None),
             "shortuuid": types.SimpleNamespace(uuid=lambda: "id")}
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    argv = ["--question-file", str(tsv), "--answers-file", str(out), "--single-pred-prompt", "--temperature", "0",
            "--conv-mode", "vicuna_v1", "--lang", lang] + (["--all-rounds"] if all_rounds else [])
    run_official("model_vqa_mmbench", argv, monkeypatch)
    return [json.loads(line) for line in out.read_text().splitlines()], images


@pytest.mark.parametrize("all_rounds, lang", [(False, "en"), (True, "en"), (True, "cn")])
def test_mmbench_questions_equal_the_official_runner(tmp_path, monkeypatch, all_rounds, lang):
    tsv = mmbench_tsv(tmp_path)
    official, official_images = official_mmbench_answers(tsv, tmp_path / "official.jsonl", monkeypatch,
                                                         all_rounds, lang)
    assert mmbench.main(["--tsv", str(tsv), "--out-dir", str(tmp_path / "q"), "--lang", lang]
                        + (["--all-rounds"] if all_rounds else [])) == 0
    questions = load_questions(tmp_path / "q" / "questions.jsonl")
    instruction = "\n" + mmbench.INSTRUCTION[lang]
    assert [(q["question_id"], q["round_id"], q["text"]) for q in questions] == [
        (a["question_id"], a["round_id"], a["prompt"] + instruction) for a in official]
    assert len(questions) == (4 + 3 + 2 + 0 if all_rounds else 4)  # options up to the first missing one
    saved = {q["question_id"]: np.asarray(Image.open(tmp_path / "q" / "images" / q["image"]).convert("RGB"))
             for q in questions}
    assert all(np.array_equal(saved[a["question_id"]], image) for a, image in zip(official, official_images))
    ours = [answer_record(q, answer_for(q["text"]), "m") for q in questions]
    assert [a["text"] for a in ours] == [a["text"] for a in official]


def test_mmbench_prompts_hand_worked(tmp_path):
    _, rows = mmbench.read_tsv(mmbench_tsv(tmp_path))
    assert mmbench.rounds(rows[1], all_rounds=True) == [
        (0, "The photo was taken outdoors.\nWhich season?\nA. winter\nB. summer\nC. autumn\n"
            "Answer with the option's letter from the given choices directly."),
        (1, "The photo was taken outdoors.\nWhich season?\nA. summer\nB. autumn\nC. winter\n"
            "Answer with the option's letter from the given choices directly."),
        (2, "The photo was taken outdoors.\nWhich season?\nA. autumn\nB. winter\nC. summer\n"
            "Answer with the option's letter from the given choices directly.")]
    # "NA" reads as missing (as pandas does), so row 13 has no options at all; a "nan" hint is no hint
    assert mmbench.options_of(rows[3]) == [] and mmbench.rounds(rows[2], False)[0][1].startswith("How many?\nA. one")


def test_mmbench_circular_accuracy_hand_worked(tmp_path):
    tsv = mmbench_tsv(tmp_path)
    mmbench.build_questions(tsv, tmp_path / "q", all_rounds=True)
    questions = load_questions(tmp_path / "q" / "questions.jsonl")
    # gold: 10 -> B (a dog), 11 -> C (autumn), 12 -> A (one); every round right but round 2 of question 11
    correct_option = {10: "a dog", 11: "autumn", 12: "one"}
    texts = {}
    for q in questions:
        right = next(line[0] for line in q["text"].split("\n") if line[3:] == correct_option[q["question_id"]])
        wrong = "A" if right != "A" else "B"
        texts[(q["question_id"], q["round_id"])] = wrong if (q["question_id"], q["round_id"]) == (11, 2) else right
    answers = [answer_record(q, texts[(q["question_id"], q["round_id"])], "m") for q in questions]
    _, rows = mmbench.read_tsv(tsv)
    result = mmbench.score_mmbench(rows, answers)
    # 13 has no options (its "NA" reads as missing), so no round at all: counted wrong and missing
    assert result["all"] == {"accuracy": 0.75, "circular_accuracy": 0.5, "count": 4, "missing": 1}
    assert result["scene"] == {"accuracy": 0.5, "circular_accuracy": 0.0, "count": 2}
    assert result["object"] == {"accuracy": 1.0, "circular_accuracy": 1.0, "count": 2}
    assert mmbench.parse_letter("B. a dog") == "B" and mmbench.parse_letter("Because") is None
    assert mmbench.parse_letter("D", count=3) is None


def official_mmbench_submission(tsv, answers_path, upload):
    """`scripts/convert_mmbench_for_submission.py` of the official repository (its body, verbatim)."""
    df = pd.read_table(tsv)
    cur_df = df.copy()
    cur_df = cur_df.drop(columns=['hint', 'category', 'source', 'image', 'comment', 'l2-category'])
    cur_df.insert(6, 'prediction', None)
    for pred in open(answers_path):
        pred = json.loads(pred)
        cur_df.loc[df['index'] == pred['question_id'], 'prediction'] = pred['text']
    cur_df.to_excel(upload, index=False, engine='openpyxl')


@pytest.mark.parametrize("with_answer", [True, False], ids=["dev", "test"])
def test_mmbench_upload_equals_the_official_conversion(tmp_path, with_answer):
    pytest.importorskip("openpyxl")
    tsv = mmbench_tsv(tmp_path, with_answer)
    mmbench.build_questions(tsv, tmp_path / "q")
    questions = load_questions(tmp_path / "q" / "questions.jsonl")[:3]  # question 13 unanswered
    answers = write_jsonl(tmp_path / "answers.jsonl", [answer_record(q, answer_for(q["text"]), "m") for q in questions])
    official_mmbench_submission(tsv, answers, tmp_path / "official.xlsx")
    result = run_cli(["mmbench", "--answers", str(answers), "--tsv", str(tsv), "--upload", str(tmp_path / "up.xlsx")])
    assert result["questions"] == 4 and result["unanswered"] == 1
    assert ("all" in result) == with_answer
    ours, official = pd.read_excel(tmp_path / "up.xlsx"), pd.read_excel(tmp_path / "official.xlsx")
    pd.testing.assert_frame_equal(ours, official)
    assert list(ours.columns)[6] == "prediction"
    if not with_answer:
        with pytest.raises(SystemExit, match="no answers \\(a test split\\): pass --upload"):
            run_cli(["mmbench", "--answers", str(answers), "--tsv", str(tsv)])


def test_mmbench_all_rounds_upload_keeps_round_0(tmp_path):
    """With --all-rounds the upload holds round 0's answer, whose letter names the TSV's own options. The official
    conversion keeps the last round's text under the same index, a letter that names a rotated option: the
    server would score it against the wrong options."""
    pytest.importorskip("openpyxl")
    tsv = mmbench_tsv(tmp_path)
    mmbench.build_questions(tsv, tmp_path / "q", all_rounds=True)
    questions = load_questions(tmp_path / "q" / "questions.jsonl")
    # The "model" always picks the option "a dog" / "autumn" / "one": its letter moves with the rotation.
    chosen = {10: "a dog", 11: "autumn", 12: "one"}
    answers = [answer_record(q, next(line[0] for line in q["text"].split("\n") if line[3:] == chosen[q["question_id"]]),
                             "m") for q in questions]
    path = write_jsonl(tmp_path / "answers.jsonl", answers)
    official_mmbench_submission(tsv, path, tmp_path / "official.xlsx")
    run_cli(["mmbench", "--answers", str(path), "--tsv", str(tsv), "--upload", str(tmp_path / "up.xlsx")])
    ours, official = pd.read_excel(tmp_path / "up.xlsx"), pd.read_excel(tmp_path / "official.xlsx")
    # TSV letters of the chosen options: a dog = B, autumn = C, one = A (13 has no options: unanswered)
    assert ours["prediction"].tolist()[:3] == ["B", "C", "A"] and pd.isna(ours["prediction"][3])
    # the official file: the last round (10: round 3, 11: round 2, 12: round 1) -> rotated letters
    assert official["prediction"].tolist()[:3] == ["C", "A", "B"]
    pd.testing.assert_frame_equal(ours.drop(columns="prediction"), official.drop(columns="prediction"))


# ---------------------------------------------------------------- SEED-Bench


def seed_files(tmp_path):
    data = {"question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10},
            "questions": [
                {"question_id": "101", "answer": "A", "data_type": "image", "question_type_id": 1},
                {"question_id": "102", "answer": "B", "data_type": "image", "question_type_id": 1},
                {"question_id": "103", "answer": "C", "data_type": "image", "question_type_id": 2},
                {"question_id": "104", "answer": "D", "data_type": "image", "question_type_id": 2},
                {"question_id": "v1", "answer": "A", "data_type": "video", "question_type_id": 10}]}
    annotation = tmp_path / "SEED-Bench.json"
    annotation.write_text(json.dumps(data))
    # 101 right, 102 wrong ("B." is not "B": exact match), 103 right, 104 unanswered, v1 right
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 101, "prompt": "q", "text": "A"}, {"question_id": 102, "prompt": "q", "text": "B."},
        {"question_id": 103, "prompt": "q", "text": "C"}, {"question_id": "v1", "prompt": "q", "text": "A"}])
    return annotation, answers


def test_seed_accuracy_and_upload_hand_worked(tmp_path):
    annotation, answers = seed_files(tmp_path)
    upload = tmp_path / "upload.jsonl"
    result = run_cli(["seed", "--answers", str(answers), "--annotations", str(annotation), "--upload", str(upload)])
    assert result["accuracy"] == pytest.approx(3 / 5) and result["image_accuracy"] == pytest.approx(2 / 4)
    assert result["video_accuracy"] == 1.0 and result["missing"] == 1 and result["uploaded"] == 4
    assert result["by_type"] == {"Scene Understanding": 0.5, "Instance Identity": 0.5, "Action Recognition": 1.0}
    # the official upload lines: annotation question ids (strings here) and the raw answer text
    assert [json.loads(line) for line in upload.read_text().splitlines()] == [
        {"question_id": "101", "prediction": "A"}, {"question_id": "102", "prediction": "B."},
        {"question_id": "103", "prediction": "C"}, {"question_id": "v1", "prediction": "A"}]


# ---------------------------------------------------------------- MM-Vet results, VizWiz


def test_mm_vet_results_file_as_the_official_conversion(tmp_path):
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 0, "prompt": "q", "text": "Yes."},
                                                       {"question_id": 7, "prompt": "q", "text": "2"}])
    results = tmp_path / "results.json"
    assert run_cli(["mm-vet-results", "--answers", str(answers), "--results", str(results)])["answers"] == 2
    assert json.loads(results.read_text()) == {"v1_0": "Yes.", "v1_7": "2"}  # convert_mmvet_for_eval.py


def test_vizwiz_upload_as_the_official_conversion(tmp_path):
    """`scripts/convert_vizwiz_for_submission.py`: EvalAIAnswerProcessor of every answer, in question order."""
    processor = official_module("m4c_evaluator").EvalAIAnswerProcessor()
    questions = [{"question_id": i, "image": f"VizWiz_test_{i:08d}.jpg", "text": "What is this?"} for i in range(4)]
    texts = ["Unanswerable.", "A can of Coke", "two dollars", "It's blue!"]
    question_file = write_jsonl(tmp_path / "llava_test.jsonl", questions)
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": i, "prompt": "q", "text": t}
                                                       for i, t in reversed(list(enumerate(texts)))])
    upload = tmp_path / "upload.json"
    run_cli(["vqa-submission", "--answers", str(answers), "--questions", str(question_file), "--style", "vizwiz",
             "--upload", str(upload)])
    results = {i: t for i, t in enumerate(texts)}
    official = [{"image": q["image"], "answer": processor(results[q["question_id"]])} for q in questions]
    assert json.loads(upload.read_text()) == official
