"""Chat-completion calls to any OpenAI-compatible endpoint, cached on disk and run concurrently.

Used by the instruction-data generator (`llava_jax.data.generate`) and the GPT judges
(`llava_jax.infer.judge`). A request is the JSON body of a chat completion (model, messages, sampling
parameters); its SHA-256 over the canonical JSON is the cache key. Each answer is committed to an SQLite
file (`ResponseCache`) as soon as it arrives, so a killed run loses at most the requests in flight and a
rerun makes no call whose answer is already stored. Failed calls are not stored: a rerun tries them
again. Retries with exponential backoff on 408/409/429/5xx and connection errors (honouring
`Retry-After`) are the `openai` client's own (`max_retries`).
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

API_KEY_ENV = "OPENAI_API_KEY"


def request_key(request: dict) -> str:
    """The cache key of a request: SHA-256 of its canonical JSON."""
    text = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Reply:
    """One answered request. `error` is set (and `content` None) when the call failed after its retries."""

    content: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error: str | None = None


class ResponseCache:
    """request key -> reply, in an SQLite file; safe to share between threads."""

    def __init__(self, path: str | os.PathLike):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, request TEXT, reply TEXT)")

    def get(self, key: str) -> Reply | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else dataclasses.replace(Reply(**json.loads(row[0])), cached=True)

    def put(self, key: str, request: dict, reply: Reply) -> None:
        record = json.dumps(dataclasses.asdict(reply), ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)",
                             (key, json.dumps(request, ensure_ascii=False), record))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclasses.dataclass
class Usage:
    """Counts over a run: calls made, answers read from the cache, failures, tokens (this run's calls and
    the cached answers' separately), and the cost of this run's calls at the given prices."""

    calls: int = 0
    cached: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    first_error: str | None = None   # what the endpoint said to the first request that failed

    def add(self, reply: Reply) -> None:
        if reply.error is not None:
            self.failed += 1
            self.first_error = self.first_error or reply.error
        elif reply.cached:
            self.cached += 1
            self.cached_prompt_tokens += reply.prompt_tokens
            self.cached_completion_tokens += reply.completion_tokens
        else:
            self.calls += 1
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens

    def report(self, input_price: float = 0.0, output_price: float = 0.0) -> dict:
        """Counts and the cost in the prices' currency (prices per million input / output tokens)."""
        cost = (self.prompt_tokens * input_price + self.completion_tokens * output_price) / 1e6
        return {**dataclasses.asdict(self), "cost": round(cost, 6)}


class ChatClient:
    """Cached, concurrent chat completions against one endpoint and model.

    Args:
      model: the model name sent with every request.
      cache_path: the SQLite cache file.
      base_url: the endpoint (default: the `openai` client's, i.e. OpenAI or `OPENAI_BASE_URL`).
      api_key_env: environment variable holding the key; a local endpoint (`base_url` given) may go without.
      concurrency: requests in flight at once.
      max_retries: retries of one request on 408/409/429/5xx and connection errors, with backoff.
      timeout: seconds per attempt.
      client: an `openai.OpenAI` to use instead of building one.
    """

    def __init__(self, model: str, cache_path: str | os.PathLike, *, base_url: str | None = None,
                 api_key_env: str = API_KEY_ENV, concurrency: int = 8, max_retries: int = 6,
                 timeout: float = 120.0, client: Any = None):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.model = model
        self.concurrency = concurrency
        self.cache = ResponseCache(cache_path)
        self.usage = Usage()
        self._client = client or _openai_client(base_url, api_key_env, max_retries, timeout)

    def request(self, messages: list[dict], **params) -> dict:
        """The JSON body of a chat completion with this client's model."""
        return {"model": self.model, "messages": messages, **params}

    def complete(self, request: dict) -> Reply:
        """The reply to one request: from the cache, else from the endpoint (then stored)."""
        reply = self._complete(request)
        self.usage.add(reply)
        return reply

    def _complete(self, request: dict) -> Reply:
        key = request_key(request)
        reply = self.cache.get(key)
        if reply is None:
            reply = self._call(request)
            if reply.error is None:
                self.cache.put(key, request, reply)
        return reply

    def complete_all(self, tagged: Iterable[tuple[Any, dict]], *, desc: str = "requests",
                     total: int | None = None, progress: bool = True) -> Iterator[tuple[Any, Reply]]:
        """Answers (tag, request) pairs with `concurrency` calls in flight; yields (tag, reply) as they finish.

        At most 4 x `concurrency` requests are pending at a time, so memory stays bounded on long inputs.
        """
        window = 4 * self.concurrency
        with futures.ThreadPoolExecutor(self.concurrency) as pool, \
                tqdm(total=total, desc=desc, unit="req", disable=not progress) as bar:
            pending: dict[futures.Future, Any] = {}
            for tag, request in tagged:
                pending[pool.submit(self._complete, request)] = tag
                if len(pending) >= window:
                    yield from _drain(pending, bar, self.usage, futures.FIRST_COMPLETED)
            yield from _drain(pending, bar, self.usage, futures.ALL_COMPLETED)

    def _call(self, request: dict) -> Reply:
        import openai

        try:
            response = self._client.chat.completions.create(**request)
            choice = response.choices[0]
            usage = response.usage
            return Reply(content=choice.message.content, finish_reason=choice.finish_reason,
                         prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                         completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
        except (openai.APIError, IndexError, AttributeError) as e:
            return Reply(content=None, error=f"{type(e).__name__}: {e}")

    def close(self) -> None:
        self.cache.close()


def _drain(pending: dict, bar, usage: Usage, return_when) -> Iterator[tuple[Any, Reply]]:
    """Collects finished requests; usage is counted here, in the caller's thread."""
    done, _ = futures.wait(pending, return_when=return_when)
    for future in done:
        tag = pending.pop(future)
        usage.add(future.result())
        bar.update(1)
        bar.set_postfix(calls=usage.calls, cached=usage.cached, failed=usage.failed,
                        tokens=usage.prompt_tokens + usage.completion_tokens, refresh=False)
        yield tag, future.result()


def failure_line(usage: dict) -> str:
    """The one line for the user when requests failed, from a `Usage.report()` ("" when none did)."""
    if not usage["failed"]:
        return ""
    return (f"error: {usage['failed']} requests failed after their retries (first: {usage['first_error']}); "
            "rerun the same command to retry them")


def _openai_client(base_url: str | None, api_key_env: str, max_retries: int, timeout: float):
    import openai

    api_key = os.environ.get(api_key_env)
    if not api_key:
        if base_url is None:
            raise ValueError(f"no API key: set ${api_key_env} (or pass --base-url for a local endpoint)")
        api_key = "EMPTY"  # local OpenAI-compatible servers (vLLM, llava_jax.serve) ignore it
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=timeout)


def add_client_arguments(parser, default_model: str) -> None:
    """The endpoint flags shared by the generator and the judges."""
    parser.add_argument("--model", default=default_model, help="model name at the endpoint (default %(default)s)")
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                        "(default: OpenAI, or $OPENAI_BASE_URL)")
    parser.add_argument("--api-key-env", default=API_KEY_ENV, help="environment variable with the API key")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default %(default)s)")
    parser.add_argument("--max-retries", type=int, default=6, help="retries per request on 429/5xx")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per attempt")
    parser.add_argument("--cache", help="SQLite cache of the replies (default: next to the output)")
    parser.add_argument("--input-price", type=float, default=0.0, help="price per 1M input tokens (cost report)")
    parser.add_argument("--output-price", type=float, default=0.0, help="price per 1M output tokens")
    parser.add_argument("--no-progress", action="store_true")


def client_from_args(args, default_cache: str | os.PathLike) -> ChatClient:
    return ChatClient(args.model, args.cache or default_cache, base_url=args.base_url, api_key_env=args.api_key_env,
                      concurrency=args.concurrency, max_retries=args.max_retries, timeout=args.timeout)


__all__ = ["ChatClient", "Reply", "ResponseCache", "Usage", "request_key", "add_client_arguments",
           "client_from_args"]
