"""Modality / length grouping against the official LLaVA sampler, and the padding report."""

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from llava_jax.data.grouping import group_by_modality_length, padding_fraction

torch = pytest.importorskip("torch")


def _official_trainer_module():
    """llava/train/llava_trainer.py from llava-torch, with its transformers imports stubbed."""
    spec = importlib.util.find_spec("llava")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llava-torch is not installed (pip install --no-deps llava-torch==1.2.2.post1)")
    path = Path(list(spec.submodule_search_locations)[0]) / "train" / "llava_trainer.py"
    stub_trainer = types.ModuleType("transformers.trainer")
    for name in ("is_sagemaker_mp_enabled", "get_parameter_names", "has_length", "ALL_LAYERNORM_LAYERS", "logger"):
        setattr(stub_trainer, name, None)
    stub_transformers = types.ModuleType("transformers")
    stub_transformers.Trainer = object
    stub_transformers.trainer = stub_trainer
    saved = {name: sys.modules.get(name) for name in ("transformers", "transformers.trainer")}
    sys.modules.update({"transformers": stub_transformers, "transformers.trainer": stub_trainer})
    try:
        module_spec = importlib.util.spec_from_file_location("official_llava_trainer", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


@pytest.fixture(scope="module")
def official():
    return _official_trainer_module()


def _torch_randperm(n):
    return torch.randperm(n).numpy()


def _modality_lengths(rng, num, text_fraction):
    words = rng.integers(1, 400, size=num)
    is_text = rng.random(num) < text_fraction
    return np.where(is_text, -words, words).tolist()


@pytest.mark.parametrize(
    "num, batch_size, world_size, text_fraction, seed",
    [
        (997, 7, 3, 0.1, 0),  # mix665k-like: a few text-only samples
        (389, 4, 5, 0.5, 1),
        (211, 13, 1, 0.0, 2),  # images only: plain length grouping
        (101, 3, 2, 1.0, 3),  # text only
        (50, 8, 4, 0.06, 4),  # fewer samples than a megabatch of text
        (123, 5, 3, 0.3, 5),  # megabatches that do not split evenly
    ],
)
def test_same_order_as_official(official, num, batch_size, world_size, text_fraction, seed):
    lengths = _modality_lengths(np.random.default_rng(seed), num, text_fraction)
    torch.manual_seed(seed)
    expected = official.get_modality_length_grouped_indices(lengths, batch_size, world_size)
    torch.manual_seed(seed)
    ours = group_by_modality_length(lengths, batch_size, world_size, randperm=_torch_randperm)
    assert ours.tolist() == list(expected)


def test_official_sampler_class_matches(official):
    lengths = _modality_lengths(np.random.default_rng(7), 301, 0.2)
    torch.manual_seed(11)
    sampler = official.LengthGroupedSampler(6, 2, lengths=lengths, group_by_modality=True)
    expected = list(iter(sampler))
    torch.manual_seed(11)
    assert group_by_modality_length(lengths, 6, 2, randperm=_torch_randperm).tolist() == expected


def test_megabatches_are_single_modality_and_deterministic():
    lengths = _modality_lengths(np.random.default_rng(3), 1009, 0.15)
    batch_size, world_size = 5, 3
    megabatch = batch_size * world_size
    order = group_by_modality_length(lengths, batch_size, world_size, seed=9, epoch=2)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    assert np.array_equal(order, group_by_modality_length(lengths, batch_size, world_size, seed=9, epoch=2))
    assert not np.array_equal(order, group_by_modality_length(lengths, batch_size, world_size, seed=9, epoch=3))
    num_image = sum(length > 0 for length in lengths)
    num_text = len(lengths) - num_image
    # Only the final megabatch (the leftovers of both modalities) may mix.
    full = len(lengths) - (num_image % megabatch or megabatch) - (num_text % megabatch or megabatch)
    signs = np.sign(np.asarray(lengths)[order[:full]]).reshape(-1, megabatch)
    assert (np.abs(signs.sum(axis=1)) == megabatch).all()
    # Within each device chunk, samples are sorted longest first where chunks are filled greedily.
    chunk_lengths = np.abs(np.asarray(lengths)[order[:full]]).reshape(-1, megabatch)
    assert chunk_lengths[:, 0].tolist() == chunk_lengths.max(axis=1).tolist()


def test_zero_length_is_rejected():
    with pytest.raises(ValueError, match="sample 2"):
        group_by_modality_length([3, -4, 0, 5], 2)


def test_padding_fraction():
    a = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.int32)  # 4 real of 8
    b = np.array([[1, 1], [1, 1]], np.int32)  # 4 real of 4
    assert padding_fraction([{"attention_mask": a}, {"attention_mask": b}]) == pytest.approx(4 / 12)
    assert padding_fraction([a]) == pytest.approx(0.5)
    assert padding_fraction([]) == 0.0
