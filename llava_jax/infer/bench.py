"""Generation benchmark: `python -m llava_jax.bench generate --preset tiny|small|llava_1_5_7b ...`.

For each batch size: time to first token (the prefill: vision tower, projector and prompt through the KV
cache, up to the first sampled token) and decode tokens/s (the compiled decode loop; every row generates
exactly --new-tokens, EOS is ignored) of our `Generator`, on random weights. With --compare-transformers
the same weights run through transformers' `generate` (PyTorch) in the same process and the ratio is
printed. On a GPU / TPU the decode step is also compared with its memory-bandwidth bound: the bytes of the
weights one step reads (language model) divided by the device's memory bandwidth.

Ours decodes as chat and eval do, through `Generator` (per-layer weight buffers, `decoding_layout`);
`--model PATH` times a real checkpoint loaded with `load_model` instead of a preset. On CUDA,
--compare-transformers draws the transformers model's own random weights on the GPU (same architecture, same
work per token).

Timings are medians over --repeats runs after a warm-up run (whose time, compilation included, is reported
as compile_s). Ours: the prefill and the decode loop are timed apart. transformers: a streamer notes when
the first and the last new token arrive within one `generate` call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax import cli, convert
from llava_jax.convert.hf_llava import llava_config_to_hf
from llava_jax.infer import decoding
from llava_jax.infer import generate as gen_lib
from llava_jax.infer.quant_quality import decode_memory
from llava_jax.models import clip_vit, llama, quant
from llava_jax.models.dtypes import DTYPES
from llava_jax.models.llava import PRESETS as LLAVA_PRESETS
from llava_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration

PRESETS: dict[str, LlavaConfig] = {
    # About 0.2M parameters: CLIP 56 px / 14 (16 image tokens), a 2-layer decoder.
    "tiny": LlavaConfig(
        vision=clip_vit.CLIPVisionConfig(hidden_size=64, intermediate_size=131, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=56, patch_size=14),
        text=llama.LlamaConfig(vocab_size=1031, hidden_size=64, intermediate_size=173, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
        image_token_index=1030),
    # About 60M parameters: CLIP 224 px / 14 (256 image tokens, 4 layers), an 8-layer 512-wide decoder with
    # the LLaVA-1.5 vocabulary.
    "small": LlavaConfig(
        vision=clip_vit.CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                         num_attention_heads=4, image_size=224, patch_size=14),
        text=llama.LlamaConfig(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                               num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)),
    "llava_1_5_7b": LLAVA_PRESETS["llava_1_5_7b"],
}

# Peak memory bandwidth in bytes/s by device kind (substring of jax's device_kind, first match wins).
BANDWIDTH = (
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L4", 0.3e12), ("A10", 0.6e12),
    ("TPU v5 lite", 0.819e12), ("TPU v5e", 0.819e12), ("TPU v5p", 2.765e12), ("TPU v5", 2.765e12),
    ("TPU v4", 1.2e12), ("TPU v6", 1.64e12),
)


def device_bandwidth(device_kind: str) -> float | None:
    return next((bw for name, bw in BANDWIDTH if name.lower() in device_kind.lower()), None)


@dataclasses.dataclass
class Timing:
    """One implementation at one batch size."""

    impl: str
    batch: int
    compile_s: float
    ttft_s: float
    decode_s: float
    new_tokens: int

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second after the first one, over all rows."""
        return self.batch * (self.new_tokens - 1) / max(self.decode_s, 1e-9)

    @property
    def step_s(self) -> float:
        return self.decode_s / max(self.new_tokens - 1, 1)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_models(cfg: LlavaConfig, dtype, compare: bool, seed: int = 0):
    """(our model, transformers model or None) with the same random weights.

    With `compare` the weights are drawn by transformers, saved and imported with `convert.from_hf`;
    otherwise our own initialization draws them directly in `dtype`. On a CUDA machine the transformers
    model is drawn on the GPU with its own random weights (same architecture and work per token; a 7B
    save / import round trip through the host would dominate the run).
    """
    if not compare or _torch_cuda():
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, dtype=dtype, param_dtype=dtype),
                                  vision=dataclasses.replace(cfg.vision, dtype=dtype, param_dtype=dtype))
        ours = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(seed))
        return ours, (_transformers_model(cfg, dtype, seed, "cuda") if compare else None)
    hf = _transformers_model(cfg, dtype, seed, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = convert.from_hf(tmp, dtype=dtype)
    return ours, hf


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _transformers_model(cfg: LlavaConfig, dtype, seed: int, device: str):
    """A random transformers LLaVA of `cfg`'s architecture in `dtype` on `device` (eval mode)."""
    import torch
    import transformers

    hf_dict = llava_config_to_hf(cfg)
    torch.manual_seed(seed)
    hf_config = transformers.AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    torch_dtype = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16}[dtype]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # drawn directly in the compute dtype
    try:
        with torch.device(device):
            hf = transformers.LlavaForConditionalGeneration(hf_config)
    finally:
        torch.set_default_dtype(default)
    return hf.to(torch_dtype).eval()


