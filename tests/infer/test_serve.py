"""The OpenAI-compatible server on a tiny LLaVA: the chat CLI's answers, the official `openai` client, a
concurrent load of valid and malformed requests, image URL policy and limits. Every server binds 127.0.0.1 on
a free port, runs on a thread of the test process, and every request has a timeout."""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import http.server
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from llava_jax.infer.serve import cli  # noqa: E402
from llava_jax.infer.serve.engine import Engine  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = ("What color is the shape?", "How many shapes do you see?")
MAX_NEW = 8
TIMEOUT = 120


def png_bytes(seed: int, size=(52, 40), solid: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (200, 10, 10)) if solid else Image.fromarray(
        rng.integers(0, 255, (size[1], size[0], 3), np.uint8))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, *images: str) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in images),
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """An allowed media folder with one image, a link out of it, and an image outside it."""
    root = tmp_path_factory.mktemp("media")
    inside, outside = root / "allowed", root / "secret"
    inside.mkdir()
    outside.mkdir()
    (inside / "photo.png").write_bytes(png_bytes(0))
    (outside / "other.png").write_bytes(png_bytes(1))
    (inside / "link.png").symlink_to(outside / "other.png")
    return inside, outside


@pytest.fixture(scope="module")
def engine(model_dir):
    args = cli.build_parser().parse_args(["--model", str(model_dir), "--max-batch", "8", "--batch-window-ms", "50",
                                          "--warm-up", "none"])
    engine = cli.build_engine(args)
    yield engine
    engine.close()


def start(engine, model_dir, *flags):
    args = cli.build_parser().parse_args(["--model", str(model_dir), "--max-tokens", "64", *map(str, flags)])
    return cli.serve_in_background(cli.build_app(args, engine))


@pytest.fixture(scope="module")
def server(engine, model_dir, media):
    """(base URL, engine): API key "sk-test", files under the media folder, remote images allowed."""
    with start(engine, model_dir, "--api-key", "sk-test", "--allowed-media-dir", media[0], "--allow-remote-images",
               "--max-image-pixels", 300 * 300, "--max-request-bytes", 200_000) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="sk-test", timeout=TIMEOUT, max_retries=0)


def post(url: str, body, key: str | None = "sk-test", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(url + "/v1/chat/completions", content=body, headers=headers, timeout=TIMEOUT, **kw)
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=TIMEOUT, **kw)


# ---------------------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    path.write_bytes(png_bytes(0))
    return path


