"""Model FLOPs, MFU and what the user sees every N steps (terminal lines or a progress bar, TensorBoard).

How FLOPs are counted (per step, from the batch's real tokens; padding is not counted): what the step
computes, 2 FLOPs per multiply-add, rematerialization not counted:
- language model, per real token (supervised or not, image tokens included): 2 * N_matmul forward (decoder
  layers and lm_head), attention 4 * L * T_ctx * width (causal: half), then the backward: a trained weight
  adds 4 * N (activation and weight gradients), a frozen one on the gradient path (LoRA base weights,
  stage 1) 2 * N (activation gradient only), attention 2x its forward; LoRA adapters 6 * their parameters;
- projector, per image token: 6 * N_projector, except 4 * N for its first Linear (no input gradient: the
  frozen tower's output is cut);
- vision tower, per image: the forward of the layers that run (up to the feature layer: 23 of 24 for
  LLaVA-1.5's layer -2) and the patch embedding; x3 when the tower trains.
AnyRes models (LLaVA-NeXT, OneVision) count per tile instead of per image: every tile (a real slot of
image_mask) runs through the tower and its `tile_tokens` features through the projector
(`features_per_tile`); their image tokens (taps of those features and the newline) are decoder tokens like
any other, and the taps themselves (<= 4 multiply-adds per token and width) are not counted.
MFU = model FLOPs per second / (number of devices * peak bf16 FLOP/s of one device).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import numpy as np
from etils import epath

from llava_jax.models.projector import num_linears

# Dense bf16 peaks (FLOP/s) by device kind.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v4": 275e12, "v5 lite": 197e12, "v5e": 197e12,
              "v5p": 459e12, "v6": 918e12}


def device_peak_flops(override_tflops: float = -1.0) -> float | None:
    """Peak FLOP/s of one device, or None where unknown (CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind.lower()
    for key, peak in PEAK_FLOPS.items():
        if key in kind:
            return peak
    return None


def features_per_tile(cfg) -> int:
    """Feature vectors one image (LLaVA: image_seq_length) or one AnyRes tile (tile_tokens) gives the projector."""
    tile_tokens = getattr(cfg, "tile_tokens", None)
    return int(tile_tokens if tile_tokens is not None else cfg.image_seq_length)


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Per-token / per-image FLOP coefficients of a LLaVA config and what the step differentiates (see the
    module docstring). Matmul FLOPs: 2 per multiply-add."""
    llm_layer_params: int       # matmul parameters of one decoder layer (attention + MLP)
    llm_layers: int
    llm_width: int              # num_heads * head_dim
    lm_head_params: int
    lora_layer_params: int      # adapter parameters of one decoder layer (0 without LoRA)
    projector_in_params: int    # the projector's first Linear
    projector_rest_params: int  # its later Linears
    vision_layer_params: int
    vision_layers: int          # encoder layers that run (up to the deepest feature layer)
    vision_tokens: int
    vision_width: int
    vision_patch_params: int
    llm: str = "trained"        # "trained", "lora" (base frozen, adapters trained) or "frozen"
    vision_trained: bool = False

    @classmethod
    def of(cls, cfg, llm: str = "trained", vision_trained: bool = False, lora_rank: int = 0) -> "FlopModel":
        t, v = cfg.text, cfg.vision
        q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
        d, f = t.hidden_size, t.intermediate_size
        attn = d * (2 * q + 2 * kv)
        lora = lora_rank * ((d + q) + 2 * (d + kv) + (q + d) + 3 * (d + f)) if llm == "lora" else 0
        proj_in = v.hidden_size * len(cfg.feature_layers)
        rest = max(num_linears(cfg.projector) - 1, 0) * d * d
        from llava_jax.models.clip_vit import resolve_layer
        run = max(resolve_layer(i, v.num_hidden_layers) for i in cfg.feature_layers)
        return cls(attn + 3 * d * f, t.num_hidden_layers, q, d * t.vocab_size, lora,
                   proj_in * d if num_linears(cfg.projector) else 0, rest,
                   4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size, run, v.num_positions,
                   v.hidden_size, v.num_channels * v.patch_size ** 2 * v.hidden_size, llm, vision_trained)

    @classmethod
    def for_groups(cls, cfg, groups: dict, lora_rank: int = 0) -> "FlopModel":
        """From the resolved trainable groups ({parameter path: group or None})."""
        trained = lambda prefix, lora=None: any(
            g is not None for path, g in groups.items() if path.startswith(prefix)
            and (lora is None or ("/lora_" in path) == lora))
        llm = "trained" if trained("language_model/", lora=False) else \
            "lora" if trained("language_model/", lora=True) else "frozen"
        return cls.of(cfg, llm, trained("vision_tower/"), lora_rank)

    def step_flops(self, lengths: np.ndarray, num_images: int, image_seq_length: int,
                   causal: bool = True) -> float:
        """lengths: real tokens of each row of the global batch; num_images: images (AnyRes: tiles) through
        the tower; image_seq_length: features each gives the projector (`features_per_tile`). causal: count
        half of the attention scores (what a causal kernel computes); False counts the full square (XLA's dense
        attention)."""
        tokens = float(np.sum(lengths))
        squares = float(np.sum(lengths.astype(np.float64) ** 2)) * (0.5 if causal else 1.0)
        attention = 4.0 * self.llm_layers * self.llm_width * squares
        layers = 2.0 * self.llm_layers * self.llm_layer_params * tokens
        head = 2.0 * self.lm_head_params * tokens
        lora = 2.0 * self.llm_layers * self.lora_layer_params * tokens
        # Backward: x2 for a trained weight (activation + weight gradients), x1 for a frozen one on the
        # gradient path (activation gradient only), attention x2 (its backward always runs).
        weight_pass = 3.0 if self.llm == "trained" else 2.0
        llm = weight_pass * (layers + head) + 3.0 * attention + 3.0 * lora
        image_tokens = float(num_images * image_seq_length)
        # The first projector Linear needs no input gradient (the frozen tower's output is cut).
        first = 3.0 if self.vision_trained else 2.0
        projector = image_tokens * (2.0 * first * self.projector_in_params + 6.0 * self.projector_rest_params)
        vision = num_images * self.vision_forward_flops() * (3.0 if self.vision_trained else 1.0)
        return llm + projector + vision

    def vision_forward_flops(self) -> float:
        """One image through the patch embedding and the encoder layers that run."""
        n, w = self.vision_tokens, self.vision_width
        per_layer = 2.0 * self.vision_layer_params * n + 4.0 * n * n * w
        return self.vision_layers * per_layer + 2.0 * self.vision_patch_params * (n - 1)


class Reporter:
    """Accumulates step timings and prints a line every `every` steps; a progress bar on a terminal."""

    def __init__(self, *, total_steps: int, start_step: int, every: int, writer=None, peak_flops=None,
                 num_devices: int = 1, is_main: bool = True):
        self.every, self.writer, self.is_main = every, writer, is_main
        self.peak = None if peak_flops is None else peak_flops * num_devices
        self.bar = None
        if is_main and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._reset()

    def _reset(self):
        self.t0 = time.perf_counter()
        self.steps = self.tokens = self.computed = self.images = 0
        self.flops = self.data_wait = 0.0

    def add(self, *, tokens: int, images: int, flops: float, data_wait: float, computed: int = 0) -> None:
        """tokens: real tokens; computed: token positions the step computes (padding included)."""
        self.steps += 1
        self.tokens += tokens
        self.computed += computed
        self.images += images
        self.flops += flops
        self.data_wait += data_wait
        if self.bar is not None:
            self.bar.update(1)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def emit(self, step: int, values: dict) -> dict:
        """values: loss, grad_norm, lr, ... (host floats). Returns everything logged."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        out = dict(values)
        out.update(step_time=elapsed / max(self.steps, 1), tokens_per_s=self.tokens / elapsed,
                   images_per_s=self.images / elapsed, data_wait=self.data_wait / max(self.steps, 1))
        if self.computed:
            out["token_efficiency"] = self.tokens / self.computed   # real / computed tokens
        if self.peak:
            out["mfu"] = self.flops / elapsed / self.peak
        self._reset()
        if not self.is_main:
            return out
        line = f"step {step}: " + ", ".join(_fmt(k, v) for k, v in out.items())
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{out.get('loss', float('nan')):.4f}")
            self.bar.write(line)
        else:
            print(line, flush=True)
        if self.writer is not None:
            for k, v in out.items():
                if np.isfinite(v):  # Non-finite steps are in metrics.jsonl and the warnings.
                    self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
        return out

    def emit_eval(self, step: int, values: dict) -> dict:
        """Held-out metrics (e.g. loss): a line, TensorBoard `eval/*`. Returns {"eval_<name>": value}."""
        out = {f"eval_{k}": v for k, v in values.items()}
        if self.is_main:
            line = f"step {step}: " + ", ".join(_fmt(k, v) for k, v in out.items())
            self.bar.write(line) if self.bar is not None else print(line, flush=True)
            if self.writer is not None:
                for k, v in values.items():
                    self.writer.add_scalar(f"eval/{k}", v, step)
                self.writer.flush()
        return out

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _fmt(key: str, value: float) -> str:
    if key in ("lr",) or key.startswith("lr/"):
        return f"{key} {value:.3g}"
    if key == "mfu":
        return f"mfu {100 * value:.1f}%"
    if key in ("step_time", "data_wait"):
        return f"{key} {value * 1e3:.0f}ms"
    if key in ("tokens_per_s", "images_per_s"):
        return f"{key} {value:,.0f}"
    return f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"


class StepLog:
    """`<workdir>/metrics.jsonl`: one JSON line per training step ({"step", "loss", ...}).

    On resume from `start_step` the lines of later steps (written before an interruption, then recomputed)
    are dropped first, so the file always holds each step once.
    """

    def __init__(self, path, *, start_step: int = 0, enabled: bool = True):
        self.path = epath.Path(path)
        self.file = None
        if not enabled:
            return
        kept = [line for line in read_step_log(self.path) if line["step"] <= start_step] \
            if self.path.exists() else []
        self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        self.file = self.path.open("a")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_step_log(path) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line, from a killed run, is ignored)."""
    records = []
    for line in epath.Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
