"""The official LLaVA prompt and label code (pip package `llava-torch`), imported without its model stack.

`llava/__init__.py` imports the PyTorch model classes and `llava/train/train.py` the DeepSpeed-era trainer;
neither is needed for prompts and masks, so both modules are stubbed before the import. Tests that use
this helper skip when `llava-torch` is not installed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import sys
import types

import pytest

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


@functools.cache
def _modules():
    pytest.importorskip("torch")
    stubs = {
        "llava.model": {"LlavaLlamaForCausalLM": None, "__all__": []},
        "llava.train.llava_trainer": {"LLaVATrainer": object},
    }
    for name, attrs in stubs.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
    conversation = pytest.importorskip("llava.conversation")
    train = pytest.importorskip("llava.train.train")
    return conversation, train


def conversation_module():
    """`llava.conversation`."""
    return _modules()[0]


def official_prompt(name: str, messages: list[str | None]) -> str:
    """`conv.get_prompt()` of the official template `name` after appending `messages` in turn order."""
    conv = conversation_module().conv_templates[name].copy()
    conv.messages = []
    for i, message in enumerate(messages):
        conv.append_message(conv.roles[i % 2], message)
    return conv.get_prompt()


def official_preprocess(name: str, conversations: list[dict], tokenizer) -> tuple[list[int], list[int], bool]:
    """The official training preprocessing of one sample with template `name`.

    Runs `preprocess_multimodal` (image placeholder placement) and `preprocess` exactly as
    `LazySupervisedDataset.__getitem__` does. Returns (input_ids, labels, mismatch) where `mismatch` says
    the official code printed "tokenization mismatch" (and masked the whole sample).
    """
    conversation, train = _modules()
    sources = [copy.deepcopy(conversations)]
    has_image = any("<image>" in turn["value"] for turn in conversations)
    conversation.default_conversation = conversation.conv_templates[name]
    if has_image:
        data_args = train.DataArguments(is_multimodal=True)
        data_args.mm_use_im_start_end = False
        sources = train.preprocess_multimodal(sources, data_args)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out = train.preprocess(sources, tokenizer, has_image=has_image)
    input_ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    return input_ids, labels, "tokenization mismatch" in printed.getvalue()
