"""Batched text generation with a KV cache for LLaVA (and plain LLaMA-family) models.

    gen = Generator(model, tokenizer, template="llava_v1")
    gen.generate(["USER: <image>\\nWhat is shown? ASSISTANT:"], [[image]], max_new_tokens=64)

How a call runs:
- Prompts are strings (each `<image>` becomes `image_seq_length` image token ids; the text between images
  is tokenized piece by piece, BOS on the first piece only, as the official `tokenizer_image_token`) or
  token id lists already in that expanded form.
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
workdir (through its `export_hf` folder) and picks the template (`default_template`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from llava_jax.data.conversation import IMAGE_TOKEN, Template, get_template, stop_strings
from llava_jax.data.images import ImageConfig, preprocess

Prompt = str | Sequence[int] | np.ndarray
StreamCallback = Callable[[int, str], None]


# ------------------------------------------------------------------------------------------ shapes


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_length(n: int) -> int:
    """Padded prompt length for `n` tokens: powers of two (at least 16) up to 256, then multiples of 128."""
    if n <= 256:
        return max(16, next_power_of_two(n))
    return -(-n // 128) * 128


# ------------------------------------------------------------------------------------------ sampling


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """transformers' warpers in their order: logits / temperature, top-k, then top-p (nucleus).

    logits float32 [B, V]; temperature > 0; top_k int (0 = off; ties with the k-th value are kept);
    top_p in (0, 1] (1 = off; the smallest set of most likely tokens whose mass reaches top_p, at least one).
    Returns [B, V] with the removed tokens at -inf.
    """
    logits = logits / temperature
    descending = -jnp.sort(-logits, axis=-1)
    vocab = logits.shape[-1]
    kth = jnp.take(descending, jnp.clip(top_k, 1, vocab) - 1, axis=-1)[..., None]
    logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
    descending = jnp.where((top_k > 0) & (descending < kth), -jnp.inf, descending)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V], exclusive
    kept = (mass_before < top_p) | (jnp.arange(vocab) == 0)
    # The smallest kept value in descending order is the threshold.
    threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((top_p < 1.0) & (logits < threshold), -jnp.inf, logits)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax); otherwise sampled after `filter_logits`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return (jnp.float32(max(self.temperature, 1e-6)), jnp.int32(self.top_k), jnp.float32(self.top_p))


def next_token(logits: jax.Array, key: jax.Array, params: tuple, greedy: bool) -> jax.Array:
    """logits float32 [B, V] -> token ids int32 [B]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, *params), axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------------------ jitted programs


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the compiled programs specialize on besides array shapes."""

    graphdef: nnx.GraphDef
    greedy: bool
    eos_ids: tuple[int, ...]
    stop_ids: tuple[tuple[int, ...], ...]
    pad_id: int
    split_prefill: bool = False  # prefill all but the last column, then the last (a text token in every row)


def _decode(model, cache, ids, mask=None, pixels=None, image_mask=None):
    """model.decode for LLaVA and for plain causal LMs (which take no images)."""
    if hasattr(model, "embed_inputs"):
        return model.decode(cache, ids, pixels, attention_mask=mask, image_mask=image_mask)
    return model.decode(cache, ids, attention_mask=mask)


def _language_model(model):
    """The decoder that embeds generated tokens: a generated image token id is an ordinary token there, as in
    transformers (images enter at the prefill only)."""
    return getattr(model, "language_model", model)


def decoding_layout(model):
    """`model` with each decoder layer in its own weight buffers (`LlamaModel.unstack_layers`), the one layout
    `Generator` decodes with: a layer loop over stacked weights copies each layer's slice every step, so a
    memory-bound GPU decode step moves about twice the bytes (H100, 7B bf16, batch 1: 15.9 -> 6.4 ms).
    A stacked model is left as it is and a copy is returned (new modules; the decoder's weights are copied
    into per-layer buffers); an unstacked one is returned itself."""
    if isinstance(_language_model(model).model.layers, nnx.List):
        return model
    graphdef, state = nnx.split(model)
    decoder = nnx.merge(graphdef, state)  # new modules over the same arrays
    _language_model(decoder).model.unstack_layers()
    return decoder


def _stopped(static: _Static, tokens: jax.Array, step: jax.Array) -> jax.Array:
    """Whether each row ends at `step`: tokens int32 [B, N] (step = the last written column) -> bool [B]."""
    last = tokens[:, step]
    stop = jnp.isin(last, jnp.asarray(static.eos_ids, jnp.int32)) if static.eos_ids else jnp.zeros_like(last, bool)
    for seq in static.stop_ids:
        n = len(seq)
        start = jnp.maximum(step - n + 1, 0)
        tail = jax.lax.dynamic_slice_in_dim(tokens, start, n, axis=1)
        stop |= (step + 1 >= n) & jnp.all(tail == jnp.asarray(seq, jnp.int32), axis=1)
    return stop


@functools.partial(jax.jit, static_argnames=("static", "cache_length", "max_new_tokens"))
def _prefill(state, ids, mask, pixels, image_mask, done, key, sampling, *, static: _Static, cache_length: int,
             max_new_tokens: int):
    """Prompt ids [B, P] (left padded, mask [B, P]) -> (Carry after the first new token)."""
    model = nnx.merge(static.graphdef, state)
    cache = model.init_cache(ids.shape[0], cache_length)
    if static.split_prefill:  # the logits of all but the last position are never computed (dead code)
        _, cache = _decode(model, cache, ids[:, :-1], mask[:, :-1], pixels, image_mask)
        logits, cache = _language_model(model).decode(cache, ids[:, -1:], attention_mask=mask[:, -1:])
    else:
        logits, cache = _decode(model, cache, ids, mask, pixels, image_mask)
    token = next_token(logits[:, -1], jax.random.fold_in(key, 0), sampling, static.greedy)
    token = jnp.where(done, static.pad_id, token)
    tokens = jnp.full((ids.shape[0], max_new_tokens), static.pad_id, jnp.int32).at[:, 0].set(token)
    lengths = jnp.where(done, 0, 1).astype(jnp.int32)
    done = done | _stopped(static, tokens, jnp.int32(0))
    return _Carry(cache, tokens, lengths, done, jnp.int32(1))


class _Carry(NamedTuple):
    """Decode state: cache, tokens int32 [B, N], lengths int32 [B], done bool [B], step int32 (next column)."""

    cache: object
    tokens: jax.Array
    lengths: jax.Array
    done: jax.Array
    step: jax.Array


def _step(static: _Static, model, carry: _Carry, key, sampling) -> _Carry:
    """Feeds every row's last token and writes the next one at column `carry.step`."""
    step, tokens, done = carry.step, carry.tokens, carry.done
    last = jax.lax.dynamic_index_in_dim(tokens, step - 1, axis=1, keepdims=True)  # [B, 1]
    logits, cache = _language_model(model).decode(carry.cache, last)
    token = next_token(logits[:, -1], jax.random.fold_in(key, step), sampling, static.greedy)
    token = jnp.where(done, static.pad_id, token)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, axis=1)
    lengths = carry.lengths + jnp.where(done, 0, 1)
    done = done | _stopped(static, tokens, step)
    return _Carry(cache, tokens, lengths, done, step + 1)


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("carry",))
def _decode_loop(state, carry: _Carry, key, sampling, *, static: _Static) -> _Carry:
    """Decodes until every row is done or the token buffer is full."""
    model = nnx.merge(static.graphdef, state)
    limit = carry.tokens.shape[1]
    return jax.lax.while_loop(lambda c: (c.step < limit) & ~jnp.all(c.done),
                              lambda c: _step(static, model, c, key, sampling), carry)


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("carry",))
def _decode_one(state, carry: _Carry, key, sampling, *, static: _Static) -> _Carry:
    """One decode step (streaming)."""
    return _step(static, nnx.merge(static.graphdef, state), carry, key, sampling)


