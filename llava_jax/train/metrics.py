"""Model FLOPs, MFU and what the user sees every N steps (terminal lines or a progress bar, TensorBoard).

How FLOPs are counted (per step, from the batch's real tokens; padding is not counted):
- language model, per real token (supervised or not, image tokens included): 2 * N_matmul forward,
  plus attention 2 * 2 * L * T_ctx * D (T_ctx = the sequence's real length, causal: half), and the
  backward pass: 2x the forward when the LLM is trained, 1x when it is frozen (activation gradients only,
  still needed to reach the projector);
- projector, per image token: 6 * N_projector (trained in both stages);
- vision tower, per image: the forward only (2 * N_matmul * P + attention), as it is frozen and never
  differentiated.
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


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Per-token / per-image FLOP coefficients of a LLaVA config (see the module docstring)."""
    llm_matmul_params: int
    llm_layers: int
    llm_width: int          # num_heads * head_dim
    projector_params: int
    vision_flops_per_image: float
    llm_trained: bool
    vision_trained: bool = False

    @classmethod
    def of(cls, cfg, llm_trained: bool, vision_trained: bool = False) -> "FlopModel":
        t, v = cfg.text, cfg.vision
        attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
        mlp = 3 * t.hidden_size * t.intermediate_size
        llm = t.num_hidden_layers * (attn + mlp) + t.hidden_size * t.vocab_size
        patches = (v.image_size // v.patch_size) ** 2 + 1
        v_layer = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size
        vision = (2 * v.num_hidden_layers * v_layer * patches + 4 * v.num_hidden_layers * patches ** 2 * v.hidden_size
                  + 2 * v.num_channels * v.patch_size ** 2 * v.hidden_size * patches)
        proj_in = v.hidden_size * len(cfg.feature_layers)
        projector = proj_in * t.hidden_size + (t.hidden_size ** 2 if cfg.projector != "linear" else 0)
        return cls(llm, t.num_hidden_layers, t.num_attention_heads * t.head_dim, projector, float(vision),
                   llm_trained, vision_trained)

    def step_flops(self, lengths: np.ndarray, num_images: int, image_seq_length: int) -> float:
        """lengths: real tokens of each row of the global batch."""
        tokens = float(np.sum(lengths))
        attention = 2.0 * self.llm_layers * self.llm_width * float(np.sum(lengths.astype(np.float64) ** 2))
        forward = 2.0 * self.llm_matmul_params * tokens + attention
        llm = forward * (3.0 if self.llm_trained else 2.0)
        return llm + 6.0 * self.projector_params * num_images * image_seq_length + \
            self.vision_flops_per_image * num_images * (3.0 if self.vision_trained else 1.0)


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
