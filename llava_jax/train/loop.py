"""The training run: config -> sharded model -> grain batches -> jitted steps -> checkpoints -> export.

    run = setup(config, workdir)            # mesh, model, optimizer, data, restored checkpoint (setup.py)
    step, history = train_loop(run, hooks)  # the step loop, bookkeeping one step behind the device
    result = finish(run, step, history)     # result.json, export, demo evaluation

`Hook` is the seam for what a run adds to its loop (batch statistics, guards on the step metrics, planners):
each hook sees the host batch before its step, the host values of each finished step, and the step's end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import jax
import ml_collections as mlc
from flax import nnx

from llava_jax import atomic_files, convert
from llava_jax.data import packing
from llava_jax.train import checkpoint as ckpt_lib
from llava_jax.train import demo, distributed, lora, phases
from llava_jax.train import metrics as metrics_lib
from llava_jax.train import optimizer as opt
from llava_jax.train import step as step_lib
from llava_jax.train.inputs import common_length, to_global
from llava_jax.train.setup import Run, setup

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


class Hook:
    """Extension points of `train_loop`; override the ones you need (each is called on every process)."""

    def before_step(self, run: Run, step: int, batch: dict) -> None:
        """`batch`: this process's host arrays for step `step` (1-based), before they go to the device."""

    def on_metrics(self, run: Run, step: int, host: dict, counts: dict) -> None:
        """Host values of finished step `step` (loss, grad_norm, ...; runs one step behind the device) and its
        counts (tokens, computed, images, data_wait, flops)."""

    def after_step(self, run: Run, step: int) -> None:
        """After step `step`'s evaluation and checkpoint (before a preemption stop)."""


def run(c: mlc.ConfigDict, workdir: str | os.PathLike, *, config_name: str = "config",
        hooks: Sequence[Hook] = ()) -> dict:
    """Trains per `c` in `workdir` (resuming from its latest checkpoint).

    Writes `<workdir>/metrics.jsonl` (one line per step: loss, grad_norm, supervised_tokens, skipped; and
    {"step", "eval_loss"} lines every `eval_every` steps when `data.eval_json` is set),
    TensorBoard logs, checkpoints and `result.json`. Returns {"step", "history" (the logged lines),
    "bad_samples", "model" (the final model, when training completed)}.
    Raises ValueError("config.<field>: ...") on bad settings, MissingInputs, NonFiniteError, SaveFailed (a
    checkpoint could not be written: the run stops, its unfinished folder removed), WorkdirLocked.
    """
    r = setup(c, workdir, config_name=config_name)
    try:
        step, history = train_loop(r, hooks)
        result = finish(r, step, history)
    finally:
        r.lock.release()
    phases.outputs(r.c, r.workdir, completed=step >= r.steps)
    return result


def train_loop(r: Run, hooks: Sequence[Hook] = ()) -> tuple[int, list[dict]]:
    """Steps from `r.start` to `r.steps` (or a preemption); returns (last step, logged lines)."""
    books, clock = Bookkeeping(r, hooks), phases.StepClock(r.start)
    preemption = distributed.Preemption()
    pending, step = None, r.start
    try:
        with jax.set_mesh(r.mesh):
            while step < r.steps:
                t_wait = time.perf_counter()
                local = common_length(next(r.data.iterator), r.pad_token_id)
                data_wait = time.perf_counter() - t_wait
                for hook in hooks:
                    hook.before_step(r, step + 1, local)
                t_step = time.perf_counter()
                r.state, m = r.train_step(r.state, r.frozen, r.rest, to_global(local, r.mesh))
                clock.dispatched(local, time.perf_counter() - t_step)
                step += 1
                r.checkpointer.check_saves()  # a failed background save stops the run here
                books.flush(pending)  # the previous step, while this one runs
                pending = (step, m, books.counts(local, data_wait))
                if r.held_out is not None and (step % r.c.eval_every == 0 or step == r.steps):
                    pending = books.flush(pending)
                    books.evaluate(step)
                preempted = preemption.reached(step)
                if step % r.c.checkpoint_every == 0 or step == r.steps or preempted:
                    pending = books.flush(pending)
                    save_checkpoint(r, step)
                for hook in hooks:
                    hook.after_step(r, step)
                if preempted:
                    stop_preempted(r, step)
                    break
            books.flush(pending)
            clock.finished(step)
    finally:
        preemption.restore()
        books.close()
        r.checkpointer.close()
    return step, books.history


