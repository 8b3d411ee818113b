"""LlavaForConditionalGeneration parity against transformers (PyTorch, CPU, float32, tiny random models)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from llava_jax.convert import hf_llava
from llava_jax.convert.params import state_dict
from llava_jax.models.llava import PRESETS, LlavaConfig, LlavaForConditionalGeneration, count_params
from tests.models.test_clip import loaded_model

IMAGE = 199  # image token id (inside the vocabulary, like llava-hf's 32000)
VOCAB = 211
VISION = dict(model_type="clip_vision_model", hidden_size=48, intermediate_size=97, num_hidden_layers=3,
              num_attention_heads=3, image_size=30, patch_size=6)
TEXT = dict(model_type="llama", vocab_size=VOCAB, hidden_size=60, intermediate_size=97, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=3, rms_norm_eps=1e-6)


class LinearProjector(torch.nn.Module):
    """The official LLaVA v1 `linear` projector (one nn.Linear), under our name `linear_1`."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.linear_1 = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.linear_1(x)


def build(projector="mlp2x_gelu", seed=0, **llava_kwargs):
    """(transformers model, our model with the same weights)."""
    kwargs = dict(vision_config=VISION, text_config=TEXT, image_token_index=IMAGE, image_seq_length=25)
    kwargs.update(llava_kwargs)
    torch.manual_seed(seed)
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**kwargs)).eval()
    if projector == "linear":
        layers = kwargs.get("vision_feature_layer", -2)
        width = kwargs["vision_config"]["hidden_size"] * (1 if isinstance(layers, int) else len(layers))
        hf.model.multi_modal_projector = LinearProjector(width, TEXT["hidden_size"])
    with torch.no_grad():  # non-trivial norm weights so that a missing or swapped norm shows up
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    cfg = hf_llava.llava_config_from_hf(hf.config)
    if projector == "linear":
        cfg = dataclasses.replace(cfg, projector="linear")
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    ours = loaded_model(lambda: LlavaForConditionalGeneration(cfg), hf_llava.llava_tensors_to_ours(tensors),
                        "tiny LLaVA")
    return hf, ours


@pytest.fixture(scope="module")
def pair():
    return build()


@pytest.fixture(scope="module")
def forward(pair):
    """Our jitted forward; every argument is always passed so that equal shapes share one compilation."""
    graphdef, params = nnx.split(pair[1])
    fn = jax.jit(lambda p, ids, px, mask, image_mask: nnx.merge(graphdef, p)(
        ids, px, attention_mask=mask, image_mask=image_mask))

    def run(ids, px, mask=None, image_mask=None):
        mask = np.ones_like(ids) if mask is None else mask
        image_mask = np.ones(len(px), bool) if image_mask is None else image_mask
        return np.asarray(fn(params, jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask), jnp.asarray(image_mask)))

    return run


def tokens(rng, n):
    return rng.integers(3, IMAGE, size=n)


def row(rng, *parts):
    """Concatenates text lengths (int) and images ('img' = 25 image tokens)."""
    return np.concatenate([np.full(25, IMAGE) if p == "img" else tokens(rng, p) for p in parts])


def pad_rows(rows, side):
    t = max(len(r) for r in rows)
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


