"""`python -m llava_jax.serve --model DIR`: serve a LLaVA model over the OpenAI Chat Completions API.

The model is loaded as the chat CLI loads it (a Hugging Face LLaVA folder, a llava_jax folder or a finished
training workdir; the same template rule) and answers through one batching engine. It listens on
127.0.0.1 unless `--host` says otherwise. `--ui` adds the web chat at /ui. Bad arguments print one
`error: ...` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from llava_jax import cli
from llava_jax.models.dtypes import DTYPES


def build_parser() -> argparse.ArgumentParser:
    from llava_jax.models.quant import add_quantize_argument

    p = argparse.ArgumentParser(prog="python -m llava_jax.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="a Hugging Face LLaVA folder, a llava_jax folder (convert.save) or a training workdir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id in /v1/models and answers (default: the folder's name)")
    p.add_argument("--template", help="conversation template (default: chosen from the model, as the chat CLI)")
    p.add_argument("--dtype", choices=tuple(DTYPES))
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--engine", choices=("continuous", "windowed"), default="continuous",
                   help="continuous: requests join and leave decode slots between steps; windowed: a batch starts, "
                        "runs to its longest row, and requests that arrive meanwhile wait for it")
    p.add_argument("--max-batch", type=int, default=16, help="most requests decoded together (continuous: slots)")
    p.add_argument("--max-queue", type=int, default=256, help="most waiting requests; more get 429")
    p.add_argument("--prefill-tokens", type=int, default=1024,
                   help="continuous engine: most prompt tokens prefilled between two decode steps; waiting requests "
                        "are prefilled together up to it, a longer prompt in chunks")
    p.add_argument("--max-prefill-rows", type=int, default=8,
                   help="continuous engine: most waiting requests prefilled together")
    p.add_argument("--batch-window-ms", type=float, default=50.0,
                   help="windowed engine: how long a request may wait for others already on their way (a lone one "
                        "never waits)")
    p.add_argument("--api-key", default=os.environ.get("LLAVA_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LLAVA_JAX_API_KEY; none: no key)")
    p.add_argument("--allowed-media-dir", help="accept file:// image URLs of files under this folder")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s):// image URLs")
    p.add_argument("--max-image-bytes", type=int, default=20 << 20)
    p.add_argument("--max-request-bytes", type=int, default=64 << 20, help="largest request body")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="width x height, checked before decoding")
    p.add_argument("--max-prompt-tokens", type=int, help="default: the model's context")
    p.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for")
    p.add_argument("--ui", action="store_true", help="serve the web chat at /ui")
    p.add_argument("--warm-up", choices=("greedy", "all", "none"), default="greedy",
                   help="compile at start-up the programs of greedy requests (all: sampled ones too; none: on the "
                        "first request of each shape); kept in the persistent compilation cache")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_quantize_argument(p)
    return p


class BadArgs(Exception):
    """A bad argument or model folder; the message is printed as one line."""


def _check(args) -> None:
    if not 0 < args.port < 65536:
        raise BadArgs(f"--port {args.port} is not a port number")
    for name in ("max_batch", "max_queue", "prefill_tokens", "max_prefill_rows", "max_image_bytes",
                 "max_request_bytes", "max_image_pixels", "max_tokens"):
        if getattr(args, name) < 1:
            raise BadArgs(f"--{name.replace('_', '-')} must be >= 1")
    if args.allowed_media_dir is not None and not Path(args.allowed_media_dir).is_dir():
        raise BadArgs(f"--allowed-media-dir: folder not found: {args.allowed_media_dir}")


def build_engine(args):
    """Loads the model as the chat CLI does -> a started engine (`--engine`)."""
    from llava_jax.infer.loading import ModelLoadError, load_generator
    from llava_jax.infer.serve.continuous import ContinuousEngine
    from llava_jax.infer.serve.engine import Engine

    try:
        generator = load_generator(args.model, dtype=args.dtype, template=args.template, tokenizer=args.tokenizer,
                                   quantize=args.quantize)
    except (ModelLoadError, FileNotFoundError) as e:
        raise BadArgs(str(e)) from None
    if args.engine == "continuous":
        engine = ContinuousEngine(generator, max_batch=args.max_batch, max_queue=args.max_queue,
                                  max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                  prefill_tokens=args.prefill_tokens, max_prefill_rows=args.max_prefill_rows)
    else:
        engine = Engine(generator, max_batch=args.max_batch, max_queue=args.max_queue,
                        batch_window_s=args.batch_window_ms / 1000, max_tokens=args.max_tokens)
    if args.warm_up != "none":
        start = time.monotonic()
        count = engine.warm_up(args.max_prompt_tokens, sampled=args.warm_up == "all",
                               progress=lambda line: print(f"\r{line:<72}", end="", file=sys.stderr, flush=True))
        print(f"\r{f'compiled {count} shape(s) in {time.monotonic() - start:.1f} s':<72}", file=sys.stderr,
              flush=True)
    return engine.start()


def build_app(args, engine):
    from llava_jax.infer.serve.app import ServerConfig, create_app
    from llava_jax.infer.serve.protocol import ImagePolicy, Limits

    images = ImagePolicy(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
                         media_dir=Path(args.allowed_media_dir) if args.allowed_media_dir else None,
                         allow_remote=args.allow_remote_images)
    config = ServerConfig(model_name=args.model_name or Path(args.model).resolve().name, api_key=args.api_key,
                          limits=Limits(args.max_prompt_tokens, args.max_tokens, images),
                          max_request_bytes=args.max_request_bytes)
    app = create_app(engine, config)
    if args.ui:
        from llava_jax.infer.serve.web import mount_ui

        mount_ui(app, engine, config)
    return app


@contextlib.contextmanager
def serve_in_background(app, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0) -> Iterator[str]:
    """Runs `app` with uvicorn on a thread (port 0: a free port) -> its base URL; stops it on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{sock.getsockname()[1]}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


def listening_lines(host: str, port: int, ui: bool) -> list[str]:
    """What a user opens: the API's base URL and, with the web chat, its page."""
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    lines = [f"OpenAI-compatible API at {base}/v1 (POST {base}/v1/chat/completions)"]
    if ui:
        lines.append(f"web chat at {base}/ui")
    return lines


def run_server(app, host: str, port: int, log_level: str = "info", ui: bool = False) -> None:
    """uvicorn's `run`, printing `listening_lines` once the socket listens."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print("\n".join(listening_lines(host, port, ui)), flush=True)

    AnnouncingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()


def _check_installed(ui: bool) -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "httpx") + (("gradio",) if ui else ())
               if importlib.util.find_spec(m) is None]
    if missing:
        raise BadArgs(f"{', '.join(missing)} not installed: pip install -e '.[serve]'")


@cli.command(BadArgs)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_installed(args.ui)
    _check(args)
    engine = build_engine(args)
    logging.basicConfig(level=args.log_level.upper())
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("serving on %s without --api-key: anyone who reaches this address can use the model",
                        args.host)
    try:
        run_server(build_app(args, engine), args.host, args.port, args.log_level, ui=args.ui)
    finally:
        engine.close()
    return 0


__all__ = ["BadArgs", "build_parser", "build_engine", "build_app", "serve_in_background", "run_server",
           "listening_lines", "main"]
