"""The serving benchmark's Poisson mode: its request mix and its latency figures (the servers it starts are
exercised by running it; see the README's serving table)."""

from __future__ import annotations

import numpy as np
import pytest

from llava_jax.infer.serve import bench


def test_poisson_requests_mix_prompt_and_answer_lengths():
    requests = bench.poisson_requests(24, (8, 48), extra_words=40, seed=0)
    max_tokens = [r["max_tokens"] for r in requests]
    words = [len(r["messages"][0]["content"][1]["text"].split()) for r in requests]
    assert all(8 <= m <= 48 for m in max_tokens) and len(set(max_tokens)) > 10
    assert len(set(words)) > 10 and max(words) - min(words) > 20
    assert all(r["stream"] and r["stream_options"] == {"include_usage": True} and not r.get("ignore_eos")
               for r in requests)
    assert requests[0]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert bench.poisson_requests(24, (8, 48), 40, seed=0) == requests  # the same mix for both engines


def test_latency_figures_of_streamed_records():
    records = [{"sent": 0.0, "chunks": [0.5, 0.6, 0.8], "tokens": 3, "end": 0.8},
               {"sent": 1.0, "chunks": [1.1, 1.2], "tokens": 2, "end": 2.0}]
    figures = bench.latency_figures(records, rate=2.0)
    assert figures["rate"] == 2.0 and figures["requests"] == 2 and figures["completion_tokens"] == 5
    assert figures["wall_s"] == pytest.approx(2.0) and figures["tokens_per_s"] == pytest.approx(2.5)
    assert figures["ttft_p50_s"] == pytest.approx(np.percentile([0.5, 0.1], 50))
    assert figures["itl_p50_s"] == pytest.approx(0.1) and figures["itl_p99_s"] == pytest.approx(
        np.percentile([0.1, 0.2, 0.1], 99))


def test_at_slo_takes_the_highest_throughput_within_both_bounds():
    rows = [{"rate": r, "tokens_per_s": t, "ttft_p99_s": f, "itl_p99_s": i}
            for r, t, f, i in ((8, 100, 0.02, 0.01), (16, 200, 0.05, 0.02), (32, 380, 0.09, 0.06),
                               (64, 500, 0.4, 0.02))]
    assert bench.at_slo(rows, 0.1, 0.05)["rate"] == 16  # 32/s breaks the ITL bound, 64/s the TTFT bound
    assert bench.at_slo(rows, 0.1, 0.1)["rate"] == 32
    assert bench.at_slo(rows, 0.01, 0.05) is None


def test_the_engine_is_a_server_option():
    from llava_jax.infer.serve import cli

    assert cli.build_parser().parse_args(["--model", "m"]).engine == "continuous"
    assert cli.build_parser().parse_args(["--model", "m", "--engine", "windowed"]).engine == "windowed"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--model", "m", "--engine", "other"])


@pytest.mark.parametrize("name", ["continuous", "windowed"])
def test_build_engine_starts_the_engine_named(model_dir, name):
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
    from llava_jax.infer.serve import cli
    from llava_jax.infer.serve.continuous import ContinuousEngine
    from llava_jax.infer.serve.engine import Engine

    args = cli.build_parser().parse_args(["--model", str(model_dir), "--warm-up", "none", "--engine", name,
                                          "--max-batch", "2", "--prefill-tokens", "64", "--max-prefill-rows", "2"])
    engine = cli.build_engine(args)
    try:
        assert type(engine) is {"continuous": ContinuousEngine, "windowed": Engine}[name] and engine.alive
        if name == "continuous":
            assert (engine.prefill_tokens, engine.chunk, engine.max_prefill_rows) == (64, 64, 2)
    finally:
        engine.close()
