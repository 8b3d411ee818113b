"""Vision towers, chosen by the type of their config: the one place that maps a tower config to its model.

Every tower implements the interface LLaVA reads (`VisionTower`); its config owns the geometry and the
normalization its image processor applies (`VisionTowerConfig`).
"""

from __future__ import annotations

from typing import Protocol, Sequence, Union

import jax
from flax import nnx

from llava_jax.models.clip_vit import CLIPVisionConfig, CLIPVisionModel
from llava_jax.models.siglip import SiglipVisionConfig, SiglipVisionModel

VisionConfig = Union[CLIPVisionConfig, SiglipVisionConfig]
TOWERS: dict[type, type[nnx.Module]] = {CLIPVisionConfig: CLIPVisionModel, SiglipVisionConfig: SiglipVisionModel}


class VisionTowerConfig(Protocol):
    hidden_size: int
    num_hidden_layers: int
    image_size: int
    patch_size: int
    image_mean: tuple[float, float, float]  # the normalization of the tower's image processor
    image_std: tuple[float, float, float]

    @property
    def num_patches(self) -> int: ...

    @property
    def num_positions(self) -> int: ...  # tokens of a hidden state (CLIP: 1 + patches)

    def num_tokens(self, strategy: str = "default") -> int: ...


class VisionTower(Protocol):
    config: VisionTowerConfig

    def hidden_states(self, pixel_values: jax.Array, indices: Sequence[int]) -> list[jax.Array]: ...

    def features(self, pixel_values: jax.Array, vision_feature_layer: int | Sequence[int] = -2,
                 strategy: str = "default") -> jax.Array: ...

    def num_tokens(self, strategy: str = "default") -> int: ...


def check_vision_config(config, where: str = "vision") -> None:
    """Raises TypeError naming `where` unless `config` is the config of a known tower."""
    if type(config) not in TOWERS:
        names = " or ".join(c.__name__ for c in TOWERS)
        raise TypeError(f"{where}: expected a {names}, got {type(config).__name__}")


def vision_tower(config: VisionConfig, *, rngs: nnx.Rngs | None = None) -> VisionTower:
    """The tower model of `config` (CLIPVisionConfig -> CLIPVisionModel, SiglipVisionConfig -> SiglipVisionModel)."""
    check_vision_config(config)
    return TOWERS[type(config)](config, rngs=rngs)