def save_checkpoint(r: Run, step: int) -> None:
    r.checkpointer.save(step, r.state, data_iterator=r.data.iterator,
                        meta={"step": step, "bad_samples": r.data.iterator.bad_sample_counts()})


def stop_preempted(r: Run, step: int) -> None:
    r.checkpointer.wait()
    if r.is_main:
        print(f"preempted: checkpoint saved at step {step}; rerun the same command to resume", flush=True)


class Bookkeeping:
    """Host-side records of finished steps: console / TensorBoard reports, metrics.jsonl, the non-finite
    monitor, the held-out loss, and the hooks' `on_metrics`."""

    def __init__(self, r: Run, hooks: Sequence[Hook]):
        self.r, self.hooks, self.history = r, hooks, []
        self.writer = None
        if r.is_main:
            from tensorboardX import SummaryWriter  # TensorFlow-free, but slow to import: process 0 only
            self.writer = SummaryWriter(str(r.workdir / "tensorboard"))
        self.reporter = metrics_lib.Reporter(
            total_steps=r.steps, start_step=r.start, every=r.c.log_every, writer=self.writer,
            peak_flops=metrics_lib.device_peak_flops(r.c.peak_tflops), num_devices=jax.device_count(),
            is_main=r.is_main)
        self.step_log = metrics_lib.StepLog(r.workdir / "metrics.jsonl", start_step=r.start, enabled=r.is_main)
        self.monitor = NonFiniteMonitor(int(r.state.nonfinite_streak), r.c.train.max_nonfinite, r.checkpointer)

    def counts(self, local: dict, data_wait: float) -> dict:
        """Global counts of a step from this process's rows: real and computed tokens, images, model FLOPs
        (attention per sample: packed rows count each segment apart)."""
        n = jax.process_count()
        lengths = packing.segment_lengths(local["segment_ids"]) if "segment_ids" in local \
            else local["attention_mask"].sum(axis=1)
        images = int(local["image_mask"].sum()) * n
        flops = self.r.flop_model.step_flops(lengths, images // n, self.r.data.image_seq_length) * n
        return dict(tokens=int(lengths.sum()) * n, computed=int(local["attention_mask"].size) * n, images=images,
                    data_wait=data_wait, flops=flops)

    def flush(self, pending) -> None:
        """Records a pending (step, device metrics, counts), if any; returns None (nothing pending)."""
        if pending is not None:
            self.record(*pending)
        return None

    def record(self, step: int, device_metrics, counts: dict) -> None:
        host = jax.device_get(device_metrics)
        self.reporter.add(**counts)
        values = {"loss": float(host["loss"]), "grad_norm": float(host["grad_norm"])}
        spike = {"spike_skipped": bool(host["spike_skipped"])} if "spike_skipped" in host else {}
        self.step_log.write({"step": step, **values, "supervised_tokens": int(host["supervised_tokens"]),
                             "token_efficiency": counts["tokens"] / max(counts["computed"], 1),
                             "skipped": not bool(host["finite"]), **spike})
        if spike.get("spike_skipped"):
            logger.warning("step %d: loss, gradient or update spike (train.spike_guard), update skipped", step)
        if self.reporter.due(step) or step == self.r.steps:
            self.history.append({"step": step, **self.reporter.emit(step, {**values, **self.learning_rates(step)})})
        for hook in self.hooks:
            hook.on_metrics(self.r, step, host, counts)
        self.monitor.check(step, bool(host["finite"]))

    def learning_rates(self, step: int) -> dict[str, float]:
        r = self.r
        lrs = opt.learning_rates({g: r.specs[g] for g in set(r.groups.values()) if g}, step - 1,
                                 total_steps=r.steps, warmup_ratio=r.c.optim.warmup_ratio)
        return {f"lr/{g}": v for g, v in sorted(lrs.items())}

    def evaluate(self, step: int) -> None:
        loss = self.r.held_out.loss(self.r.state.trainable, self.r.frozen, self.r.rest, self.r.mesh)
        self.step_log.write({"step": step, "eval_loss": loss})
        self.history.append({"step": step, **self.reporter.emit_eval(step, {"loss": loss})})

    def close(self) -> None:
        self.reporter.close()
        self.step_log.close()
        if self.writer is not None:
            self.writer.close()


def finish(r: Run, step: int, history: list[dict]) -> dict:
    """Writes result.json; when training completed: the final model, its export and the demo evaluation."""
    result = {"step": step, "history": history, "bad_samples": r.data.iterator.bad_sample_counts(),
              "nonfinite_steps": int(r.state.nonfinite_total), **step_lib.spike_counts(r.state.opt_state)}
    if r.is_main:
        write_result(r.workdir, result)
    if step < r.steps:
        return result
    final = nnx.merge(r.graphdef, r.state.trainable, r.frozen, r.rest)
    result["model"] = final = lora.merged(final) if r.c.lora.enabled else final
    if r.c.export_hf:
        export(r, final)
    if phases.demo_evaluates(r.c):
        start = time.perf_counter()
        result["demo_eval"] = demo.evaluate(final, r.tokenizer, r.data.demo_paths, r.c, r.workdir)
        phases.say(f"evaluate: {r.c.demo.num_eval} held-out questions, with images and with blank images, in "
                   f"{phases.seconds(time.perf_counter() - start)}")
        if r.is_main:
            write_result(r.workdir, result)
    return result


def export(r: Run, final: nnx.Module) -> None:
    start = time.perf_counter()
    gathered = distributed.gather_to_host(final)  # every process takes part; process 0 writes
    if r.is_main:
        convert.to_hf(gathered, r.c.export_hf, tokenizer=r.tokenizer)
        print(f"export: Hugging Face LLaVA in {phases.seconds(time.perf_counter() - start)} -> {r.c.export_hf}",
              flush=True)


def write_result(workdir: Path, result: dict) -> None:
    summary = {k: v for k, v in result.items() if k not in ("history", "model")}
    atomic_files.write_text(workdir / "result.json", json.dumps(summary, indent=2, default=str))


class NonFiniteMonitor:
    """Counts consecutive steps whose update was skipped (non-finite loss or gradients) and stops the run
    after `limit` in a row."""

    def __init__(self, streak: int, limit: int, checkpointer: ckpt_lib.Checkpointer):
        self.streak, self.limit, self.checkpointer = streak, limit, checkpointer

    def check(self, step: int, finite: bool) -> None:
        self.streak = 0 if finite else self.streak + 1
        if finite:
            return
        logger.warning("step %d: non-finite loss or gradients, update skipped (%d in a row)", step, self.streak)
        if self.streak >= self.limit:
            raise NonFiniteError(
                f"step {step}: {self.streak} non-finite steps in a row (train.max_nonfinite={self.limit}); "
                f"stopping. Skipped steps leave the parameters unchanged; last checkpoint: "
                f"{self._last_checkpoint()}. Lower optim.lr, check the data, or compute in float32 "
                f"(--config.model.dtype=float32)")

    def _last_checkpoint(self) -> str:
        step = self.checkpointer.latest_step()
        return "none" if step is None else f"step {step} ({self.checkpointer.directory / str(step)})"
