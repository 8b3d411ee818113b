"""Multi-host: two processes with two CPU devices each (jax.distributed on 127.0.0.1, gloo collectives, started
by launch/local_multiprocess.py) train like one process with four devices, and their checkpoint resumes in one
process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np

from tests.train.test_loop import REPO, DEMO_OVERRIDES, cli_command, cli_env, demo_data, jax_cache  # noqa: F401
from tests.train.test_loop import link_data, run_cli, step_records

# Stage 2 (every group trained, modality-grouped batches) with the demo's three length buckets, so that the
# two processes' rows can pick different buckets.
RUN = {"train.num_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 5,
       "data.length_buckets": "(96, 128, 160)"}
# The global reductions (loss, gradients) add in another order across processes: float32 rounding only.
RTOL = 2e-5


def assert_close(records, expected, steps):
    got = {r["step"]: r for r in records}
    want = {r["step"]: r for r in expected}
    for step in steps:
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=RTOL, err_msg=f"step {step} {key}")
        assert got[step]["supervised_tokens"] == want[step]["supervised_tokens"]


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path, demo_data, jax_cache):
    single = tmp_path / "one_process"
    run_cli(2, single, RUN, demo_data=demo_data, jax_cache=jax_cache, devices=4)
    expected = step_records(single)
    assert [r["step"] for r in expected] == [1, 2, 3, 4]

    multi = tmp_path / "two_processes"
    link_data(multi, demo_data)
    command = [sys.executable, str(REPO / "launch" / "local_multiprocess.py"), "--num_processes=2",
               "--cpu_devices=2", "--"] + cli_command(2, multi, RUN)[3:]
    done = subprocess.run(command, cwd=REPO, env=cli_env(jax_cache), capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert "[p0] step 4: loss" in done.stdout
    assert "[p1] step" not in done.stdout  # Only process 0 reports.
    assert_close(step_records(multi), expected, steps=[1, 2, 3, 4])

    # Each process read its half of every global batch (the data position counts this process's rows).
    data = multi / "checkpoints" / "4" / "data"
    positions = [json.loads((data / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    batch = DEMO_OVERRIDES["train.global_batch_size"]
    assert [p["pipeline"]["next_index"] for p in positions] == [4 * batch // 2] * 2
    assert [p["batches"] for p in positions] == [4, 4]

    # The two processes' step-2 checkpoint resumes in one process with four devices.
    resumed = tmp_path / "resumed_in_one"
    shutil.copytree(multi, resumed, symlinks=True)
    shutil.rmtree(resumed / "checkpoints" / "4")
    done = run_cli(2, resumed, RUN, demo_data=None, jax_cache=jax_cache, devices=4)
    assert f"resumed from {resumed}/checkpoints step 2" in done.stdout
    assert [r["step"] for r in step_records(resumed)] == [1, 2, 3, 4]
    assert_close(step_records(resumed), step_records(multi), steps=[3, 4])
    assert_close(step_records(resumed), expected, steps=[3, 4])
