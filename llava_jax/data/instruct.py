"""Few-shot prompts for the GPT-assisted instruction data, and the parsing of the LLM's answers into LLaVA samples.

A prompts folder has the layout of the official `playground/data/prompts`: one folder per family
(`conversation`, `detail_description`, `complex_reasoning`) with `system_message.txt` and few-shot pairs
`000_caps.txt` (an image's context) / `000_conv.txt` (the answer wanted for it), `001_...`, ... The
request for an image is the system message, then each pair as a user / assistant turn, then the image's
context as the last user turn (as in the paper). `detail_description/instructions.txt` lists the
questions a description answers (one per line; the packaged list is used when a folder has none).

Answers of the question families hold turns headed `Question:` / `Answer:` (or `User:` / `GPT:`),
usually separated by `===` lines. `<image>` goes at the start or the end of the first question, at
random from a seed and the sample (the same on every rerun, whatever the order of completion).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from importlib import resources
from pathlib import Path

from llava_jax.data.coco_context import ImageContext, file_stem
from llava_jax.data.conversation import IMAGE_TOKEN

FAMILIES = ("conversation", "detail_description", "complex_reasoning")
# Whether a family's context shows the boxes (the official conversation examples show captions only).
USES_BOXES = {"conversation": False, "detail_description": True, "complex_reasoning": True}
INSTRUCTIONS_FILE = "instructions.txt"

_MARKER = re.compile(r"^[ \t]*(Question|Answer|User|GPT)[ \t]*:[ \t]*", re.MULTILINE)
_QUESTION_MARKERS = ("Question", "User")
_SEPARATOR = re.compile(r"^[ \t]*===+[ \t]*$", re.MULTILINE)


class MalformedResponse(ValueError):
    """An LLM answer that cannot be turned into a sample."""


@dataclasses.dataclass(frozen=True)
class FamilyPrompt:
    """A family's system message, few-shot (context, answer) pairs and, for descriptions, the questions."""

    name: str
    system_message: str
    examples: tuple[tuple[str, str], ...]
    instructions: tuple[str, ...] = ()

    def messages(self, context: str) -> list[dict]:
        """The chat messages asking for one image with this context."""
        messages = [{"role": "system", "content": self.system_message}]
        for caps, conv in self.examples:
            messages += [{"role": "user", "content": caps}, {"role": "assistant", "content": conv}]
        return messages + [{"role": "user", "content": context}]


def default_prompts_dir() -> Path:
    """The prompts shipped with the package."""
    return Path(str(resources.files("llava_jax.data") / "prompts"))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


def load_family(prompts_dir: str | os.PathLike, name: str) -> FamilyPrompt:
    """Reads one family from a prompts folder; errors name the missing file."""
    if name not in FAMILIES:
        raise ValueError(f"unknown prompt family {name!r}; choose from {FAMILIES}")
    folder = Path(prompts_dir) / name
    if not (folder / "system_message.txt").is_file():
        raise ValueError(f"{folder}: no system_message.txt (expected the layout of playground/data/prompts)")
    examples = []
    for caps in sorted(folder.glob("[0-9][0-9][0-9]_caps.txt")):
        conv = caps.with_name(caps.name.replace("_caps.txt", "_conv.txt"))
        if not conv.is_file():
            raise ValueError(f"{caps}: no matching {conv.name}")
        examples.append((_read(caps), _read(conv)))
    instructions = ()
    if name == "detail_description":
        source = folder / INSTRUCTIONS_FILE
        if not source.is_file():
            source = default_prompts_dir() / name / INSTRUCTIONS_FILE
        instructions = tuple(line.strip() for line in _read(source).splitlines() if line.strip())
    return FamilyPrompt(name, _read(folder / "system_message.txt"), tuple(examples), instructions)


def parse_turns(response: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from `Question:` / `Answer:` (or `User:` / `GPT:`) turns.

    Raises MalformedResponse when there is no turn, text comes before the first turn, a turn is empty,
    or questions and answers do not alternate starting with a question and ending with an answer.
    """
    markers = list(_MARKER.finditer(response))
    if not markers:
        raise MalformedResponse("no 'Question:' / 'Answer:' turns")
    if _SEPARATOR.sub("", response[:markers[0].start()]).strip():
        raise MalformedResponse("text before the first turn")
    turns = []
    for marker, following in zip(markers, markers[1:] + [None]):
        end = following.start() if following else len(response)
        text = _SEPARATOR.sub("", response[marker.end():end]).strip()
        if not text:
            raise MalformedResponse(f"empty '{marker.group(1)}:' turn")
        turns.append((marker.group(1) in _QUESTION_MARKERS, text))
    if len(turns) % 2 or any(is_question != (i % 2 == 0) for i, (is_question, _) in enumerate(turns)):
        raise MalformedResponse("questions and answers do not alternate (question first, answer last)")
    return [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]


def parse_response(family: FamilyPrompt, response: str | None, finish_reason: str | None = None
                   ) -> list[tuple[str, str]]:
    """The (question, answer) pairs of one answer of `family`; the question of a description is left ""."""
    if response is None or not response.strip():
        raise MalformedResponse("empty response")
    if finish_reason == "length":
        raise MalformedResponse("response cut at max_tokens")
    if IMAGE_TOKEN in response:
        raise MalformedResponse(f"response contains {IMAGE_TOKEN}")
    if family.name == "detail_description":
        if _MARKER.search(response):
            raise MalformedResponse("a description with 'Question:' / 'Answer:' turns")
        return [("", response.strip())]
    pairs = parse_turns(response)
    if family.name == "complex_reasoning" and len(pairs) != 1:
        raise MalformedResponse(f"complex reasoning needs one question and answer, got {len(pairs)}")
    return pairs


def sample_rng(seed: int, family: str, image: ImageContext) -> random.Random:
    """The random stream of one sample: fixed by the seed, the family and the image."""
    return random.Random(f"{seed}/{family}/{image.image_id}")


def build_sample(family: FamilyPrompt, image: ImageContext, pairs: list[tuple[str, str]], seed: int) -> dict:
    """A LLaVA training sample (id, image, conversations) with `<image>` before or after the first question."""
    rng = sample_rng(seed, family.name, image)
    if family.name == "detail_description":
        pairs = [(rng.choice(family.instructions), pairs[0][1])]
    conversations = []
    for question, answer in pairs:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    first = conversations[0]["value"]
    conversations[0]["value"] = f"{IMAGE_TOKEN}\n{first}" if rng.random() < 0.5 else f"{first}\n{IMAGE_TOKEN}"
    return {"id": file_stem(image.file_name), "image": image.file_name, "conversations": conversations}
