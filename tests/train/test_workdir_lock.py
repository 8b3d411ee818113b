"""One job per workdir: a second job is refused with one line naming the lock file, host and pid; a lock left
by a killed run on this host is taken over; one left from another host says which file to delete."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from llava_jax.train.workdir_lock import LOCK_FILE, WorkdirLocked, acquire
from tests.train.test_checkpoint_heal import RUN
from tests.train.test_loop import REPO, cli_env, demo_data, jax_cache, run_cli, start_cli, step_records  # noqa: F401

HOLD = "import sys, time; from llava_jax.train import workdir_lock; workdir_lock.acquire(sys.argv[1]); " \
       "print('locked', flush=True); time.sleep(600)"


def test_a_held_workdir_is_refused_and_free_again_after_release(tmp_path):
    lock = acquire(tmp_path)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(WorkdirLocked) as refused:
        acquire(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path / LOCK_FILE) in message
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    acquire(tmp_path).release()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLocked, match=f"pid {holder.pid} on host"):
            acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING):
        lock = acquire(tmp_path)
    assert any(f"took over the stale lock of pid {holder.pid}" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_left_from_another_host_says_which_file_to_delete(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "another-host", "pid": 4242, "started": "yesterday"}))
    with pytest.raises(WorkdirLocked) as refused:
        acquire(tmp_path)
    message = str(refused.value)
    assert "pid 4242 on host another-host" in message and f"delete {tmp_path / LOCK_FILE}" in message
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == 4242  # left as it was


def test_cli_second_job_on_a_workdir_is_refused(tmp_path, demo_data, jax_cache):
    """Two trainings on one workdir at once: the second stops with one line (exit 2) naming the lock file and
    the first's host and pid; the first trains its steps once and releases the lock. The first runs long enough
    to still hold the lock while the second starts on a loaded machine."""
    workdir = tmp_path / "run"
    first = start_cli(1, workdir, {**RUN, "train.num_steps": 12}, demo_data=demo_data, jax_cache=jax_cache)
    try:
        deadline = time.monotonic() + 120
        while not (workdir / LOCK_FILE).is_file() or not (workdir / LOCK_FILE).read_text():
            assert first.poll() is None and time.monotonic() < deadline, "the first job never took the lock"
            time.sleep(0.2)
        second = run_cli(1, workdir, {**RUN, "train.num_steps": 4}, demo_data=demo_data, jax_cache=jax_cache,
                         check=False)
        out, err = first.communicate(timeout=400)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert "Traceback" not in second.stderr, second.stderr[-3000:]
    assert last.startswith(f"error: workdir {workdir} is in use by another training job")
    assert str(workdir / LOCK_FILE) in last and f"pid {first.pid} on host {socket.gethostname()}" in last
    assert first.returncode == 0, err[-3000:]
    assert [r["step"] for r in step_records(workdir) if "loss" in r] == list(range(1, 13))
    assert not (workdir / LOCK_FILE).exists()
