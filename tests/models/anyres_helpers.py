"""Tiny random transformers LLaVA-NeXT / LLaVA-OneVision models, their processors (the real LLaMA-2 tokenizer with
`<image>` / `<video>` added) and our forward on the processor's outputs."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from llava_jax.models import llava_next

TOKENIZER = Path("/work/shared/testdata/llama2_tokenizer")
TILE, PATCH = 30, 6
PINPOINTS = [[30, 60], [60, 30], [60, 60]]
IMAGE_ID, VIDEO_ID = 32000, 32001  # the ids `<image>` and `<video>` get when added to LLaMA-2's 32000
VOCAB = 32064


def clip_config() -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=97, num_hidden_layers=3,
                                         num_attention_heads=3, image_size=TILE, patch_size=PATCH)


def _text_fields() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=56, intermediate_size=97, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)


def next_config(vision_feature_layer=-2) -> transformers.LlavaNextConfig:
    return transformers.LlavaNextConfig(vision_config=clip_config(), text_config=transformers.LlamaConfig(
        **_text_fields()), image_token_index=IMAGE_ID, image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default", vision_feature_layer=vision_feature_layer, image_seq_length=25)


def onevision_config(aspect: str = "anyres_max_1") -> transformers.LlavaOnevisionConfig:
    text = transformers.Qwen2Config(**_text_fields(), tie_word_embeddings=False)
    return transformers.LlavaOnevisionConfig(
        vision_config=clip_config(), text_config=text, image_token_index=IMAGE_ID, video_token_index=VIDEO_ID,
        image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="default", vision_feature_layer=-2,
        vision_aspect_ratio=aspect)


def save(model_class, config, path: Path, seed: int = 0):
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # transformers initialises a tiny random model's weights small; make them matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model


@functools.cache
def tokenizer():
    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    tok.add_tokens([transformers.AddedToken(t, special=True, normalized=False) for t in ("<image>", "<video>")],
                   special_tokens=True)
    assert tok.convert_tokens_to_ids(["<image>", "<video>"]) == [IMAGE_ID, VIDEO_ID]
    return tok


def next_processor() -> transformers.LlavaNextProcessor:
    image = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    return transformers.LlavaNextProcessor(image_processor=image, tokenizer=tokenizer(), patch_size=PATCH,
                                           vision_feature_select_strategy="default", num_additional_image_tokens=1)


def onevision_image_processor() -> transformers.LlavaOnevisionImageProcessor:
    return transformers.LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE},
                                                     image_grid_pinpoints=PINPOINTS)


def onevision_counter(aspect: str = "anyres_max_1") -> transformers.LlavaOnevisionProcessor:
    """transformers' LlavaOnevisionProcessor without its video processor (it needs torchvision, absent here):
    only its own token-count methods are used."""
    proc = transformers.LlavaOnevisionProcessor.__new__(transformers.LlavaOnevisionProcessor)
    proc.image_processor, proc.image_token, proc.video_token = onevision_image_processor(), "<image>", "<video>"
    proc.num_image_tokens, proc.vision_feature_select_strategy = (TILE // PATCH) ** 2 + 1, "default"
    proc.vision_aspect_ratio = aspect
    return proc


def onevision_inputs(messages_images: list[list[Image.Image]], text: str, aspect: str = "anyres_max_1") -> dict:
    """What LlavaOnevisionProcessor gives: the image processor's outputs and input_ids with each `<image>`
    expanded by the processor's own `replace_image_token` (prompt order)."""
    proc = onevision_counter(aspect)
    inputs = dict(proc.image_processor(messages_images, return_tensors="np"))
    parts = text.split("<image>")
    expanded = parts[0] + "".join(proc.replace_image_token(inputs, i) + part for i, part in enumerate(parts[1:]))
    inputs["input_ids"] = tokenizer()(expanded, return_tensors="np")["input_ids"]
    return inputs


def images(*sizes: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    """Random RGB images of (height, width) sizes."""
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def video(frames: int = 8, seed: int = 1) -> np.ndarray:
    """Preprocessed video frames [1, frames, 3, TILE, TILE] (the pixels' values do not matter here)."""
    return np.random.RandomState(seed).randn(1, frames, 3, TILE, TILE).astype(np.float32)


def video_token_count(frames: int) -> int:
    """transformers' own count (LlavaOnevisionProcessor._get_num_multimodal_tokens)."""
    return onevision_counter()._get_num_multimodal_tokens(video_sizes=[(frames, TILE, TILE)])["num_video_tokens"][0]


def torch_logits(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits.float().numpy()


@functools.cache
def _forward():
    from flax import nnx

    def forward(model, ids, mask, pix, taps, vids, vtaps):
        return model(ids, pix, mask, taps, pixel_values_videos=vids, video_taps=vtaps)

    return nnx.jit(forward)


def our_logits(model, inputs: dict) -> np.ndarray:
    """Our forward on a processor's outputs: the images' real tiles flattened, the taps from image_sizes."""
    import jax.numpy as jnp

    pix = taps = vids = vtaps = None
    if "pixel_values" in inputs:
        nums = inputs.get("batch_num_images")
        index, weight, tiles = llava_next.image_taps(model.config, np.asarray(inputs["image_sizes"]).tolist(),
                                                     None if nums is None else list(np.asarray(nums)))
        pixel_values = np.asarray(inputs["pixel_values"])
        pix = jnp.asarray(np.concatenate([pixel_values[i, :n] for i, n in enumerate(tiles)]))
        taps = (jnp.asarray(index), jnp.asarray(weight))
    if "pixel_values_videos" in inputs:
        frames = np.asarray(inputs["pixel_values_videos"])
        vtaps = tuple(jnp.asarray(a) for a in llava_next.video_taps(model.config, [frames.shape[1]] * len(frames)))
        vids = jnp.asarray(frames.reshape((-1,) + frames.shape[2:]))
    mask = inputs.get("attention_mask")
    mask = None if mask is None else jnp.asarray(mask)
    return np.asarray(_forward()(model, jnp.asarray(inputs["input_ids"]), mask, pix, taps, vids, vtaps))


def assert_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    """Within `rel` of the reference's largest magnitude (fp32)."""
    np.testing.assert_allclose(ours, ref, rtol=0, atol=rel * float(np.abs(ref).max()))
