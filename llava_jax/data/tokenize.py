"""A conversation sample -> `input_ids` and answer-only `labels`.

The prompt is rendered into segments (`conversation.training_segments`); the supervised segments (each
answer and its end-of-turn; for `plain` the caption and its "\\n") are found in the token stream through
the tokenizer's character offsets, so the mask is right whatever the tokenizer does at segment borders
(legacy and non-legacy LLaMA SentencePiece, byte-level BPE). A token is supervised when it covers at
least one supervised character.

The text is tokenized as the official `tokenizer_image_token` does: split at each `<image>`, each piece
tokenized on its own (BOS only on the first), and each `<image>` expanded to `image_seq_length` copies of
the image token id, the transformers convention the model takes. For images of any resolution (LLaVA-NeXT,
OneVision) `image_seq_length` is one count per `<image>`, and a video sample's `<image>` may expand to
OneVision's video token (`placeholder_id`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from tokenizers import AddedToken

from llava_jax.data.conversation import IMAGE_TOKEN, Template, move_image_to_front, training_segments
from llava_jax.data.errors import BadSample

IGNORE_INDEX = -100
_ROLES = ("human", "gpt")


@dataclasses.dataclass(frozen=True)
class TokenizedSample:
    """One training sample.

    Attributes:
      input_ids: np.int32 [T], each image expanded to its `image_seq_length` image token ids.
      labels: np.int32 [T], the token itself where supervised, IGNORE_INDEX (-100) elsewhere.
      num_images: how many images the sample's placeholders stand for, in order.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    num_images: int


def add_image_token(tokenizer) -> int:
    """Adds `<image>` as a special token when the tokenizer lacks it; returns its id."""
    if _single_token_id(tokenizer, IMAGE_TOKEN) is None:
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return _single_token_id(tokenizer, IMAGE_TOKEN)


def pad_token_id(tokenizer) -> int:
    """The id a batch is padded with: the tokenizer's pad token, else its unk token (the official LLaVA sets
    pad_token = unk_token), else its eos token (what transformers' generate pads with). Padded positions are
    out of attention and loss, so any real token does; a tokenizer with none of the three is refused."""
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has no pad, unk or eos token to pad batches with: set "
                     "PipelineConfig.pad_token_id")


