"""Row-aligned images (training batches): each row's image tokens take that row's own images, the same
result as the batch-wide merge, without looking at other rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models.llava import check_row_image_tokens, merge_image_features, merge_row_features

IMAGE = 7


def batch(seed=0):
    """3 rows, 2 image slots each, 2 tokens per image; row 1 has one real image in slot 1, row 2 none."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 5, (3, 10))
    ids[0, 1:3] = ids[0, 5:7] = IMAGE
    ids[1, 4:6] = IMAGE
    image_mask = np.array([[True, True], [False, True], [False, False]])
    features = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    embeds = rng.normal(size=(3, 10, 4)).astype(np.float32)
    return ids, image_mask, features, embeds


def test_row_merge_equals_the_batch_wide_merge():
    ids, image_mask, features, embeds = batch()
    is_image = jnp.asarray(ids == IMAGE)
    rows = merge_row_features(jnp.asarray(embeds), is_image, jnp.asarray(features), jnp.asarray(image_mask))
    flat = merge_image_features(jnp.asarray(embeds), is_image, jnp.asarray(features.reshape(6, 2, 4)),
                                jnp.asarray(image_mask.reshape(6)))
    np.testing.assert_array_equal(rows, flat)
    np.testing.assert_array_equal(rows[1, 4:6], features[1, 1])       # row 1's only real image
    np.testing.assert_array_equal(rows[2], embeds[2])                 # no image: untouched
    jitted = jax.jit(merge_row_features)(jnp.asarray(embeds), is_image, jnp.asarray(features),
                                         jnp.asarray(image_mask))
    np.testing.assert_array_equal(jitted, rows)


def test_row_image_count_mismatch_names_the_row():
    ids, image_mask, _, _ = batch()
    check_row_image_tokens(ids, IMAGE, 2, image_mask)
    image_mask[1, 0] = True
    with pytest.raises(ValueError, match="row 1 holds 2 image tokens .* its 2 images need 4"):
        check_row_image_tokens(ids, IMAGE, 2, image_mask)
