"""Shared test fixtures."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("LLAVA_JAX_TESTDATA", REPO_ROOT.parent / "shared" / "testdata"))
LLAMA2_TOKENIZER = TESTDATA / "llama2_tokenizer"


@pytest.fixture
def llama2_tokenizer_dir() -> Path:
    """The real LLaMA-2 tokenizer folder; the test is skipped where it is absent."""
    if not (LLAMA2_TOKENIZER / "tokenizer.model").exists():
        pytest.skip(f"LLaMA-2 tokenizer not found at {LLAMA2_TOKENIZER}")
    return LLAMA2_TOKENIZER
