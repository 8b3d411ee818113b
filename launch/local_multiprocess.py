"""Starts N training processes on this machine, joined by jax.distributed on 127.0.0.1 (multi-host on one box).

    python launch/local_multiprocess.py --num_processes=2 --cpu_devices=2 -- \
        --config=configs/stage2.py:demo --workdir=/tmp/llava_2proc

Everything after `--` goes to `python -m llava_jax.train`; each process also gets
--config.distributed.coordinator=127.0.0.1:PORT, .num_processes and .process_id. With --cpu_devices=K every
process runs on K CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=K, JAX_PLATFORMS=cpu), which
is how the multi-host path is tested without accelerators; with --gpus_per_process=K process i sees GPUs
[i*K, (i+1)*K). Output lines are prefixed with [p<i>]. If one process fails the others are stopped; the exit
status is the first non-zero one (0 when all succeed). SIGTERM / Ctrl-C are forwarded to every process (they
save a checkpoint at a common step and exit).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, args) -> dict:
    env = dict(os.environ)
    if args.cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.cpu_devices}"])
    if args.gpus_per_process:
        k = args.gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(index * k, (index + 1) * k))
    return env


def stream(process: subprocess.Popen, prefix: str) -> None:
    for line in process.stdout:
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--cpu_devices", type=int, default=0, help="CPU devices per process (0: real devices)")
    parser.add_argument("--gpus_per_process", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the llava_jax.train flags")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    port = args.port or free_port()
    processes = []
    for i in range(args.num_processes):
        command = [sys.executable, "-m", "llava_jax.train", *train_args,
                   f"--config.distributed.coordinator=127.0.0.1:{port}",
                   f"--config.distributed.num_processes={args.num_processes}",
                   f"--config.distributed.process_id={i}"]
        processes.append(subprocess.Popen(command, env=process_env(i, args), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, bufsize=1))
    threads = [threading.Thread(target=stream, args=(p, f"[p{i}] "), daemon=True) for i, p in enumerate(processes)]
    for t in threads:
        t.start()

    def forward(signum, frame):
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while any(p.poll() is None for p in processes):
        failed = [p.returncode for p in processes if p.returncode not in (None, 0)]
        if failed and not status:
            status = failed[0]
            for p in processes:  # The others would wait for the failed one forever.
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    for t in threads:
        t.join()
    return status or next((p.returncode for p in processes if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
