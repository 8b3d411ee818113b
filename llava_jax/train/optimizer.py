"""What is trainable (regex rules over parameter paths), learning-rate schedules and the optimizer.

Rules are big_vision style: an ordered list of `(regex, group)` where group names a learning-rate group
(`"projector"`, `"llm"`, `"lora"`, `"vision"`) or is None for frozen. A regex is matched with
`re.fullmatch` against the parameter path joined by "/", e.g.
`language_model/model/layers/self_attn/q_proj/weight`. Every parameter must match exactly one rule.
Frozen parameters are split off before differentiation and get no optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Rules = Sequence[tuple[str, str | None]]


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """Per-group optimizer settings (peak learning rate and weight decay)."""
    lr: float
    weight_decay: float = 0.0


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path)


def resolve_groups(state: nnx.State, rules: Rules) -> dict[str, str | None]:
    """{parameter path: group or None}. Raises if a parameter matches no rule or several rules."""
    compiled = [(re.compile(pattern), group, pattern) for pattern, group in rules]
    resolved, problems = {}, []
    for path, _ in nnx.to_flat_state(state):
        name = path_str(path)
        hits = [(pattern, group) for regex, group, pattern in compiled if regex.fullmatch(name)]
        if len(hits) != 1:
            problems.append(f"{name}: matches {len(hits)} rules {[h[0] for h in hits]}")
            continue
        resolved[name] = hits[0][1]
    if problems:
        raise ValueError("trainable rules: every parameter must match exactly one rule:\n  "
                         + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
    unused = [pattern for regex, _, pattern in compiled
              if not any(regex.fullmatch(name) for name in resolved)]
    if unused:
        raise ValueError(f"trainable rules: rules that match no parameter: {unused}")
    return resolved


def trainable_filter(groups: Mapping[str, str | None]):
    """An nnx filter selecting the parameters whose group is not None."""
    def is_trainable(path, value) -> bool:
        return isinstance(value, nnx.Param) and groups.get(path_str(path)) is not None
    return is_trainable


def split_model(model: nnx.Module, groups: Mapping[str, str | None]):
    """-> (graphdef, trainable params, frozen params, other state)."""
    return nnx.split(model, trainable_filter(groups), nnx.Param, ...)


def group_table(state: nnx.State, groups: Mapping[str, str | None]) -> str:
    """A printable table of parameter counts per group (frozen included)."""
    counts: dict[str, list[int]] = {}
    for path, var in nnx.to_flat_state(state):
        group = groups[path_str(path)] or "frozen"
        entry = counts.setdefault(group, [0, 0])
        entry[0] += 1
        entry[1] += int(math.prod(var.get_value().shape))
    total = sum(c[1] for c in counts.values())
    lines = [f"{'group':<12}{'tensors':>9}{'parameters':>16}{'share':>8}"]
    for group, (n, size) in sorted(counts.items()):
        lines.append(f"{group:<12}{n:>9}{size:>16,}{100 * size / max(total, 1):>7.2f}%")
    lines.append(f"{'total':<12}{sum(c[0] for c in counts.values()):>9}{total:>16,}")
    return "\n".join(lines)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length as Hugging Face computes it from a ratio: ceil(total * ratio)."""
    return math.ceil(total_steps * warmup_ratio)


def warmup_cosine(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then cosine decay to 0 at `total_steps` (transformers' schedule)."""
    warmup = warmup_steps(total_steps, warmup_ratio)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        progress = (step - warmup) / max(total_steps - warmup, 1)
        cosine = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decays(path: Sequence[Any], value: Any) -> bool:
    """Weight decay applies to matrices only: never to norms, biases or other vectors."""
    name = path_str(path)
    return getattr(value, "ndim", 0) - ("layers" in name.split("/")[:-1]) >= 2 and "norm" not in name \
        and not name.endswith("bias")


def _keypath_str(keypath) -> str:
    """Parameter path of a pytree key path over an nnx.State or a pure dict ('.value' keys dropped)."""
    parts = [getattr(k, "key", getattr(k, "idx", None)) for k in keypath if not isinstance(k, jax.tree_util.GetAttrKey)]
    return path_str(parts)


def map_with_names(fn, tree):
    """tree_map where fn receives (parameter path string, leaf)."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(_keypath_str(kp), x), tree)


def make_optimizer(groups: Mapping[str, str | None], specs: Mapping[str, GroupSpec], *, total_steps: int,
                   warmup_ratio: float, clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW per group with warmup + cosine, global-norm clipping first, decay mask on matrices only.

    Apply it to the trainable parameters only: frozen ones never reach the optimizer.
    """
    used = sorted({g for g in groups.values() if g is not None})  # sorted: same program on every host
    missing = sorted(set(used) - set(specs))
    if missing:
        raise ValueError(f"optimizer: no learning rate configured for groups {missing}")
    labels = functools.partial(map_with_names, lambda name, _: groups[name])
    decay_mask = functools.partial(map_with_names, lambda name, x: decays(name.split("/"), x))
    transforms = {
        group: optax.adamw(warmup_cosine(specs[group].lr, total_steps, warmup_ratio), b1=b1, b2=b2, eps=eps,
                           weight_decay=specs[group].weight_decay, mask=decay_mask)
        for group in used
    }
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.multi_transform(transforms, labels))


def learning_rates(specs: Mapping[str, GroupSpec], step: int, *, total_steps: int, warmup_ratio: float) -> dict:
    """The learning rate of each group at `step` (for logging)."""
    return {g: float(warmup_cosine(s.lr, total_steps, warmup_ratio)(step)) for g, s in specs.items()}
