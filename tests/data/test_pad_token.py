"""One pad-token rule (`data.tokenize.pad_token_id`) for the pipeline's batches and training's common length:
the pad token, else unk (the official LLaVA sets pad_token = unk_token), else eos; none of them is refused."""

from __future__ import annotations

import types

import pytest
import transformers

from llava_jax.data import tokenize
from llava_jax.train import inputs, setup


def test_llama2_pads_with_unk_as_the_official_llava(llama2_tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(llama2_tokenizer_dir))
    assert tok.pad_token_id is None
    official = transformers.AutoTokenizer.from_pretrained(str(llama2_tokenizer_dir))
    official.pad_token = official.unk_token  # llava/train/train.py for the v1 templates
    assert tokenize.pad_token_id(tok) == official.pad_token_id == 0
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tokenize.pad_token_id(tok) == len(tok) - 1


def test_fallbacks_and_refusal():
    def fake(**ids):
        return types.SimpleNamespace(**{"pad_token_id": None, "unk_token_id": None, "eos_token_id": None, **ids})

    assert tokenize.pad_token_id(fake(unk_token_id=3, eos_token_id=2)) == 3
    assert tokenize.pad_token_id(fake(eos_token_id=2)) == 2  # e.g. LLaMA-3: no pad, no unk
    with pytest.raises(ValueError, match="no pad, unk or eos token"):
        tokenize.pad_token_id(fake())


def test_training_and_the_pipeline_pad_alike(tmp_path):
    """A tokenizer without a pad token: the pipeline pads its rows with unk, the id training's common length
    pads with across processes (train.setup reads the same data.tokenize.pad_token_id)."""
    from llava_jax.data.images import ImageConfig
    from llava_jax.data.pipeline import PipelineConfig, make_train_iterator
    from llava_jax.data.sources import LlavaJsonSource
    from llava_jax.data.synthetic import generate

    paths = generate(tmp_path / "demo", num_stage1=0, num_stage2=8, num_eval=0, image_size=24, seed=1)
    tok = transformers.AutoTokenizer.from_pretrained(paths.tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None and tok.unk_token_id is not None
    config = PipelineConfig(sources=(LlavaJsonSource(paths.stage2, paths.images),), template="v1", max_length=96,
                            length_buckets=(96,), global_batch_size=4, num_epochs=None, image_seq_length=4,
                            image_config=ImageConfig(size=11, crop_size=11, aspect="pad"), read_threads=1,
                            report_every=0)
    batch = next(iter(make_train_iterator(config, tok, process_index=0, process_count=1)))
    padded = batch["input_ids"][batch["attention_mask"] == 0]
    assert padded.size and (padded == tok.unk_token_id).all()
    assert setup.pad_token_id is tokenize.pad_token_id and not hasattr(inputs, "pad_token_id")