def make_inputs(cfg: LlavaConfig, batch: int, prompt_len: int, images: int, seed: int = 0):
    """Rows of BOS + `images` image-token groups + `prompt_len` random text tokens, and their pixels
    float32 [batch * images, 3, S, S]."""
    rng = np.random.default_rng(seed)
    vocab = min(cfg.text.vocab_size, cfg.image_token_index)
    rows = [np.concatenate([[1], np.full(images * cfg.image_seq_length, cfg.image_token_index),
                            rng.integers(3, vocab, prompt_len)]).astype(np.int32) for _ in range(batch)]
    size = cfg.vision.image_size
    pixels = rng.normal(size=(batch * images, 3, size, size)).astype(np.float32)
    return rows, pixels


def time_ours(model, rows, pixels, images: int, new_tokens: int, repeats: int) -> Timing:
    gen = gen_lib.Generator(model, None, eos_token_ids=())
    per_row = [[pixels[r * images + k] for k in range(images)] for r in range(len(rows))]
    batch = gen.make_batch(rows, per_row)
    static = gen.static(batch, greedy=True)
    params = gen_lib.Sampling().arrays()
    key = jax.random.key(0)

    def prefill():
        return decoding.prefill(gen.state, batch.ids, batch.mask, batch.pixels, batch.image_mask, batch.done, key,
                                params, np.int32(new_tokens), static=static, buffer=new_tokens)

    def first_token():
        return jax.block_until_ready(prefill().tokens)

    def decode_time() -> float:
        carry = jax.block_until_ready(prefill())
        start = time.perf_counter()
        carry = jax.block_until_ready(decoding.decode_loop(gen.state, carry, key, params, static=static))
        elapsed = time.perf_counter() - start
        assert (np.asarray(carry.lengths)[:len(rows)] == new_tokens).all()
        return elapsed

    start = time.perf_counter()
    first_token()
    decode_time()
    compile_s = time.perf_counter() - start
    ttft = _median_time(first_token, repeats)
    decode = statistics.median(decode_time() for _ in range(repeats))
    return Timing("llava_jax", len(rows), compile_s, ttft, decode, new_tokens)


class _TokenClock:
    """A transformers streamer that notes when the prompt, the first new token and the last one arrive."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


def time_transformers(hf, rows, pixels, new_tokens: int, repeats: int) -> Timing:
    """transformers' greedy generate; a streamer clocks the first token (TTFT from the call) and the rest."""
    import torch

    ids = torch.from_numpy(np.stack(rows).astype(np.int64)).to(hf.device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if pixels.size:
        inputs["pixel_values"] = torch.from_numpy(pixels).to(hf.device, hf.dtype)

    def run() -> tuple[float, float]:
        clock = _TokenClock()
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, streamer=clock)
        assert out.shape[1] == ids.shape[1] + new_tokens and len(clock.times) == new_tokens + 2
        return clock.times[1] - start, clock.times[-2] - clock.times[1]  # (first token, the other tokens)

    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    runs = [run() for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return Timing("transformers", len(rows), compile_s, ttft, decode, new_tokens)


def decode_weight_bytes(model) -> int:
    """Bytes of the parameters one decode step reads: the language model's."""
    state = nnx.state(model.language_model, nnx.Param)
    return sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves(state))  # int4: 1/2