def pixels(n, seed=0, size=30):
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def reference_logits(hf, ids, px=None, mask=None):
    """transformers' logits with positions cumsum(mask) - 1 (what generate uses for padded batches)."""
    kwargs = dict(input_ids=torch.from_numpy(ids))
    if px is not None:
        kwargs["pixel_values"] = torch.from_numpy(px)
    if mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(mask)
        kwargs["position_ids"] = torch.from_numpy(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    with torch.no_grad():
        return hf(**kwargs).logits.numpy()


def assert_logits_close(ours, ref, mask=None):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    if mask is not None:
        ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_one_image(pair, forward):
    hf, ours = pair
    rng = np.random.default_rng(0)
    ids, px = row(rng, 4, "img", 9)[None], pixels(1)
    ref = reference_logits(hf, ids, px)
    assert_logits_close(ours(jnp.asarray(ids), jnp.asarray(px)), ref)  # eager
    # The image matters: other pixels give other logits.
    other = forward(ids, pixels(1, seed=5))
    assert np.abs(other - ref).max() > 1e-2


def test_two_images_in_a_row_and_a_text_only_row(pair, forward):
    hf, _ = pair
    rng = np.random.default_rng(1)
    rows = [row(rng, 3, "img", 5, "img", 5), row(rng, 63), row(rng, "img", 38)]
    ids, mask = pad_rows(rows, "right")
    assert mask.all()  # equal lengths: no padding here
    px = pixels(3, seed=1)
    assert_logits_close(forward(ids, px), reference_logits(hf, ids, px))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(pair, forward, side):
    hf, _ = pair
    rng = np.random.default_rng(2)
    ids, mask = pad_rows([row(rng, 2, "img", 7), row(rng, 11), row(rng, "img", 3, "img", 10)], side)
    assert ids.shape == (3, 63) and not mask.all()
    px = pixels(3, seed=2)
    assert_logits_close(forward(ids, px, mask), reference_logits(hf, ids, px, mask), mask)


def test_padding_images_are_skipped(pair, forward):
    hf, ours = pair
    rng = np.random.default_rng(3)
    ids = np.stack([row(rng, 3, "img", 8), row(rng, "img", 11)])
    px = pixels(2, seed=3)
    ref = reference_logits(hf, ids, px)
    # Static shapes for training: 4 image slots, the 2 real images at slots 1 and 3.
    padded_px = np.stack([pixels(1, seed=9)[0], px[0], np.zeros_like(px[0]), px[1]])
    image_mask = np.array([False, True, False, True])
    assert_logits_close(forward(ids, padded_px, image_mask=image_mask), ref)  # jit
    # Eagerly the count check uses image_mask: 2 real images for 2 token groups.
    assert_logits_close(ours(jnp.asarray(ids), jnp.asarray(padded_px), image_mask=jnp.asarray(image_mask)), ref)


def test_text_only_batch_without_pixels(pair):
    hf, ours = pair
    ids = np.random.default_rng(4).integers(3, IMAGE, size=(2, 17))
    assert_logits_close(ours(jnp.asarray(ids)), reference_logits(hf, ids))


def test_image_token_count_mismatch_raises(pair):
    hf, ours = pair
    rng = np.random.default_rng(5)
    ids = jnp.asarray(np.stack([row(rng, 3, "img", 8), row(rng, "img", 11)]))
    with pytest.raises(ValueError, match=r"50 image tokens \(id 199; per row \[25, 25\]\) but 3 images"):
        ours(ids, jnp.asarray(pixels(3)))
    with pytest.raises(ValueError, match="but 0 images"):
        ours(ids)
    with pytest.raises(ValueError, match="but 1 images"):
        ours(ids, jnp.asarray(pixels(2)), image_mask=jnp.asarray([True, False]))
    # 75 tokens = 3 images in total, but a group straddles the rows (30 + 45).
    split = np.stack([np.concatenate([tokens(rng, 20), np.full(30, IMAGE)]),
                      np.concatenate([np.full(45, IMAGE), tokens(rng, 5)])])
    with pytest.raises(ValueError, match="row 0 holds 30 image tokens, not a multiple of image_seq_length 25"):
        ours(jnp.asarray(split), jnp.asarray(pixels(3)))
    # transformers refuses the same input.
    with pytest.raises(Exception, match="do not match"):
        reference_logits(hf, np.array(ids), pixels(3))


@pytest.mark.parametrize("layers,strategy,projector", [((-2, -5), "default", "mlp2x_gelu"),
                                                      ((-1, -4), "full", "linear")])
def test_feature_layers_strategy_and_projector(layers, strategy, projector):
    vision = dict(VISION, num_hidden_layers=4)  # -5 is then hidden_states[0], the embeddings
    seq = 25 + (strategy == "full")
    hf, ours = build(projector, seed=6, vision_config=vision, image_seq_length=seq,
                     vision_feature_layer=list(layers) if isinstance(layers, tuple) else layers,
                     vision_feature_select_strategy=strategy)
    assert ours.config.image_seq_length == seq and ours.config.projector == projector
    rng = np.random.default_rng(7)
    ids = np.concatenate([tokens(rng, 4), np.full(seq, IMAGE), tokens(rng, 6)])[None]
    px = pixels(1, seed=7)
    assert_logits_close(ours(jnp.asarray(ids), jnp.asarray(px)), reference_logits(hf, ids, px))
    with torch.no_grad():
        ref_features = hf.get_image_features(torch.from_numpy(px)).pooler_output[0].numpy()
    assert_logits_close(ours.get_image_features(jnp.asarray(px))[0], ref_features)


@pytest.fixture(scope="module")
def greedy(pair):
    """Our greedy generation of 20 tokens with the KV cache, for a left-padded batch: a row with an image
    and a text-only row. Returns (ids, mask, pixels, generated [B, 20], logits of every cached step)."""
    _, ours = pair
    rng = np.random.default_rng(9)
    ids, mask = pad_rows([row(rng, 4, "img", 7), row(rng, 12)], "left")
    px, steps = pixels(1, seed=9), 20
    graphdef, params = nnx.split(ours)
    prefill = jax.jit(lambda p, c, i, m, x: nnx.merge(graphdef, p).decode(c, i, x, attention_mask=m))
    step = jax.jit(lambda p, c, i: nnx.merge(graphdef, p).decode(c, i))
    cache = ours.init_cache(ids.shape[0], ids.shape[1] + steps)
    logits, cache = prefill(params, cache, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(px))
    all_logits, out = [logits], []
    for _ in range(steps):
        token = jnp.argmax(all_logits[-1][:, -1], axis=-1)[:, None]
        out.append(token)
        logits, cache = step(params, cache, token)
        all_logits.append(logits)
    return ids, mask, px, np.asarray(jnp.concatenate(out, axis=1)), np.asarray(jnp.concatenate(all_logits, axis=1))


def test_prefill_and_decode_equal_full_forward(greedy, forward):
    ids, mask, px, generated, cached_logits = greedy
    full_ids = np.concatenate([ids, generated], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(generated)], axis=1)
    full = forward(full_ids, px, full_mask)
    # Prefill gives the prompt's logits, each step those of the token it fed: aligned with full_ids.
    assert_logits_close(cached_logits, full, full_mask)