def _single_token_id(tokenizer, token: str) -> int | None:
    ids = tokenizer(token, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def validate_conversations(conversations: Sequence[dict], sample_id: str | None = None) -> None:
    """Checks the raw structure: turns `{"from", "value"}`, human first, human / gpt alternating, no empty value.

    Raises:
      BadSample: `empty_text`, `roles_out_of_order`, `image_in_answer` or `no_assistant_turn`.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise BadSample("empty_text", "`conversations` must be a non-empty list of turns", sample_id)
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadSample("empty_text", f"turn {i} must be a dict with 'from' and 'value', got {turn!r}",
                            sample_id)
        value = turn["value"]
        if not isinstance(value, str) or not value.strip():
            raise BadSample("empty_text", f"turn {i} ('from': {turn['from']!r}) has an empty 'value'", sample_id)
        if turn["from"] != _ROLES[i % 2]:
            raise BadSample("roles_out_of_order",
                            f"turn {i} is from {turn['from']!r}, expected {_ROLES[i % 2]!r} "
                            "(turns alternate human / gpt, starting with human)", sample_id)
        if turn["from"] == "gpt" and IMAGE_TOKEN in value:
            raise BadSample("image_in_answer", f"turn {i} (gpt) contains {IMAGE_TOKEN}", sample_id)
    if len(conversations) < 2:
        raise BadSample("no_assistant_turn", "the conversation has no gpt turn", sample_id)


IMAGE_PLACEMENTS = ("llava", "next")


def _place_images(value: str, placement: str = "llava") -> str:
    """The official placement of a turn's single `<image>` (moved to the front, then "\\n"); a turn with several
    keeps them in order. "next" (LLaVA-NeXT's `preprocess_multimodal`) leaves a turn that starts with it as is."""
    if value.count(IMAGE_TOKEN) != 1 or (placement == "next" and value.startswith(IMAGE_TOKEN)):
        return value
    return move_image_to_front(value)


def _supervised_chars(segments) -> tuple[str, np.ndarray]:
    """The prompt text and a bool [len(text)] mask of the supervised characters."""
    text = "".join(s.text for s in segments)
    mask = np.zeros(len(text), bool)
    start = 0
    for s in segments:
        mask[start:start + len(s.text)] = s.supervised
        start += len(s.text)
    return text, mask


def _tokenize_with_offsets(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list]:
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise ValueError(f"{type(tokenizer).__name__} gives no character offsets; use a fast tokenizer") from e
    return enc["input_ids"], enc["offset_mapping"]


def _tokenize(text: str, supervised_chars: np.ndarray, tokenizer, image_token_id: int,
              image_seq_lengths: Sequence[int]) -> tuple[list[int], list[bool]]:
    """Token ids [T] and which of them are supervised [T], the k-th `<image>` expanded to
    image_seq_lengths[k] copies of `image_token_id`."""
    supervised_before = np.concatenate([[0], np.cumsum(supervised_chars)])  # [len(text) + 1]
    ids, supervised = [], []
    base = 0
    for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if k > 0:
            ids += [image_token_id] * image_seq_lengths[k - 1]
            supervised += [False] * image_seq_lengths[k - 1]
            base += len(IMAGE_TOKEN)
        chunk_ids, offsets = _tokenize_with_offsets(tokenizer, chunk, add_special_tokens=k == 0)
        ids += chunk_ids
        supervised += _covers_any(supervised_before, np.asarray(offsets, np.int64).reshape(-1, 2) + base).tolist()
        base += len(chunk)
    return ids, supervised


def _covers_any(supervised_before: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Whether each character span [N, 2] holds a supervised character; empty spans never do. -> bool [N]"""
    return supervised_before[spans[:, 1]] > supervised_before[spans[:, 0]]


def _check_image_token(tokenizer, image_token_id: int) -> None:
    found = _single_token_id(tokenizer, IMAGE_TOKEN)
    if found != image_token_id:
        raise ValueError(f"the tokenizer maps {IMAGE_TOKEN} to {found}, expected image_token_id={image_token_id}; "
                         "call add_image_token(tokenizer) and use the id it returns")


def _image_seq_lengths(image_seq_length: int | Sequence[int], num_images: int, sample_id: str | None
                       ) -> list[int]:
    """One token count per image: an int for every image, or the given counts (one per `<image>`)."""
    if isinstance(image_seq_length, (int, np.integer)):
        return [int(image_seq_length)] * num_images
    counts = [int(n) for n in image_seq_length]
    if len(counts) != num_images:
        raise BadSample("image_count_mismatch", f"{len(counts)} images but {num_images} {IMAGE_TOKEN} "
                        "placeholders in the conversation", sample_id)
    return counts


def tokenize_conversation(conversations: Sequence[dict], tokenizer, template: Template, *, image_token_id: int,
                          image_seq_length: int | Sequence[int], max_length: int, sample_id: str | None = None,
                          max_images: int | None = None, placeholder_id: int | None = None,
                          image_placement: str = "llava") -> TokenizedSample:
    """Tokenizes one sample with answer-only labels.

    Args:
      conversations: the LLaVA turns `[{"from": "human" | "gpt", "value": str}, ...]`.
      tokenizer: a fast Hugging Face tokenizer that has `<image>` (see `add_image_token`).
      template: the conversation template (`plain` for stage 1, `vicuna_v1` for stage 2).
      image_token_id: the id of `<image>` in `tokenizer`.
      image_seq_length: image features per image (576 for CLIP ViT-L/14-336), or one count per `<image>`
        in prompt order (images of any resolution); a count list of another length is `image_count_mismatch`.
      max_length: the longest sample kept, image tokens included; longer ones are cut at the end.
      sample_id: the dataset id, named in errors.
      max_images: drop samples with more images than this (None: no cap).
      placeholder_id: the id each `<image>` expands to (None: image_token_id; OneVision's video token for
        a video sample).
      image_placement: "llava" (LLaVA-1.5) or "next" (LLaVA-NeXT / OneVision data): how a turn's single
        `<image>` is moved to the front (`_place_images`).

    Raises:
      BadSample: the structural reasons of `validate_conversations`, `too_many_images`,
        `image_tokens_truncated` (an image would not fit in `max_length`) or `no_supervised_tokens`.
    """
    validate_conversations(conversations, sample_id)
    _check_image_token(tokenizer, image_token_id)
    if image_placement not in IMAGE_PLACEMENTS:
        raise ValueError(f"image_placement must be one of {IMAGE_PLACEMENTS}, got {image_placement!r}")
    messages = [_place_images(turn["value"], image_placement) for turn in conversations]
    num_images = sum(m.count(IMAGE_TOKEN) for m in messages)
    if max_images is not None and num_images > max_images:
        raise BadSample("too_many_images", f"{num_images} images, at most {max_images} allowed", sample_id)

    counts = _image_seq_lengths(image_seq_length, num_images, sample_id)
    expand_id = image_token_id if placeholder_id is None else placeholder_id
    text, supervised_chars = _supervised_chars(training_segments(template, messages))
    ids, supervised = _tokenize(text, supervised_chars, tokenizer, expand_id, counts)
    input_ids = np.asarray(ids, np.int32)
    labels = np.where(np.asarray(supervised, bool), input_ids, IGNORE_INDEX).astype(np.int32)

    if len(input_ids) > max_length:
        if (input_ids[max_length:] == expand_id).any():
            raise BadSample("image_tokens_truncated",
                            f"{len(input_ids)} tokens with {num_images} image(s) ({sum(counts)} image tokens) "
                            f"do not fit in max_length={max_length}", sample_id)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if not (labels != IGNORE_INDEX).any():
        raise BadSample("no_supervised_tokens",
                        f"no answer token within the first {max_length} tokens", sample_id)
    return TokenizedSample(input_ids=input_ids, labels=labels, num_images=num_images)
