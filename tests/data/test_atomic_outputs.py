"""Outputs written in several steps never wedge a rerun: the demo data killed halfway is detected and redone."""

from __future__ import annotations

import pytest

from llava_jax.data import synthetic

SIZES = dict(num_stage1=5, num_stage2=7, num_eval=4, image_size=16, seed=1)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kill_in", ["build_tokenizer", "_write_jsonl", "chance_levels"])
def test_demo_data_killed_halfway_is_detected_and_redone(tmp_path, monkeypatch, kill_in):
    reference = synthetic.generate(tmp_path / "reference", **SIZES)
    assert synthetic.is_complete(reference.root)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill at that point leaves it
    with monkeypatch.context() as patch:
        patch.setattr(synthetic, kill_in, killed)
        with pytest.raises(KeyboardInterrupt):
            synthetic.generate(tmp_path / "run", **SIZES)
    assert not synthetic.is_complete(tmp_path / "run") and not (tmp_path / "run" / "info.json").exists()
    if kill_in != "chance_levels":  # killed before the tokenizer: no tokenizer folder at all
        assert not (tmp_path / "run" / "tokenizer").exists()

    synthetic.generate(tmp_path / "run", **SIZES)  # the rerun redoes it
    assert synthetic.is_complete(tmp_path / "run")
    assert _files(tmp_path / "run") == _files(reference.root)


def test_training_demo_data_is_regenerated_after_a_kill_before_the_tokenizer(tmp_path, monkeypatch):
    """The training run's check: data without its tokenizer (a kill before it was written) is redone, not
    used (it used to fail every rerun with a hub 'Repo id' error)."""
    from transformers import AutoTokenizer

    from llava_jax.train import inputs
    from tests.train.test_loop import demo_config

    c = demo_config(2)
    c.demo.num_stage1, c.demo.num_stage2, c.demo.num_eval = 4, 4, 2
    monkeypatch.setattr(synthetic, "build_tokenizer", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        inputs.prepare_demo_data(c, tmp_path)
    monkeypatch.undo()
    paths = inputs.prepare_demo_data(c, tmp_path)
    assert synthetic.is_complete(paths.root)
    assert AutoTokenizer.from_pretrained(paths.tokenizer).convert_tokens_to_ids("<image>") == 4