def test_greedy_generation_with_image_equals_transformers_generate(pair, greedy):
    hf, _ = pair
    ids, mask, px, generated, _ = greedy
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          pixel_values=torch.from_numpy(px), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False, pad_token_id=0)
    ref = ref[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(generated, ref)
    assert len(np.unique(ref)) > 3  # a real sequence, not one repeated token


def test_decode_step_may_emit_the_image_token_id(pair):
    # Decoding steps carry no pixels: an emitted image-token id keeps its own embedding, as in transformers.
    hf, ours = pair
    ids = np.random.default_rng(10).integers(3, IMAGE, size=(1, 6))
    logits, cache = ours.decode(ours.init_cache(1, 8), jnp.asarray(ids))
    step_logits, _ = ours.decode(cache, jnp.asarray([[IMAGE]]))
    ref = reference_logits(hf, np.concatenate([ids, [[IMAGE]]], axis=1))
    assert_logits_close(np.concatenate([logits, step_logits], axis=1), ref)


def test_vision_tower_is_frozen_projector_and_llm_train(pair):
    _, ours = pair
    rng = np.random.default_rng(11)
    ids, px = row(rng, 2, "img", 3)[None], pixels(1, seed=11)
    graphdef, params = nnx.split(ours, nnx.Param)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(jnp.asarray(ids), jnp.asarray(px))[0, -1] ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    norm = lambda tree: float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(tree)))
    assert norm(grads["vision_tower"]) == 0.0
    assert norm(grads["multi_modal_projector"]) > 0 and norm(grads["language_model"]) > 0


def test_bfloat16_stays_close_to_float32_reference(pair):
    hf, ours = pair
    bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    cfg = dataclasses.replace(ours.config, vision=dataclasses.replace(ours.config.vision, **bf16),
                              text=dataclasses.replace(ours.config.text, **bf16))
    model = loaded_model(lambda: LlavaForConditionalGeneration(cfg), state_dict(ours), "bf16 LLaVA")
    assert model.multi_modal_projector.linear_1.weight.dtype == jnp.bfloat16
    rng = np.random.default_rng(12)
    ids, px = row(rng, 5, "img", 9)[None], pixels(1, seed=12)
    got = np.asarray(jax.jit(lambda i, x: model(i, x))(jnp.asarray(ids), jnp.asarray(px)))
    ref = reference_logits(hf, ids, px)
    # bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.4%); rounding the weights and every
    # activation through 3 + 2 layers compounds to a few steps, so 3% of the logit scale bounds it while a
    # wrong merge or a missing layer moves logits by far more.
    np.testing.assert_allclose(got, ref, rtol=0, atol=3e-2 * np.abs(ref).max())


