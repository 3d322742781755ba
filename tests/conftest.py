"""Shared test set-up: offline assets from tests/fixtures and small random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
os.environ.setdefault("NLTK_DATA", str(FIXTURES / "nltk_data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lightning_modules.decoder import DecoderConfig  # noqa: E402
from lightning_modules.nxtp import NXTP  # noqa: E402
from lightning_modules.vision import VisionConfig  # noqa: E402

LLAMA_TOKENIZER = FIXTURES / "llama2-tokenizer"
OFFICIAL = FIXTURES / "nxtp-official-tiny"


def tiny_nxtp(seed: int = 0, hidden: int = 64, blocks: int = 2, **kwargs) -> NXTP:
    """A small random NXTP (4x4 image tokens, LLaMA-2 tokenizer) for tests."""
    torch.manual_seed(seed)
    decoder = DecoderConfig(config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=blocks,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256))
    return NXTP(VisionConfig(model_name="nxtp-tiny-vit"), decoder, str(LLAMA_TOKENIZER), **kwargs).eval()


@pytest.fixture(scope="session")
def llama_tokenizer_dir() -> Path:
    return LLAMA_TOKENIZER
