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
    assert main(["import-llava", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
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
