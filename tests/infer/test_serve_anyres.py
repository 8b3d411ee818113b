"""Server requests for AnyRes models (`infer/serve/protocol.py`): several `image_url` parts in one message and a
`video_url` part (vLLM's extension) on a tiny LLaVA-OneVision folder; the job they become decodes as the engine
runs it (`Generator.decode_steps` on the job's ids and media) to the answer `generate` gives the same inputs."""

from __future__ import annotations

import base64
import io
import json
import re
import threading

import numpy as np
import pytest

from llava_jax.data.video import decode_video
from llava_jax.infer.generate import Video, load_generator
from llava_jax.infer.serve import protocol
from tests.infer import anyres_models as M
from tests.models import anyres_helpers as H

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    path = tmp_path_factory.mktemp("ov") / "llava-onevision-tiny"
    M.save_onevision(path, seed=3)
    gen = load_generator(path, dtype="float32")
    gen.folder = path
    return gen


def _video_bytes(frames: int = 6) -> bytes:
    buf, rng = io.BytesIO(), np.random.RandomState(4)
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.randint(0, 255, (32, 32, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _request(content: list, **fields) -> protocol.ChatRequest:
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 6, **fields}
    return protocol.parse_request(json.dumps(body).encode())


def test_two_images_and_a_video_become_a_job_the_engine_decodes(generator, tmp_path):
    images, video = H.images((23, 61), (41, 19), seed=10), _video_bytes()
    (tmp_path / "clip.mp4").write_bytes(video)
    request = _request([
        {"type": "image_url", "image_url": {"url": _png_url(images[0])}},
        {"type": "image_url", "image_url": {"url": _png_url(images[1])}},
        {"type": "video_url", "video_url": {"url": (tmp_path / "clip.mp4").as_uri()}},
        {"type": "text", "text": "Same?"}])
    policy = protocol.ImagePolicy(media_dir=tmp_path, video_frames=4)
    job = protocol.prepare(request, generator, protocol.Limits(images=policy), threading.Lock())
    assert [len(t.pixels) for t in job.pixels] == [1, 1, 4] and job.pixels[2].video  # single-tile images, frames
    frames = decode_video(video, num_frames=4, name="clip")
    prompt = generator.prompt("Same?", num_images=2, num_videos=1)
    np.testing.assert_array_equal(job.ids, generator.encode(prompt, generator.prepare_media(images + [Video(frames)])))
    *_, (tokens, lengths, _) = generator.decode_steps([job.ids], [list(job.pixels)], max_new_tokens=6)
    expected = generator.generate_tokens([prompt], [images + [Video(frames)]], max_new_tokens=6)[0]
    np.testing.assert_array_equal(tokens[0, :lengths[0]], expected)


def test_video_data_url_and_its_refusals(generator, tmp_path):
    url = "data:video/mp4;base64," + base64.b64encode(_video_bytes()).decode()
    field = "messages[0].content[0].video_url"
    quoted = re.escape(field)
    video = protocol.read_video(url, field, protocol.ImagePolicy(video_frames=3))
    assert video.frames.shape == (3, 32, 32, 3)
    with pytest.raises(protocol.ApiError, match=f"{quoted}: unsupported video URL"):
        protocol.read_video("http://example.com/v.mp4", field, protocol.ImagePolicy())
    with pytest.raises(protocol.ApiError, match="over the limit") as error:
        protocol.read_video(url, field, protocol.ImagePolicy(max_video_bytes=100))
    assert error.value.status == 413
    with pytest.raises(protocol.ApiError, match=f"{quoted}.*video") as error:
        protocol.read_video("data:video/mp4;base64," + base64.b64encode(b"not a video").decode(), field,
                            protocol.ImagePolicy())
    assert error.value.status == 400


def test_video_parts_only_in_user_turns_and_only_for_onevision(generator):
    chat = protocol.conversation(_request([{"type": "video_url", "video_url": {"url": "data:,x"}},
                                           {"type": "text", "text": "hi <video>"}]))
    assert chat.videos == [("messages[0].content[0].video_url", "data:,x")] and chat.messages == ["<video>\nhi"]
    body = {"messages": [{"role": "system", "content": [{"type": "video_url", "video_url": {"url": "data:,x"}}]},
                         {"role": "user", "content": "hi"}]}
    with pytest.raises(protocol.ApiError, match=r"messages\[0\].content\[0\]: images and videos are only"):
        protocol.conversation(protocol.parse_request(json.dumps(body).encode()))
    text_only = _request([{"type": "video_url", "video_url": {"url": "data:,x"}}])
    generator.video_token_index, saved = None, generator.video_token_index  # as a LLaVA-NeXT model
    try:
        with pytest.raises(protocol.ApiError, match="video_url: the model takes no videos"):
            protocol.prepare(text_only, generator, protocol.Limits(), threading.Lock())
    finally:
        generator.video_token_index = saved


def test_server_answers_two_images_and_a_video_as_generate(generator, tmp_path):
    """Through the HTTP server and its engine (unchanged): a OneVision request with two image_url parts and a
    video_url file:// part answers what Generator.generate answers to the same prompt and media."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    httpx = pytest.importorskip("httpx")
    from llava_jax.infer.serve import cli

    folder = str(generator.folder)
    images, video = H.images((23, 61), (41, 19), seed=12), _video_bytes()
    (tmp_path / "clip.mp4").write_bytes(video)
    args = cli.build_parser().parse_args(["--model", folder, "--max-batch", "2", "--warm-up", "none", "--dtype",
                                          "float32", "--allowed-media-dir", str(tmp_path), "--max-tokens", "64"])
    engine = cli.build_engine(args)
    content = [{"type": "image_url", "image_url": {"url": _png_url(i)}} for i in images]
    content += [{"type": "video_url", "video_url": {"url": (tmp_path / "clip.mp4").as_uri()}},
                {"type": "text", "text": "Same?"}]
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 6}
    try:
        with cli.serve_in_background(cli.build_app(args, engine)) as url:
            response = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    finally:
        engine.close()
    assert response.status_code == 200, response.text
    frames = decode_video(video, num_frames=32, name="clip")  # the server's default: all 6 frames
    prompt = generator.prompt("Same?", num_images=2, num_videos=1)
    expected = generator.generate([prompt], [images + [Video(frames)]], max_new_tokens=6)[0]
    assert expected.strip() and response.json()["choices"][0]["message"]["content"] == expected.strip()


def test_continuous_engine_chunks_a_onevision_prompt_with_images_and_a_video(generator):
    """The continuous engine with a 16-token prefill budget prefills a prompt of two images and a video (longer
    than that: in chunks of 16, its media embedded once) and answers as Generator.generate."""
    from llava_jax.infer.serve.continuous import ContinuousEngine
    from llava_jax.infer.serve.engine import Finished, Job

    images = H.images((23, 61), (41, 19), seed=5)
    frames = decode_video(_video_bytes(4), num_frames=4, name="clip")
    media = [*images, Video(frames)]
    prompt = generator.prompt("Same?", num_images=2, num_videos=1)
    expected = generator.generate([prompt], [media], max_new_tokens=5)[0]
    tiles = generator.prepare_media(media)
    ids = generator.encode(prompt, tiles)
    engine = ContinuousEngine(generator, max_batch=2, max_tokens=8, prefill_tokens=16,
                              max_prompt_tokens=ids.size + 8)
    assert engine._is_long(ids)
    events, done = [], threading.Event()
    engine.start()
    try:
        engine.submit(Job(ids, tiles, 5, lambda e: (events.append(e), isinstance(e, Finished) and done.set())))
        assert done.wait(120), events
    finally:
        engine.close()
    answer = "".join(e.text for e in events[:-1])
    assert expected.strip() and answer.strip() == expected.strip()
    assert engine.prefills >= 2 and engine.prefix_hits == 1
