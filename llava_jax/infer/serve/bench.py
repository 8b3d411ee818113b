"""Server throughput: the same requests one by one, then from concurrent clients; or Poisson arrivals against
both engines.

    python -m llava_jax.infer.serve.bench --model DIR [--clients 16] [--requests 64] [--max-tokens 16]
    python -m llava_jax.infer.serve.bench --model DIR --poisson 4,8,16 [--requests 64] [--max-tokens 8,48]

Starts `python -m llava_jax.serve` in its own process on 127.0.0.1 (a free port), warms up (every batch size,
then both passes once, so compiles are not timed), then sends `--requests` chat completions (a demo scene as
a data: URL and a demo question each, greedy) one at a time, and the same requests from `--clients` threads.
Prints completion tokens/s, requests/s and p50 / p95 latency of both, and their ratio. `--ignore-eos` makes
every answer `--max-tokens` long (vLLM's extension).

`--poisson RATES` (requests per second, comma separated): for each engine (`--engine continuous`, then
`windowed`; each compiles every shape at start-up), the requests arrive as a Poisson process at each rate, with
mixed prompt lengths (demo questions with 0-`--extra-words` more words) and answer lengths (`--max-tokens LO,HI`;
on a random model few answers end early), streamed. Reports per engine and rate: throughput (completion
tokens / s from the first request to the last answer), time to first token and inter-token latency (the gaps
between streamed chunks, as vLLM's benchmark) p50 / p99, as a table and (`--json`) JSON; then, at the same
p99 latency (`--slo TTFT_MS,ITL_MS`), each engine's highest throughput among the rates that meet it and their
ratio. The requests come from one asyncio client, so that the client's own work stays small.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from typing import Iterator, Sequence

import numpy as np

from llava_jax import cli
from llava_jax.atomic_files import write_text


def demo_requests(n: int, max_tokens: int, seed: int = 0, ignore_eos: bool = False) -> list[dict]:
    """`n` chat requests about synthetic demo scenes (64 px PNG data URLs) with the demo's questions."""
    from llava_jax.data import synthetic

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        category = synthetic.CATEGORIES[k % len(synthetic.CATEGORIES)]
        scene = synthetic.Scene(synthetic.SHAPES[k % 4], list(synthetic.COLORS)[k % 5], (int(rng.integers(4)),))
        buf = io.BytesIO()
        synthetic.draw_scene(scene, 64, rng).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        question = synthetic.QUESTIONS[category][k % 3] + synthetic.SHORT_ANSWER_SUFFIX
        out.append({"model": "bench", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos,
                    "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]})
    return out


def _send(client, body: dict) -> tuple[float, int]:
    start = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]


def run(url: str, requests: list[dict], clients: int) -> dict:
    """Sends `requests` from `clients` threads (1: one by one) -> throughput and latency figures."""
    import httpx

    pool_clients = [httpx.Client(base_url=url, timeout=600) for _ in range(clients)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda kv: _send(pool_clients[kv[0] % clients], kv[1]), enumerate(requests)))
    wall = time.perf_counter() - start
    for client in pool_clients:
        client.close()
    latency = np.array([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(requests), "completion_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "requests_per_s": len(requests) / wall,
            "p50_latency_s": float(np.percentile(latency, 50)), "p95_latency_s": float(np.percentile(latency, 95))}


def warm_up(url: str, requests: list[dict], clients: int) -> None:
    """Compiles before timing: groups of 1, 2, 4, ... concurrent requests (each batch size), then both passes."""
    size = 1
    while size < clients:
        run(url, requests[:size], size)
        size *= 2
    run(url, requests, 1)
    run(url, requests, clients)


def poisson_requests(n: int, max_tokens: tuple[int, int], extra_words: int, seed: int = 0) -> list[dict]:
    """`demo_requests` with mixed prompt lengths (0..extra_words more words in front of the question) and answer
    lengths (max_tokens uniform in [lo, hi]; a random model seldom says EOS), streamed with usage. Not
    `ignore_eos`: the windowed engine compiles its programs for the template's stops at start-up."""
    from llava_jax.data import synthetic

    rng = np.random.default_rng(seed + 1)
    words = sorted({w for text in synthetic.corpus() for w in text.replace("?", " ").split() if w.isalpha()})
    out = []
    for body in demo_requests(n, 1, seed):
        text = body["messages"][0]["content"][1]
        text["text"] = " ".join(rng.choice(words, int(rng.integers(0, extra_words + 1)))) + " " + text["text"]
        out.append({**body, "max_tokens": int(rng.integers(max_tokens[0], max_tokens[1] + 1)),
                    "stream": True, "stream_options": {"include_usage": True}})
    return out


async def _stream(client, body: dict, start: float) -> dict:
    """One streamed request sent at `start` (perf_counter) -> its send time, chunk times and tokens."""
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    sent, chunks, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in event.get("choices", ())):
                chunks.append(time.perf_counter())
    return {"sent": sent, "chunks": chunks, "tokens": tokens, "end": time.perf_counter()}


