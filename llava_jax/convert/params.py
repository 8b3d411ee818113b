"""Generic mapping between Hugging Face tensor names and llava_jax parameter paths.

Our module trees mirror the Hugging Face module trees name for name, with one difference: repeated
layers are stacked on a leading axis. So the Hugging Face tensor `model.layers.3.self_attn.q_proj.weight`
is row 3 of our leaf at path `("model", "layers", "self_attn", "q_proj", "weight")`. Leaves keep Hugging
Face orientation, so no tensor is transposed.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping

import jax
import numpy as np
from flax import nnx

_LAYER_INDEX = re.compile(r"(?:^|(?<=\.))layers\.(\d+)\.")

Path = tuple[str, ...]


def hf_name_to_path(name: str) -> tuple[Path, int | None]:
    """'a.layers.3.b.weight' -> (('a', 'layers', 'b', 'weight'), 3); 'a.b' -> (('a', 'b'), None)."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        return tuple(name.split(".")), None
    stripped = name[: match.start()] + "layers." + name[match.end():]
    return tuple(stripped.split(".")), int(match.group(1))


def path_to_hf_name(path: Path, layer: int | None = None) -> str:
    if layer is None:
        return ".".join(path)
    i = path.index("layers")
    return ".".join(path[: i + 1] + (str(layer),) + path[i + 1:])


def is_stacked(path: Path) -> bool:
    return "layers" in path[:-1]


def _iter_params(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Param]]:
    state = nnx.state(model, nnx.Param)
    for path, leaf in nnx.to_flat_state(state):
        yield path, leaf


def hf_names(model: nnx.Module) -> dict[str, tuple[Path, int | None]]:
    """Every Hugging Face tensor name the model holds -> (our path, layer index or None)."""
    names = {}
    for path, leaf in _iter_params(model):
        path = tuple(str(k) for k in path)
        if is_stacked(path):
            for i in range(leaf.get_value().shape[0]):
                names[path_to_hf_name(path, i)] = (path, i)
        else:
            names[path_to_hf_name(path)] = (path, None)
    return names


def state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Hugging Face style {name: array} view of the model's parameters (host numpy copies)."""
    out = {}
    for path, leaf in _iter_params(model):
        path = tuple(str(k) for k in path)
        value = np.asarray(jax.device_get(leaf.get_value()))
        if is_stacked(path):
            for i in range(value.shape[0]):
                out[path_to_hf_name(path, i)] = value[i]
        else:
            out[path_to_hf_name(path)] = value
    return out


def load_state_dict(model: nnx.Module, tensors: Mapping[str, np.ndarray], *, strict: bool = True,
                    source: str = "state dict") -> None:
    """Copies Hugging Face named tensors into the model in place, casting to each parameter's dtype.

    Raises a ValueError naming the tensor on a shape mismatch, and (strict) on missing or unexpected names.
    """
    expected = hf_names(model)
    if strict:
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source}: missing tensors {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                             f"unexpected tensors {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}")
    leaves = {tuple(str(k) for k in p): leaf for p, leaf in _iter_params(model)}
    buffers: dict[Path, np.ndarray] = {}
    for name, value in tensors.items():
        if name not in expected:
            continue
        path, layer = expected[name]
        leaf = leaves[path]
        target_shape = leaf.get_value().shape[1:] if layer is not None else leaf.get_value().shape
        value = np.asarray(value)
        if tuple(value.shape) != tuple(target_shape):
            raise ValueError(f"{source}: tensor '{name}' has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(target_shape)}")
        if layer is None:
            leaf.set_value(jax.numpy.asarray(value, dtype=leaf.get_value().dtype))
        else:
            buf = buffers.setdefault(path, np.array(jax.device_get(leaf.get_value())))
            buf[layer] = value.astype(buf.dtype)
    for path, buf in buffers.items():
        leaves[path].set_value(jax.numpy.asarray(buf))
