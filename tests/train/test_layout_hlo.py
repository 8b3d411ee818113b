"""The sharded stage-2 step's layout, read from the SPMD partitioner's output (8 fake CPU devices; a TPU
v5p:2x2x2 through libtpu's ahead-of-time compiler when libtpu is installed).

Tiny model, recipe layout: tower frozen, projector and LLM trained, bf16 compute, full remat, scanned
layers, 2 microbatches of 24 rows x 80 tokens (global batch 48). Meshes: FSDP (fsdp=8), tensor parallel
with data parallelism (data=2 x tensor=4), and a mix (fsdp=2 x tensor=4).

What XLA does after partitioning is not asserted here: XLA:CPU widens bf16 collectives to float32 (it has
no bf16 collectives) and forms no reduce-scatter (the ReduceScatterCreator pass runs only in the GPU and
TPU pipelines), so the partitioner's all-reduce + dynamic-slice of each weight gradient is what becomes a
reduce-scatter on an accelerator (see README, "Planning a run").
"""

import json
import os
import subprocess
import sys

import pytest

from tests.train import layout_hlo_script as script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MICRO_ROWS = script.BATCH // script.MICROBATCHES            # 24 rows per microbatch
VOCAB, MLP, WIDTH = 512, 256, 128
# The output head's einsum ("...d,vd->...v", inside the chunked loss): f32 logits, so its backward multiplies
# in f32 and the lm_head is gathered in f32 there.
LM_HEAD = "d,vd->"


def is_lm_head_backward(op: str) -> bool:
    return "transpose(jvp(" in op and LM_HEAD in op


def collectives(*args):
    done = subprocess.run([sys.executable, os.path.join("tests", "train", "layout_hlo_script.py"), *args],
                          capture_output=True, text=True, timeout=1200, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cpu():
    return collectives()


def has_tokens(shape) -> bool:
    """An activation: it has a sequence axis (LLM tokens, or the tower's patches beside two more axes)."""
    return script.LENGTH in shape or script.LENGTH - 1 in shape or (len(shape) >= 3 and bool({16, 17} & set(shape)))


def spans_global_batch(c) -> bool:
    return any(has_tokens(s) and any(d in (MICRO_ROWS, script.BATCH) for d in s) for s in c["shapes"])


def check_no_global_activations(found):
    bad = [c for c in found if spans_global_batch(c)]
    assert not bad, f"collectives over the global batch x sequence: {bad[:3]}"


@pytest.mark.parametrize("mesh", list(script.MESHES))
def test_no_collective_spans_the_global_batch_and_sequence(cpu, mesh):
    check_no_global_activations(cpu[mesh])


def test_fsdp_moves_weights_only_in_bf16(cpu):
    found = cpu["fsdp"]
    # Batch-sharded activations never move: no resharding collectives, nothing of a row's length.
    assert not [c for c in found if c["kind"] in ("all-to-all", "collective-permute")]
    assert not [c for c in found if any(has_tokens(s) for s in c["shapes"])]
    gathers = [c for c in found if c["kind"] == "all-gather" and len(c["shapes"][0]) >= 2]
    assert len(gathers) >= 10
    f32 = [c for c in gathers if c["dtype"] != "bf16" and not is_lm_head_backward(c["op"])]
    assert not f32, f"weight gathers not in bf16: {f32[:3]}"
    # Inside the layer scans, per layer and microbatch: the LLM's 7 matrices gathered for the forward and
    # once more for the backward (shared by the rematerialized forward and the gradients); 3 layers x 2
    # microbatches. Whole-model gathers outside the scans would not count here.
    per_layer = sum(c["count"] for c in gathers if c["op"].count("while/body") >= 2)
    assert per_layer >= 7 * 2 * 3 * 2


@pytest.mark.parametrize("mesh", ["tensor", "mix"])
def test_tensor_parallel_reduces_each_block_on_local_rows(cpu, mesh):
    found = cpu[mesh]
    activations = [c for c in found if any(has_tokens(s) for s in c["shapes"])]
    assert activations, "tensor parallelism needs per-block reductions"
    for c in activations:
        (shape,) = c["shapes"]
        assert shape[0] == MICRO_ROWS // 2, c          # this batch shard's rows only (2 batch shards)
        assert VOCAB not in shape and MLP not in shape, c  # never logits- or MLP-sized
    # The decoder's residual stream: one bf16 all-reduce after attention and one after the MLP, per layer
    # (3) and microbatch (2) in the forward pass.
    forward = [c for c in activations if c["kind"] == "all-reduce" and c["dtype"] == "bf16"
               and c["shapes"][0][-1] == WIDTH and "/jvp()/while/body/" in c["op"]
               and "checkpoint" not in c["op"] and "transpose" not in c["op"]]
    assert sum(c["count"] for c in forward) == 3 * 2 * 2


def test_tpu_ahead_of_time_layout():
    pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[tpu]')")
    found = collectives("fsdp", "--tpu=v5p:2x2x2")["fsdp"]
    check_no_global_activations(found)
    gathers = [c for c in found if c["kind"] == "all-gather" and len(c["shapes"][0]) >= 2]
    assert gathers and not [c for c in gathers if c["dtype"] != "bf16" and not is_lm_head_backward(c["op"])]