@pytest.fixture(scope="module")
def cli_answers(model_dir, image_file):
    """The chat CLI's greedy answers to the two-turn conversation about the image."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "llava_jax.chat", "--model", str(model_dir), "--image",
                             str(image_file), "--temperature", "0", "--max-new-tokens", str(MAX_NEW)],
                            input="\n".join(QUESTIONS) + "\n\n", text=True, capture_output=True, env=env, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    answers = [line.removeprefix("USER: ASSISTANT: ") for line in lines[:2]]
    assert all(answers) and lines[2] == "USER: ", result.stdout
    return answers


def test_greedy_answers_equal_the_chat_cli(server, client, cli_answers, image_file):
    url, _ = server
    image = data_url(image_file.read_bytes())
    first = post(url, {"messages": [user(QUESTIONS[0], image)], "max_tokens": MAX_NEW, "temperature": 0}).json()
    assert first["choices"][0]["message"]["content"] == cli_answers[0]
    history = [user(QUESTIONS[0], image), {"role": "assistant", "content": cli_answers[0]},
               {"role": "user", "content": QUESTIONS[1]}]
    second = client.chat.completions.create(model="m", messages=history, max_tokens=MAX_NEW, temperature=0)
    assert second.choices[0].message.content == cli_answers[1]
    stream = client.chat.completions.create(model="m", messages=history, max_tokens=MAX_NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cli_answers[1]
    assert chunks[-1].usage.model_dump() == second.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == second.choices[0].finish_reason


def test_usage_finish_reason_stop_and_models(server, client, engine):
    prompt = engine.generator.prompt(QUESTIONS[1])
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                           max_tokens=5, temperature=0)
    assert reply.usage.prompt_tokens == engine.generator.encode(prompt).size
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    # A stop string cuts the answer before it and ends it with finish_reason "stop".
    text = reply.choices[0].message.content
    stop = text[2:4]
    stopped = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                             max_tokens=5, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert [m.id for m in client.models.list()] == ["llava-v1.5-tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_sampling_with_a_seed_is_reproducible(client):
    ask = functools.partial(client.chat.completions.create, model="m", max_tokens=MAX_NEW, temperature=2.0,
                            messages=[{"role": "user", "content": QUESTIONS[0]}])
    answers = [ask(seed=s).choices[0].message.content for s in (1, 1, 2, 3)]
    assert answers[0] == answers[1]
    assert len(set(answers[1:])) > 1  # different seeds draw different answers


# ---------------------------------------------------------------------------------------------- load


def malformed(url: str, media) -> list[tuple[object, int, str, dict]]:
    """(body, expected status, text the error message names, extra post arguments)."""
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bomb = png_bytes(5, size=(400, 400), solid=True)  # a small file of 160,000 pixels, over the server's 90,000
    tiny = png_bytes(6, size=(1, 1))  # 82 of them: 82 x 25 image tokens, over the context of 2048
    inside, outside = media
    return [
        (b"{not json", 400, "not valid JSON", {}),
        ({**ok, "n": 2}, 400, "n:", {}),
        ({**ok, "max_tokens": 65}, 400, "max_tokens:", {}),
        ({**ok, "temperature": -1}, 400, "temperature", {}),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop:", {}),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role", {}),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
         "messages[1].role", {}),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
         400, "messages[0].content[0].image_url", {}),
        ({"messages": [user("q", "data:image/png;base64,@@@")]}, 400, "invalid base64", {}),
        ({"messages": [user("q", data_url(b"not an image"))]}, 400, "cannot decode image", {}),
        ({"messages": [user("q", data_url(bomb))]}, 413, "over the limit", {}),
        ({"messages": [user("q", "file://" + str(outside / "other.png"))]}, 400, "not a file under", {}),
        ({"messages": [user("q", "file://" + str(inside / "link.png"))]}, 400, "not a file under", {}),
        ({"messages": [user("q", "file:///etc/passwd")]}, 400, "not a file under", {}),
        ({"messages": [user("q", "file://" + str(inside) + "/../secret/other.png")]}, 400, "not a file under", {}),
        ({"messages": [user("q", "file://" + str(inside / "missing.png"))]}, 400, "image file not found", {}),
        ({"messages": [user("q", "x" * 300_000)]}, 413, "request body", {}),
        ({"messages": [user("word " * 3000)]}, 400, "messages: the prompt is", {}),
        ({"messages": [user("q", *[data_url(tiny)] * 82)]}, 400, "the model's context holds at most 81", {}),
        (ok, 401, "API key", {"key": "wrong"}),
        (ok, 401, "API key", {"key": None}),
    ]


def test_concurrent_valid_and_malformed_requests(server, media, image_file):
    url, engine = server
    images = [data_url(png_bytes(s)) for s in range(3)]
    valid = [{"messages": [user(QUESTIONS[i % 2], images[i % 3])], "max_tokens": 3 + i % 4, "temperature": 0,
              "stream": i % 2 == 1} for i in range(6)]
    valid.append({"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 6, "temperature": 0})
    valid.append({"messages": [user(QUESTIONS[0], "file://" + str(media[0] / "photo.png"))], "max_tokens": 5,
                  "temperature": 0})
    expected = [answer(post(url, body)) for body in valid]  # one by one: batches of one
    batches = engine.batches
    bad = malformed(url, media)
    jobs = [("valid", i, body, {}) for i, body in enumerate(valid * 3)]
    jobs += [("bad", i, body, extra) for i, (body, *_, extra) in enumerate(bad)]
    np.random.default_rng(0).shuffle(jobs)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = {pool.submit(post, url, body, **extra): (kind, i) for kind, i, body, extra in jobs}
        results = {futures[f]: f.result(timeout=TIMEOUT) for f in concurrent.futures.as_completed(futures, TIMEOUT)}
    for i in range(len(valid) * 3):
        response = results[("valid", i)]
        assert response.status_code == 200, response.text
        assert answer(response) == expected[i % len(valid)], i
    for i, (_, status, text, _) in enumerate(bad):
        response = results[("bad", i)]
        assert response.status_code == status, (i, response.text)
        error = response.json()["error"]
        assert text in error["message"] and error["type"], (i, error)
    assert engine.batches - batches < len(valid) * 3  # concurrent requests were batched together
    wrong_method = httpx.get(url + "/v1/chat/completions", timeout=TIMEOUT)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    health = httpx.get(url + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["waiting"] == 0 and health["rows"] >= len(valid) * 4


def answer(response: httpx.Response) -> str:
    """The answer of a streamed or plain response."""
    assert response.status_code == 200, response.text
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.json()["choices"][0]["message"]["content"]
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_remote_images_only_when_allowed(server, engine, model_dir):
    data = png_bytes(7)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    remote = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=remote.serve_forever, daemon=True).start()
    try:
        image_url = f"http://127.0.0.1:{remote.server_address[1]}/photo.png"
        body = {"messages": [user(QUESTIONS[0], image_url)], "max_tokens": 4, "temperature": 0}
        fetched = answer(post(server[0], body))
        assert fetched == answer(post(server[0], {**body, "messages": [user(QUESTIONS[0], data_url(data))]}))
        with start(engine, model_dir) as plain:  # no --allow-remote-images: nothing is fetched
            response = post(plain, body, key=None)
            assert response.status_code == 400 and "--allow-remote-images" in response.json()["error"]["message"]
    finally:
        remote.shutdown()


def test_full_queue_is_429_and_a_stopped_engine_503(model_dir, engine):
    slow = Engine(engine.generator, max_batch=8, max_queue=1, batch_window_s=60.0).start()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    try:
        with start(slow, model_dir) as url, concurrent.futures.ThreadPoolExecutor(3) as pool:
            # While a request is "on its way", the first waits in the queue of one; the others find it full.
            with slow.arriving():
                futures = [pool.submit(post, url, body, key=None) for _ in range(3)]
                first_two = itertools.islice(concurrent.futures.as_completed(futures, TIMEOUT), 2)
                done = [f.result() for f in first_two]
                assert [r.status_code for r in done] == [429, 429]
                assert all("busy" in r.json()["error"]["message"] for r in done)
            assert sorted(f.result(TIMEOUT).status_code for f in futures) == [200, 429, 429]
            slow.close()
            assert post(url, body, key=None).status_code == 503
            assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 503
    finally:
        slow.close()


def test_bad_command_line_is_one_line_and_status_2(tmp_path, capsys):
    assert cli.main(["--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: model folder not found: {tmp_path / 'nowhere'}\n"
    assert cli.main(["--model", str(tmp_path), "--allowed-media-dir", str(tmp_path / "none")]) == 2
    assert "--allowed-media-dir: folder not found" in capsys.readouterr().err


def test_the_server_prints_the_api_and_web_chat_addresses_once_it_listens(model_dir):
    pytest.importorskip("gradio", reason="the web chat needs the serve extra's gradio")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "llava_jax.serve", "--model", str(model_dir), "--port", str(port),
                               "--ui", "--log-level", "warning", "--warm-up", "none"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL,
                              text=True, env=env, cwd=REPO)
    killer = threading.Timer(300, server.kill)  # a hung start fails the test instead of hanging it
    killer.start()
    try:
        lines = [server.stdout.readline().rstrip("\n") for _ in range(2)]
        base = f"http://127.0.0.1:{port}"
        assert lines == [f"OpenAI-compatible API at {base}/v1 (POST {base}/v1/chat/completions)",
                         f"web chat at {base}/ui"]
        assert httpx.get(base + "/v1/models", timeout=TIMEOUT).status_code == 200  # listening when printed
        assert httpx.get(base + "/ui", timeout=TIMEOUT, follow_redirects=True).status_code == 200
    finally:
        killer.cancel()
        server.terminate()
        server.wait(30)


def test_evaluation_through_the_server_equals_llava_jax_eval(server, client, engine, tmp_path):
    """lmms-eval's OpenAI-compatible protocol (text part, then the image as a PNG data: URL, greedy, concurrent
    requests) over demo questions: the same answers and accuracy as `llava_jax.eval` + the GQA scorer."""
    from llava_jax.data import synthetic
    from llava_jax.infer import scorers
    from llava_jax.infer.evaluate import evaluate

    paths = synthetic.generate(tmp_path / "data", num_stage1=0, num_stage2=0, num_eval=8)
    questions = [json.loads(line) for line in paths.eval_questions.read_text().splitlines()]
    gold = scorers.load_gqa_questions(paths.eval_answers)
    generator = engine.generator
    ours = evaluate(generator.model, generator.tokenizer, paths.eval_questions, paths.images, tmp_path / "ours.jsonl",
                    template=generator.template, image_config=generator.image_config, batch_size=4,
                    max_new_tokens=MAX_NEW, progress=False)

    def ask(question: dict) -> str:
        image = data_url((paths.images / question["image"]).read_bytes())
        content = [{"type": "text", "text": question["text"]}, {"type": "image_url", "image_url": {"url": image}}]
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                               max_tokens=MAX_NEW, temperature=0)
        return reply.choices[0].message.content.strip()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        served = dict(zip((str(q["question_id"]) for q in questions), pool.map(ask, questions)))
    expected = scorers.predictions_by_id(scorers.load_answers(ours), ours)
    assert served == expected
    assert scorers.score_gqa(served, gold)["accuracy"] == scorers.score_gqa_files(ours, paths.eval_answers)["accuracy"]


def test_a_cancelled_row_stops_and_the_others_finish(engine):
    """A client that goes away mid-answer: its row is dropped at the next step; its batch-mate finishes."""
    from llava_jax.infer.serve.engine import Delta, Finished, Job

    ids = engine.generator.encode(engine.generator.prompt(QUESTIONS[0]))
    events = {"gone": [], "stays": []}
    finished = threading.Event()

    def gone(event):
        events["gone"].append(event)
        if len(events["gone"]) == 2:
            jobs[0].cancelled = True

    def stays(event):
        events["stays"].append(event)
        if isinstance(event, Finished):
            finished.set()

    jobs = [Job(ids, [], 32, gone, ignore_eos=True), Job(ids, [], 32, stays, ignore_eos=True)]
    with engine.arriving():  # both are queued before the engine takes a batch
        for job in jobs:
            engine.submit(job)
    assert finished.wait(TIMEOUT)
    assert events["stays"][-1] == Finished("length", 32)
    assert len(events["gone"]) <= 3 and not any(isinstance(e, Finished) for e in events["gone"])
    assert all(isinstance(e, Delta) for e in events["gone"])
