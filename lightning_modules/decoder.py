"""The language decoder: a LLaMA-type causal LM from transformers, cut to its first blocks.

Recognition needs far less depth than chat (NXTP keeps 6 of LLaMA-2-7B's 32 blocks), so the model is
built with ``num_hidden_layers = num_blocks``: ``from_pretrained`` then loads only those blocks and never
materialises the others, and the final norm and output layer are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig


@dataclass
class DecoderConfig:
    """How to build the decoder.

    Args:
        name_or_path: a transformers model name or folder to load weights from; None for random init.
        config: config values for random init (``model_type`` defaults to ``llama``), or overrides on top
            of the pretrained config.
        num_blocks: how many transformer blocks to keep (None keeps all).
        dtype: dtype to load pretrained weights in (``float32``, ``bfloat16``, ``float16``).
    """

    name_or_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    num_blocks: int | None = None
    dtype: str = "float32"


def decoder_config(cfg: DecoderConfig) -> PretrainedConfig:
    """The transformers config of the truncated decoder (nothing is loaded)."""
    overrides = dict(cfg.config)
    if cfg.name_or_path is None:
        hf_config = AutoConfig.for_model(overrides.pop("model_type", "llama"), **overrides)
    else:
        hf_config = AutoConfig.from_pretrained(cfg.name_or_path, **overrides)
    depth = hf_config.num_hidden_layers
    if cfg.num_blocks is not None:
        if not 1 <= cfg.num_blocks <= depth:
            raise ValueError(f"decoder.num_blocks={cfg.num_blocks}: the decoder has {depth} blocks")
        hf_config.num_hidden_layers = cfg.num_blocks
        if getattr(hf_config, "layer_types", None):
            hf_config.layer_types = hf_config.layer_types[: cfg.num_blocks]
    return hf_config


def build_decoder(cfg: DecoderConfig, vocab_size: int) -> nn.Module:
    """Build the truncated causal LM and resize its vocabulary to ``vocab_size`` (new rows random)."""
    hf_config = decoder_config(cfg)
    if cfg.name_or_path is None:
        hf_config.vocab_size = vocab_size
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, config=hf_config, dtype=getattr(torch, cfg.dtype), attn_implementation="sdpa"
        )
        if model.get_input_embeddings().num_embeddings != vocab_size:
            model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model
