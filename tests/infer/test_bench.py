"""The generation benchmark times a checkpoint through the same load_model + Generator path as chat and eval."""

from __future__ import annotations

import json

from llava_jax.infer import bench
from tests.infer.test_generate import save_tiny_llava


def test_bench_times_a_model_folder_through_load_model(tmp_path, capsys):
    save_tiny_llava(tmp_path / "model")
    out = tmp_path / "bench.json"
    assert bench.main(["generate", "--model", str(tmp_path / "model"), "--batch-sizes", "2", "--prompt-len", "4",
                       "--new-tokens", "3", "--repeats", "1", "--json", str(out)]) == 0
    [record] = json.loads(out.read_text())
    assert record["impl"] == "llava_jax" and record["batch"] == 2 and record["new_tokens"] == 3
    assert record["decode_tokens_per_s"] > 0 and record["ttft_s"] > 0
    assert str(tmp_path / "model") in capsys.readouterr().out
    assert bench.main(["generate", "--model", str(tmp_path / "model"), "--compare-transformers"]) == 2
