"""Incremental streaming detokenization equals full decoding, with constant work per token, on unicode texts
(multi-byte characters, byte-fallback tokens) with the real LLaMA-2 tokenizer."""

from __future__ import annotations

import types

import numpy as np
import pytest
import transformers

from llava_jax.infer.streaming import IncrementalDecoder, TextStreamer, cut_at_stop

FIXED = ["Hello world! A plain answer.", "naïve café — déjà vu… «quotes» ½ °C",
         "日本語のテキストと中文字符，还有한국어 문장.",
         "emoji 😀👍🏽 and a family 👩‍👩‍👧‍👦 with joiners", "rare 𠜎𠜱𠝹 and Ge'ez ጠጡጢ, Devanagari नमस्ते",
         "  leading spaces,\ttabs\nand\n\nnew lines  ", "combining e\u0301 a\u0308 and 🇫🇷🇯🇵 flags"]
RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
          (0xAC00, 0xD7A3), (0x1F300, 0x1F6FF), (0x20000, 0x2A6DF)]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        chars = []
        for _ in range(int(rng.integers(5, 60))):
            lo, hi = RANGES[int(rng.integers(len(RANGES)))]
            chars.append(chr(int(rng.integers(lo, hi + 1))) if rng.random() < 0.8 else " ")
        texts.append("".join(chars))
    return texts


@pytest.fixture
def tokenizer(llama2_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(str(llama2_tokenizer_dir))


def windows(tokenizer):
    """The tokenizer, with the lengths of the id lists it is asked to decode recorded."""
    sizes = []
    decode = tokenizer.decode

    def recorded(ids, **kw):
        sizes.append(len(ids))
        return decode(ids, **kw)

    return types.SimpleNamespace(decode=recorded), sizes


def test_incremental_decoding_equals_full_decoding_token_by_token(tokenizer):
    texts = FIXED + random_texts(40)
    byte_tokens = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        byte_tokens += sum(t.startswith("<0x") for t in tokenizer.convert_ids_to_tokens(ids))
        full = tokenizer.decode(ids, skip_special_tokens=True)
        recorder, sizes = windows(tokenizer)
        decoder = IncrementalDecoder(recorder)
        for i in ids:
            decoder.push([i])
            assert full.startswith(decoder.text), text  # never a character that later changes
        decoder.finish()
        assert decoder.text == full, text
        assert max(sizes) <= 12, (text, max(sizes))  # a window, never the whole text
    assert byte_tokens > 50  # the texts exercise byte-fallback characters


def test_constant_work_per_token_on_a_long_text(tokenizer):
    text = " ".join(FIXED * 20)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    recorder, sizes = windows(tokenizer)
    decoder = IncrementalDecoder(recorder)
    for i in ids:
        decoder.push([i])
    decoder.finish()
    assert len(ids) > 1000 and decoder.text == tokenizer.decode(ids)
    assert sum(sizes) < 12 * len(ids)  # linear in the length (a full decode per step is quadratic)


@pytest.mark.parametrize("stop", [(), ("</s>",), ("。", "###"), ("👍",)])
def test_streamed_pieces_equal_the_cut_full_text(tokenizer, stop):
    eos = tokenizer.eos_token_id
    generator = types.SimpleNamespace(tokenizer=tokenizer, eos_token_ids=(eos,))
    for text in FIXED + random_texts(10, seed=1):
        ids = tokenizer(text + " 。 ### more", add_special_tokens=False).input_ids + [eos]
        pieces = []
        streamer = TextStreamer(generator, stop, pieces.append)
        for k in range(1, len(ids) + 1):
            streamer.update(np.asarray(ids[:k]))
            assert all(p for p in pieces)
        streamer.update(np.asarray(ids))  # the same tokens again change nothing
        streamer.flush()
        expected = cut_at_stop(tokenizer.decode(ids[:-1], skip_special_tokens=True), stop)
        assert "".join(pieces) == streamer.text == expected, text
        assert streamer.stopped == (len(expected) < len(tokenizer.decode(ids[:-1], skip_special_tokens=True)))
