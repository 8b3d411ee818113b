"""transformers LLaVA-NeXT / LLaVA-OneVision -> import -> export -> transformers again: tensors bitwise, config,
processor files, and the reloaded model's logits; configs we cannot honour refused naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

import llava_jax.convert as convert
from llava_jax.convert import checkpoint_io
from llava_jax.convert.hf_llava_next import next_tensor_name_to_ours
from llava_jax.convert.params import state_dict
from tests.models import anyres_helpers as H

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                 "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
FAMILIES = {"next": (transformers.LlavaNextForConditionalGeneration, H.next_config),
            "onevision": (transformers.LlavaOnevisionForConditionalGeneration, H.onevision_config)}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    H.tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory, tokenizer_dir):
    """(name, source dir, transformers model, our model, export dir)."""
    root = tmp_path_factory.mktemp(request.param)
    model_class, config = FAMILIES[request.param]
    hf = H.save(model_class, config(), root / "hf", seed=3)
    ours = convert.from_hf(root / "hf", dtype="float32")
    out = convert.to_hf(ours, root / "export", tokenizer=tokenizer_dir, chat_template=CHAT_TEMPLATE,
                        max_shard_size="400KB")
    return request.param, root / "hf", hf, ours, out


def test_export_tensors_bitwise_identical(exported):
    _, src_dir, _, _, out = exported
    src, dst = checkpoint_io.CheckpointReader(src_dir), checkpoint_io.CheckpointReader(out)
    renamed = {next_tensor_name_to_ours(n): n for n in src.names()}
    assert "image_newline" in renamed and set(renamed) == set(dst.names())
    for ours, theirs in renamed.items():
        a, b = src.get(theirs), dst.get(ours)
        assert a.dtype == b.dtype and np.array_equal(a, b), ours


def test_export_config_equals_source(exported):
    _, src_dir, _, _, out = exported
    a, b = (json.loads((d / "config.json").read_text()) for d in (src_dir, out))
    drop = {"projection_dim"}  # CLIPVisionModelWithProjection's, not part of our config
    assert {k: v for k, v in a["vision_config"].items() if k not in drop} == \
        {k: v for k, v in b["vision_config"].items() if k not in drop}
    text = a["text_config"]  # Qwen2 configs leave head_dim implicit; ours writes it
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    assert text == b["text_config"]
    rest = {"vision_config", "text_config", "image_seq_length"}  # transformers' NeXT default is 576, unused
    assert {k: v for k, v in a.items() if k not in rest} == {k: v for k, v in b.items() if k not in rest}


def _inputs(name: str, out) -> dict:
    if name == "next":
        processor = transformers.AutoProcessor.from_pretrained(out)
        assert isinstance(processor, transformers.LlavaNextProcessor)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"},
                                                 {"type": "image"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert prompt == "USER: <image>\nHi<image>\n ASSISTANT:"
        return processor(images=H.images((31, 77), (45, 47)), text=prompt, return_tensors="np")
    # OneVision's processor needs torchvision for its video processor: check its files, count as it does.
    fields = json.loads((out / "processor_config.json").read_text())
    assert fields["vision_aspect_ratio"] == "anyres_max_1" and fields["num_image_tokens"] == 26
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    image_processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert image_processor.image_grid_pinpoints == H.PINPOINTS and image_processor.size["height"] == H.TILE
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["<image>", "<video>"]) == [H.IMAGE_ID, H.VIDEO_ID]
    inputs = H.onevision_inputs([H.images((50, 57))], "<image>\nand " + "<video>" * H.video_token_count(8))
    return {**inputs, "pixel_values_videos": H.video()}


def test_transformers_loads_export_to_the_same_logits(exported):
    name, _, hf, ours, out = exported
    reloaded, info = type(hf).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    inputs = _inputs(name, out)
    ref = H.torch_logits(hf, inputs)
    np.testing.assert_array_equal(H.torch_logits(reloaded.eval(), inputs), ref)
    H.assert_close(H.our_logits(ours, inputs), ref)


def test_in_memory_layout_imports_the_same(exported, tmp_path):
    """transformers' in-memory names (model.image_newline, model.vision_tower.*, lm_head.*)."""
    from safetensors.torch import save_file

    _, src_dir, hf, ours, _ = exported
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.image_newline" in tensors
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src_dir / "config.json").read_text())
    a, b = state_dict(ours), state_dict(convert.from_hf(tmp_path, dtype="float32"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("field, value", [("vision_feature_select_strategy", "full"),
                                          ("vision_aspect_ratio", "anyres_max_nine"),
                                          ("projector_hidden_act", "relu")])
def test_import_refuses_what_we_cannot_honour(exported, tmp_path, field, value):
    name, src_dir, _, _, _ = exported
    if field == "vision_aspect_ratio" and name == "next":
        pytest.skip("LLaVA-NeXT has no vision_aspect_ratio")
    config = json.loads((src_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    (tmp_path / "model.safetensors").symlink_to(src_dir / "model.safetensors")
    with pytest.raises(checkpoint_io.CheckpointError, match=field):
        convert.from_hf(tmp_path)


def test_export_refuses_a_projector_transformers_lacks(exported, tmp_path):
    import dataclasses

    from flax import nnx

    name, _, _, ours, _ = exported
    if name != "next":
        pytest.skip("one family is enough")
    cfg = dataclasses.replace(ours.config, projector="linear")
    model = nnx.eval_shape(lambda: type(ours)(cfg, rngs=nnx.Rngs(0)))  # refused before any tensor is read
    with pytest.raises(ValueError, match="projector 'linear'"):
        convert.to_hf(model, tmp_path / "out")


def test_our_format_round_trip(exported, tmp_path):
    """model.json + Orbax params: the config (pinpoints, aspect ratio) and every tensor come back."""
    from llava_jax.convert import native

    _, _, _, ours, _ = exported
    back = native.load(native.save(ours, tmp_path / "native"))
    assert type(back) is type(ours) and back.config == ours.config
    a, b = state_dict(ours), state_dict(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
