"""`python -m llava_jax.convert`: help text and an import -> export run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

from llava_jax.convert import checkpoint_io
from llava_jax.convert.__main__ import main
from llava_jax.convert.hf_llava import llava_tensor_name_to_ours
from tests.conftest import REPO_ROOT
from tests.convert import helpers


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("import-llava", "import-clip-llm", "import-original", "export", "llava_jax.convert.load"):
        assert command in text


def test_bad_input_exits_with_message(tmp_path, capsys):
    assert main(["import-llava", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "missing" in capsys.readouterr().err


def test_import_then_export_in_subprocess(tmp_path):
    helpers.save_tiny_llava(tmp_path / "hf")
    tokenizer = helpers.save_tiny_tokenizer(tmp_path / "tok", size=helpers.VOCAB - 1)
    # One subprocess (interpreter start-up and imports dominate); the export runs through the same main().
    command = [sys.executable, "-m", "llava_jax.convert", "import-llava", str(tmp_path / "hf"),
               str(tmp_path / "ours"), "--param-dtype", "bfloat16"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported LlavaForConditionalGeneration" in result.stdout
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "out"), "--tokenizer", str(tokenizer),
                 "--max-shard-size", "200KB"]) == 0
    assert (tmp_path / "ours" / "model.json").is_file()
    src, out = checkpoint_io.CheckpointReader(tmp_path / "hf"), checkpoint_io.CheckpointReader(tmp_path / "out")
    assert (tmp_path / "out" / checkpoint_io.SAFE_INDEX).is_file()
    for name in src.names():
        got = out.get(llava_tensor_name_to_ours(name))
        assert str(got.dtype) == "bfloat16", name
        assert np.array_equal(got.astype(np.float32), src.get(name).astype("bfloat16").astype(np.float32)), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert isinstance(transformers.AutoProcessor.from_pretrained(tmp_path / "out"), transformers.LlavaProcessor)


def test_export_takes_a_training_workdir_as_chat_and_serve_do(tmp_path, capsys):
    """A finished training workdir stands for its export_hf folder (`convert.resolve_workdir`, the function
    chat and serve use); one without a finished export is one line naming it, exit 2."""
    helpers.save_tiny_llama(tmp_path / "export")
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"export_hf": str(tmp_path / "export")}))
    assert main(["export", str(workdir), str(tmp_path / "out")]) == 0
    src, out = checkpoint_io.CheckpointReader(tmp_path / "export"), checkpoint_io.CheckpointReader(tmp_path / "out")
    assert set(out.names()) == set(src.names())
    for name in src.names():
        assert np.array_equal(out.get(name), src.get(name)), name
    (workdir / "config.json").write_text(json.dumps({"export_hf": str(tmp_path / "nowhere")}))
    capsys.readouterr()
    assert main(["export", str(workdir), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {workdir}: a training workdir without a finished") and err.count("\n") == 1
    assert not (tmp_path / "out2").exists()
