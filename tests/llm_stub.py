"""A small real OpenAI-compatible chat server on 127.0.0.1 for tests: the counterpart, not the code under test.

Answers `POST /v1/chat/completions` with `respond(request)` (deterministic in the request), counts attempts
and successful answers per request, and fails on demand: `fail(request, attempt)` returns an HTTP status
(429, 500, ...) to send instead of an answer. Its load is bounded: it stops after `max_requests` requests
(later ones get 503 and are counted) and every handler finishes within its `delay`. With `hold_after=N`
it answers N requests, then holds every later one until `release()`, which fails them with 503 (so a
client can be killed at a known point, with nothing answered that it has not received).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llava_jax.data.llm_client import request_key


class StubLLM:
    def __init__(self, respond: Callable[[dict], str], *, fail: Callable[[dict, int], int | None] | None = None,
                 delay: float = 0.0, max_requests: int = 2000, hold_after: int | None = None):
        self.respond, self.fail, self.delay, self.max_requests = respond, fail, delay, max_requests
        self.hold_after = hold_after
        self._reserved = 0
        self._gate = threading.Event()
        self.attempts: Counter = Counter()
        self.answered: Counter = Counter()
        self.requests: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def total_answered(self) -> int:
        with self._lock:
            return sum(self.answered.values())

    def __enter__(self) -> "StubLLM":
        self._thread.start()
        return self

    def release(self) -> None:
        """Fails the held requests (503) and answers every later one."""
        with self._lock:
            self.hold_after = None
        self._gate.set()

    def __exit__(self, *exc) -> None:
        self._gate.set()
        self._server.shutdown()
        self._server.server_close()

    def _reply(self, request: dict) -> tuple[int, dict]:
        key = request_key(request)
        with self._lock:
            self.attempts[key] += 1
            attempt = self.attempts[key]
            over = sum(self.attempts.values()) > self.max_requests
        if over:
            return 503, {"error": {"message": "stub request budget exhausted"}}
        status = self.fail(request, attempt) if self.fail else None
        if status:
            return status, {"error": {"message": f"stub failure {status}", "type": "stub"}}
        with self._lock:
            held = self.hold_after is not None and self._reserved >= self.hold_after
            self._reserved += not held
        if held:
            self._gate.wait(timeout=120)
            return 503, {"error": {"message": "stub held this request, then failed it"}}
        time.sleep(self.delay)
        content = self.respond(request)
        with self._lock:
            self.answered[key] += 1
            self.requests[key] = request
        prompt_tokens = len(json.dumps(request["messages"])) // 4
        return 200, {
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": request["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content) // 4,
                      "total_tokens": prompt_tokens + len(content) // 4},
        }

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    status, payload = 404, {"error": {"message": f"no route {self.path}"}}
                else:
                    status, payload = stub._reply(json.loads(body))
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("retry-after-ms", "5")
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client is gone (killed)

            def log_message(self, *args):
                pass

        return Handler