def test_tensor_names_of_every_layout(pair, tmp_path):
    hf, ours = pair
    ours_names = set(state_dict(ours))
    in_memory = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.vision_tower.embeddings.") for k in in_memory)  # 5.x: no vision_model
    assert set(hf_llava.llava_tensors_to_ours(in_memory)) == ours_names
    hf.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert set(hf_llava.llava_tensors_to_ours(on_disk)) == ours_names
    # Classic layout (what our names are) maps to itself.
    assert all(hf_llava.llava_tensor_name_to_ours(n) == n for n in ours_names)
    original = {  # liuhaotian/llava-v1.5-* names
        "model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
        "model.layers.7.self_attn.q_proj.weight": "language_model.model.layers.7.self_attn.q_proj.weight",
        "model.norm.weight": "language_model.model.norm.weight",
        "lm_head.weight": "language_model.lm_head.weight",
        "model.mm_projector.0.weight": "multi_modal_projector.linear_1.weight",
        "model.mm_projector.2.bias": "multi_modal_projector.linear_2.bias",
        "model.mm_projector.weight": "multi_modal_projector.linear_1.weight",
        "model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight":
            "vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight",
    }
    assert {k: hf_llava.llava_tensor_name_to_ours(k) for k in original} == original
    assert hf_llava.llava_tensor_name_to_ours("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(ValueError, match="'vision_tower.text_model.x'"):
        hf_llava.llava_tensor_name_to_ours("vision_tower.text_model.x")
    with pytest.raises(ValueError, match="both map to"):
        hf_llava.llava_tensors_to_ours({"lm_head.weight": 0, "language_model.lm_head.weight": 0})


def test_config_round_trip_through_transformers(pair):
    hf, ours = pair
    d = hf_llava.llava_config_to_hf(ours.config)
    again = transformers.LlavaConfig(**{k: v for k, v in d.items() if k != "model_type"})
    assert hf_llava.llava_config_from_hf(again) == ours.config
    linear = dataclasses.replace(ours.config, projector="linear", vision_feature_layer=[-1, -3])
    assert linear.vision_feature_layer == (-1, -3)
    d = hf_llava.llava_config_to_hf(linear)
    assert d["projector_type"] == "linear" and d["vision_feature_layer"] == [-1, -3]
    assert hf_llava.llava_config_from_hf(transformers.LlavaConfig(
        **{k: v for k, v in d.items() if k != "model_type"})) == linear
    # A sparse config.json (as llava-hf writes) is completed with transformers' defaults.
    sparse = hf_llava.llava_config_from_hf({"model_type": "llava", "text_config": {"model_type": "llama"}})
    full = transformers.LlavaConfig()
    assert (sparse.vision.hidden_size, sparse.vision.image_size, sparse.text.hidden_size) == (
        full.vision_config.hidden_size, full.vision_config.image_size, full.text_config.hidden_size)
    assert sparse.image_seq_length == full.image_seq_length and sparse.image_token_index == full.image_token_id
    with pytest.raises(ValueError, match="'llava_next'"):
        hf_llava.llava_config_from_hf({"model_type": "llava_next"})
    with pytest.raises(ValueError, match="image_seq_length 576 differs from the 25 tokens"):
        dataclasses.replace(ours.config, image_seq_length=576)
    with pytest.raises(ValueError, match="vision_feature_layer -5"):
        dataclasses.replace(ours.config, vision_feature_layer=-5)


def _hf_param_count(cfg: LlavaConfig) -> int:
    d = hf_llava.llava_config_to_hf(cfg)
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(
            transformers.LlavaConfig(**{k: v for k, v in d.items() if k != "model_type"}))
    count = sum(p.numel() for p in model.parameters())
    if cfg.projector == "linear":  # transformers always builds mlp2x: drop its second Linear
        count -= sum(p.numel() for p in model.model.multi_modal_projector.linear_2.parameters())
    return count


# Published size of llava-hf/llava-1.5-7b-hf.
@pytest.mark.parametrize("name,published", [("llava_1_5_7b", 7_063_427_072), ("llava_1_5_13b", None),
                                            ("llava_7b_v1", None), ("llava_llama3_8b", None)])
def test_preset_parameter_counts_equal_transformers(name, published):
    cfg = PRESETS[name]
    ours = count_params(cfg)
    assert ours == _hf_param_count(cfg)
    assert published is None or ours == published
