"""OpenAI Chat Completions requests -> engine jobs: validation, prompt rendering, images, limits.

A request's messages become the chat CLI's conversation: an optional system (or developer) message replaces
the template's system prompt, then user and assistant turns alternate, ending with a user turn. A user turn's
text parts are joined with "\\n" and stripped (a literal `<image>` in the text is dropped, as in the chat CLI);
its images become one `<image>\\n` each in front of the text, so one image in the first turn renders exactly as
`python -m llava_jax.chat --image`. Assistant turns are stripped, as the chat CLI records its answers.

Images: `data:` URLs (base64) always; `file://` URLs only under `ImagePolicy.media_dir` (resolved, links
included, before the check); `http(s)://` only with `ImagePolicy.allow_remote`. AnyRes models (LLaVA-NeXT,
OneVision) take several images per message, each expanded to its own token count; OneVision models also take
`video_url` parts (vLLM's extension: a `data:` URL of a video file, or a `file://` URL under the media folder),
`<video>\\n` after the turn's `<image>\\n` lines, `ImagePolicy.video_frames` frames sampled uniformly. The job
then carries the prompt's ids and, per image and video, its `media.Tiles` (pixel tiles + token taps), which
`Generator.make_batch` packs as it packs a generate call's. Every error is an `ApiError` whose message names the
request field.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import threading
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llava_jax.data.conversation import IMAGE_TOKEN, VIDEO_TOKEN, Template, generation_prompt
from llava_jax.data.errors import BadSample
from llava_jax.data.images import load_image, preprocess, read_image_bytes
from llava_jax.data.paths import resolve_inside
from llava_jax.data.video import decode_video
from llava_jax.infer.generate import Generator
from llava_jax.infer.media import Video

MAX_STOP_STRINGS = 4  # as the OpenAI API


class ApiError(Exception):
    """An error answer: HTTP status, a message naming the field, the field (`param`) and the OpenAI type."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": None}}


# ------------------------------------------------------------------------------------------ request schema


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Model):
    url: str
    detail: str | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Model):
    """vLLM's extension: `{"type": "video_url", "video_url": {"url": ...}}` (LLaVA-OneVision models)."""

    type: Literal["video_url"]
    video_url: ImageURL


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(_Model):
    """The fields of a Chat Completions request we read; other fields are ignored."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens (benchmarks)


def parse_request(body: bytes) -> ChatRequest:
    """JSON body -> ChatRequest; ApiError 400 naming the first bad field."""
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {errors[0]['msg']}") from None
        error = max(errors, key=lambda err: len(_field(err["loc"])))  # the deepest: the branch that applied
        field = _field(error["loc"])
        raise ApiError(400, f"{field or 'body'}: {error['msg']}", field or None) from None


def _field(loc: tuple) -> str:
    """pydantic's error location -> `messages[0].content[1].image_url.url` (union branches and tags left out)."""
    out, tag_next = "", False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif tag_next:  # the discriminator value after a tagged union's index
            tag_next = False
        elif "[" in part or part in ("str", "int", "float", "bool"):  # a union branch: list[...], str, ...
            tag_next = "tagged-union" in part
        else:
            out += ("." if out else "") + part
    return out


# ------------------------------------------------------------------------------------------ images


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how large they may be."""

    max_bytes: int = 20 << 20
    max_pixels: int = 4096 * 4096
    media_dir: Path | None = None       # file:// URLs under this folder
    allow_remote: bool = False          # http(s):// URLs
    fetch_timeout_s: float = 10.0
    max_video_bytes: int = 256 << 20    # a video_url's file
    video_frames: int = 32              # frames sampled uniformly from a video (LLaVA-OneVision's 32)


def read_video(url: str, field: str, policy: ImagePolicy) -> Video:
    """A video URL (`data:` with base64 video bytes, or `file://` under the media folder) -> its `video_frames`
    frames sampled uniformly (`data.video.decode_video`), or ApiError naming `field`."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url(url, field, policy.max_video_bytes)
    elif scheme == "file":
        data = _local_file(url, field, policy, policy.max_video_bytes)
    else:
        raise ApiError(400, f"{field}: unsupported video URL (use a data: URL with base64 video bytes, or a file: "
                       "URL under the allowed media folder)", field)
    try:
        return Video(decode_video(data, num_frames=policy.video_frames, name=field, max_pixels=policy.max_pixels))
    except BadSample as e:
        raise ApiError(413 if e.reason == "image_too_large" else 400, str(e), field) from None


