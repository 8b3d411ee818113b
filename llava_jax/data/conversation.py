"""Conversation templates: how a chat is rendered into one prompt string.

A template is data (roles, separators, system prompt and a separator style), rendered by one function per
style exactly as the official LLaVA `Conversation.get_prompt()` does. Rendering goes through segments,
`(text, supervised)` pairs, so the tokenizer can find the answer spans by character offsets.

Messages are plain strings in turn order, user first, alternating user / assistant. A final `None`
stands for the assistant turn still to be generated (the official CLI appends `None` the same way).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple, Sequence

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"  # LLaVA-OneVision's video placeholder

Style = Literal["plain", "two", "llama_2", "chatml", "chatml_lines", "llama_3"]

_LLAMA3_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"


@dataclasses.dataclass(frozen=True)
class Template:
    """One conversation format.

    Attributes:
      name: the canonical name (`get_template` also accepts aliases).
      style: how turns are joined (the official `SeparatorStyle`; `chatml` is the official `MPT`,
        `chatml_lines` LLaVA-NeXT's `CHATML`: a newline after each role and after each end-of-turn).
      system: the system prompt ("" for none).
      roles: the (user, assistant) role strings as written in the prompt.
      sep: separator after user turns (`two`), between rounds (`llama_2`), or after every turn.
      sep2: end-of-turn after assistant answers (`two`, `llama_2`); None where `sep` ends every turn.
    """

    name: str
    style: Style
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None = None


class Segment(NamedTuple):
    """A piece of the rendered prompt.

    `supervised` pieces are what the model generates after a generation prompt: an answer, with the
    separator the template puts before it (the " " after "ASSISTANT:") and its end-of-turn after it.
    """

    text: str
    supervised: bool


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
    "illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information.")
_LLAVA_LLAMA_3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language.")

_ALL = (
    Template("plain", "plain", "", ("", ""), "\n"),
    Template("vicuna_v1", "two", _VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    Template("llava_v1", "two", _LLAVA_V1_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    Template("llama_2", "llama_2", _LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>"),
    Template("mistral_instruct", "llama_2", "", ("USER", "ASSISTANT"), "", "</s>"),
    Template("chatml_direct", "chatml", "<|im_start|>system\nAnswer the questions.",
             ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    Template("llama_3", "llama_3", _LLAVA_LLAMA_3_SYSTEM, ("user", "assistant"), "<|eot_id|>"),
    # LLaVA-NeXT / OneVision on Qwen2 (the LLaVA-NeXT repo's conv_qwen, also named qwen_2 there).
    Template("qwen_1_5", "chatml_lines", "<|im_start|>system\nYou are a helpful assistant.",
             ("<|im_start|>user", "<|im_start|>assistant"), "<|im_end|>"),
    Template("qwen_2_5", "chatml_lines",
             "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
             ("<|im_start|>user", "<|im_start|>assistant"), "<|im_end|>"),
)
_ALIASES = {"v1": "vicuna_v1", "qwen_2": "qwen_1_5"}

TEMPLATES: dict[str, Template] = {t.name: t for t in _ALL}
TEMPLATES.update({alias: TEMPLATES[name] for alias, name in _ALIASES.items()})


def get_template(name: str) -> Template:
    """The template called `name` (canonical name or alias such as `v1`)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}") from None


def move_image_to_front(text: str) -> str:
    """The official placement of one `<image>`: removed where it is, put first and followed by "\\n"."""
    if IMAGE_TOKEN not in text:
        return text
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


