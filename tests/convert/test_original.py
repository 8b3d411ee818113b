"""Original LLaVA checkpoints (`model.mm_projector.*`), made by the official model class of llava-torch."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

import llava_jax.convert as convert
from llava_jax.convert import checkpoint_io, hf_original
from llava_jax.convert.params import state_dict
from tests.convert import helpers

VOCAB = helpers.VOCAB


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(checkpoint dir, CLIP dir, official model): a tiny LLaVA-1.5 saved by llava-torch's own class."""
    LlavaConfig, LlavaLlamaForCausalLM = helpers.official_llava_llama()
    root = tmp_path_factory.mktemp("original")
    clip_dir = root / "clip"
    helpers.save_tiny_clip(clip_dir)
    transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size=30).save_pretrained(clip_dir)
    torch.manual_seed(5)
    model = LlavaLlamaForCausalLM(LlavaConfig(**helpers.llama_config().to_dict()))
    args = types.SimpleNamespace(vision_tower=str(clip_dir), mm_vision_select_layer=-2,
                                 mm_vision_select_feature="patch", pretrain_mm_mlp_adapter=None,
                                 mm_patch_merge_type="flat", mm_projector_type="mlp2x_gelu")
    model.get_model().initialize_vision_modules(args)
    torch.nn.init.normal_(model.get_model().mm_projector[2].bias, std=0.1)  # Non-trivial biases.
    model.eval().save_pretrained(root / "llava")
    return root / "llava", clip_dir, model


def _official_logits(model, pix):
    """The official forward: one IMAGE_TOKEN_INDEX (-200) placeholder spliced by the model."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, -200, 7, 8]]), images=torch.tensor(pix)).logits.numpy()


def test_import_matches_official_forward(official):
    path, _, hf = official
    assert any(n.startswith("model.mm_projector.2.") for n in checkpoint_io.CheckpointReader(path).names())
    model = convert.from_hf(path)  # Detected as original; the tower config comes from the local mm_vision_tower.
    cfg = model.config
    assert cfg.projector == "mlp2x_gelu" and cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == "default" and cfg.image_seq_length == helpers.NUM_PATCHES
    # Like transformers' conversion: <image> = old vocab size, vocabulary padded to a multiple of 64.
    assert cfg.image_token_index == VOCAB and cfg.text.vocab_size == 256
    pix = helpers.pixels(seed=2)
    ref = _official_logits(hf, pix)
    got = helpers.forward(model, helpers.image_ids([5], [7, 8], VOCAB), pix)
    assert got.shape[1] == ref.shape[1]
    np.testing.assert_allclose(got[..., :VOCAB], ref, atol=1e-4 * np.abs(ref).max())
    embed = state_dict(model)["language_model.model.embed_tokens.weight"]
    official_embed = hf.state_dict()["model.embed_tokens.weight"].numpy()
    assert np.array_equal(embed[:VOCAB], official_embed)
    np.testing.assert_allclose(embed[VOCAB:], np.broadcast_to(official_embed.mean(0), (256 - VOCAB, 56)),
                               rtol=1e-6, atol=1e-7)


def test_tower_from_separate_clip_checkpoint(official, tmp_path):
    path, clip_dir, _ = official
    config = json.loads((path / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"  # Not a local folder.
    (tmp_path / "config.json").write_text(json.dumps(config))
    reader = checkpoint_io.CheckpointReader(path)
    save_file({n: reader.get(n) for n in reader.names() if not n.startswith("model.vision_tower.")},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(convert.CheckpointError, match=r"no vision tower.*clip-vit-large-patch14-336"):
        convert.from_original_llava(tmp_path)
    separate = state_dict(convert.from_original_llava(tmp_path, clip_path=clip_dir))
    bundled = state_dict(convert.from_original_llava(path))
    assert separate.keys() == bundled.keys()
    assert all(np.array_equal(separate[k], bundled[k]) for k in bundled)


def test_tower_config_inferred_from_shapes():
    """Without any CLIP config, the tower's config comes from tensor shapes (64-wide heads, as OpenAI CLIP)."""
    config = transformers.CLIPVisionConfig(hidden_size=128, intermediate_size=97, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=42, patch_size=6)
    with torch.device("meta"):
        tower = transformers.CLIPVisionModel(config)
    shapes = {}
    for name, tensor in tower.state_dict().items():
        ours = hf_original.original_tensor_name_to_ours("model.vision_tower.vision_tower." + name)
        if ours is not None:
            shapes[ours] = tuple(tensor.shape)
    inferred = hf_original.vision_config_from_tensors(shapes)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "num_channels"):
        assert inferred[key] == getattr(config, key), key


def test_original_names():
    rename = hf_original.original_tensor_name_to_ours
    assert rename("model.mm_projector.weight") == "multi_modal_projector.linear_1.weight"  # v1 linear
    assert rename("model.mm_projector.4.bias") == "multi_modal_projector.linear_3.bias"  # mlp3x_gelu
    assert rename("model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == \
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert rename("lm_head.weight") == "language_model.lm_head.weight"
    assert rename("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(ValueError, match="mm_projector.1"):
        rename("model.mm_projector.1.weight")