def read_image(url: str, field: str, policy: ImagePolicy) -> Image.Image:
    """An image URL -> RGB PIL image (EXIF orientation applied, as the chat CLI), or ApiError naming `field`."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url(url, field, policy.max_bytes)
    elif scheme == "file":
        data = _local_file(url, field, policy)
    elif scheme in ("http", "https"):
        data = _remote(url, field, policy)
    else:
        raise ApiError(400, f"{field}: unsupported image URL (use a data: URL with base64 image bytes)", field)
    try:
        return load_image(data, name=field, max_pixels=policy.max_pixels, exif_transpose=True)
    except BadSample as e:
        raise ApiError(413 if e.reason == "image_too_large" else 400, str(e), field) from None


def _too_large(field: str, size: int, limit: int) -> ApiError:
    return ApiError(413, f"{field}: the image is {size} bytes, over the limit of {limit} bytes", field)


def _data_url(url: str, field: str, limit: int) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ApiError(400, f"{field}: a data: URL must be 'data:<type>;base64,<data>'", field)
    if len(payload) * 3 // 4 > limit + 2:
        raise _too_large(field, len(payload) * 3 // 4, limit)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{field}: invalid base64 data ({e})", field) from None


def _local_file(url: str, field: str, policy: ImagePolicy, max_bytes: int | None = None) -> bytes:
    """A file: URL's bytes (at most `max_bytes`, default the image limit); the path is checked by
    `data.paths.resolve_inside`, as every data reader's."""
    if policy.media_dir is None:
        raise ApiError(400, f"{field}: file: URLs are refused (the server has no --allowed-media-dir)", field)
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    outside = ApiError(400, f"{field}: {path} is not a file under the allowed media folder", field)
    root = next((r for r in (policy.media_dir, policy.media_dir.resolve()) if path.is_relative_to(r)), None)
    if not path.is_absolute() or root is None:
        raise outside
    try:
        real = Path(resolve_inside(root, path.relative_to(root).as_posix()))
    except BadSample:
        raise outside from None
    try:
        return read_image_bytes(real, max_bytes=max_bytes or policy.max_bytes, name=str(path))
    except BadSample as e:
        raise ApiError(413 if e.reason == "image_too_large" else 400, f"{field}: {e}", field) from None


def _remote(url: str, field: str, policy: ImagePolicy) -> bytes:
    import httpx

    if not policy.allow_remote:
        raise ApiError(400, f"{field}: remote image URLs are refused (the server runs without "
                       "--allow-remote-images); send the image as a data: URL", field)
    data = bytearray()
    try:
        with httpx.stream("GET", url, timeout=policy.fetch_timeout_s, follow_redirects=True) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > policy.max_bytes:
                    raise _too_large(field, len(data), policy.max_bytes)
    except httpx.HTTPError as e:
        raise ApiError(400, f"{field}: cannot fetch {url}: {e}", field) from None
    return bytes(data)


# ------------------------------------------------------------------------------------------ conversation


@dataclasses.dataclass(frozen=True)
class Conversation:
    system: str | None
    messages: list[str]                 # user first, alternating, ending with a user turn
    images: list[tuple[str, str]]       # (field, url) in prompt order
    videos: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (field, url) in prompt order

    def prompt(self, template: Template) -> str:
        if self.system is not None:
            template = dataclasses.replace(template, system=self.system)
        return generation_prompt(template, self.messages)


def conversation(request: ChatRequest) -> Conversation:
    """The request's messages as a conversation (see the module docstring), or ApiError naming the message."""
    messages, images, videos, system = list(request.messages), [], [], None
    if messages[0].role in ("system", "developer"):
        system = _text(messages.pop(0), "messages[0]", images, videos, allow_images=False)
    turns = []
    for i, message in enumerate(messages, start=len(request.messages) - len(messages)):
        field = f"messages[{i}]"
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if message.role != expected:
            raise ApiError(400, f"{field}.role: expected '{expected}' (after an optional system message, user and "
                           f"assistant turns alternate and the last is a user turn), got '{message.role}'",
                           f"{field}.role")
        before, videos_before = len(images), len(videos)
        text = _text(message, field, images, videos, allow_images=expected == "user")
        text = (IMAGE_TOKEN + "\n") * (len(images) - before) + (VIDEO_TOKEN + "\n") * (len(videos) - videos_before) \
            + text
        if not text:
            raise ApiError(400, f"{field}.content: empty message", f"{field}.content")
        turns.append(text)
    if len(turns) % 2 == 0:
        raise ApiError(400, f"messages[{len(request.messages) - 1}].role: the last message must be a user turn",
                       f"messages[{len(request.messages) - 1}].role")
    return Conversation(system, turns, images, videos)


