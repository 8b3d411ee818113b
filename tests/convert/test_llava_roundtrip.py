"""transformers LLaVA -> import -> logits -> export -> transformers again (tensors, config, processor, logits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

import llava_jax.convert as convert
from llava_jax.convert import checkpoint_io
from llava_jax.convert.hf_llava import llava_tensor_name_to_ours
from llava_jax.convert.params import state_dict
from tests.convert import helpers

IMAGE = helpers.VOCAB - 1
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                 "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(source dir, transformers model, our model, export dir) with a tokenizer lacking <image>."""
    root = tmp_path_factory.mktemp("llava")
    hf = helpers.save_tiny_llava(root / "hf", max_shard_size="100KB")
    tokenizer = helpers.save_tiny_tokenizer(root / "tok", size=IMAGE)  # <image> will get id IMAGE.
    model = convert.from_hf(root / "hf")
    out = convert.to_hf(model, root / "export", tokenizer=tokenizer, max_shard_size="150KB",
                        chat_template=CHAT_TEMPLATE)
    return root / "hf", hf, model, out


def _ours_logits(model, ids, pix):
    return helpers.forward(model, ids, pix)


def _torch_logits(model, ids, pix):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()


def test_import_logits_match_transformers(exported):
    _, hf, model, _ = exported
    assert (exported[0] / checkpoint_io.SAFE_INDEX).exists()  # The source is sharded.
    # Same length as the processor test below, so the eager forward reuses its compiled ops.
    ids, pix = helpers.image_ids([5], [7, 8], IMAGE), helpers.pixels()
    ref = _torch_logits(hf, ids, pix)
    np.testing.assert_allclose(_ours_logits(model, ids, pix), ref, atol=1e-4 * np.abs(ref).max())


def test_export_tensors_bitwise_identical_and_sharded(exported):
    src_dir, _, _, out = exported
    src, dst = checkpoint_io.CheckpointReader(src_dir), checkpoint_io.CheckpointReader(out)
    renamed = {llava_tensor_name_to_ours(n): n for n in src.names()}
    assert set(renamed) == set(dst.names())
    for ours, theirs in renamed.items():
        a, b = src.get(theirs), dst.get(ours)
        assert a.dtype == b.dtype and np.array_equal(a, b), ours
    # The classic on-disk layout of REFERENCE.md, in several shards listed by the index.
    index = json.loads((out / checkpoint_io.SAFE_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    prefixes = {n.split(".")[0] if not n.startswith("language_model") else ".".join(n.split(".")[:2])
                for n in index["weight_map"]}
    assert prefixes == {"vision_tower", "multi_modal_projector", "language_model.model", "language_model.lm_head"}
    assert all(n.startswith("vision_tower.vision_model.") for n in index["weight_map"] if "vision" in n)


def _without(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def test_export_config_equals_source(exported):
    src_dir, _, _, out = exported
    a = json.loads((src_dir / "config.json").read_text())
    b = json.loads((out / "config.json").read_text())
    # projection_dim belongs to CLIPVisionModelWithProjection and is not part of our config.
    assert _without(a["vision_config"], {"projection_dim"}) == _without(b["vision_config"], {"projection_dim"})
    assert a["text_config"] == b["text_config"]
    assert _without(a, {"vision_config", "text_config"}) == _without(b, {"vision_config", "text_config"})


def test_transformers_loads_export_and_processor(exported):
    _, hf, model, out = exported
    reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert isinstance(processor, transformers.LlavaProcessor)
    image = Image.fromarray(np.random.RandomState(3).randint(0, 255, (41, 37, 3), dtype=np.uint8))
    inputs = processor(images=image, text="w5 <image> w7 w8", return_tensors="np")
    ids = inputs["input_ids"]
    assert (ids == IMAGE).sum() == helpers.NUM_PATCHES == model.config.image_seq_length
    assert inputs["pixel_values"].shape == (1, 3, helpers.IMAGE_SIZE, helpers.IMAGE_SIZE)
    # The official CLIP preprocessing: normalized with OpenAI CLIP statistics.
    assert processor.image_processor.image_mean == pytest.approx(list(convert.CLIP_MEAN))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w5 w6"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nw5 w6 ASSISTANT:"
    ref = _torch_logits(reloaded.eval(), ids, inputs["pixel_values"])
    np.testing.assert_allclose(_ours_logits(model, ids, inputs["pixel_values"]), ref, atol=1e-4 * np.abs(ref).max())


def test_in_memory_layout_imports_the_same(exported, tmp_path):
    """transformers 4.52+/5.x in-memory names (model.vision_tower.*, model.language_model.*, lm_head.*)."""
    src_dir, hf, model, _ = exported
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src_dir / "config.json").read_text())
    a, b = state_dict(model), state_dict(convert.from_hf(tmp_path))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_export_grows_vocab_for_image_token(exported, tmp_path):
    """A tokenizer that fills the whole vocabulary: <image> is appended and the embeddings padded."""
    src_dir, _, _, _ = exported
    config = json.loads((src_dir / "config.json").read_text())
    config["image_token_index"] = helpers.VOCAB
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    reader = checkpoint_io.CheckpointReader(src_dir)
    save_file({n: torch.from_numpy(reader.get(n).copy()) for n in reader.names()},
              str(tmp_path / "src" / "model.safetensors"))
    model = convert.from_hf(tmp_path / "src")
    tokenizer = helpers.save_tiny_tokenizer(tmp_path / "tok", size=helpers.VOCAB)
    out = convert.to_hf(model, tmp_path / "out", tokenizer=tokenizer)
    reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.text_config.vocab_size == helpers.VOCAB + 1
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(convert.IMAGE_TOKEN) == helpers.VOCAB
    ours = state_dict(model)
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        exported_table = checkpoint_io.CheckpointReader(out).get(name)
        assert np.array_equal(exported_table[:-1], ours[name])
        np.testing.assert_allclose(exported_table[-1], ours[name].mean(0), rtol=1e-6, atol=1e-7)
    # A tokenizer where adding <image> cannot give the model's id.
    with pytest.raises(ValueError, match="image_token_index"):
        convert.to_hf(model, tmp_path / "bad", tokenizer=helpers.save_tiny_tokenizer(tmp_path / "t2", size=50))