def run_poisson(url: str, requests: list[dict], rate: float, seed: int = 0) -> dict:
    """Sends `requests` at Poisson arrival times of `rate` per second from one asyncio client (as vLLM's
    benchmark: a light client, so that the server, not the client, is measured on a small machine) ->
    throughput, TTFT and ITL figures."""
    import httpx

    async def send_all() -> list[dict]:
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(requests))
        limits = httpx.Limits(max_connections=len(requests))
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            t0 = time.perf_counter() + 0.2
            return list(await asyncio.gather(*(_stream(client, body, t0 + at)
                                               for at, body in zip(np.cumsum(gaps), requests))))

    return latency_figures(asyncio.run(send_all()), rate)


def at_slo(rows: list[dict], ttft_s: float, itl_s: float) -> dict | None:
    """The figures of the highest throughput among `rows` (one per rate) whose TTFT p99 and ITL p99 are within
    the bounds; None when no rate meets them."""
    meeting = [r for r in rows if r["ttft_p99_s"] <= ttft_s and r["itl_p99_s"] <= itl_s]
    return max(meeting, key=lambda r: r["tokens_per_s"]) if meeting else None


def latency_figures(records: list[dict], rate: float) -> dict:
    """Throughput over the run, TTFT and ITL percentiles (seconds) of streamed request records."""
    wall = max(r["end"] for r in records) - min(r["sent"] for r in records)
    ttft = np.array([r["chunks"][0] - r["sent"] for r in records if r["chunks"]])
    itl = np.concatenate([np.diff(r["chunks"]) for r in records] + [np.zeros(0)])
    tokens = sum(r["tokens"] for r in records)
    pct = lambda a, q: float(np.percentile(a, q)) if a.size else float("nan")
    return {"rate": rate, "requests": len(records), "completion_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99)}


def poisson_main(args) -> dict:
    """Both engines at every rate -> {"continuous": [figures per rate], "windowed": [...]}; prints the table."""
    rates = [float(r) for r in args.poisson.split(",")]
    low, high = (int(v) for v in args.max_tokens.split(",")) if "," in args.max_tokens else (int(args.max_tokens),) * 2
    requests = poisson_requests(args.requests, (low, high), args.extra_words)
    results = {}
    for engine in ("continuous", "windowed"):
        with server_process(args, engine=engine, warm_up="greedy") as url:
            run_poisson(url, requests[:max(8, args.max_batch)], 1000.0)  # compiled at start-up: a short run
            results[engine] = [run_poisson(url, requests, rate) for rate in rates]
    print(f"{'engine':>10} {'rate/s':>6} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
    for engine, rows in results.items():
        for r in rows:
            print(f"{engine:>10} {r['rate']:6.1f} {r['tokens_per_s']:9.1f} {r['ttft_p50_s']:9.3f} "
                  f"{r['ttft_p99_s']:9.3f} {r['itl_p50_s']:8.4f} {r['itl_p99_s']:8.4f}")
    for c, w in zip(results["continuous"], results["windowed"]):
        print(f"rate {c['rate']:.1f}/s: continuous / windowed {c['tokens_per_s'] / w['tokens_per_s']:.2f}x tokens/s")
    ttft_ms, itl_ms = (float(v) for v in args.slo.split(","))
    best = {engine: at_slo(rows, ttft_ms / 1000, itl_ms / 1000) for engine, rows in results.items()}
    for engine, row in best.items():
        print(f"at p99 TTFT <= {ttft_ms:g} ms and p99 ITL <= {itl_ms:g} ms, {engine}: " +
              (f"{row['tokens_per_s']:.1f} tokens/s (rate {row['rate']:g}/s)" if row else "no rate meets it"))
    if all(best.values()):
        print(f"continuous / windowed at the same p99 latency: "
              f"{best['continuous']['tokens_per_s'] / best['windowed']['tokens_per_s']:.2f}x tokens/s")
    results["at_slo"] = {"ttft_p99_ms": ttft_ms, "itl_p99_ms": itl_ms, **best}
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_jax.infer.serve.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="as for python -m llava_jax.serve")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", default="16", help="N, or with --poisson LO,HI (default 8,48 there)")
    p.add_argument("--poisson", help="comma-separated arrival rates (requests/s): both engines under Poisson load")
    p.add_argument("--extra-words", type=int, default=40, help="--poisson: up to this many more words a prompt")
    p.add_argument("--max-prompt-tokens", type=int, default=128, help="--poisson: the servers' prompt limit")
    p.add_argument("--slo", default="100,50", help="--poisson: TTFT_MS,ITL_MS: compare the engines' highest "
                   "throughput among the rates whose p99 TTFT and p99 ITL are within these (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-window-ms", type=float, default=50.0)
    p.add_argument("--ignore-eos", action="store_true", help="every answer is --max-tokens long")
    p.add_argument("--json", help="also write the figures to this file")
    return p


@contextlib.contextmanager
def server_process(args, timeout_s: float = 900.0, engine: str = "continuous", warm_up: str = "none"
                   ) -> Iterator[str]:
    """`python -m llava_jax.serve --engine ENGINE` on a free 127.0.0.1 port -> its URL, once /health answers."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "llava_jax.serve", "--model", args.model, "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", str(max(args.requests, 1)),
               "--batch-window-ms", str(args.batch_window_ms), "--log-level", "warning", "--engine", engine,
               "--warm-up", warm_up]  # "none": warm_up below compiles the shapes it times
    if args.poisson:
        command += ["--max-prompt-tokens", str(args.max_prompt_tokens), "--max-tokens", args.max_tokens.split(",")[-1]]
    server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {timeout_s} s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(30)


@cli.command(RuntimeError)
def main(argv: Sequence[str] | None = None) -> int:
    import httpx

    args = build_parser().parse_args(argv)
    if args.poisson:
        if args.max_tokens == "16":
            args.max_tokens = "8,48"
        results = poisson_main(args)
        if args.json:
            write_text(args.json, json.dumps({**results, "args": vars(args)}, indent=1))
        return 0
    args.max_tokens = int(args.max_tokens)
    requests = demo_requests(args.requests, args.max_tokens, ignore_eos=args.ignore_eos)
    with server_process(args) as url:
        warm_up(url, requests, args.clients)
        one = run(url, requests, 1)
        before = httpx.get(url + "/health", timeout=30).json()
        many = run(url, requests, args.clients)
        after = httpx.get(url + "/health", timeout=30).json()
    many["mean_batch"] = (after["rows"] - before["rows"]) / max(after["batches"] - before["batches"], 1)
    print(f"{'':>22} {'tokens/s':>9} {'requests/s':>10} {'p50 s':>7} {'p95 s':>7} {'tokens':>7}")
    for name, r in (("one by one", one), (f"{args.clients} concurrent clients", many)):
        print(f"{name:>22} {r['tokens_per_s']:9.1f} {r['requests_per_s']:10.2f} {r['p50_latency_s']:7.3f} "
              f"{r['p95_latency_s']:7.3f} {r['completion_tokens']:7d}")
    ratio = many["tokens_per_s"] / one["tokens_per_s"]
    print(f"concurrent / one by one: {ratio:.2f}x tokens/s ({args.requests} requests, max_tokens "
          f"{args.max_tokens}{', ignore_eos' if args.ignore_eos else ''}, max batch {args.max_batch}, mean batch "
          f"{many['mean_batch']:.1f})")
    if args.json:
        write_text(args.json, json.dumps({"one_by_one": one, "concurrent": many, "ratio": ratio, "args": vars(args)},
                                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