def _check_messages(messages: Sequence[str | None]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        if message is None and i != len(messages) - 1:
            raise ValueError(f"message {i}: only the last message may be None (the turn to generate)")
        if message is None and i % 2 == 0:
            raise ValueError(f"message {i}: the turn to generate (None) must be an assistant turn")
        if message is not None and not message:
            raise ValueError(f"message {i} is empty")


def _two(t: Template, messages: Sequence[str | None]) -> list[Segment]:
    out = [Segment(t.system + t.sep, False)]
    for i, message in enumerate(messages):
        role = t.roles[i % 2]
        if message is None:
            out.append(Segment(role + ":", False))
        elif i % 2 == 0:
            out.append(Segment(f"{role}: {message}{t.sep}", False))
        else:
            out += [Segment(f"{role}:", False), Segment(f" {message}{t.sep2}", True)]
    return out


def _llama_2(t: Template, messages: Sequence[str | None]) -> list[Segment]:
    out = []
    for i, message in enumerate(messages):
        if message is None:
            continue
        if i % 2 == 1:
            out.append(Segment(f" {message} {t.sep2}", True))
            continue
        if i == 0 and t.system:
            message = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n{message}"
        round_start = t.sep if i > 0 else ""  # the official code strips the first `sep`
        out.append(Segment(f"{round_start}[INST] {message} [/INST]", False))
    return out


def _chatml(t: Template, messages: Sequence[str | None]) -> list[Segment]:
    out = [Segment(t.system + t.sep, False)]
    for i, message in enumerate(messages):
        role = t.roles[i % 2]
        if message is None:
            out.append(Segment(role, False))
        elif i % 2 == 0:
            out.append(Segment(role + message + t.sep, False))
        else:
            out += [Segment(role, False), Segment(message + t.sep, True)]
    return out


def _chatml_lines(t: Template, messages: Sequence[str | None]) -> list[Segment]:
    # The answer and its end-of-turn are supervised; the newline after it starts the next turn.
    out = [Segment(t.system + t.sep + "\n" if t.system else "", False)]
    for i, message in enumerate(messages):
        role = t.roles[i % 2] + "\n"
        if message is None:
            out.append(Segment(role, False))
        elif i % 2 == 0:
            out.append(Segment(role + message + t.sep + "\n", False))
        else:
            out += [Segment(role, False), Segment(message + t.sep, True), Segment("\n", False)]
    return out


def _plain(t: Template, messages: Sequence[str | None]) -> list[Segment]:
    # The official get_prompt fails on a finished conversation (its sep2 is None); `sep` ends every turn here.
    out = [Segment(t.system, False)]
    for i, message in enumerate(messages):
        if message is not None:
            out.append(Segment(message + (t.sep2 or t.sep), i % 2 == 1))
    return out


def _llama_3(t: Template, messages: Sequence[str | None]) -> list[Segment]:
    # The LLaMA-3 chat format; contents are stripped as its chat template does. BOS comes from the tokenizer.
    out = []
    if t.system:
        out.append(Segment(_LLAMA3_HEADER.format(role="system") + t.system.strip() + t.sep, False))
    for i, message in enumerate(messages):
        header = _LLAMA3_HEADER.format(role=t.roles[i % 2])
        if message is None:
            out.append(Segment(header, False))
        elif i % 2 == 0:
            out.append(Segment(header + message.strip() + t.sep, False))
        else:
            out += [Segment(header, False), Segment(message.strip() + t.sep, True)]
    return out


_STYLES = {"two": _two, "llama_2": _llama_2, "chatml": _chatml, "chatml_lines": _chatml_lines, "plain": _plain,
           "llama_3": _llama_3}


def segments(template: Template, messages: Sequence[str | None]) -> list[Segment]:
    """The rendered prompt as pieces; their concatenation is `render(template, messages)`."""
    _check_messages(messages)
    return [s for s in _STYLES[template.style](template, messages) if s.text]


def training_segments(template: Template, messages: Sequence[str]) -> list[Segment]:
    """The pieces a training sample is tokenized from.

    The rendered prompt, except for `plain` (stage 1): there each instruction is replaced by its image
    placeholders alone, so a sample is `<image>` + caption + "\\n" (the official `preprocess_plain`).
    """
    if template.style != "plain":
        return segments(template, messages)
    _check_messages(messages)
    out = []
    for i, message in enumerate(messages):
        if i % 2 == 0:
            out.append(Segment(IMAGE_TOKEN * message.count(IMAGE_TOKEN), False))
        else:
            out.append(Segment(message + template.sep, True))
    return [s for s in out if s.text]


def render(template: Template, messages: Sequence[str | None]) -> str:
    """The prompt string, identical to the official `conv.get_prompt()` for the same messages."""
    return "".join(s.text for s in segments(template, messages))


def generation_prompt(template: Template, messages_so_far: Sequence[str]) -> str:
    """The prompt that asks the model for the next answer: it ends with the assistant role.

    `messages_so_far` ends with a user message (odd length).
    """
    if len(messages_so_far) % 2 != 1:
        raise ValueError(f"the conversation must end with a user message, got {len(messages_so_far)} messages")
    return render(template, [*messages_so_far, None])


def stop_strings(template: Template) -> list[str]:
    """Strings that end an assistant answer (the end-of-turn the model is trained to emit)."""
    return [template.sep2 if template.style in ("two", "llama_2") else template.sep]
