"""One line per phase of a run, with the time it took, and where the outputs are at the end:

    data: 8400 samples (4000 stage-1, 4000 stage-2, 400 held-out questions) in 3.1 s -> /tmp/llava_demo/data
    compile: the train step in 41.2 s
    train: 625 steps in 5 min 12 s (0.50 s a step; 2 more batch shapes compiled in 30.0 s)
    evaluate: 400 held-out questions, with images and with blank images, in 35.0 s
    export: Hugging Face LLaVA in 2.1 s -> /tmp/llava_demo/hf
    outputs: ...

Only process 0 prints.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import ml_collections as mlc

from llava_jax.data import synthetic
from llava_jax.train import inputs


def seconds(value: float) -> str:
    """3.1 s, 41 s, 5 min 12 s."""
    if value < 10:
        return f"{value:.1f} s"
    if value < 60:
        return f"{value:.0f} s"
    minutes, rest = divmod(round(value), 60)
    return f"{minutes} min {rest:02d} s"


def say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)


def prepare_demo_data(c: mlc.ConfigDict, workdir: Path) -> synthetic.SyntheticPaths:
    """`inputs.prepare_demo_data`, with its phase line."""
    fresh, start = not synthetic.is_complete(workdir / "data"), time.perf_counter()
    paths = inputs.prepare_demo_data(c, workdir)
    d = c.demo
    if fresh:
        media = "".join(f", {n} {what}" for n, what in ((d.num_multi_image, "multi-image"), (d.num_video, "video"))
                        if n)
        total = d.num_stage1 + d.num_stage2 + d.num_multi_image + d.num_video + d.num_eval
        say(f"data: {total} samples ({d.num_stage1} stage-1, {d.num_stage2} stage-2{media}, {d.num_eval} held-out "
            f"questions) in {seconds(time.perf_counter() - start)} -> {workdir / 'data'}")
    else:
        say(f"data: {workdir / 'data'} (generated before)")
    return paths


class StepClock:
    """Times the train loop: a step whose batch shape is new compiles while it is dispatched (the first one
    is the `compile` line), the rest is `train`."""

    def __init__(self, start_step: int):
        self.start_step, self.began = start_step, time.perf_counter()
        self.shapes: set[tuple] = set()
        self.compiles: list[float] = []

    def dispatched(self, batch: dict, took: float) -> None:
        """After the jitted step returned for `batch` (host arrays), `took` seconds after it was called."""
        shape = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if shape in self.shapes:
            return
        self.shapes.add(shape)
        self.compiles.append(took)
        if len(self.compiles) == 1:
            say(f"compile: the train step in {seconds(took)}")

    def finished(self, step: int) -> None:
        steps, total = step - self.start_step, time.perf_counter() - self.began
        if steps <= 0:
            return
        running = total - (self.compiles[0] if self.compiles else 0.0)
        per_step = (total - sum(self.compiles)) / steps
        more = (f"; {len(self.compiles) - 1} more batch shape(s) compiled in {seconds(sum(self.compiles[1:]))}"
                if len(self.compiles) > 1 else "")
        say(f"train: {steps} steps in {seconds(running)} ({per_step:.2f} s a step{more})")


def demo_evaluates(c: mlc.ConfigDict) -> bool:
    """Whether a finished run ends with the demo's held-out accuracy (`train.demo`: LLaVA-1.5 and AnyRes demos)."""
    return c.model.preset == "demo" and c.demo.evaluate


def outputs(c: mlc.ConfigDict, workdir: Path, completed: bool) -> None:
    """The last lines: where the run's outputs are."""
    lines = [f"  result: {workdir / 'result.json'}", f"  checkpoints: {workdir / 'checkpoints'}",
             f"  metrics: {workdir / 'metrics.jsonl'} (TensorBoard: {workdir / 'tensorboard'})"]
    if completed and demo_evaluates(c):
        lines.insert(1, f"  answers: {workdir / 'eval_answers_images.jsonl'}, {workdir / 'eval_answers_blank.jsonl'}"
                        f" (scores: {workdir / 'demo_eval.json'})")
    if completed and c.export_hf:
        lines.append(f"  Hugging Face export: {c.export_hf}")
    say("outputs:\n" + "\n".join(lines))
