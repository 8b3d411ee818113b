"""The real stage-1 start: a Hugging Face CLIP tower and a LLaMA checkpoint (whose tokenizer lacks <image>),
a fresh projector, a few steps on LLaVA-format data, and an export that transformers loads."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
import transformers

from tests.train.test_loop import demo_data, jax_cache, run_cli  # noqa: F401 (fixtures)


def save_towers(tmp_path, tokenizer_dir):
    """Tiny random CLIP (32 px, 8 px patches) and LLaMA checkpoints with the LLaMA-2 tokenizer."""
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=97, num_hidden_layers=3, num_attention_heads=3, image_size=32,
        patch_size=8, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=60, intermediate_size=97, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    return llm


def test_stage1_from_hf_clip_and_llama_exports_a_loadable_llava(tmp_path, llama2_tokenizer_dir, demo_data,
                                                                 jax_cache):
    llm = save_towers(tmp_path, llama2_tokenizer_dir)
    workdir, export = tmp_path / "stage1", tmp_path / "hf"
    overrides = {
        "model.clip_path": tmp_path / "clip", "model.llm_path": tmp_path / "llm",
        "model.dtype": "float32", "model.frozen_dtype": "float32", "model.remat": "none",
        "data.json": demo_data / "stage1.json", "data.images": demo_data / "images", "data.worker_count": 0,
        "data.max_length": 96, "data.length_buckets": "(96,)", "train.global_batch_size": 4,
        "train.num_steps": 2, "log_every": 1, "export_hf": export, "mesh.fsdp": 1, "mesh.data": -1,
    }
    done = run_cli(1, workdir, overrides, demo_data=None, jax_cache=jax_cache, variant="vicuna7b")
    assert "projector" in done.stdout and "frozen" in done.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)

    # The exported LLaVA: <image> appended to the 32000-token vocabulary, towers unchanged, loadable.
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert tokenizer.convert_tokens_to_ids("<image>") == 32000 == model.config.image_token_index
    embed = model.get_input_embeddings().weight.detach()
    assert embed.shape[0] >= 32001
    torch.testing.assert_close(embed[:32000], llm.get_input_embeddings().weight.detach(), rtol=0, atol=0)
    shutil.rmtree(workdir / "checkpoints")