def bench_models(args):
    """(our model, transformers model or None): a checkpoint (`load_generator`), or a preset's random weights."""
    if args.model:
        return gen_lib.load_generator(args.model, dtype=DTYPES[args.dtype], quantize=args.quantize).model, None
    ours, hf = build_models(PRESETS[args.preset], DTYPES[args.dtype], args.compare_transformers)
    return quant.as_quantized(ours, args.quantize), hf


def run_generate(args) -> list[dict]:
    model, hf = bench_models(args)
    cfg = model.config
    device = jax.devices()[0]
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else (
        device_bandwidth(device.device_kind) if device.platform != "cpu" else None)
    weight_bytes = decode_weight_bytes(model)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    name = args.model or f"preset {args.preset}"
    print(f"{name}: {n_params / 1e6:.1f}M parameters ({weight_bytes / 2**20:.0f} MiB read per decode step), "
          f"{args.dtype}, prompt {args.images} x {cfg.image_seq_length} image + {args.prompt_len} text tokens,"
          f" {args.new_tokens} new tokens, {device.device_kind} ({device.platform})"
          + (f", bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""))
    memory = decode_memory(model, max(args.batch_sizes), args.images * cfg.image_seq_length + args.prompt_len
                           + args.new_tokens)
    print("decode step memory (XLA analysis): " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in memory.items()))
    header = f"{'batch':>5} {'impl':>12} {'compile_s':>9} {'ttft_ms':>9} {'decode_tok/s':>12} {'step_ms':>8}"
    print(header + ("  bw_bound" if bandwidth else "") + ("  ratio(ours/hf)" if hf is not None else ""))
    results = []
    for batch in args.batch_sizes:
        rows, pixels = make_inputs(cfg, batch, args.prompt_len, args.images)
        timings = [time_ours(model, rows, pixels, args.images, args.new_tokens, args.repeats)]
        if hf is not None:
            timings.append(time_transformers(hf, rows, pixels, args.new_tokens, args.repeats))
        for t in timings:
            line = (f"{t.batch:>5} {t.impl:>12} {t.compile_s:>9.2f} {t.ttft_s * 1e3:>9.1f} "
                    f"{t.decode_tokens_per_s:>12.1f} {t.step_s * 1e3:>8.2f}")
            record = {"preset": args.model or args.preset, "dtype": args.dtype, "device": device.device_kind,
                      "quantize": args.quantize, "decode_memory": memory,
                      **dataclasses.asdict(t), "decode_tokens_per_s": t.decode_tokens_per_s, "step_s": t.step_s}
            if bandwidth and t.impl == "llava_jax":
                fraction = weight_bytes / bandwidth / t.step_s
                line += f"  {fraction:7.1%}"
                record["bandwidth_bound_fraction"] = fraction
            results.append(record)
            print(line)
        if hf is not None:
            ours, ref = timings
            print(f"{'':>5} {'ratio':>12} {'':>9} {ref.ttft_s / ours.ttft_s:>8.2f}x "
                  f"{ours.decode_tokens_per_s / ref.decode_tokens_per_s:>11.2f}x   (ours faster when > 1)")
            results[-1]["ttft_speedup"] = ref.ttft_s / ours.ttft_s
            results[-1]["decode_speedup"] = ours.decode_tokens_per_s / ref.decode_tokens_per_s
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.bench", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    g = commands.add_parser("generate", help="time to first token and decode tokens/s")
    g.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    g.add_argument("--prompt-len", type=int, default=64, help="text tokens per prompt (besides the images)")
    g.add_argument("--images", type=int, default=1, help="images per prompt")
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--compare-transformers", action="store_true",
                   help="also time transformers' generate on the same weights")
    g.add_argument("--model", help="a model folder or training workdir (load_model) instead of a preset")
    g.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the bound (default: by device kind)")
    g.add_argument("--json", help="write the results here")
    quant.add_quantize_argument(g)
    return parser


@cli.command()
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.new_tokens < 2:
        raise cli.UsageError("--new-tokens must be >= 2")
    if args.model and args.compare_transformers:
        raise cli.UsageError("--compare-transformers draws its own weights; use it with --preset, not --model")
    run_generate(args)
    return 0


__all__ = ["PRESETS", "Timing", "build_models", "device_bandwidth", "main", "run_generate"]
