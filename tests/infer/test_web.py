"""The web chat in a real browser: headless system Chromium driven by Playwright. It uploads a demo image, asks
two demo questions and checks the streamed answers against the chat CLI's; Regenerate and Clear; a screenshot.
On a tiny LLaVA-OneVision model it uploads two images and a video and checks the answer against `generate`.
Skipped, with the reason, where Chromium, Playwright or Gradio is missing (CI installs them: .ci/run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the serve extra is not installed (pip install -e '.[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from llava_jax.data.synthetic import QUESTIONS, SHORT_ANSWER_SUFFIX, Scene, draw_scene  # noqa: E402
from llava_jax.infer.serve import cli  # noqa: E402

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parents[2]
ASKED = (QUESTIONS["color"][0] + " " + SHORT_ANSWER_SUFFIX.strip(), QUESTIONS["count"][0])  # one line each
MAX_NEW = 8
CHROMIUM = next((p for p in (os.environ.get("LLAVA_JAX_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p), None)


def chromium():
    if CHROMIUM is None:
        pytest.skip("no Chromium: install it (apt-get install chromium) or set LLAVA_JAX_CHROMIUM")
    return CHROMIUM


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red_circle.png"
    draw_scene(Scene("circle", "red", (0,)), 64, np.random.default_rng(0)).save(path)
    return path


def cli_answers(model_dir: Path, image: Path, questions, max_new: int) -> list[str]:
    """The chat CLI's greedy answers to the conversation."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    stdin = "".join(q + "\n" for q in questions) + "\n"
    result = subprocess.run([sys.executable, "-m", "llava_jax.chat", "--model", str(model_dir), "--image", str(image),
                             "--temperature", "0", "--max-new-tokens", str(max_new)], input=stdin, text=True,
                            capture_output=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    return [line.removeprefix("USER: ASSISTANT: ") for line in result.stdout.split("\n")[:len(questions)]]


def bot_messages(page) -> list[str]:
    return [t.strip() for t in page.locator('#chatbot [data-testid="bot"]').all_inner_texts()]


def wait_for_answer(page, count: int, timeout_s: float = 120.0, replacing: str | None = None) -> str:
    """Waits until the chat shows `count` answers, the last one (other than `replacing`) no longer changing."""
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        texts = bot_messages(page)
        busy = page.locator(".generating").count() > 0
        current = texts[-1] if len(texts) == count and texts[-1] != replacing else None
        if current != last:
            last, since = current, time.monotonic()
        elif current and not busy and time.monotonic() - since > 1.0:
            return current
        time.sleep(0.2)
    raise AssertionError(f"no complete answer {count} within {timeout_s} s; the chat shows {bot_messages(page)}")


def chat_in_browser(url: str, image: Path, questions, max_tokens: int, screenshot: Path) -> tuple[list[str], object]:
    """Opens the web chat, uploads `image`, asks `questions` in turn -> (answers, the open page's browser)."""
    playwright = sync_api.sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1180, "height": 760})
    page.goto(url + "/ui/", wait_until="networkidle")
    slider = page.locator("#max_tokens input[type=number]")
    slider.fill(str(max_tokens))
    slider.press("Enter")
    page.locator("#images input[type=file]").set_input_files(str(image))
    answers = []
    for k, question in enumerate(questions, start=1):
        page.locator("#question textarea").fill(question)
        page.locator("#send").click()
        answers.append(wait_for_answer(page, k))
    page.screenshot(path=str(screenshot))
    return answers, (playwright, browser, page)


def test_web_chat_streams_the_chat_cli_answers(model_dir, image_file, tmp_path):
    chromium()
    expected = cli_answers(model_dir, image_file, ASKED, MAX_NEW)
    args = cli.build_parser().parse_args(["--model", str(model_dir), "--ui", "--warm-up", "none"])
    engine = cli.build_engine(args)
    try:
        with cli.serve_in_background(cli.build_app(args, engine)) as url:
            answers, (playwright, browser, page) = chat_in_browser(url, image_file, ASKED, MAX_NEW,
                                                                    tmp_path / "web_chat.png")
            try:
                assert answers == expected
                assert (tmp_path / "web_chat.png").stat().st_size > 10_000
                slider = page.locator("#max_tokens input[type=number]")
                slider.fill("2")
                slider.press("Enter")
                page.locator("#regenerate").click()  # greedy, 2 tokens: the start of the same answer
                again = wait_for_answer(page, 2, replacing=expected[1])
                assert again and expected[1].startswith(again)
                page.locator("#clear").click()
                page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length == 0",
                                       timeout=30_000)
            finally:
                browser.close()
                playwright.stop()
    finally:
        engine.close()


def test_web_chat_takes_two_images_and_a_video_for_onevision(tmp_path):
    """On a tiny LLaVA-OneVision model the page shows a video input: two images dropped into the gallery and a
    video, then a question, stream the answer Generator.generate gives the same prompt and media."""
    chromium()
    from llava_jax.data.images import load_image
    from llava_jax.data.video import decode_video
    from llava_jax.infer.generate import Video
    from tests.infer import anyres_models as M
    from tests.infer.test_serve_anyres import _video_bytes
    from tests.models import anyres_helpers as H

    folder = tmp_path / "llava-onevision-tiny"
    M.save_onevision(folder, seed=3)
    images = [tmp_path / "first.png", tmp_path / "second.png"]
    for image, path in zip(H.images((23, 61), (41, 19), seed=12), images):
        image.save(path)
    (tmp_path / "clip.mp4").write_bytes(_video_bytes())
    args = cli.build_parser().parse_args(["--model", str(folder), "--ui", "--warm-up", "none", "--dtype", "float32"])
    engine = cli.build_engine(args)
    try:
        generator = engine.generator
        frames = decode_video((tmp_path / "clip.mp4").read_bytes(), num_frames=32, name="clip")
        media = [load_image(path, exif_transpose=True) for path in images] + [Video(frames)]
        prompt = generator.prompt("Same?", num_images=2, num_videos=1)
        expected = generator.generate([prompt], [media], max_new_tokens=MAX_NEW)[0].strip()
        with cli.serve_in_background(cli.build_app(args, engine)) as url:
            playwright = sync_api.sync_playwright().start()
            browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1180, "height": 900})
                page.goto(url + "/ui/", wait_until="networkidle")
                slider = page.locator("#max_tokens input[type=number]")
                slider.fill(str(MAX_NEW))
                slider.press("Enter")
                page.locator("#images input[type=file]").set_input_files([str(p) for p in images])
                page.locator("#video input[type=file]").set_input_files(str(tmp_path / "clip.mp4"))
                page.wait_for_function("document.querySelectorAll('#images img').length >= 2", timeout=30_000)
                page.wait_for_function("document.querySelector('#video').innerText.includes('.mp4')", timeout=30_000)
                page.locator("#question textarea").fill("Same?")
                page.locator("#send").click()
                assert expected and wait_for_answer(page, 1) == expected
                page.screenshot(path=str(tmp_path / "web_chat_media.png"))
            finally:
                browser.close()
                playwright.stop()
    finally:
        engine.close()
