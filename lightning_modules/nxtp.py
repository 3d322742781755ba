"""NXTP: object recognition as next-token prediction.

image -> open_clip ViT -> all patch tokens after ``ln_post`` (CLS dropped) -> linear projection (no bias)
-> prepended to ``<|image|> <s> The objects in the image are`` -> truncated LLaMA-type decoder -> labels.

Training uses the label-masked attention of ``masking``; inference reads the next-token distribution at
the last prompt token and decodes every label from it in parallel (``sampling``).
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .decoder import DecoderConfig, build_decoder
from .masking import compact_label_mask, label_block_mask, label_masked_attention
from .sequence import PROMPT, SequenceBuilder, TextBatch, loss_targets, pad_text, position_ids, segment_ids
from .vision import VisionConfig, build_vision_tower, encode_patches

Attention = Literal["auto", "dense", "compact", "flex"]


def flex_available(device: torch.device) -> bool:
    """Whether FlexAttention can train on ``device``: it needs a GPU (it has no CPU backward) and Triton."""
    return device.type == "cuda" and _flex_importable()


@functools.cache
def _flex_importable() -> bool:
    try:
        import triton  # noqa: F401
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def load_tokenizer(name_or_path: str):
    """A transformers tokenizer from a hub name or folder; a folder with only ``tokenizer.json`` works too."""
    path = Path(name_or_path)
    if path.is_dir() and not (path / "tokenizer_config.json").exists() and (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast(
            tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
    return AutoTokenizer.from_pretrained(name_or_path)


# The constructor arguments that give the weights their shapes and meaning: what a saved model records
# (``init_args`` and the tokenizer) and what ``nxtp test --ckpt_path`` takes from a checkpoint.
ARCHITECTURE = ("vision", "decoder", "tokenizer", "prompt", "reference_compat", "reset_label_positions")


class NXTP(nn.Module):
    """The recognizer: vision tower, projection and truncated decoder, with its tokenizer.

    Args:
        vision: how to build the open_clip vision tower.
        decoder: how to build the truncated decoder.
        tokenizer: tokenizer name or folder; ``<|image|>`` and ``<|empty|>`` are added to it.
        prompt: the text after ``<s>`` that the labels continue.
        reference_compat: reproduce the official implementation's quirks exactly (for parity with released
            checkpoints and fixtures): the last label has no delimiter block, the answer start of a batch is
            taken from its last sample, and the sampler's step-limit and rounding quirks.
        reset_label_positions: give every label block the rotary positions that follow the prompt, as at
            inference (the reference does not).
        attention: how the training forward computes the label-masked attention; every path gives the same
            result up to float rounding (see ``masking``). ``dense``: SDPA with the full [B, 1, S, S] boolean mask,
            the reference path. ``compact``: SDPA without a mask for the image rows and with a [B, 1, T, S] mask
            for the text rows. ``flex``: FlexAttention with a block-sparse mask (GPU only for training: it has no
            CPU backward). ``auto``: ``flex`` on a GPU where it is available, else ``dense`` (on the CPU the
            three SDPA-based paths measure within noise of each other, and ``dense`` is bit-identical to the
            reference).
        pad_to_multiple: pad every training sequence (image + text) to a multiple of this length, so that a
            compiled decoder sees few distinct shapes; padding rows carry no loss. None pads to the longest sample.
    """

    def __init__(
        self,
        vision: VisionConfig,
        decoder: DecoderConfig,
        tokenizer: str,
        prompt: str = PROMPT,
        reference_compat: bool = False,
        reset_label_positions: bool = False,
        attention: Attention = "auto",
        pad_to_multiple: int | None = None,
    ) -> None:
        super().__init__()
        if attention not in Attention.__args__:
            raise ValueError(f"attention={attention!r}: choose one of {Attention.__args__}")
        if pad_to_multiple is not None and pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple={pad_to_multiple}: must be a positive length")
        self.init_args = dict(
            vision=asdict(vision),
            decoder=asdict(decoder),
            prompt=prompt,
            reference_compat=reference_compat,
            reset_label_positions=reset_label_positions,
        )
        self.tokenizer = load_tokenizer(tokenizer)
        self.sequences = SequenceBuilder(self.tokenizer, reference_compat=reference_compat)
        self.prompt = prompt
        self.reset_label_positions = reset_label_positions
        # Speed settings, not part of the model: ``save_pretrained`` leaves them out of the config.
        self.attention = attention
        self.pad_to_multiple = pad_to_multiple
        self.visual, self.train_transform, self.eval_transform = build_vision_tower(vision)
        self.decoder = build_decoder(decoder, vocab_size=len(self.tokenizer))
        width = self.visual.ln_post.normalized_shape[0]
        self.projection = nn.Linear(width, self.decoder.config.hidden_size, bias=False)
        grid = self.visual.grid_size
        self.n_image_tokens = grid[0] * grid[1]

    def embed_images(self, pixels: Tensor) -> Tensor:
        """Image embeddings in the decoder's token space: [B, n_image_tokens, hidden]."""
        return self.projection(encode_patches(self.visual, pixels))

    def embed_text(self, ids: Tensor) -> Tensor:
        return self.decoder.get_input_embeddings()(ids)

    def hidden_states(
        self, image_embeds: Tensor, text_ids: Tensor, attention_mask: Tensor, positions: Tensor
    ) -> Tensor:
        """Decoder output after the final norm, at every position: [B, n_image + T, hidden]."""
        embeds = torch.cat([image_embeds, self.embed_text(text_ids).to(image_embeds.dtype)], dim=1)
        out = self.decoder.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False
        )
        return out.last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        return self.decoder.get_output_embeddings()(hidden)

    def attention_path(self, device: torch.device) -> str:
        """The attention path ``layout`` uses on ``device`` (``auto`` resolved)."""
        if self.attention == "auto":
            return "flex" if flex_available(device) else "dense"
        if self.attention == "flex" and device.type == "cpu" and torch.is_grad_enabled():
            raise RuntimeError(
                "attention='flex' cannot train on the CPU (FlexAttention has no CPU backward); "
                "use 'auto', 'dense' or 'compact' there"
            )
        return self.attention

    def layout(self, text: TextBatch, attention: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Block ids [B, S], attention mask and rotary positions [B, S] of a training batch.

        The mask is in the form ``attention`` (default: this model's path) asks for: a [B, 1, S, S] boolean
        tensor (``dense``), a [B, 1, S - n_image, S] one (``compact``) or a FlexAttention ``BlockMask`` (``flex``).
        """
        seg = segment_ids(text, self.n_image_tokens, self.reference_compat)
        attention = attention or self.attention_path(seg.device)
        if attention == "flex":
            mask = label_block_mask(seg)
        elif attention == "compact":
            mask = compact_label_mask(seg, self.n_image_tokens)
        else:
            mask = label_masked_attention(seg)
        return seg, mask, position_ids(seg, self.reset_label_positions)

    def pad(self, text: TextBatch) -> TextBatch:
        """``text`` padded so that the whole sequence is a multiple of ``pad_to_multiple`` (unchanged if None)."""
        if self.pad_to_multiple is None:
            return text
        m = self.pad_to_multiple
        total = -(-(self.n_image_tokens + text.ids.shape[1]) // m) * m
        return pad_text(text, total - self.n_image_tokens, self.sequences.pad_id)

    @property
    def reference_compat(self) -> bool:
        """Whether the reference's quirks are reproduced; kept once, by the sequence builder that lays them out."""
        return self.sequences.reference_compat

    @reference_compat.setter
    def reference_compat(self, value: bool) -> None:
        self.sequences.reference_compat = value

    def forward(self, pixels: Tensor, text: TextBatch) -> tuple[Tensor, Tensor]:
        """Training loss: next-token cross-entropy averaged over every counted token of the batch.

        Returns the loss and the number of counted tokens. Logits are computed only at rows that carry a target.
        """
        text = self.pad(text)
        seg, mask, positions = self.layout(text)
        hidden = self.hidden_states(self.embed_images(pixels), text.ids, mask, positions)
        rows, targets = loss_targets(text, seg, self.n_image_tokens, self.reference_compat)
        keep = targets >= 0
        batch_index = torch.arange(len(rows), device=rows.device)[:, None].expand_as(rows)
        logits = self.logits(hidden[batch_index[keep], rows[keep]])
        return F.cross_entropy(logits.float(), targets[keep]), keep.sum()

    # pickle-free checkpoints ------------------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``model.safetensors``, ``config.yaml`` and ``tokenizer/``: all that ``from_pretrained`` needs."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = {**self.init_args, "reference_compat": self.reference_compat}
        config["vision"] = {**config["vision"], "pretrained": None}  # the weights are in model.safetensors
        config["decoder"] = {
            "name_or_path": None,
            "num_blocks": None,
            "dtype": "float32",
            "config": {"model_type": self.decoder.config.model_type, **self.decoder.config.to_diff_dict()},
        }
        config["tokenizer"] = "tokenizer"
        self.tokenizer.save_pretrained(out / "tokenizer")
        safetensors.torch.save_model(self, str(out / "model.safetensors"))
        (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> NXTP:
        """Rebuild a model written by ``save_pretrained`` (no pickle involved)."""
        path = Path(path)
        config = {**yaml.safe_load((path / "config.yaml").read_text()), **overrides}
        model = cls(
            VisionConfig(**config.pop("vision")),
            DecoderConfig(**config.pop("decoder")),
            tokenizer=str(path / config.pop("tokenizer")),
            **config,
        )
        missing, unexpected = safetensors.torch.load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path / 'model.safetensors'}: missing keys {missing}, unexpected keys {unexpected}")
        return model.eval()


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The NXTP state dict stored at ``path``, read without running code from it.

    ``path`` is a folder written by ``save_pretrained`` (``nxtp import-official``, ``nxtp export --format
    safetensors``), a ``.safetensors`` file, or a Lightning ``.ckpt`` written by ``nxtp fit`` (read with the
    allow-list of ``checkpoint_io.load_checkpoint``; only its ``model.*`` tensors are kept).
    """
    path = Path(path) if "://" not in str(path) else path
    if isinstance(path, Path) and not path.exists():
        raise FileNotFoundError(f"model.init_from={path}: no such file or folder")
    if isinstance(path, Path) and path.is_dir():
        path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: a weights folder is one written by save_pretrained, "
                f"nxtp import-official or nxtp export --format safetensors"
            )
    if str(path).endswith(".safetensors"):
        return safetensors.torch.load_file(str(path))
    from .checkpoint_io import load_checkpoint

    checkpoint = load_checkpoint(path)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path}: no 'state_dict'; expected a .ckpt written by nxtp fit")
    # LitNXTP keeps the recognizer under ``model.``; the rest (metric embedders) is not part of NXTP.
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def _listed(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys) - limit} more)" if len(keys) > limit else shown


def load_weights(
    model: nn.Module, state: dict[str, Tensor], allow_missing: list[str] = (), source: str = "the source"
) -> list[str]:
    """Copy ``state`` into ``model``, whose names and shapes it must match exactly; return the keys left as built.

    Keys of ``model`` absent from ``state`` are allowed only where they match a pattern of ``allow_missing``
    (fnmatch); they keep the model's own initialisation. Otherwise a ``ValueError`` lists every missing,
    unexpected and mis-shaped key (with both shapes), in the terms of ``model.init_from`` and
    ``model.init_allow_missing`` (what ``nxtp fit`` calls them).
    """
    expected = model.state_dict(keep_vars=True)
    # Tied tensors (e.g. lm_head tied to the embeddings) are stored once by safetensors: any alias will do.
    storage: dict[int | str, set[str]] = {}
    ptr = {name: t.data_ptr() or name for name, t in expected.items()}  # empty and meta tensors all give 0
    for name in expected:
        storage.setdefault(ptr[name], set()).add(name)
    absent = sorted(k for k in expected if not storage[ptr[k]] & state.keys())
    allowed = [k for k in absent if any(fnmatch.fnmatch(k, p) for p in allow_missing)]
    missing = [k for k in absent if k not in allowed]
    unexpected = sorted(state.keys() - expected.keys())
    mis_shaped = [
        f"{k}: source {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in sorted(state.items())
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        problems = [
            f"missing from the source (name them in model.init_allow_missing to keep them as built): {_listed(missing)}"
            if missing
            else "",
            f"not in the model: {_listed(unexpected)}" if unexpected else "",
            f"shape mismatches: {_listed(mis_shaped)}" if mis_shaped else "",
        ]
        raise ValueError(
            f"model.init_from={source} does not fit the model built from the config (the model config "
            f"must describe the source's architecture, e.g. --model FOLDER/config.yaml for a "
            f"save_pretrained folder):\n  " + "\n  ".join(p for p in problems if p)
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return allowed