def _text(message: Message, field: str, images: list, videos: list, *, allow_images: bool) -> str:
    content = message.content or ""
    if isinstance(content, str):
        return _strip_placeholders(content)
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif not allow_images:
            raise ApiError(400, f"{field}.content[{j}]: images and videos are only accepted in user messages",
                           f"{field}.content[{j}]")
        elif isinstance(part, VideoPart):
            videos.append((f"{field}.content[{j}].video_url", part.video_url.url))
        else:
            images.append((f"{field}.content[{j}].image_url", part.image_url.url))
    return _strip_placeholders("\n".join(texts))


def _strip_placeholders(text: str) -> str:
    """A literal `<image>` / `<video>` in a message's text is dropped (media come from their parts only)."""
    return text.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "").strip()


# ------------------------------------------------------------------------------------------ jobs


@dataclasses.dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int | None = None  # default: the model's context
    max_tokens: int = 1024                # the largest max_tokens a request may ask for
    images: ImagePolicy = ImagePolicy()


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What the engine needs for a request, and its usage counts."""

    ids: np.ndarray
    pixels: list  # LLaVA: pixel values [3, S, S] per image; AnyRes: `media.Tiles` per image, then per video
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool = False


def prepare(request: ChatRequest, generator: Generator, limits: Limits,
            tokenizer_lock: threading.Lock) -> Prepared:
    """Validates a request and turns it into token ids and pixels (runs off the event loop)."""
    if request.n not in (None, 1):
        raise ApiError(400, f"n: only n=1 is supported, got {request.n}", "n")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", "stop")
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        field = "max_tokens" if request.max_tokens else "max_completion_tokens"
        raise ApiError(400, f"{field}: {max_tokens} is over this server's limit of {limits.max_tokens}", field)
    chat = conversation(request)
    if chat.images and not generator.is_llava:
        raise ApiError(400, f"{chat.images[0][0]}: the model is text-only and takes no images", chat.images[0][0])
    if chat.videos and generator.video_token_index is None:
        raise ApiError(400, f"{chat.videos[0][0]}: the model takes no videos (LLaVA-OneVision models do)",
                       chat.videos[0][0])
    most = (generator.context_length - 1) // max(generator.min_image_tokens, 1)
    if len(chat.images) > most:  # checked before any image is read
        raise ApiError(400, f"messages: {len(chat.images)} images; the model's context holds at most {most} (of "
                       f"{'at least ' * generator.is_anyres}{generator.min_image_tokens} tokens each)", "messages")
    pixels, media = _media(chat, generator, limits.images)
    with tokenizer_lock:
        ids = generator.encode(chat.prompt(generator.template), media)
    room = generator.context_length - ids.size
    limit = min(limits.max_prompt_tokens or generator.context_length, generator.context_length - 1)
    if ids.size > limit:
        images = f"{len(pixels)} image(s)" + ("" if generator.is_anyres else f" of {generator.image_seq_length}")
        raise ApiError(400, f"messages: the prompt is {ids.size} tokens ({images}), over the limit of {limit}",
                       "messages")
    temperature = 1.0 if request.temperature is None else request.temperature
    return Prepared(ids, pixels, min(max_tokens or limits.max_tokens, room), temperature,
                    1.0 if request.top_p is None else request.top_p, request.seed, tuple(s for s in stop if s),
                    request.ignore_eos)


def _media(chat: Conversation, generator: Generator, policy: ImagePolicy) -> tuple[list, list]:
    """The request's images (and videos) read and prepared -> (what the job carries, what `encode` expands by):
    LLaVA: pixel values [3, S, S] each, nothing to expand by; AnyRes: `media.Tiles` (images, then videos) for
    both."""
    images = [read_image(url, field, policy) for field, url in chat.images]
    if not generator.is_anyres:
        return [preprocess(image, generator.image_config) for image in images], []
    videos = [read_video(url, field, policy) for field, url in chat.videos]
    try:
        tiles = generator.prepare_media(images + videos)
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None
    return tiles, tiles


__all__ = ["ApiError", "ChatRequest", "Conversation", "ImagePolicy", "Limits", "Prepared", "conversation",
           "parse_request", "prepare", "read_image", "read_video", "VideoPart"]
