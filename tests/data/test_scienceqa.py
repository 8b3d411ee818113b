"""ScienceQA conversion: hand-worked samples of the official `convert_sqa_to_llava.py` output, quirks included;
the `configs/stage2.py:scienceqa` variant resolves and validates."""

import importlib.util
import json
from pathlib import Path

import pytest

from llava_jax.data import scienceqa

REPO = Path(__file__).resolve().parents[2]

PROBLEMS = {
    "1": {"question": "Which figure of speech is used in this text?", "hint": "Sing, O goddess, the anger of Achilles.",
          "choices": ["chiasmus", "apostrophe"], "answer": 1,
          "lecture": "Figures of speech are words.\nThey add meaning.",
          "solution": "The text uses apostrophe.", "image": None},
    "2": {"question": "What is the capital of Utah?", "hint": "", "choices": ["Salt Lake City", "Provo", "Denver"],
          "answer": 0, "lecture": "", "solution": "", "image": "image.png"},
    "3": {"question": "Which is a solid?", "hint": "Question: read the passage.", "choices": ["milk", "rock"],
          "answer": 1, "lecture": "Matter has states.", "solution": "", "image": None},
}


def test_convert_qcm_lea_hand_worked():
    assert scienceqa.convert(PROBLEMS, ["2", "1"]) == [
        {"id": "2", "image": "2/image.png", "conversations": [
            {"from": "human", "value": "What is the capital of Utah?\nContext: N/A\n"
                                       "Options: (A) Salt Lake City (B) Provo (C) Denver\n<image>"},
            # "Answer: " + "" + " " + "" + " The answer is A.": three spaces, halved once to two, then
            # "Answer: " removed: one leading space stays (as in the official file)
            {"from": "gpt", "value": " The answer is A."}]},
        {"id": "1", "conversations": [
            {"from": "human", "value": "Which figure of speech is used in this text?\n"
                                       "Context: Sing, O goddess, the anger of Achilles.\n"
                                       "Options: (A) chiasmus (B) apostrophe"},
            {"from": "gpt", "value": "Figures of speech are words.\nThey add meaning. The text uses apostrophe. "
                                     "The answer is B."}]},
    ]


def test_other_formats_and_official_quirks_hand_worked():
    # the evaluation format: the context comes first, so "Question: " stays
    assert scienceqa.prompt_pair(PROBLEMS["2"], "CQM-A") == (
        "Context: N/A\nQuestion: What is the capital of Utah?\nOptions: (A) Salt Lake City (B) Provo (C) Denver",
        "The answer is A.")
    # every "Question: " goes, the hint's too; an empty "BECAUSE:" at the end is cut
    assert scienceqa.prompt_pair(PROBLEMS["3"], "QCM-AL") == (
        "Which is a solid?\nContext: read the passage.\nOptions: (A) milk (B) rock", "The answer is B.")
    assert scienceqa.prompt_pair(PROBLEMS["3"], "QCM-LEPA")[1] == "LECTURE: Matter has states.\n###\nANSWER: B."
    assert scienceqa.prompt_pair(PROBLEMS["1"], "QCML-A")[0].endswith(
        "\nBECAUSE: Figures of speech are words.\nThey add meaning.")
    with pytest.raises(ValueError, match="unknown prompt format 'QMC-A'"):
        scienceqa.prompt_pair(PROBLEMS["1"], "QMC-A")


def test_cli_writes_the_official_file_name(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["1", "2", "3"], "test": ["9"]}))
    assert scienceqa.main(["--base-dir", str(tmp_path), "--split", "train"]) == 0
    written = json.loads((tmp_path / "llava_train_QCM-LEA.json").read_text())
    assert written == scienceqa.convert(PROBLEMS, ["1", "2", "3"])
    assert scienceqa.main(["--base-dir", str(tmp_path), "--split", "test"]) == 2  # names the missing problem


def test_scienceqa_config_variant_resolves_and_validates():
    from llava_jax.train import recipes

    spec = importlib.util.spec_from_file_location("stage2_config", REPO / "configs" / "stage2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("scienceqa")
    recipes.validate(c)
    assert (c.data.json, c.data.images) == ("data/scienceqa/llava_train_QCM-LEA.json", "data/scienceqa/images/train")
    base = recipes.stage_config(2, None)
    assert (c.train.num_epochs, c.optim.lr, c.data.template) == (12, 2e-5, "v1")
    assert c.train.global_batch_size == base.train.global_batch_size and c.data.packing == base.data.packing
    assert c.data.image_aspect == "resize" and not c.data.group_by_modality_length
    assert module.get_config("vicuna13b,scienceqa").model.llm_path == "lmsys/vicuna-13b-v1.5"
    with pytest.raises(ValueError, match="'scienceqa' is a stage-2 variant"):
        recipes.stage_config(1, "scienceqa")


def test_converted_test_split_is_asked_as_model_vqa_science(tmp_path):
    """The CQM-A file of our converter feeds `python -m llava_jax.eval` (question = human turn, no <image>, letter
    instruction), as `model_vqa_science.py --single-pred-prompt` asks it."""
    from llava_jax.infer.questions import SCIENCEQA_LETTER_PROMPT, load_question_file

    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps(scienceqa.convert(PROBLEMS, ["2", "1"], "CQM-A")))
    questions = load_question_file(path)
    assert questions[0] == {"question_id": "2", "image": "2/image.png", "text":
                            "Context: N/A\nQuestion: What is the capital of Utah?\nOptions: (A) Salt Lake City "
                            "(B) Provo (C) Denver\n" + SCIENCEQA_LETTER_PROMPT}
    assert "image" not in questions[1] and questions[1]["text"].endswith("(B) apostrophe\n" + SCIENCEQA_LETTER_PROMPT)
