"""User errors of the data.check, eval, chat and convert CLIs: exit 2 with one line naming the path or
option, never a traceback (the training CLI's are in tests/train/test_cli_errors.py)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "d.json").write_text(json.dumps([{"id": "1", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo."}]}]))
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "text": "What?", "image": "x.png"}) + "\n")
    (tmp_path / "images").mkdir()
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    (tmp_path / "x.png").write_bytes(png.getvalue())
    return tmp_path


def cases(t):
    from llava_jax.convert.__main__ import main as convert
    from llava_jax.data.check import main as check
    from llava_jax.infer.chat import main as chat
    from llava_jax.infer.evaluate import main as evaluate

    return {
        "check_missing_data": (check, ["--data", f"{t}/nope.json"], "nope.json"),
        "check_data_is_a_folder": (check, ["--data", f"{t}/images"], "images"),
        "check_empty_data": (check, ["--data", f"{t}/empty.json"], "empty.json: no samples"),
        "check_images_is_a_file": (check, ["--data", f"{t}/d.json", "--images", f"{t}/a_file"], "a_file"),
        "check_missing_tokenizer": (check, ["--data", f"{t}/d.json", "--tokenizer", f"{t}/tok"], "tok"),
        "check_json_below_a_file": (check, ["--data", f"{t}/d.json", "--json", f"{t}/a_file/r.json"], "--json"),
        "check_zero_workers": (check, ["--data", f"{t}/d.json", "--workers", "0"], "--workers"),
        "eval_missing_questions": (evaluate, ["--model", f"{t}/m", "--questions", f"{t}/nope.jsonl", "--images",
                                              f"{t}/images", "--answers", f"{t}/a.jsonl"], "nope.jsonl"),
        "eval_images_is_a_file": (evaluate, ["--model", f"{t}/m", "--questions", f"{t}/q.jsonl", "--images",
                                             f"{t}/a_file", "--answers", f"{t}/a.jsonl"], "a_file"),
        "eval_unknown_template": (evaluate, ["--model", f"{t}/m", "--questions", f"{t}/q.jsonl", "--images",
                                             f"{t}/images", "--answers", f"{t}/a.jsonl", "--template", "nope"],
                                  "nope"),
        "eval_missing_model": (evaluate, ["--model", f"{t}/m", "--questions", f"{t}/q.jsonl", "--images",
                                          f"{t}", "--answers", f"{t}/a.jsonl"], f"{t}/m"),
        "chat_missing_model": (chat, ["--model", f"{t}/m", "--prompt", "hi"], f"{t}/m"),
        "chat_model_is_a_file": (chat, ["--model", f"{t}/a_file", "--prompt", "hi"], "a_file"),
        "chat_missing_image": (chat, ["--model", f"{t}/m", "--image", f"{t}/nope.png"], "nope.png"),
        "convert_missing_input": (convert, ["import-llava", f"{t}/m", f"{t}/out"], f"{t}/m"),
        "convert_export_missing_input": (convert, ["export", f"{t}/m", f"{t}/out"], f"{t}/m"),
        "convert_input_is_a_file": (convert, ["import-llava", f"{t}/a_file", f"{t}/out"], "a_file"),
    }


def test_user_errors_exit_2_with_one_line(files, capsys):
    for name, (main, argv, named) in cases(files).items():
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (name, code, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert named in err, (name, err)


def test_tfds_builder_user_errors_exit_2_with_one_line(files, capsys):
    from llava_jax.data.tfds_builder import main

    for argv, named in ((["--data", f"{files}/nope.json", "--out", f"{files}/o"], "nope.json"),
                        (["--data", f"{files}/d.json", "--images", f"{files}/a_file", "--out", f"{files}/o"],
                         "a_file")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err[-1].startswith("error: ") and named in err[-1], err
