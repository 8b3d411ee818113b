"""The server's image URLs: the pixel limit (--max-image-pixels) is checked from the header before any decode and
reported in the server's words, and file: URLs go through the one bounded image reader of `llava_jax.data`."""

from __future__ import annotations

import base64
import os

import pytest

from llava_jax.infer.serve.protocol import ApiError, ImagePolicy, read_image
from tests.data.test_images import png_header

FIELD = "messages[0].content[0].image_url"


def refusal(url: str, policy: ImagePolicy) -> ApiError:
    with pytest.raises(ApiError) as error:
        read_image(url, FIELD, policy)
    return error.value


def test_pixel_limit_is_the_servers_even_past_pils_bomb_limit():
    policy = ImagePolicy(max_pixels=300 * 300)
    for width, height in ((400, 400), (20_000, 20_000)):  # under and over twice PIL's MAX_IMAGE_PIXELS
        url = "data:image/png;base64," + base64.b64encode(png_header(width, height)).decode()
        error = refusal(url, policy)
        assert error.status == 413 and error.param == FIELD
        assert error.message == (f"image {FIELD} is {width}x{height}, over the limit of 90000 pixels "
                                 "[image_too_large]")


def test_file_urls_are_read_by_the_bounded_reader(tmp_path):
    with open(tmp_path / "huge.png", "wb") as f:  # sparse: never read whole
        f.truncate(1 << 30)
    os.mkfifo(tmp_path / "pipe.png")
    policy = ImagePolicy(max_bytes=1 << 20, media_dir=tmp_path)
    huge = refusal(f"file://{tmp_path}/huge.png", policy)
    assert huge.status == 413 and huge.message.startswith(f"{FIELD}: image {tmp_path}/huge.png is over the limit "
                                                          f"of {1 << 20} bytes")
    pipe = refusal(f"file://{tmp_path}/pipe.png", policy)
    assert pipe.status == 400 and "not a regular file" in pipe.message
    missing = refusal(f"file://{tmp_path}/missing.png", policy)
    assert missing.status == 400 and "image file not found" in missing.message
