"""`python -m llava_jax.bench train`: both layouts and transformers run the same model (same first loss), and the
report carries step time, real tokens/s, real/computed tokens, FLOPs and memory."""

import json

from llava_jax import bench


def test_bench_train_against_transformers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["train", "--preset", "tiny", "--batch", "2", "--seq", "128", "--repeats", "1",
                       "--compare-transformers", "--json", str(out)]) == 0
    rows = {(r["layout"], r["impl"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {("unpacked", "llava_jax"), ("packed", "llava_jax"), ("unpacked", "transformers")}
    ours, ref = rows[("unpacked", "llava_jax")], rows[("unpacked", "transformers")]
    packed = rows[("packed", "llava_jax")]
    assert abs(ours["loss"] - ref["loss"]) < 1e-4 * abs(ref["loss"])        # same weights, same batch, same loss
    assert packed["token_efficiency"] > ours["token_efficiency"] and packed["real_tokens"] > ours["real_tokens"]
    assert all(r["step_s"] > 0 and r["flops"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    assert ours["memory_bytes"] > 0
    printed = capsys.readouterr().out
    assert "ratio llava_jax unpacked / transformers unpacked" in printed and "real/comp" in printed


def test_bench_train_rejects_bad_sizes(capsys):
    assert bench.main(["train", "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err


def test_bench_train_lora_against_peft(tmp_path, capsys):
    """LoRA at a chosen rank: our adapters and peft's (the same zero-initialized B) give the same first loss."""
    out = tmp_path / "bench.json"
    assert bench.main(["train", "--preset", "tiny", "--batch", "2", "--seq", "128", "--repeats", "1", "--lora",
                       "--lora-rank", "4", "--compare-transformers", "--json", str(out)]) == 0
    rows = {(r["layout"], r["impl"]): r for r in json.loads(out.read_text())}
    ours, ref = rows[("unpacked", "llava_jax")], rows[("unpacked", "transformers")]
    assert abs(ours["loss"] - ref["loss"]) < 1e-4 * abs(ref["loss"])
    assert "LoRA r4 stage 2" in capsys.readouterr().out


def test_ratio_of_medians_and_a_verdict_only_when_the_ranges_do_not_overlap():
    from llava_jax.train.bench import compare_rates

    ratio, verdict = compare_rates([100.0, 120.0, 110.0], [50.0, 70.0, 55.0])
    assert ratio == 110.0 / 55.0 and verdict.startswith("llava_jax faster")
    ratio, verdict = compare_rates([40.0, 45.0, 41.0], [50.0, 70.0, 55.0])
    assert ratio == 41.0 / 55.0 and verdict.startswith("llava_jax slower")
    # 0.86x and 2.63x from the same command: the ranges overlap, no verdict.
    ratio, verdict = compare_rates([86.0, 263.0, 150.0], [100.0, 120.0, 110.0])
    assert ratio == 150.0 / 110.0 and verdict.startswith("too noisy to decide")
    assert "llava_jax 86-263, transformers 100-120" in verdict


def test_both_sides_are_pinned_to_the_same_cores_then_restored():
    import os

    import torch

    from llava_jax.train.bench import pinned_threads

    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    with pinned_threads(1):
        assert len(os.sched_getaffinity(0)) == 1 and torch.get_num_threads() == 1
    assert os.sched_getaffinity(0) == cores and torch.get_num_threads() == threads
    assert bench.main(["train", "--threads", str(len(cores) + 1)]) == 2