# ------------------------------------------------------------------------------------------ host side


@dataclasses.dataclass
class Batch:
    """A padded batch. ids / mask int32 [B, P] (left padded); pixels float32 [N, 3, S, S] or None;
    image_mask bool [N]; done bool [B] (True for padding rows); num_rows: the real rows."""

    ids: np.ndarray
    mask: np.ndarray
    pixels: np.ndarray | None
    image_mask: np.ndarray | None
    done: np.ndarray
    num_rows: int


def _default_image_config(model) -> ImageConfig | None:
    vision = getattr(getattr(model, "config", None), "vision", None)
    if vision is None:
        return None
    return ImageConfig(size=vision.image_size, crop_size=vision.image_size, aspect="pad")


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
        config = model.config
        self.text_config = config.text if self.is_llava else config
        self.image_token_index = config.image_token_index if self.is_llava else None
        self.image_seq_length = config.image_seq_length if self.is_llava else 0
        self.image_config = image_config or _default_image_config(model)
        self.template = get_template(template) if isinstance(template, str) else template
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos]
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (self.eos_token_ids or (0,))[0])
        self.bucket = bucket
        self.graphdef, self.state = nnx.split(self.model)

    @property
    def context_length(self) -> int:
        return self.text_config.max_position_embeddings

    # -------------------------------------------------------------------------------- prompts

    def prompt(self, question: str, num_images: int = 0) -> str:
        """The generation prompt of a single question, as the official `model_vqa`: each image becomes an
        `<image>\\n` line in front of the question, then the template's user turn and assistant role."""
        from llava_jax.data.conversation import generation_prompt

        if self.template is None:
            raise ValueError("Generator.prompt needs a template (Generator(..., template='llava_v1'))")
        return generation_prompt(self.template, [(IMAGE_TOKEN + "\n") * num_images + question])

    def encode(self, prompt: Prompt) -> np.ndarray:
        """A prompt -> int32 [T]; a string's `<image>` placeholders become `image_seq_length` image token ids."""
        if not isinstance(prompt, str):
            return np.asarray(prompt, np.int32).reshape(-1)
        pieces = prompt.split(IMAGE_TOKEN)
        if len(pieces) > 1 and not self.is_llava:
            raise ValueError(f"the prompt has {IMAGE_TOKEN} but the model takes no images: {prompt[:80]!r}")
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k > 0:
                ids += [self.image_token_index] * self.image_seq_length
            ids += self.tokenizer(piece, add_special_tokens=k == 0).input_ids
        return np.asarray(ids, np.int32)

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
        num_rows, width = next_power_of_two(max(len(rows), min_rows)), self.bucket(max(r.size for r in rows))
        ids = np.full((num_rows, width), self.pad_id, np.int32)
        mask = np.zeros((num_rows, width), np.int32)
        for r in range(num_rows):
            row = rows[r] if r < len(rows) else np.asarray([self.pad_id], np.int32)  # padding rows: one token
            ids[r, width - row.size:], mask[r, width - row.size:] = row, 1
        done = np.arange(num_rows) >= len(rows)
        if not pixels:
            return Batch(ids, mask, None, None, done, len(rows))
        n = max(next_power_of_two(len(pixels)), num_rows)  # one image per row compiles once per row count
        stacked = np.zeros((n,) + pixels[0].shape, np.float32)
        stacked[:len(pixels)] = pixels
        return Batch(ids, mask, stacked, np.arange(n) < len(pixels), done, len(rows))

    def _stop_ids(self, stop: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """Token sequences of the stop strings that tokenize to something decoding back to exactly themselves
        (ending a row on them is then safe: the decoded text holds the stop string and is cut there)."""
        out = []
        for s in stop:
            ids = self.tokenizer(s, add_special_tokens=False).input_ids
            if ids and self.tokenizer.decode(ids) == s:
                out.append(tuple(int(i) for i in ids))
        return tuple(out)

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
        return _cut_at_stop(text, stop)

    def static(self, batch: Batch, greedy: bool, stop_ids: tuple = ()) -> _Static:
        """The compile-time settings of a batch's programs."""
        last_is_text = self.image_token_index is None or not (batch.ids[:, -1] == self.image_token_index).any()
        return _Static(self.graphdef, greedy, self.eos_token_ids, stop_ids, self.pad_id,
                       split_prefill=last_is_text and batch.ids.shape[1] > 1)

    def _start(self, prompts, images, max_new_tokens, sampling: Sampling, rng, stop: tuple[str, ...],
               min_rows: int = 1, ignore_eos: bool = False):
        """Batches the prompts and runs the prefill -> (carry, key, sampling arrays, static, real rows)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        batch = self.make_batch(prompts, images, min_rows=min_rows)
        key = rng if isinstance(rng, jax.Array) else jax.random.key(0 if rng is None else int(rng))
        static = self.static(batch, sampling.greedy, self._stop_ids(stop))
        if ignore_eos:
            static = dataclasses.replace(static, eos_ids=())
        params = sampling.arrays()
        carry = _prefill(self.state, batch.ids, batch.mask, batch.pixels, batch.image_mask, batch.done, key, params,
                         static=static, cache_length=batch.ids.shape[1] + max_new_tokens,
                         max_new_tokens=max_new_tokens)
        return carry, key, params, static, batch.num_rows

    def _run(self, prompts, images, max_new_tokens, sampling: Sampling, rng, stop: tuple[str, ...],
             stream: StreamCallback | None, min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """-> (tokens int32 [B, max_new_tokens], lengths int32 [B]) for the real rows."""
        if stream is not None:
            return self._stream(self._steps(prompts, images, max_new_tokens, sampling, rng, stop, min_rows), stop,
                                stream, len(prompts))
        carry, key, params, static, num_rows = self._start(prompts, images, max_new_tokens, sampling, rng, stop,
                                                           min_rows)
        carry = _decode_loop(self.state, carry, key, params, static=static)
        tokens, lengths = jax.device_get((carry.tokens, carry.lengths))
        return tokens[:num_rows], lengths[:num_rows]

    def decode_steps(self, prompts: Sequence[Prompt], images: Sequence[Sequence] | None = None, *,
                     max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     rng: jax.Array | int | None = None, stop: Sequence[str] | None = None, min_rows: int = 1,
                     ignore_eos: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Decodes one step at a time, driven from the host (streaming, serving).

        Same arguments as `generate`; `ignore_eos`: rows go on past an EOS (benchmarks). Yields
        `(tokens int32 [R, max_new_tokens], lengths int32 [R], done bool [R])` of the R real rows after the
        prefill and after every decode step, until every row is done (EOS or a stop string's tokens) or the
        token buffer is full. A caller that needs no more steps stops iterating.
        """
        return self._steps(prompts, images, max_new_tokens, Sampling(temperature, top_k, top_p), rng,
                           self._stops(stop), min_rows, ignore_eos)

    def _steps(self, prompts, images, max_new_tokens, sampling: Sampling, rng, stop: tuple[str, ...],
               min_rows: int = 1, ignore_eos: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        carry, key, params, static, num_rows = self._start(prompts, images, max_new_tokens, sampling, rng, stop,
                                                           min_rows, ignore_eos)
        limit = carry.tokens.shape[1]
        while True:
            tokens, lengths, done = jax.device_get((carry.tokens, carry.lengths, carry.done))
            yield tokens[:num_rows], lengths[:num_rows], done[:num_rows]
            if done.all() or int(carry.step) >= limit:
                return
            carry = _decode_one(self.state, carry, key, params, static=static)

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


# ------------------------------------------------------------------------------------------ loading


class ModelLoadError(ValueError):
    """A model folder that cannot be used for generation; the message names the folder and what is wrong."""


def default_template(name: str, tokenizer=None, text_model_type: str | None = None) -> str:
    """The conversation template of a model, by the official CLI's rule on the model name, extended:

    "llama-3" / "llama3" in the name or a tokenizer with `<|eot_id|>` -> llama_3; "llama-2" / "llama_2" ->
    llama_2; "mistral" in the name or a Mistral text model -> mistral_instruct; otherwise llava_v1 (LLaVA v1 and
    LLaVA-1.5 Vicuna models; the official CLI picks it for every name with "v1").
    """
    name = name.lower()
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    if "llama-3" in name or "llama3" in name or "<|eot_id|>" in vocab:
        return "llama_3"
    if "llama-2" in name or "llama_2" in name:
        return "llama_2"
    if "mistral" in name or text_model_type == "mistral":
        return "mistral_instruct"
    return "llava_v1"


def _workdir_export(path: Path) -> tuple[Path, str | None]:
    """A training workdir -> (its Hugging Face export folder, its data template)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable training config.json ({e})") from None
    data = config.get("data") if isinstance(config, dict) else None
    export = config.get("export_hf") if isinstance(config, dict) else None
    template = data.get("template") if isinstance(data, dict) else None
    if not isinstance(template, (str, type(None))) or not isinstance(export, (str, type(None))):
        raise ModelLoadError(f"{path / 'config.json'}: export_hf and data.template must be strings")
    if not export or not (Path(export) / "config.json").is_file():
        raise ModelLoadError(f"{path}: a training workdir without a finished Hugging Face export (its config's "
                             f"export_hf is {export!r}); load the exported folder, or finish the run with "
                             "export_hf set")
    return Path(export), template


def load_model(path: str | os.PathLike, *, dtype=None, tokenizer: str | os.PathLike | None = None,
               quantize=None):
    """Loads a model for generation -> (model, tokenizer, image_config, template name).

    PATH is a Hugging Face LLaVA / LLaMA folder (config.json + weights; tokenizer and preprocessor_config.json
    read from it), a folder in our format (`convert.save`: model.json + params/; the tokenizer from the same
    folder or `tokenizer`), or a finished training workdir (config.json + checkpoints/): its `export_hf` folder.
    The model comes in `decoding_layout` (per-layer weight buffers, for `Generator`; not for `convert`).
    The template is the workdir's `data.template` or `default_template(folder name)`.
    quantize: None, 8, 4 or a `models.quant.QuantConfig`: weight-only quantization at load time (a folder
    written by `convert quantize` is quantized already).
    Raises:
      ModelLoadError naming the folder.
    """
    from transformers import AutoTokenizer

    from llava_jax import convert
    from llava_jax.models import quant

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    template = None
    if (path / "checkpoints").is_dir() and (path / "config.json").is_file():
        path, template = _workdir_export(path)
    try:
        if (path / "model.json").is_file():
            model = convert.load(path, **({"dtype": dtype} if dtype else {}))
        elif (path / "config.json").is_file():
            model = convert.from_hf(path, dtype=dtype)
        else:
            raise ModelLoadError(f"{path}: not a model folder (no config.json or model.json)")
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or path), trust_remote_code=False)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: cannot load the model or its tokenizer: {e}") from e
    try:
        model = quant.as_quantized(model, quantize)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    _language_model(model).model.unstack_layers()  # in place: the one copy of the weights
    image_config = None
    if hasattr(model, "embed_inputs"):
        image_config = _image_config(path, model.config.vision.image_size)
    text = model.config.text if hasattr(model.config, "text") else model.config
    template = template or default_template(path.name, tokenizer, "mistral" if text.sliding_window else None)
    return model, tokenizer, image_config, template


def _image_config(path: Path, image_size: int) -> ImageConfig:
    """The folder's preprocessor_config.json (LLaVA-1.5 "pad" aspect) or CLIP's defaults at the tower's size."""
    if not (path / "preprocessor_config.json").is_file():
        return ImageConfig(size=image_size, crop_size=image_size, aspect="pad")
    try:
        config = ImageConfig.from_hf(path, aspect="pad")
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{path / 'preprocessor_config.json'}: {e}") from e
    if config.crop_size != image_size:
        raise ModelLoadError(f"{path / 'preprocessor_config.json'}: crop size {config.crop_size} differs from the "
                             f"vision tower's image_size {image_size}")
    return config


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


class TextStreamer:
    """Emits the new part of one row's decoded text, holding back what may still become a stop string or an
    incomplete character. `update(tokens)` with the row's tokens so far; `stopped` once a stop string is seen;
    `text` the answer so far (cut at the stop string); `flush()` emits the rest."""

    def __init__(self, generator: Generator, stop: tuple[str, ...], emit: Callable[[str], None]):
        self.generator, self.stop, self.emit = generator, stop, emit
        self.sent, self.text, self.stopped = 0, "", False

    def update(self, tokens: np.ndarray) -> None:
        full = self.generator.tokenizer.decode(
            np.asarray(tokens)[~np.isin(tokens, self.generator.eos_token_ids)].tolist(), skip_special_tokens=True)
        self.text = _cut_at_stop(full, self.stop)
        self.stopped = len(self.text) < len(full)
        safe = len(self.text) - max([_held_back(self.text, s) for s in self.stop] + [0])
        if self.text.endswith("\ufffd"):
            safe = min(safe, len(self.text) - 1)
        if safe > self.sent:
            self.emit(self.text[self.sent:safe])
            self.sent = safe

    def flush(self) -> None:
        if len(self.text) > self.sent:
            self.emit(self.text[self.sent:])
            self.sent = len(self.text)


def _held_back(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


__all__ = ["Generator", "Batch", "Sampling", "ModelLoadError", "TextStreamer", "bucket_length", "decoding_layout",
           "default_template", "filter_logits", "load_model", "next_token"]
