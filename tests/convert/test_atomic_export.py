"""Exports replace a previous export whole or not at all: a failure after the weights are written leaves the
old export intact and loadable; a folder that is not an export is never replaced."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers

from llava_jax import atomic_files, convert
from llava_jax.convert import checkpoint_io
from tests.convert import helpers


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two tiny LLaVA models with different weights, and a tokenizer folder."""
    root = tmp_path_factory.mktemp("atomic")
    helpers.save_tiny_llava(root / "a", seed=0)
    helpers.save_tiny_llava(root / "b", seed=1)
    tokenizer = helpers.save_tiny_tokenizer(root / "tok", size=helpers.VOCAB - 1)
    return convert.from_hf(root / "a"), convert.from_hf(root / "b"), tokenizer


def weights(folder) -> dict[str, np.ndarray]:
    reader = checkpoint_io.CheckpointReader(folder)
    return {n: reader.get(n) for n in reader.names()}


def test_failed_export_over_an_export_leaves_it_intact_and_loadable(two_models, tmp_path, monkeypatch):
    a, b, tokenizer = two_models
    out = tmp_path / "export"
    convert.to_hf(a, out, tokenizer=tokenizer)
    before = digest(out)
    written = []

    def failing_save(self, path, *args, **kwargs):  # the tokenizer/processor files come after the weights
        written.append(sorted(p.name for p in path.iterdir()))
        raise OSError("disk full")

    monkeypatch.setattr(transformers.LlavaProcessor, "save_pretrained", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert.to_hf(b, out, tokenizer=tokenizer, max_shard_size="100KB")
    assert "config.json" in written[0] and "model.safetensors.index.json" in written[0]  # failed after weights
    assert digest(out) == before and siblings(out) == []
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    ours = weights(out)
    projector = next(v for k, v in hf.state_dict().items() if k.endswith("multi_modal_projector.linear_1.weight"))
    np.testing.assert_array_equal(projector.numpy(), ours["multi_modal_projector.linear_1.weight"])
    assert transformers.AutoProcessor.from_pretrained(out) is not None

    monkeypatch.undo()
    convert.to_hf(b, out, tokenizer=tokenizer, max_shard_size="100KB")
    again = tmp_path / "b_alone"
    convert.to_hf(b, again, tokenizer=tokenizer, max_shard_size="100KB")
    assert digest(out) == digest(again) and siblings(out) == []
    assert not np.array_equal(weights(out)["multi_modal_projector.linear_1.weight"],
                              ours["multi_modal_projector.linear_1.weight"])


def test_failed_save_over_a_save_leaves_it_intact(two_models, tmp_path, monkeypatch):
    a, b, _ = two_models
    out = tmp_path / "ours"
    convert.save(a, out)
    before = digest(out)
    save = ocp.StandardCheckpointer.save

    def save_then_fail(self, *args, **kwargs):
        save(self, *args, **kwargs)
        self.wait_until_finished()
        raise KeyboardInterrupt  # a kill after the parameters are written

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        convert.save(b, out)
    assert digest(out) == before and siblings(out) == []
    monkeypatch.undo()
    loaded = convert.load(out)
    np.testing.assert_array_equal(np.asarray(loaded.multi_modal_projector.linear_1.weight),
                                  np.asarray(a.multi_modal_projector.linear_1.weight))
    convert.save(b, out)
    np.testing.assert_array_equal(np.asarray(convert.load(out).multi_modal_projector.linear_1.weight),
                                  np.asarray(b.multi_modal_projector.linear_1.weight))


def test_a_folder_that_is_not_an_export_is_never_replaced(two_models, tmp_path):
    a, _, _ = two_models
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    for target in (workdir, other):
        before = digest(target)
        with pytest.raises(FileExistsError, match="not an export"):
            convert.to_hf(a, target)
        assert digest(target) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        convert.save(a, tmp_path / "file")


def test_a_model_in_the_decode_layout_is_not_exported(two_models, tmp_path):
    from llava_jax.infer.generate import decoding_layout

    decoder = decoding_layout(two_models[0])
    for export in (lambda: convert.to_hf(decoder, tmp_path / "hf"), lambda: convert.save(decoder, tmp_path / "ours")):
        with pytest.raises(TypeError, match="per-layer weight buffers"):
            export()
    assert list(tmp_path.iterdir()) == []


def test_write_text_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    atomic_files.write_text(path, json.dumps({"step": 1}))

    def fail(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        atomic_files.write_text(path, json.dumps({"step": 2}))
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["result.json"]
