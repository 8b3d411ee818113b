"""`python -m llava_jax.plan --config=configs/stage2.py[:variant] --topology=v5p-64 [--mesh.fsdp=N]`
(or `--devices=cpu:8`, or a GPU host such as `--topology=h100x8`): compiles the train step ahead of time
from abstract shapes and prints memory, FLOPs, collectives and a roofline step time per device (see
llava_jax.train.plan). Exit status 2 on an invalid config, topology or mesh."""

import os
import re
import sys
import tempfile


def _prepare_environment(argv) -> None:
    """Before JAX starts: fake CPU devices for --devices=cpu:N and GPU hosts, the partitioner's HLO dumped
    for the collective table, libtpu's AOT path without a TPU."""
    wanted = 0
    for arg in argv:
        match = re.fullmatch(r"--(?:devices=cpu:|topology=(?:a100|h100|h200)x)(\d+)", arg.lower())
        if match:
            wanted = int(match.group(1))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dump = tempfile.mkdtemp(prefix="llava_plan_hlo_")
    os.environ["LLAVA_PLAN_DUMP"] = dump
    dump_flags = f"--xla_dump_to={dump} --xla_dump_hlo_pass_re=spmd-partitioning --xla_dump_hlo_module_re=jit_step"
    devices = f"--xla_force_host_platform_device_count={wanted}" if wanted else ""
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), devices, dump_flags])


if __name__ == "__main__":
    _prepare_environment(sys.argv[1:])
    from llava_jax.train.plan import main

    main()
