"""Packing does not change the math: on random samples (with and without images), the token-weighted loss and
the gradients of a packed batch equal those of the same samples unpacked, to float32 rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.data.packing import pack_window
from llava_jax.data.pipeline import collate
from llava_jax.models import clip_vit, llama
from llava_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration
from llava_jax.train import step as train_step

IMAGE, VOCAB, SIZE = 61, 64, 16
CONFIG = LlavaConfig(
    vision=clip_vit.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=SIZE, patch_size=8),
    text=llama.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    image_token_index=IMAGE, freeze_vision_tower=False)


def random_samples(n, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        images = int(rng.integers(0, 2))
        prompt = [1] + [IMAGE] * 4 * images + list(rng.integers(2, 60, int(rng.integers(1, 6))))
        answer = list(rng.integers(2, 60, int(rng.integers(1, 12))))
        samples.append({"input_ids": np.asarray(prompt + answer, np.int32),
                        "labels": np.asarray([-100] * len(prompt) + answer, np.int32),
                        "pixel_values": rng.normal(size=(images, 3, SIZE, SIZE)).astype(np.float32)})
    return samples


def loss_and_grads(model, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def mean_loss(p):
        total, count = train_step.batch_loss(nnx.merge(graphdef, p, rest), batch, loss_chunk=16)
        return total / count, count

    (loss, count), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)
    return float(loss), int(count), grads


@pytest.mark.parametrize("attention_impl", ["xla", pytest.param("splash", marks=pytest.mark.slow)])
def test_packed_batch_equals_unpacked(attention_impl):
    samples = random_samples(7)
    text = llama.LlamaConfig(**{**CONFIG.text.__dict__, "attention_impl": attention_impl})
    model = LlavaForConditionalGeneration(LlavaConfig(**{**CONFIG.__dict__, "text": text}), rngs=nnx.Rngs(0))
    unpacked = collate(samples, buckets=(32,), pad_token_id=0, max_images=1, image_size=SIZE)
    rows = pack_window(samples, method="best_fit", length=48, max_images=3, pad_token_id=0)
    packed = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    assert len(rows) < len(samples) and packed["segment_ids"].max() >= 2   # rows really hold several samples
    assert packed["image_mask"].sum() == unpacked["image_mask"].sum() > 1
    loss_u, count_u, grads_u = loss_and_grads(model, {k: v for k, v in unpacked.items() if k != "attention_mask"})
    loss_p, count_p, grads_p = loss_and_grads(model, {k: v for k, v in packed.items() if k != "attention_mask"})
    assert count_p == count_u
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-6)
    for path, a in jax.tree_util.tree_leaves_with_path(grads_p):
        b = dict(jax.tree_util.tree_leaves_with_path(grads_u))[path]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads_p["vision_tower"]))
