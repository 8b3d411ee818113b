"""Training-step benchmark: `python -m llava_jax.bench train --preset tiny|small|llava_1b|llava_1_5_7b ...`.

Times the jitted stage-2 train step (AdamW, full fine-tuning or `--lora`) on random weights and synthetic
samples drawn from a mix665k-like length mix scaled to `--seq` (`llava_jax.data.packing.LengthMix`:
image samples = image tokens + log-uniform text of seq/20 .. 0.73 seq tokens, 6% text-only samples up to
seq). Two batch layouts of `--batch` rows of `--seq` tokens:
- `unpacked`: one sample per row, padded (what the unpacked pipeline computes);
- `packed`: rows filled by the best-fit packer (several samples and images per row).
Reported per layout: step time (median after a compiled warm-up), real tokens/s, model FLOPs per step
(`llava_jax.train.metrics.FlopModel`, real tokens only), MFU where the device peak is known, real / computed
tokens, and memory (the device's peak bytes in use on GPU / TPU; the compiled step's arguments + temporaries
everywhere). `--compare-transformers` also times transformers' LlavaForConditionalGeneration (PyTorch, same
weights, the unpacked batches, AdamW, the same trainable parameters; peft LoRA with `--lora`), interleaving
its steps with ours, and checks that both compute the same loss on the first batch. Both sides then run on the
same `--threads` cores (this process's CPU affinity, which sizes XLA's CPU thread pools and bounds them, and
`torch.set_num_threads`); each reports min / median / max over `--repeats` interleaved rounds, and the ratio of
median real tokens/s comes with a verdict that says "too noisy to decide" when the min-max ranges overlap.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
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
from llava_jax.convert.build import with_runtime
from llava_jax.data.packing import LengthMix, pack_window, segment_lengths
from llava_jax.data.pipeline import collate
from llava_jax.infer.bench import PRESETS as GENERATE_PRESETS
from llava_jax.infer.bench import _transformers_model
from llava_jax.models import clip_vit, llama
from llava_jax.models.dtypes import DTYPES
from llava_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration
from llava_jax.train import lora as lora_lib
from llava_jax.train import metrics, recipes
from llava_jax.train import optimizer as opt
from llava_jax.train import step as step_lib

PRESETS: dict[str, LlavaConfig] = {
    **GENERATE_PRESETS,
    # A ~1.4B LLaMA (width 2048, 24 layers) with CLIP-L/336: full fine-tuning fits one 80 GB GPU.
    "llava_1b": LlavaConfig(
        vision=clip_vit.PRESETS["clip_l14_336"],
        text=llama.LlamaConfig(vocab_size=32064, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                               num_attention_heads=16, max_position_embeddings=4096)),
}


def synthetic_samples(cfg: LlavaConfig, n: int, seq: int, seed: int = 0) -> list[dict]:
    """`n` LLaVA-style training samples (BOS, image tokens, prompt, supervised answer) of the scaled mix."""
    p = cfg.image_seq_length
    mix = LengthMix(image_tokens=p, text_min=max(4, seq // 20), text_max=max(8, int(seq * 0.73)), max_length=seq)
    lengths, has_image = mix.draw(n, seed)
    rng = np.random.default_rng(seed)
    vocab = min(cfg.text.vocab_size, cfg.image_token_index)
    size = cfg.vision.image_size
    samples = []
    for n_tokens, image in zip(lengths, has_image):
        head = [1] + [cfg.image_token_index] * (p if image else 0)
        text = rng.integers(3, vocab, max(int(n_tokens) - len(head), 2))
        prompt = len(head) + max(1, len(text) // 5)
        ids = np.concatenate([head, text]).astype(np.int32)
        labels = np.where(np.arange(len(ids)) < prompt, -100, ids).astype(np.int32)
        pixels = rng.normal(size=(int(image), 3, size, size)).astype(np.float32)
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})
    return samples


def make_batches(cfg: LlavaConfig, batch: int, seq: int, steps: int, seed: int = 0) -> dict[str, list[dict]]:
    """{"unpacked": [...], "packed": [...]}: `steps` batches of `batch` rows x `seq` tokens each."""
    p = cfg.image_seq_length
    max_images = max(1, seq // (p + max(4, seq // 20)))
    samples = synthetic_samples(cfg, 4 * batch * steps * (max_images + 2), seq, seed)
    unpacked = [collate(samples[i * batch:(i + 1) * batch], buckets=(seq,), pad_token_id=0, max_images=1,
                        image_size=cfg.vision.image_size) for i in range(steps)]
    rows = pack_window(samples, method="best_fit", length=seq, max_images=max_images, pad_token_id=0)
    rows.sort(key=lambda r: -int(r["attention_mask"].sum()))  # the fullest rows, as a packer's steady state
    packed = [{k: np.stack([r[k] for r in rows[i * batch:(i + 1) * batch]]) for k in rows[0]}
              for i in range(steps)]
    return {"unpacked": unpacked, "packed": packed}


@dataclasses.dataclass
class StepTiming:
    layout: str
    impl: str
    times_s: list[float]
    compile_s: float
    real_tokens: int
    computed_tokens: int
    flops: float
    memory_bytes: int | None = None
    loss: float | None = None

    @property
    def step_s(self) -> float:
        return statistics.median(self.times_s)

    def row(self, peak: float | None) -> dict:
        out = dataclasses.asdict(self)
        out.update(step_s=self.step_s, step_min_s=min(self.times_s), step_max_s=max(self.times_s),
                   tokens_per_s=self.real_tokens / self.step_s, token_efficiency=self.real_tokens /
                   self.computed_tokens, tflops_per_s=self.flops / self.step_s / 1e12)
        if peak:
            out["mfu"] = self.flops / self.step_s / peak
        return out


def build(cfg: LlavaConfig, compute_dtype, *, lora_rank: int, remat: str, attention_impl: str, compare: bool):
    """(our model, transformers model or None, trainable groups) with the same random weights: with `compare`
    transformers draws them and ours imports them (`convert.from_hf`). lora_rank 0: full fine-tuning."""
    runtime = dict(dtype=compute_dtype, param_dtype=jnp.float32, remat=remat, attention_impl=attention_impl)
    hf = None
    if compare:
        hf = _transformers_model(cfg, jnp.float32, 0, "cpu")
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            model = convert.from_hf(tmp, **runtime)
    else:
        model = LlavaForConditionalGeneration(with_runtime(cfg, **runtime), rngs=nnx.Rngs(0))
    if lora_rank:
        lora_lib.add_adapters(model, rank=lora_rank, alpha=2.0 * lora_rank, rngs=nnx.Rngs(1))
    groups = opt.resolve_groups(nnx.state(model, nnx.Param),
                                recipes.STAGE2_LORA_RULES if lora_rank else recipes.STAGE2_RULES)
    return model, hf, groups


def our_runner(model, groups, batch: dict, compute_dtype, loss_chunk: int):
    """(run() -> (seconds, loss), compile seconds, compiled memory bytes) of our train step on `batch`."""
    graphdef, trainable, frozen, rest = opt.split_model(model, groups)
    frozen = jax.tree.map(lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
    tx = opt.make_optimizer(groups, {g: opt.GroupSpec(1e-5) for g in set(groups.values()) if g}, total_steps=1000,
                            warmup_ratio=0.0)
    holder = {"state": step_lib.init_state(jax.tree.map(jnp.copy, trainable), tx)}  # donated: our own copy
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "attention_mask"}
    start = time.perf_counter()
    compiled = jax.jit(step_lib.make_train_step(graphdef, tx, compute_dtype=compute_dtype, loss_chunk=loss_chunk),
                       donate_argnums=(0,)).lower(holder["state"], frozen, rest, batch).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    memory = None if analysis is None else int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes)

    def run() -> tuple[float, float]:
        start = time.perf_counter()
        holder["state"], m = compiled(holder["state"], frozen, rest, batch)
        loss = float(jax.block_until_ready(m["loss"]))
        return time.perf_counter() - start, loss

    return run, compile_s, memory


def transformers_runner(hf, batch: dict, lora_rank: int):
    """run() -> (seconds, loss) of a transformers training step on `batch`: forward with labels, backward,
    gradient clipping, AdamW over the projector and the language model (LoRA adapters with peft)."""
    import torch

    for name, p in hf.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    if lora_rank:
        import peft

        targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                      target_modules=targets))
        for name, p in hf.named_parameters():
            p.requires_grad_("lora_" in name or "multi_modal_projector" in name)
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    inputs = {"input_ids": torch.from_numpy(batch["input_ids"]).long(),
              "attention_mask": torch.from_numpy(batch["attention_mask"]).long(),
              "labels": torch.from_numpy(batch["labels"]).long()}
    if batch["image_mask"].any():
        inputs["pixel_values"] = torch.from_numpy(batch["pixel_values"][batch["image_mask"]])

    def run() -> tuple[float, float]:
        start = time.perf_counter()
        loss = hf(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, float(loss.detach())

    return run


def interleaved(runners: dict[str, Callable[[], tuple[float, float]]], repeats: int) -> dict[str, list]:
    """Each runner once as a warm-up (its loss kept), then `repeats` rounds, one step of each per round."""
    results = {name: {"first_loss": run()[1], "times": []} for name, run in runners.items()}
    for _ in range(repeats):
        for name, run in runners.items():
            results[name]["times"].append(run()[0])
    return results


def batch_stats(batch: dict, flop_model, image_seq_length: int) -> tuple[int, int, float]:
    """(real tokens, computed tokens, model FLOPs) of a batch."""
    lengths = segment_lengths(batch["segment_ids"]) if "segment_ids" in batch else batch["attention_mask"].sum(1)
    images = int(batch["image_mask"].sum())
    return int(lengths.sum()), int(batch["attention_mask"].size), flop_model.step_flops(lengths, images,
                                                                                        image_seq_length)


def run_train(args) -> list[dict]:
    cfg = PRESETS[args.preset]
    compute_dtype = DTYPES[args.dtype]
    lora_rank = args.lora_rank if args.lora else 0
    model, hf, groups = build(cfg, compute_dtype, lora_rank=lora_rank, remat=args.remat,
                              attention_impl=args.attention, compare=args.compare_transformers)
    batches = {k: v[0] for k, v in make_batches(cfg, args.batch, args.seq, 1).items()}
    runners, info = {}, {}
    for layout, batch in batches.items():
        run, compile_s, memory = our_runner(model, groups, batch, compute_dtype, args.loss_chunk)
        runners[f"{layout}/llava_jax"], info[f"{layout}/llava_jax"] = run, (layout, compile_s, memory)
    if hf is not None:
        runners["unpacked/transformers"] = transformers_runner(hf, batches["unpacked"], lora_rank)
        info["unpacked/transformers"] = ("unpacked", 0.0, None)
    results = interleaved(runners, args.repeats)
    flop_model = metrics.FlopModel.for_groups(cfg, groups, lora_rank=lora_rank)
    peak = metrics.device_peak_flops(args.peak_tflops)
    rows = []
    for name, result in results.items():
        layout, compile_s, memory = info[name]
        real, computed, flops = batch_stats(batches[layout], flop_model, cfg.image_seq_length)
        timing = StepTiming(layout, name.split("/")[1], result["times"], compile_s, real, computed, flops, memory,
                            result["first_loss"])
        rows.append(timing.row(peak))
    report(args, rows, cfg)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def report(args, rows: list[dict], cfg: LlavaConfig) -> None:
    device = jax.devices()[0]
    kind = f"LoRA r{args.lora_rank}" if args.lora else "full"
    threads = f", {args.threads} threads on both sides" if args.threads else ""
    print(f"bench train: preset {args.preset}, {kind} stage 2, batch {args.batch} x seq {args.seq}, {args.dtype}, "
          f"remat {args.remat}, attention {args.attention}, {device.device_kind} ({device.platform}), "
          f"{args.repeats} interleaved rounds{threads}")
    print(f"{'layout':>9} {'impl':>12} {'step_ms':>9} {'min-max_ms':>15} {'tokens/s':>9} {'real/comp':>9} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'mem_MiB':>8} {'loss@1':>8}")
    for r in rows:
        mfu = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else "   n/a"
        mem = f"{r['memory_bytes'] / 2**20:8.0f}" if r["memory_bytes"] else "     n/a"
        spread = f"{r['step_min_s'] * 1e3:.1f}-{r['step_max_s'] * 1e3:.1f}"
        print(f"{r['layout']:>9} {r['impl']:>12} {r['step_s'] * 1e3:9.1f} {spread:>15} {r['tokens_per_s']:9.0f} "
              f"{r['token_efficiency']:9.3f} {r['tflops_per_s']:8.3f} {mfu} {mem} {r['loss']:8.4f}")
    by = {(r["layout"], r["impl"]): r for r in rows}
    if ("unpacked", "transformers") in by:
        ref = by[("unpacked", "transformers")]
        for layout in ("unpacked", "packed"):
            ratio, verdict = compare_rates(token_rates(by[(layout, "llava_jax")]), token_rates(ref))
            print(f"ratio llava_jax {layout} / transformers unpacked: {ratio:.2f}x median real tokens/s: {verdict}")
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"device peak memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")


def token_rates(row: dict) -> list[float]:
    """Real tokens/s of each timed round of a result row."""
    return [row["real_tokens"] / t for t in row["times_s"]]


def compare_rates(ours: Sequence[float], theirs: Sequence[float]) -> tuple[float, str]:
    """(ratio of the medians ours / theirs, verdict) of two samples of a rate (higher is faster). The verdict
    is undecided when the min-max ranges overlap: then the noise of the runs is as large as the gap."""
    ratio = statistics.median(ours) / statistics.median(theirs)
    ranges = f"llava_jax {min(ours):.0f}-{max(ours):.0f}, transformers {min(theirs):.0f}-{max(theirs):.0f}"
    if min(ours) <= max(theirs) and min(theirs) <= max(ours):
        return ratio, (f"too noisy to decide, the min-max ranges overlap ({ranges}); rerun with more --repeats "
                       "on a quieter machine")
    return ratio, f"llava_jax {'faster' if ratio > 1 else 'slower'} ({ranges}, no overlap)"


@contextlib.contextmanager
def pinned_threads(count: int | None):
    """Runs both sides on the same `count` cores: this process's CPU affinity (XLA sizes its CPU thread pools
    from it when its backend starts, and no thread runs outside it) and `torch.set_num_threads`. Restored
    afterwards. None: nothing pinned."""
    if not count:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(before)[:count])
    torch = _torch_or_none()
    torch_before = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
        if torch:
            torch.set_num_threads(torch_before)


def _torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def add_parser(commands) -> None:
    t = commands.add_parser("train", help="train-step time, real tokens/s, MFU, memory, packing efficiency")
    t.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    t.add_argument("--batch", type=int, default=4, help="rows per step")
    t.add_argument("--seq", type=int, default=256, help="tokens per row")
    t.add_argument("--lora", action="store_true", help="LoRA adapters instead of full fine-tuning")
    t.add_argument("--lora-rank", type=int, default=128, help="adapter rank (alpha = 2 x rank; default: the recipe's)")
    t.add_argument("--compare-transformers", action="store_true",
                   help="also time a transformers (PyTorch) training step on the same weights and batches")
    t.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    t.add_argument("--remat", default="none", help="remat policy (llava_jax.models.layers.REMAT_POLICIES)")
    t.add_argument("--attention", default="xla", help="attention kernel: xla, cudnn, splash")
    t.add_argument("--loss-chunk", type=int, default=512)
    t.add_argument("--repeats", type=int, default=5, help="interleaved rounds timed (min / median / max)")
    t.add_argument("--threads", type=int, help="cores for both sides (CPU affinity and torch threads; default with "
                   "--compare-transformers: all this process may use)")
    t.add_argument("--peak-tflops", type=float, default=-1.0, help="device peak (default: by device kind)")
    t.add_argument("--json", help="write the results here")


@cli.command()
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.bench", description=__doc__.split("\n")[0])
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    if args.batch <= 0 or args.seq <= 0 or args.repeats <= 0 or not 0 < (args.threads or 1) <= cores:
        raise cli.UsageError(f"--batch, --seq and --repeats must be positive, --threads within 1..{cores} (the "
                             "cores this process may use)")
    if args.threads is None and args.compare_transformers:
        args.threads = cores
    with pinned_threads(args.threads):
        run_train(args)
    return 0
