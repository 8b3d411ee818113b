"""The web chat's media without a browser (`infer/serve/web.py`): several images and a video become the first user
turn's `image_url` / `video_url` parts, and a turn through the page's real handlers, on a tiny LLaVA-OneVision
engine, streams the answer `Generator.generate` gives the same prompt and media; `prepare`'s refusals show as the
chat's error."""

from __future__ import annotations

import base64
import dataclasses

import pytest

gr = pytest.importorskip("gradio", reason="the serve extra is not installed (pip install -e '.[serve]')")
av = pytest.importorskip("av")

from llava_jax.data.images import load_image  # noqa: E402
from llava_jax.data.video import decode_video  # noqa: E402
from llava_jax.infer.generate import Video  # noqa: E402
from llava_jax.infer.serve import cli, web  # noqa: E402
from tests.infer import anyres_models as M  # noqa: E402
from tests.infer.test_serve_anyres import _video_bytes  # noqa: E402
from tests.models import anyres_helpers as H  # noqa: E402

MAX_NEW = 6


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """(two image paths, a video path) on disk, as the page's uploads."""
    folder = tmp_path_factory.mktemp("uploads")
    paths = [folder / "first.png", folder / "second.jpg"]
    for image, path in zip(H.images((23, 61), (41, 19), seed=12), paths):
        image.save(path)
    (folder / "clip.mp4").write_bytes(_video_bytes())
    return [str(p) for p in paths], str(folder / "clip.mp4")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(engine, server config) of the default (continuous) engine on a tiny OneVision folder, as `--ui` serves."""
    path = tmp_path_factory.mktemp("ov") / "llava-onevision-tiny"
    M.save_onevision(path, seed=3)
    args = cli.build_parser().parse_args(["--model", str(path), "--max-batch", "2", "--warm-up", "none", "--dtype",
                                          "float32", "--max-tokens", "64", "--ui"])
    engine = cli.build_engine(args)
    app = cli.build_app(args, engine)
    yield engine, app.state.config, app.state.tokenizer_lock
    engine.close()


def _decoded(url: str) -> tuple[str, bytes]:
    header, _, payload = url.removeprefix("data:").partition(",")
    return header, base64.b64decode(payload)


def test_to_messages_attaches_the_images_in_order_then_the_video_to_the_first_turn(media):
    (first, second), video = media
    history = [{"role": "user", "content": "Same?"}, {"role": "assistant", "content": [{"type": "text", "text": "No"}]},
               {"role": "user", "content": "Why?"}]
    messages = web.to_messages(history, [second, first], video)
    parts = messages[0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "video_url", "text"]
    urls = [parts[0]["image_url"]["url"], parts[1]["image_url"]["url"], parts[2]["video_url"]["url"]]
    expected = [("image/jpeg;base64", second), ("image/png;base64", first), ("video/mp4;base64", video)]
    assert [_decoded(url) for url in urls] == [(kind, open(path, "rb").read()) for kind, path in expected]
    assert parts[3] == {"type": "text", "text": "Same?"}
    assert messages[1:] == [{"role": "assistant", "content": "No"}, {"role": "user", "content": "Why?"}]
    assert web.to_messages(history[:1]) == [{"role": "user", "content": "Same?"}]
    assert web.gallery_paths([(second, None), (first, "caption")]) == [second, first]
    assert web.gallery_paths(None) == []


def test_a_turn_with_two_images_and_a_video_streams_what_generate_answers(served, media):
    engine, config, lock = served
    (first, second), video = media
    handlers = web._Handlers(engine, config, lock)
    gallery = [(first, None), (second, None)]  # the Gallery's value
    updates = list(handlers.ask([], gallery, video, "  Same?  ", 0.0, 1.0, MAX_NEW))
    history, cleared = updates[-1]
    generator = engine.generator
    frames = decode_video(open(video, "rb").read(), num_frames=32, name="clip")  # the default: all 6 frames
    prompt = generator.prompt("Same?", num_images=2, num_videos=1)
    images = [load_image(path, exif_transpose=True) for path in (first, second)]  # as the chat CLI reads them
    expected = generator.generate([prompt], [images + [Video(frames)]], max_new_tokens=MAX_NEW)[0]
    assert expected.strip() and cleared == ""
    assert history == [{"role": "user", "content": "Same?"}, {"role": "assistant", "content": expected.strip()}]
    assert len(updates) > 2  # streamed: the empty reply, then the answer growing


def test_prepare_refusals_show_as_the_chat_error(served, media):
    engine, config, lock = served
    (first, _), video = media
    handlers = web._Handlers(engine, config, lock)
    history = [{"role": "user", "content": "Same?"}]
    engine.generator.video_token_index, saved = None, engine.generator.video_token_index  # as a LLaVA-NeXT model
    try:
        with pytest.raises(gr.Error, match="video_url: the model takes no videos"):
            next(handlers.answer(history, [(first, None)], video, 0.0, 1.0, MAX_NEW))
    finally:
        engine.generator.video_token_index = saved
    small = dataclasses.replace(config.limits, images=dataclasses.replace(config.limits.images, max_bytes=100))
    handlers = web._Handlers(engine, dataclasses.replace(config, limits=small), lock)
    with pytest.raises(gr.Error, match=r"content\[0\].image_url: the image is \d+ bytes, over the limit of 100"):
        next(handlers.answer(history, [(first, None)], None, 0.0, 1.0, MAX_NEW))


def test_the_video_input_shows_only_for_a_model_that_takes_videos(served):
    engine, config, lock = served
    assert _video_input(web.build_ui(engine, config, lock)).visible
    engine.generator.video_token_index, saved = None, engine.generator.video_token_index
    try:
        assert not _video_input(web.build_ui(engine, config, lock)).visible
    finally:
        engine.generator.video_token_index = saved


def _video_input(ui):
    return next(block for block in ui.blocks.values() if getattr(block, "elem_id", None) == "video")

