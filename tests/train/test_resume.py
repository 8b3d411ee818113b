"""Resume: a run killed with SIGKILL after a checkpoint, resumed, stopped by SIGTERM (saves, exits cleanly),
and resumed again gives bitwise the losses of an uninterrupted run (CPU)."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from tests.train.test_loop import demo_data, jax_cache, run_cli, start_cli, step_records  # noqa: F401

STEPS = 24
RUN = {"train.num_steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 30}


def finished_checkpoints(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def wait_until(condition, process, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the run ended (rc {process.returncode}) before {what}:\n{out}\n{err[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_kill_and_sigterm_resume_match_an_uninterrupted_run(tmp_path, demo_data, jax_cache):
    reference = tmp_path / "reference"
    run_cli(1, reference, RUN, demo_data=demo_data, jax_cache=jax_cache)
    expected = step_records(reference)
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))

    # 1. SIGKILL once step 3 is done: after the step-2 checkpoint was started (its asynchronous write may
    # be complete or not; an incomplete one must be ignored).
    workdir = tmp_path / "interrupted"
    process = start_cli(1, workdir, RUN, demo_data=demo_data, jax_cache=jax_cache)
    wait_until(lambda: (workdir / "metrics.jsonl").is_file() and
               max([0] + [r["step"] for r in step_records(workdir)]) >= 3, process, "step 3")
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed_at = (finished_checkpoints(workdir) or [0])[-1]
    assert killed_at < STEPS

    # 2. Resume; SIGTERM once it has gone one step past the checkpoint: it saves after the current step.
    last_step = lambda: max([0] + [r["step"] for r in step_records(workdir)])
    logged_past_checkpoint = last_step() > killed_at
    process = start_cli(1, workdir, RUN, demo_data=demo_data, jax_cache=jax_cache)
    if logged_past_checkpoint:  # The resumed run drops the lines of steps after its checkpoint first.
        wait_until(lambda: last_step() <= killed_at, process, "the resumed run drops them")
    wait_until(lambda: last_step() > killed_at, process, "a step after resume")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-4000:]
    assert (f"resumed from {workdir}/checkpoints step {killed_at}" in out) == (killed_at > 0)
    preempted = re.search(r"preempted: checkpoint saved at step (\d+)", out)
    assert preempted, out
    stopped_at = int(preempted.group(1))
    assert killed_at < stopped_at < STEPS, "the SIGTERM came too late to test preemption"
    assert finished_checkpoints(workdir)[-1] == stopped_at
    assert step_records(workdir)[-1]["step"] == stopped_at

    # 3. Resume to the end: continues at the next step.
    done = run_cli(1, workdir, RUN, demo_data=demo_data, jax_cache=jax_cache)
    assert f"resumed from {workdir}/checkpoints step {stopped_at}" in done.stdout
    assert re.search(rf"^step {stopped_at + 1}: ", done.stdout, re.M)
    assert not re.search(rf"^step {stopped_at}: ", done.stdout, re.M)

    resumed = step_records(workdir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in expected]
