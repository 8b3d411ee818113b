"""Quantized models end to end: `convert quantize` writes our format, `load_model` and the CLIs read it (or
quantize at load time), and int8 greedy answers follow the float model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from llava_jax.convert import native
from llava_jax.infer import quant_quality
from llava_jax.infer.generate import Generator, ModelLoadError, load_model
from llava_jax.models import quant

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [f"USER: <image>\nQuestion {i}: what is in the picture? ASSISTANT:" for i in range(6)]


def run(module: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], text=True, capture_output=True, env=env,
                          cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def int8_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "llava-v1.5-tiny-int8"
    done = run("llava_jax.convert", "quantize", "--model", model_dir, "--bits", 8, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "int8" in done.stdout
    return out


def answers(generator: Generator, images) -> list[list[int]]:
    out = generator.generate_tokens(PROMPTS, images, max_new_tokens=12)
    return [t.tolist() for t in out]


def test_convert_quantize_writes_our_format(int8_dir, model_dir):
    meta = json.loads((int8_dir / native.MODEL_JSON).read_text())
    assert meta["quantization"]["__dataclass__"] == "llava_jax.models.quant:QuantConfig"
    assert meta["quantization"]["bits"] == 8
    assert (int8_dir / "tokenizer_config.json").is_file() and (int8_dir / "preprocessor_config.json").is_file()
    model = native.load(int8_dir)
    assert quant.quantization_of(model) == quant.QuantConfig(bits=8)
    q_proj = model.language_model.model.layers.self_attn.q_proj.weight
    assert isinstance(q_proj, quant.QuantizedWeight) and q_proj.qvalue.dtype == np.int8
    assert isinstance(model.vision_tower.vision_model.embeddings.patch_embedding.weight, nnx.Param)


def test_quantized_type_outside_the_allow_list_is_refused(int8_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((int8_dir / native.MODEL_JSON).read_text())
    meta["quantization"]["__dataclass__"] = "os:system"
    (bad / native.MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(native.FormatError, match="not one of ours"):
        native.read_quantization(bad)


def test_int8_greedy_follows_float_and_load_time_quantize(model_dir, int8_dir):
    images = [[Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 30, 3), np.uint8))]
              for i in range(len(PROMPTS))]
    float_model, tokenizer, image_config, template = load_model(model_dir)
    reference = answers(Generator(float_model, tokenizer, image_config=image_config, template=template), images)
    saved, *_ = load_model(int8_dir)
    at_load, *_ = load_model(model_dir, quantize=8)
    from_folder = answers(Generator(saved, tokenizer, image_config=image_config, template=template), images)
    from_flag = answers(Generator(at_load, tokenizer, image_config=image_config, template=template), images)
    assert from_folder == from_flag  # the same quantization, saved or at load time
    agreement = quant_quality.greedy_agreement(reference, from_folder)
    assert agreement >= 0.9, (agreement, reference, from_folder)
    with pytest.raises(ModelLoadError, match="already quantized"):
        load_model(int8_dir, quantize=4)


def test_eval_cli_takes_quantize_flag(model_dir, tmp_path):
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "a.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": "a.png", "text": "What is it?"}) + "\n")
    done = run("llava_jax.eval", "--model", model_dir, "--questions", questions, "--images", tmp_path,
               "--answers", tmp_path / "a.jsonl", "--max-new-tokens", 4, "--quantize", 4, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])["question_id"] == 1


def test_chat_serve_and_bench_parse_quantize():
    from llava_jax.infer import bench, chat
    from llava_jax.infer.serve import cli

    assert chat.build_parser().parse_args(["--model", "m", "--quantize", "8"]).quantize == 8
    assert cli.build_parser().parse_args(["--model", "m", "--quantize", "4"]).quantize == 4
    assert bench.build_parser().parse_args(["generate", "--quantize", "4"]).quantize == 4
    assert chat.build_parser().parse_args(["--model", "m"]).quantize is None
    with pytest.raises(SystemExit):
        chat.build_parser().parse_args(["--model", "m", "--quantize", "3"])
