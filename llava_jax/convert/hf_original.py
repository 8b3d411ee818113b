"""The original LLaVA checkpoint layout (liuhaotian/llava-v1.5-*, `LlavaLlamaForCausalLM`).

Tensors: `model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head` (the LLaMA decoder),
`model.mm_projector.{0,2,...}` (an nn.Sequential: Linear, GELU, Linear, ...; `model.mm_projector.weight`
for the v1 `linear` projector) and, when the tower was saved with the model,
`model.vision_tower.vision_tower.vision_model.*`. The config is a LLaMA config plus `mm_*` fields
(`mm_vision_tower`, `mm_projector_type`, `mm_vision_select_layer`, `mm_vision_select_feature`,
`mm_hidden_size`). The official model splices images in at a placeholder id (-200) that has no embedding
row; our model (like transformers) needs a real `<image>` id, see `llava_jax.convert.from_original_llava`.
"""

from __future__ import annotations

import re

from llava_jax.convert.hf_clip import clip_tensor_name_to_ours

ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaForCausalLM")
MODEL_TYPES = ("llava_llama", "llava")

_PROJECTOR = re.compile(r"^model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$")
_TOWER_PREFIX = "model.vision_tower.vision_tower."
# Tensors the official code saves that are not weights (rotary caches of old transformers versions).
_NOT_WEIGHTS = (".rotary_emb.inv_freq",)

SELECT_FEATURE_TO_STRATEGY = {"patch": "default", "cls_patch": "full"}


def is_original_llava(config: dict) -> bool:
    """True for an original LLaVA config (LLaMA fields + `mm_*` fields, no `text_config`)."""
    if "text_config" in config:
        return False
    return bool(set(config.get("architectures") or ()) & set(ARCHITECTURES)) or "mm_vision_tower" in config \
        or "mm_projector_type" in config


def original_tensor_name_to_ours(name: str) -> str | None:
    """An original LLaVA tensor name -> our (classic Hugging Face LLaVA) name; None for non-weights.

    'model.layers.3.mlp.up_proj.weight' -> 'language_model.model.layers.3.mlp.up_proj.weight';
    'model.mm_projector.2.bias' -> 'multi_modal_projector.linear_2.bias' (Sequential index 2k -> linear_{k+1});
    'model.mm_projector.weight' (linear projector) -> 'multi_modal_projector.linear_1.weight';
    'model.vision_tower.vision_tower.vision_model.x' and (transformers 5.x) 'model.vision_tower.vision_tower.x'
    -> 'vision_tower.vision_model.x'.
    """
    if name.endswith(_NOT_WEIGHTS):
        return None
    projector = _PROJECTOR.match(name)
    if projector:
        index, leaf = projector.groups()
        index = int(index or 0)
        if index % 2:
            raise ValueError(f"tensor '{name}': mm_projector.{index} is a GELU position, it has no weights")
        return f"multi_modal_projector.linear_{index // 2 + 1}.{leaf}"
    if name.startswith(_TOWER_PREFIX):
        # transformers 5.x saves the inner CLIPVisionModel without its `vision_model.` level.
        tower = clip_tensor_name_to_ours(name[len(_TOWER_PREFIX):])
        return None if tower is None else "vision_tower." + tower
    if name.startswith("model.vision_tower."):
        raise ValueError(f"tensor '{name}': unrecognized vision tower layout (expected '{_TOWER_PREFIX}...')")
    if name.startswith("model.") or name.startswith("lm_head."):
        return "language_model." + name
    raise ValueError(f"tensor '{name}' is not part of an original LLaVA checkpoint")


def projector_type(config: dict) -> str:
    """The projector type of an original config (the official default is 'linear')."""
    return config.get("mm_projector_type") or "linear"


def feature_strategy(config: dict) -> str:
    """`mm_vision_select_feature` ('patch' / 'cls_patch') -> transformers' strategy ('default' / 'full')."""
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE_TO_STRATEGY:
        raise ValueError(f"config.json: unsupported mm_vision_select_feature {feature!r} "
                         f"(expected one of {sorted(SELECT_FEATURE_TO_STRATEGY)})")
    return SELECT_FEATURE_TO_STRATEGY[feature]


def feature_layer(config: dict) -> int:
    return int(config.get("mm_vision_select_layer", -2))


def text_config(config: dict) -> dict:
    """The LLaMA part of an original config, as a plain Hugging Face LlamaConfig dict."""
    text = {k: v for k, v in config.items() if not k.startswith("mm_")}
    text["model_type"] = "llama"
    text["architectures"] = ["LlamaForCausalLM"]
    return text


def vision_config_from_tensors(shapes: dict[str, tuple[int, ...]], head_dim: int = 64) -> dict:
    """A CLIPVisionConfig dict inferred from the vision tower tensor shapes (our names -> shapes).

    The number of heads is not stored in the weights: `hidden_size // head_dim` (64 for every OpenAI CLIP
    ViT). Pass the CLIP checkpoint folder instead when in doubt.
    """
    prefix = "vision_tower.vision_model."
    patch = shapes[prefix + "embeddings.patch_embedding.weight"]  # [D, C, P, P]
    positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
    fc1 = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"]  # [I, D]
    layers = {int(m.group(1)) for n in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", n))}
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise ValueError(f"vision tower: {positions} position embeddings is not a square grid plus the class token")
    hidden = patch[0]
    return {"model_type": "clip_vision_model", "hidden_size": hidden, "intermediate_size": fc1[0],
            "num_hidden_layers": len(layers), "num_attention_heads": hidden // head_dim,
            "num_channels": patch[1], "patch_size": patch[2], "image_size": grid * patch[2],
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
