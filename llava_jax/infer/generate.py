"""Batched text generation with a KV cache for LLaVA (and plain LLaMA-family) models: the `Generator` front.

The pieces: `sampling` (next-token choice), `decoding` (the jitted prefill and decode loops, the buckets),
`streaming` (stop strings, streamed text) and `loading` (`load_model`, `load_generator`); their public names are
re-exported here.

    gen = Generator(model, tokenizer, template="llava_v1")
    gen.generate(["USER: <image>\\nWhat is shown? ASSISTANT:"], [[image]], max_new_tokens=64)

How a call runs:
- Prompts are strings (each `<image>` becomes `image_seq_length` image token ids; the text between images
  is tokenized piece by piece, BOS on the first piece only, as the official `tokenizer_image_token`) or
  token id lists already in that expanded form.
- AnyRes models (LLaVA-NeXT, OneVision): a prompt's images (PIL) and OneVision videos (`Video`) become `Tiles`
  (`prepare_media`: pixel tiles and feature taps, OneVision's several-image prompts single tiles); the k-th
  `<image>` (`<video>`) expands to the k-th image's (video's) token count. The batch's tiles are padded to a
  power of two and the taps to a bound of that bucket (`media.pack`), so shapes stay bucketed.
- The batch is left padded to a bucketed length (`bucket_length`: powers of two up to 256, then multiples of
  128), its rows to a power of two and its images to a power of two, at least one per row (padding images
  are masked out), so a long evaluation compiles a handful of programs.
- One jitted prefill runs the vision tower and the prompt through the cache and picks the first token; one
  jitted `jax.lax.while_loop` then decodes until every row has stopped or `max_new_tokens` are out. Both are
  pure functions of the `nnx.split` state.
- A row stops at an end-of-sequence id or at a stop string. Stop strings are cut from the decoded text on
  the host (exact); inside the loop they also end a row early when the generated ids end with the stop
  string's own tokenization.
- Sampling: greedy when temperature == 0, else temperature, then top-k, then top-p (transformers' order and
  rules), drawn with `jax.random.categorical` from an explicit key folded with the step number. The same
  key, prompts and batch give the same output.
- `stream`: decodes step by step from the host and calls `stream(row, text_piece)` as text is produced
  (text that might begin a stop string is held back until it is resolved).
- A generated image token id is embedded as an ordinary token (images enter at the prefill only), as in
  transformers.

Loading: `load_model(path)` reads a Hugging Face folder, our `convert.save` format or a finished training
workdir (through its `export_hf` folder) and picks the template (`default_template`); `load_generator(path)`
returns the `Generator` over it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from PIL import Image

from llava_jax import vision_layout
from llava_jax.data.conversation import IMAGE_TOKEN, VIDEO_TOKEN, Template, get_template, stop_strings
from llava_jax.data.images import ImageConfig, preprocess
from llava_jax.infer.decoding import (Carry, Static, bucket_length, decode_loop, decode_one, decoding_layout,
                                      next_power_of_two, prefill, token_buffer)
from llava_jax.infer import media as media_lib
from llava_jax.infer.loading import ModelLoadError, default_template, load_generator, load_model
from llava_jax.infer.media import Tiles, Video
from llava_jax.infer.sampling import Sampling, filter_logits, next_token
from llava_jax.infer.streaming import IncrementalDecoder, TextStreamer, cut_at_stop

Prompt = str | Sequence[int] | np.ndarray
StreamCallback = Callable[[int, str], None]

# The prefill under its former name (callers count its compiled programs).
_prefill = prefill


@dataclasses.dataclass
class Batch:
    """A padded batch. ids / mask int32 [B, P] (left padded); pixels float32 [N, 3, S, S] or None;
    image_mask bool [N]; done bool [B] (True for padding rows); num_rows: the real rows. AnyRes models: pixels
    are all images' tiles [N, 3, S, S] and `vision` holds "image_taps", "videos" (frames [F, 3, S, S]) and
    "video_taps" (`media.pack`; None where absent); image_mask is None."""

    ids: np.ndarray
    mask: np.ndarray
    pixels: np.ndarray | None
    image_mask: np.ndarray | None
    done: np.ndarray
    num_rows: int
    vision: dict | None = None

    @property
    def image_inputs(self):
        """What the prefill takes besides the pixels: image_mask (LLaVA) or the taps dict (AnyRes)."""
        return self.image_mask if self.vision is None else self.vision


def _default_image_config(model) -> ImageConfig | None:
    vision = getattr(getattr(model, "config", None), "vision", None)
    if vision is None:
        return None
    return ImageConfig.for_tower(vision, aspect="pad")


class Generator:
    """Generates answers from a LLaVA model (or a LLaMA-family causal LM, text only).

    Args:
      model: `LlavaForConditionalGeneration` or `LlamaForCausalLM`.
      tokenizer: a Hugging Face tokenizer of the model (None: token id prompts only, no text output).
      image_config: how PIL images become pixels; default: the tower's size, `aspect="pad"` (LLaVA-1.5).
      template: a conversation template (name or Template); only used for its default stop strings and by
        `prompt()`.
      eos_token_ids: ids that end a row; default the tokenizer's eos_token_id.
      bucket: prompt length -> padded length (default `bucket_length`).
    Decoding runs on `decoding_layout(model)`: per-layer weight buffers. A model from `load_model` already has
    them; a stacked model (fresh from `convert`, or training) is left unchanged and its decoder weights are
    copied, so drop the stacked model when it is no longer needed.
    """

    def __init__(self, model: nnx.Module, tokenizer, *, image_config: ImageConfig | None = None,
                 template: str | Template | None = None, eos_token_ids: Sequence[int] | None = None,
                 bucket: Callable[[int], int] = bucket_length):
        self.model, self.tokenizer = decoding_layout(model), tokenizer
        self.is_llava = hasattr(model, "embed_inputs")
        self.is_anyres = hasattr(model, "get_image_tokens")  # LLaVA-NeXT / OneVision: per-image token counts
        config = model.config
        self.text_config = config.text if self.is_llava else config
        self.image_token_index = config.image_token_index if self.is_llava else None
        self.video_token_index = getattr(config, "video_token_index", None)
        self.image_seq_length = config.image_seq_length if self.is_llava and not self.is_anyres else 0
        self.image_config = image_config or _default_image_config(model)
        self.template = get_template(template) if isinstance(template, str) else template
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos]
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (self.eos_token_ids or (0,))[0])
        self.bucket = bucket
        self.min_buffer = 0  # the token buffer of the warmed-up programs (`warm_up`)
        self._stop_id_cache: dict[tuple[str, ...], tuple[tuple[int, ...], ...]] = {}
        self.graphdef, self.state = nnx.split(self.model)

    @property
    def min_image_tokens(self) -> int:
        """The fewest tokens an image takes: image_seq_length, or an AnyRes model's tile of features."""
        return self.model.config.tile_tokens if self.is_anyres else self.image_seq_length

    @property
    def context_length(self) -> int:
        return self.text_config.max_position_embeddings

    # -------------------------------------------------------------------------------- prompts

    def prompt(self, question: str, num_images: int = 0, num_videos: int = 0) -> str:
        """The generation prompt of a single question, as the official `model_vqa`: each image becomes an
        `<image>\\n` line in front of the question (then each video a `<video>\\n` line), then the template's user
        turn and assistant role."""
        from llava_jax.data.conversation import generation_prompt

        if self.template is None:
            raise ValueError("Generator.prompt needs a template (Generator(..., template='llava_v1'))")
        media = (IMAGE_TOKEN + "\n") * num_images + (VIDEO_TOKEN + "\n") * num_videos
        return generation_prompt(self.template, [media + question])

    def encode(self, prompt: Prompt, media: Sequence[Tiles] = ()) -> np.ndarray:
        """A prompt -> int32 [T]; a string's `<image>` placeholders become `image_seq_length` image token ids.
        AnyRes models: the k-th `<image>` (`<video>`) becomes as many image (video) token ids as the k-th image
        (video) of `media` (`prepare_media`'s output) has tokens."""
        if not isinstance(prompt, str):
            return np.asarray(prompt, np.int32).reshape(-1)
        placeholders = (IMAGE_TOKEN,) + ((VIDEO_TOKEN,) if self.video_token_index is not None else ())
        pieces = re.split("(" + "|".join(map(re.escape, placeholders)) + ")", prompt)  # text, placeholder, text...
        if len(pieces) > 1 and not self.is_llava:
            raise ValueError(f"the prompt has {IMAGE_TOKEN} but the model takes no images: {prompt[:80]!r}")
        counts = self._placeholder_counts(pieces[1::2], media)
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                ids += [self.image_token_index if piece == IMAGE_TOKEN else self.video_token_index] * counts[k // 2]
            else:
                ids += self.tokenizer(piece, add_special_tokens=k == 0).input_ids
        return np.asarray(ids, np.int32)

    def _placeholder_counts(self, placeholders: Sequence[str], media: Sequence[Tiles]) -> list[int]:
        """Token counts of a prompt's `<image>` / `<video>` placeholders, in order."""
        if not self.is_anyres:
            return [self.image_seq_length] * len(placeholders)
        out = []
        for kind, video in ((IMAGE_TOKEN, False), (VIDEO_TOKEN, True)):
            wanted = [k for k, p in enumerate(placeholders) if p == kind]
            have = [m.num_tokens for m in media if m.video == video]
            if len(wanted) != len(have):
                raise ValueError(f"the prompt has {len(wanted)} {kind} placeholder(s) but {len(have)} "
                                 f"{'video' if video else 'image'}(s) were given")
            out += list(zip(wanted, have))
        return [n for _, n in sorted(out)]

    def prepare_media(self, items: Sequence) -> list[Tiles]:
        """AnyRes models: one prompt's PIL images and `Video`s (placeholder order) -> their `Tiles` (pixels and
        token taps; OneVision gives a prompt with several images single-tile images)."""
        if not self.is_anyres:
            raise ValueError("prepare_media: only AnyRes models (LLaVA-NeXT, OneVision) take prepared tiles")
        return media_lib.prepare(self.model.config, items, self.image_config)

    def count_images(self, ids: np.ndarray, where: str) -> int:
        """Images a prompt's ids [T] stand for (checked: whole groups of image_seq_length tokens)."""
        if not self.is_llava:
            return 0
        count = int(np.sum(ids == self.image_token_index))
        if count % self.image_seq_length:
            raise ValueError(f"{where}: {count} image tokens (id {self.image_token_index}) are not a multiple of "
                             f"image_seq_length {self.image_seq_length}")
        return count // self.image_seq_length

    def _pixels(self, image, where: str) -> np.ndarray:
        """A PIL image or pixel values [3, S, S] -> float32 [3, S, S]."""
        size = self.model.config.vision.image_size
        if isinstance(image, Image.Image):
            pixels = preprocess(image, self.image_config)
        else:
            pixels = np.asarray(image, np.float32)
        if pixels.shape != (3, size, size):
            raise ValueError(f"{where}: pixel values of shape {pixels.shape}, the vision tower takes "
                             f"(3, {size}, {size})")
        return pixels

    def make_batch(self, prompts: Sequence[Prompt], images: Sequence[Sequence] | None = None, *,
                   min_rows: int = 1) -> Batch:
        """Tokenizes, checks and pads prompts and their images (see the module docstring); the rows are padded
        to a power of two, at least `min_rows` (a fixed batch size keeps a last, smaller batch compiled)."""
        if not prompts:
            raise ValueError("no prompts given")
        images = [[] for _ in prompts] if images is None else [list(i or []) for i in images]
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        if self.is_anyres:
            return self._anyres_batch(prompts, images, min_rows)
        rows, pixels = [], []
        for r, (prompt, row_images) in enumerate(zip(prompts, images)):
            ids = self.encode(prompt)
            where = f"prompt {r}"
            if ids.size == 0:
                raise ValueError(f"{where} is empty")
            if ids.size > self.context_length:
                raise ValueError(f"{where} has {ids.size} tokens ({self.count_images(ids, where)} image(s) of "
                                 f"{self.image_seq_length}), longer than the model's context of "
                                 f"{self.context_length} tokens")
            wanted = self.count_images(ids, where)
            if wanted != len(row_images):
                raise ValueError(f"{where} has {wanted} {IMAGE_TOKEN} placeholder(s) but {len(row_images)} image(s) "
                                 "were given")
            rows.append(ids)
            pixels += [self._pixels(image, f"{where}, image {k}") for k, image in enumerate(row_images)]
        ids, mask, done = self._pad_rows(rows, min_rows)
        num_rows = ids.shape[0]
        if not pixels:
            return Batch(ids, mask, None, None, done, len(rows))
        n = max(next_power_of_two(len(pixels)), num_rows)  # one image per row compiles once per row count
        stacked = np.zeros((n,) + pixels[0].shape, np.float32)
        stacked[:len(pixels)] = pixels
        return Batch(ids, mask, stacked, np.arange(n) < len(pixels), done, len(rows))

    def _anyres_batch(self, prompts: Sequence[Prompt], images: Sequence[list], min_rows: int) -> Batch:
        """make_batch of an AnyRes model: each row's images / videos prepared (`prepare_media`), the prompt
        expanded by their token counts, all tiles and taps packed into buckets (`media.pack`)."""
        rows, image_tiles, video_tiles = [], [], []
        for r, (prompt, items) in enumerate(zip(prompts, images)):
            where = f"prompt {r}"
            try:
                media = self.prepare_media(items)
                ids = self.encode(prompt, media)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}: {e}") from None
            self._check_anyres_row(ids, media, where)
            rows.append(ids)
            image_tiles += [m for m in media if not m.video]
            video_tiles += [m for m in media if m.video]
        ids, mask, done = self._pad_rows(rows, min_rows)
        config, pixels, vision = self.model.config, None, {"image_taps": None, "videos": None, "video_taps": None}
        if image_tiles:
            pixels, vision["image_taps"] = media_lib.pack(config, image_tiles)
        if video_tiles:
            vision["videos"], vision["video_taps"] = media_lib.pack(config, video_tiles)
        return Batch(ids, mask, pixels, None, done, len(rows), vision)

    def _check_anyres_row(self, ids: np.ndarray, media: Sequence[Tiles], where: str) -> None:
        if ids.size == 0:
            raise ValueError(f"{where} is empty")
        if ids.size > self.context_length:
            raise ValueError(f"{where} has {ids.size} tokens ({sum(m.num_tokens for m in media)} of its images / "
                             f"videos), longer than the model's context of {self.context_length} tokens")
        for index, video, what in ((self.image_token_index, False, "image"), (self.video_token_index, True, "video")):
            have = int(np.sum(ids == index)) if index is not None else 0
            need = sum(m.num_tokens for m in media if m.video == video)
            if have != need:
                raise ValueError(f"{where} has {have} {what} tokens (id {index}) but its {what}s give {need}")

    def _pad_rows(self, rows: Sequence[np.ndarray], min_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of ids -> (ids, mask) int32 [B, P] left padded, done bool [B] (B a power of two >= min_rows)."""
        num_rows, width = next_power_of_two(max(len(rows), min_rows)), self.bucket(max(r.size for r in rows))
        ids = np.full((num_rows, width), self.pad_id, np.int32)
        mask = np.zeros((num_rows, width), np.int32)
        for r in range(num_rows):
            row = rows[r] if r < len(rows) else np.asarray([self.pad_id], np.int32)  # padding rows: one token
            ids[r, width - row.size:], mask[r, width - row.size:] = row, 1
        return ids, mask, np.arange(num_rows) >= len(rows)

    def _stop_ids(self, stop: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """Token sequences of the stop strings that tokenize to something decoding back to exactly themselves
        (ending a row on them is then safe: the decoded text holds the stop string and is cut there)."""
        stop = tuple(stop)
        if stop not in self._stop_id_cache:  # tokenized once, not per batch
            out = []
            for s in stop:
                ids = self.tokenizer(s, add_special_tokens=False).input_ids
                if ids and self.tokenizer.decode(ids) == s:
                    out.append(tuple(int(i) for i in ids))
            self._stop_id_cache[stop] = tuple(out)
        return self._stop_id_cache[stop]

    # -------------------------------------------------------------------------------- generation

    def generate_tokens(self, prompts: Sequence[Prompt], images: Sequence[Sequence] | None = None, *,
                        max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                        rng: jax.Array | int | None = None, stop: Sequence[str] | None = None,
                        stream: StreamCallback | None = None, min_rows: int = 1) -> list[np.ndarray]:
        """New token ids per prompt, int32 [n_i]; a row that stopped ends with its EOS / stop tokens."""
        tokens, lengths = self._run(prompts, images, max_new_tokens, Sampling(temperature, top_k, top_p), rng,
                                    self._stops(stop), stream, min_rows)
        return [tokens[r, :lengths[r]] for r in range(len(prompts))]

    def generate(self, prompts: Sequence[Prompt], images: Sequence[Sequence] | None = None, *,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 rng: jax.Array | int | None = None, stop: Sequence[str] | None = None,
                 stream: StreamCallback | None = None, min_rows: int = 1) -> list[str]:
        """Answers to a batch of prompts.

        Args:
          prompts: strings with `<image>` placeholders, or token id lists (images already expanded).
          images: per prompt, a list of PIL images (or pixel values [3, S, S]) in placeholder order.
          max_new_tokens: at most this many new tokens per prompt.
          temperature, top_p, top_k: sampling (temperature 0 = greedy).
          rng: a jax PRNG key or an int seed (default 0) for sampling.
          stop: strings that end an answer; default: the template's end-of-turn, none without a template.
          stream: called as `stream(row, text_piece)` while decoding (step by step from the host).
          min_rows: pad the batch to at least this many rows (see `make_batch`).
        Returns:
          The decoded answers without the EOS and without the stop string and anything after it.
        """
        stop = self._stops(stop)
        tokens, lengths = self._run(prompts, images, max_new_tokens, Sampling(temperature, top_k, top_p), rng,
                                    stop, stream, min_rows)
        return [self.text_of(tokens[r, :lengths[r]], stop) for r in range(len(prompts))]

    def _stops(self, stop: Sequence[str] | None) -> tuple[str, ...]:
        if stop is None:
            stop = stop_strings(self.template) if self.template is not None else ()
        return tuple(s for s in stop if s)

    def text_of(self, tokens: np.ndarray, stop: Sequence[str] = ()) -> str:
        """Decoded text of new tokens [n]: up to the first EOS, cut at the first stop string."""
        tokens = np.asarray(tokens)
        ends = np.nonzero(np.isin(tokens, self.eos_token_ids))[0]
        if ends.size:
            tokens = tokens[:ends[0]]
        text = self.tokenizer.decode(tokens.tolist(), skip_special_tokens=True)
        return cut_at_stop(text, stop)

    def static(self, batch: Batch, greedy: bool, stop_ids: tuple = ()) -> Static:
        """The compile-time settings of a batch's programs."""
        last = batch.ids[:, -1]
        last_is_text = self.image_token_index is None or not (
            (last == self.image_token_index) | (last == (self.video_token_index or -1))).any()
        return Static(self.graphdef, greedy, self.eos_token_ids, stop_ids, self.pad_id,
                       split_prefill=last_is_text and batch.ids.shape[1] > 1)

    def _start(self, prompts, images, max_new_tokens, sampling: Sampling, rng, stop: tuple[str, ...],
               min_rows: int = 1, ignore_eos: bool = False, buffer: int | None = None):
        """Batches the prompts and runs the prefill -> (carry, key, sampling arrays, static, real rows)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return self._prefill(self.make_batch(prompts, images, min_rows=min_rows), max_new_tokens, sampling, rng,
                             stop, ignore_eos, buffer)

    def _prefill(self, batch: Batch, max_new_tokens, sampling: Sampling, rng, stop: tuple[str, ...],
                 ignore_eos: bool = False, buffer: int | None = None):
        key = rng if isinstance(rng, jax.Array) else jax.random.key(0 if rng is None else int(rng))
        static = self.static(batch, sampling.greedy, self._stop_ids(stop))
        if ignore_eos:
            static = dataclasses.replace(static, eos_ids=())
        params = sampling.arrays()
        buffer = max(buffer or 0, self.min_buffer, token_buffer(max_new_tokens))
        carry = prefill(self.state, batch.ids, batch.mask, batch.pixels, batch.image_inputs, batch.done, key, params,
                        np.int32(max_new_tokens), static=static, buffer=buffer)
        return carry, key, params, static, batch.num_rows

    def warm_up(self, *, rows: Sequence[int] = (1,), images: Sequence[int] = (0,), max_new_tokens: int = 128,
                greedy: bool = True, stream: bool = False, max_prompt_tokens: int | None = None,
                buffer: int | None = None, progress: Callable[[str], None] | None = None,
                videos: Sequence[int] = (0,), video_frames: int = 32) -> int:
        """Compiles, before any request, the programs requests of these shapes run, so that none compiles on
        the request path: for each row count, images per row and prompt bucket (from the shortest prompt with
        those images up to `max_prompt_tokens`, default the context), the prefill and the decode loop (`stream`:
        the one-step decode) for the default stop strings and `token_buffer(max_new_tokens)` (or `buffer`), which
        later calls then use for any smaller max_new_tokens. AnyRes models: images per row stand for tile buckets
        (`_warm_up_anyres`); OneVision also takes `videos` per row of at most `video_frames` frames.
        `progress(line)` is called before each shape; returns how many shapes were compiled."""
        self.min_buffer = max(self.min_buffer, buffer or token_buffer(max_new_tokens))
        if self.is_anyres:
            return self._warm_up_anyres(rows, images, greedy, stream, max_prompt_tokens, progress, videos,
                                        video_frames)
        if any(videos):
            raise ValueError("warm_up: videos need a LLaVA-OneVision model")
        shapes = [(r, i, p) for r in rows for i in images
                  for p in self.prompt_buckets(i, max_prompt_tokens or self.context_length)]
        sampling, stop = Sampling(0.0 if greedy else 1.0), self._stops(None)
        for k, (num_rows, num_images, width) in enumerate(shapes):
            if progress is not None:
                progress(f"compiling {k + 1}/{len(shapes)}: {num_rows} row(s), {num_images} image(s), prompt "
                         f"bucket {width}")
            carry, key, params, static, _ = self._prefill(self._warm_llava_batch(num_rows, num_images, width), 1,
                                                          sampling, None, stop)
            (decode_one if stream else decode_loop)(self.state, carry, key, params, static=static)
        return len(shapes)

    def _warm_llava_batch(self, num_rows: int, num_images: int, width: int) -> Batch:
        """A batch of `num_rows` prompts of bucket `width` with `num_images` images each (values do not matter)."""
        prompt = np.full(width, self.pad_id, np.int32)
        prompt[1:1 + num_images * self.image_seq_length] = self.image_token_index or 0
        pixels = [np.zeros((3,) + (self.model.config.vision.image_size,) * 2, np.float32)] * num_images \
            if num_images else []  # a text-only model has no vision config
        return self.make_batch([prompt] * num_rows, [pixels] * num_rows)

    def _warm_up_anyres(self, rows: Sequence[int], images: Sequence[int], greedy: bool, stream: bool,
                        max_prompt_tokens: int | None, progress: Callable[[str], None] | None,
                        videos: Sequence[int], video_frames: int) -> int:
        """warm_up of an AnyRes model: for up to `i` images and `v` videos a row, every tile bucket from 1 to the
        bucket of `rows * i` largest images (`media.max_tiles_per_image`) and every frame bucket from 1 to that
        of `rows * v * video_frames` frames, with every prompt bucket."""
        if any(videos) and self.video_token_index is None:
            raise ValueError("warm_up: videos need a LLaVA-OneVision model")
        shapes = self.anyres_shapes(rows, images, videos, video_frames, max_prompt_tokens or self.context_length)
        sampling, stop = Sampling(0.0 if greedy else 1.0), self._stops(None)
        for k, (num_rows, num_tiles, num_frames, width) in enumerate(sorted(shapes)):
            if progress is not None:
                progress(f"compiling {k + 1}/{len(shapes)}: {num_rows} row(s), {num_tiles} image tile(s), "
                         f"{num_frames} video frame(s), prompt bucket {width}")
            batch = self._warm_batch(num_rows, num_tiles, num_frames, width)
            carry, key, params, static, _ = self._prefill(batch, 1, sampling, None, stop)
            (decode_one if stream else decode_loop)(self.state, carry, key, params, static=static)
        return len(shapes)

    def anyres_shapes(self, rows: Sequence[int], images: Sequence[int], videos: Sequence[int], video_frames: int,
                      max_prompt_tokens: int) -> list[tuple[int, int, int, int]]:
        """(rows, tile bucket, frame bucket, prompt bucket) of AnyRes batches of `rows` prompts of at most
        `max_prompt_tokens` tokens with up to `i` images and `v` videos each: every tile bucket from 1 to the
        bucket of `rows * i` largest images (`media.max_tiles_per_image`) and every frame bucket from 1 to that
        of `rows * v * video_frames` frames."""
        most_tiles = media_lib.max_tiles_per_image(self.model.config)
        shapes = set()
        for r in rows:
            for i in images:
                for v in videos:
                    buckets = [_buckets_up_to(r * i * most_tiles), _buckets_up_to(r * v * video_frames)]
                    prompts = self.prompt_buckets(min(i + v, 1), max_prompt_tokens)
                    shapes |= {(r, t, f, p) for t in buckets[0] for f in buckets[1] for p in prompts}
        return sorted(shapes)

    def _warm_batch(self, num_rows: int, num_tiles: int, num_frames: int, width: int) -> Batch:
        """A batch of the shapes real AnyRes batches of `num_tiles` image tiles and `num_frames` video frames
        (buckets) take (values do not matter)."""
        ids = np.full((num_rows, width), self.pad_id, np.int32)
        mask, done = np.ones((num_rows, width), np.int32), np.zeros(num_rows, bool)
        vision = {"image_taps": None, "videos": None, "video_taps": None}
        pixels, side, index, weight = None, self.model.config.vision.image_size, *vision_layout.gather_taps([0])
        if num_tiles:
            tiles = Tiles(np.zeros((num_tiles, 3, side, side), np.float32), index, weight)
            pixels, vision["image_taps"] = media_lib.pack(self.model.config, [tiles])
        if num_frames:
            frames = Tiles(np.zeros((num_frames, 3, side, side), np.float32), index, weight, video=True)
            vision["videos"], vision["video_taps"] = media_lib.pack(self.model.config, [frames])
        return Batch(ids, mask, pixels, None, done, num_rows, vision)

    def prompt_buckets(self, num_images: int, max_tokens: int) -> list[int]:
        """The padded prompt lengths of prompts with `num_images` images and at most `max_tokens` tokens."""
        shortest = num_images * self.image_seq_length + 2  # BOS, the images, a text token
        longest = min(max_tokens, self.context_length)
        return sorted({self.bucket(n) for n in range(shortest, longest + 1)})

    def _run(self, prompts, images, max_new_tokens, sampling: Sampling, rng, stop: tuple[str, ...],
             stream: StreamCallback | None, min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """-> (tokens int32 [B, max_new_tokens], lengths int32 [B]) for the real rows."""
        if stream is not None:
            return self._stream(self._steps(prompts, images, max_new_tokens, sampling, rng, stop, min_rows), stop,
                                stream, len(prompts))
        carry, key, params, static, num_rows = self._start(prompts, images, max_new_tokens, sampling, rng, stop,
                                                           min_rows)
        carry = decode_loop(self.state, carry, key, params, static=static)
        tokens, lengths = jax.device_get((carry.tokens, carry.lengths))
        return tokens[:num_rows, :max_new_tokens], lengths[:num_rows]

    def decode_steps(self, prompts: Sequence[Prompt], images: Sequence[Sequence] | None = None, *,
                     max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     rng: jax.Array | int | None = None, stop: Sequence[str] | None = None, min_rows: int = 1,
                     ignore_eos: bool = False, buffer: int | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Decodes one step at a time, driven from the host (streaming, serving).

        Same arguments as `generate`; `ignore_eos`: rows go on past an EOS (benchmarks); `buffer`: the token
        buffer to compile for (at least `token_buffer(max_new_tokens)`; a server keeps it fixed). Yields
        `(tokens int32 [R, max_new_tokens], lengths int32 [R], done bool [R])` of the R real rows after the
        prefill and after every decode step, until every row is done (EOS or a stop string's tokens) or the
        token buffer is full. A caller that needs no more steps stops iterating.
        """
        return self._steps(prompts, images, max_new_tokens, Sampling(temperature, top_k, top_p), rng,
                           self._stops(stop), min_rows, ignore_eos, buffer)

    def _steps(self, prompts, images, max_new_tokens, sampling: Sampling, rng, stop: tuple[str, ...],
               min_rows: int = 1, ignore_eos: bool = False, buffer: int | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        carry, key, params, static, num_rows = self._start(prompts, images, max_new_tokens, sampling, rng, stop,
                                                           min_rows, ignore_eos, buffer)
        while True:
            tokens, lengths, done = jax.device_get((carry.tokens, carry.lengths, carry.done))
            yield tokens[:num_rows, :max_new_tokens], lengths[:num_rows], done[:num_rows]
            if done.all() or int(carry.step) >= max_new_tokens:
                return
            carry = decode_one(self.state, carry, key, params, static=static)

    def _stream(self, steps: Iterator, stop: tuple[str, ...], stream: StreamCallback,
                num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        streamers = [TextStreamer(self, stop, lambda piece, r=r: stream(r, piece)) for r in range(num_rows)]
        for tokens, lengths, done in steps:
            for r, streamer in enumerate(streamers):
                streamer.update(tokens[r, :lengths[r]])
            if all(d or s.stopped for d, s in zip(done, streamers)):
                break
        for streamer in streamers:
            streamer.flush()
        return tokens, lengths



def _buckets_up_to(n: int) -> list[int]:
    """The power-of-two buckets 1, 2, 4, ... up to that of `n` ([0] for n = 0: nothing to pack)."""
    return [1 << k for k in range(next_power_of_two(n).bit_length())] if n else [0]


__all__ = ["Generator", "Batch", "Sampling", "ModelLoadError", "TextStreamer", "bucket_length", "decoding_layout",
           "default_template", "filter_logits", "load_generator", "load_model", "next_token", "next_power_of_two",
           "cut_at_stop", "Carry", "Static", "IncrementalDecoder", "Tiles", "Video", "VIDEO_TOKEN"]
