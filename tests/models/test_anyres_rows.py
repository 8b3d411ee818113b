"""AnyRes training batches (row-aligned tiles and token-aligned taps): the same logits as the flat forward on the
same images, and packed rows (several samples with AnyRes images of different token counts, a video) give the
same loss and gradients as the unpacked batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.models import llava_next
from llava_jax.train import step as train_step
from tests.models import anyres_batch as A


@pytest.fixture(scope="module")
def models():
    """{"next": ..., "onevision": ...}: tiny random models (their parameters' shapes shared, so built once)."""
    return {name: llava_next.AnyResLlava(A.tiny_config(name == "onevision"), rngs=nnx.Rngs(0))
            for name in ("next", "onevision")}


def flat_logits(model, samples, length):
    """The flat (transformers-style) forward of samples, one a row, right-padded: all tiles and taps in a row."""
    c = model.config
    ids = np.zeros((len(samples), length), np.int32)
    mask = np.zeros_like(ids)
    for r, s in enumerate(samples):
        ids[r, :len(s.input_ids)], mask[r, :len(s.input_ids)] = s.input_ids, 1
    sizes = [size for s in samples for size in s.image_sizes]
    index, weight, tiles = llava_next.image_taps(c, sizes)
    image_pixels = np.concatenate([s.tiles[:len(s.tiles) - s.video_frames] for s in samples])
    assert len(image_pixels) == sum(tiles)
    kwargs = {}
    frames = [s.video_frames for s in samples if s.video_frames]
    if frames:
        kwargs["pixel_values_videos"] = jnp.asarray(np.concatenate([s.tiles[len(s.tiles) - s.video_frames:]
                                                                    for s in samples if s.video_frames]))
        kwargs["video_taps"] = tuple(jnp.asarray(a) for a in llava_next.video_taps(c, frames))
    forward = nnx.jit(lambda m, *args, **kw: m(*args, **kw))
    return np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(image_pixels), jnp.asarray(mask),
                              (jnp.asarray(index), jnp.asarray(weight)), **kwargs)), mask.astype(bool)


def _row_logits(model, b):
    hidden = model.hidden_states(b["input_ids"], b["pixel_values"], b["attention_mask"], image_mask=b["image_mask"],
                                 image_taps_index=b["image_taps_index"], image_taps_weight=b["image_taps_weight"])
    return model.logits(hidden)


def row_logits(model, batch, jit: bool = True):
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    return np.asarray((nnx.jit(_row_logits) if jit else _row_logits)(model, b))


@pytest.mark.parametrize("name", ["next", "onevision"])
def test_row_aligned_forward_equals_the_flat_forward(models, name):
    """Two rows of different image token counts (odd sizes, unpadding; OneVision: anyres_max_1 downsampling and
    a 3-frame video), spare empty tile slots: the same logits as the flat forward."""
    model, onevision = models[name], name == "onevision"
    config = model.config
    rng = np.random.default_rng(0)
    samples = [A.sample(config, rng, [(20, 50), (41, 40)]),
               A.sample(config, rng, [(50, 21)], video_frames=3 if onevision else 0)]
    assert len({int((s.input_ids == A.IMAGE).sum()) for s in samples}) == 2
    length, slots = 200, 10
    assert max(len(s.tiles) for s in samples) < slots
    flat, valid = flat_logits(model, samples, length)
    rows = row_logits(model, A.rows(config, [[s] for s in samples], length, slots, packed=False))
    np.testing.assert_allclose(rows[valid], flat[valid], rtol=0, atol=1e-5 * np.abs(flat).max())


def test_row_aligned_taps_are_checked_against_the_tokens(models):
    model = models["next"]
    config = model.config
    batch = A.rows(config, [[A.sample(config, np.random.default_rng(1), [(20, 50)])]], 120, 4, packed=False)
    batch["input_ids"][0, np.flatnonzero(batch["input_ids"][0] == A.IMAGE)[3]] = 5
    with pytest.raises(ValueError, match="row 0 position .* has taps but its input_id is no image / video token"):
        row_logits(model, batch, jit=False)
    batch = A.rows(config, [[A.sample(config, np.random.default_rng(1), [(20, 50)])]], 120, 4, packed=False)
    batch["image_mask"][0, 1] = False
    with pytest.raises(ValueError, match="image_taps_index: row 0 taps an empty tile slot"):
        row_logits(model, batch, jit=False)
    batch["image_mask"][0, 1] = True
    batch["image_taps_index"][0, np.flatnonzero(batch["image_taps_weight"][0, :, 0])[0], 0] = 4 * 16 + 1
    with pytest.raises(ValueError, match=r"image_taps_index: an index outside 0\.\.64"):
        row_logits(model, batch, jit=False)


def loss_and_grads(model, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "attention_mask"}

    def mean_loss(p):
        total, count = train_step.batch_loss(nnx.merge(graphdef, p, rest), batch, loss_chunk=64)
        return total / count, count

    (loss, count), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)
    return float(loss), int(count), grads


def test_packed_equals_unpacked_with_anyres_images_of_different_token_counts(models):
    """OneVision (AnyRes images, anyres_max downsampling, a video, text only) with a trained tower: packed
    rows give the unpacked batch's loss and gradients, every parameter's, tower and image_newline included."""
    model = models["onevision"]
    model.config = config = dataclasses.replace(model.config, freeze_vision_tower=False)
    rng = np.random.default_rng(2)
    samples = [A.sample(config, rng, [(20, 50)]), A.sample(config, rng, [(41, 40), (50, 21)]),
               A.sample(config, rng), A.sample(config, rng, video_frames=2), A.sample(config, rng, [(30, 31)])]
    counts = [int(np.isin(s.input_ids, (A.IMAGE, A.VIDEO)).sum()) for s in samples]
    assert len(set(c for c in counts if c)) >= 3
    unpacked = A.rows(config, [[s] for s in samples], 160, 8, packed=False)
    packed = A.rows(config, [samples[:2], samples[2:]], 320, 12, packed=True)
    loss_u, count_u, grads_u = loss_and_grads(model, unpacked)
    loss_p, count_p, grads_p = loss_and_grads(model, packed)
    assert count_p == count_u > 0
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-6)
    flat_u = dict(jax.tree_util.tree_leaves_with_path(grads_u))
    for path, a in jax.tree_util.tree_leaves_with_path(grads_p):
        np.testing.assert_allclose(a, flat_u[path], rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert float(jnp.abs(grads_p["image_newline"].get_value()).max()) > 0
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads_p["vision_tower"]))
