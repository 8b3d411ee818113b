"""A LLaVA with a SigLIP tower, exported by `convert.to_hf` (SigLIP's processor: size as height / width, no
crop), opens for generation: its images are SigLIP-processed after LLaVA's mean-colour square padding."""

from __future__ import annotations

import numpy as np
import torch
import transformers
from PIL import Image

import llava_jax.convert as convert
from llava_jax.data.images import expand_to_square
from llava_jax.infer.generate import load_generator
from tests.convert import helpers
from tests.convert.test_siglip_roundtrip import IMAGE, _llava_config, _perturbed


def test_llava_siglip_export_generates_with_siglip_preprocessing(tmp_path):
    torch.manual_seed(9)
    _perturbed(transformers.LlavaForConditionalGeneration(_llava_config("full", -2))).save_pretrained(tmp_path / "hf")
    tokenizer = helpers.save_tiny_tokenizer(tmp_path / "tok", size=IMAGE)
    out = convert.to_hf(convert.from_hf(tmp_path / "hf"), tmp_path / "export", tokenizer=tokenizer)
    gen = load_generator(out, dtype="float32")
    assert (gen.image_config.size, gen.image_config.crop_size, gen.image_config.mean) == (
        helpers.IMAGE_SIZE, helpers.IMAGE_SIZE, (0.5, 0.5, 0.5))
    image = Image.fromarray(np.random.RandomState(3).randint(0, 255, (41, 17, 3), dtype=np.uint8))
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    pixels = processor(images=expand_to_square(image, (127, 127, 127)), return_tensors="np")["pixel_values"][0]
    prompt = [5] + [IMAGE] * gen.image_seq_length + [7, 8]
    ours = gen.generate_tokens([prompt], [[image]], max_new_tokens=6)[0]
    np.testing.assert_array_equal(ours, gen.generate_tokens([prompt], [[pixels]], max_new_tokens=6)[0])
    np.testing.assert_allclose(gen._pixels(image, "image"), pixels, atol=1e-5)
