"""NXTP: object recognition as next-token prediction.

image -> open_clip ViT -> all patch tokens after ``ln_post`` (CLS dropped) -> linear projection (no bias)
-> prepended to ``<|image|> <s> The objects in the image are`` -> truncated LLaMA-type decoder -> labels.

Training uses the label-masked attention of ``masking``; inference reads the next-token distribution at
the last prompt token and decodes every label from it in parallel (``sampling``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import torch
import yaml
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .decoder import DecoderConfig, build_decoder
from .masking import label_masked_attention
from .sequence import SequenceBuilder, TextBatch, loss_targets, position_ids, segment_ids
from .vision import VisionConfig, build_vision_tower, encode_patches

PROMPT = "The objects in the image are"


def load_tokenizer(name_or_path: str):
    """A transformers tokenizer from a hub name or folder; a folder with only ``tokenizer.json`` works too."""
    path = Path(name_or_path)
    if path.is_dir() and not (path / "tokenizer_config.json").exists() and (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast(
            tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
    return AutoTokenizer.from_pretrained(name_or_path)


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
    """

    def __init__(
        self,
        vision: VisionConfig,
        decoder: DecoderConfig,
        tokenizer: str,
        prompt: str = PROMPT,
        reference_compat: bool = False,
        reset_label_positions: bool = False,
    ) -> None:
        super().__init__()
        self.init_args = dict(vision=asdict(vision), decoder=asdict(decoder), prompt=prompt,
                              reference_compat=reference_compat, reset_label_positions=reset_label_positions)
        self.tokenizer = load_tokenizer(tokenizer)
        self.sequences = SequenceBuilder(self.tokenizer, reference_compat=reference_compat)
        self.prompt = prompt
        self.reference_compat = reference_compat
        self.reset_label_positions = reset_label_positions
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

    def hidden_states(self, image_embeds: Tensor, text_ids: Tensor, attention_mask: Tensor, positions: Tensor) -> Tensor:
        """Decoder output after the final norm, at every position: [B, n_image + T, hidden]."""
        embeds = torch.cat([image_embeds, self.embed_text(text_ids).to(image_embeds.dtype)], dim=1)
        out = self.decoder.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False
        )
        return out.last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        return self.decoder.get_output_embeddings()(hidden)

    def layout(self, text: TextBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Block ids, attention mask [B, 1, S, S] and rotary positions [B, S] of a training batch."""
        seg = segment_ids(text, self.n_image_tokens, self.reference_compat)
        return seg, label_masked_attention(seg), position_ids(seg, self.reset_label_positions)

    def forward(self, pixels: Tensor, text: TextBatch) -> tuple[Tensor, Tensor]:
        """Training loss: next-token cross-entropy averaged over every counted token of the batch.

        Returns the loss and the number of counted tokens. Logits are computed only at rows that carry a target.
        """
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
        config = dict(self.init_args)
        config["vision"] = {**config["vision"], "pretrained": None}  # the weights are in model.safetensors
        config["decoder"] = {"name_or_path": None, "num_blocks": None, "dtype": "float32",
                             "config": {"model_type": self.decoder.config.model_type, **self.decoder.config.to_diff_dict()}}
        config["tokenizer"] = "tokenizer"
        self.tokenizer.save_pretrained(out / "tokenizer")
        safetensors.torch.save_model(self, str(out / "model.safetensors"))
        (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "NXTP":
        """Rebuild a model written by ``save_pretrained`` (no pickle involved)."""
        path = Path(path)
        config = {**yaml.safe_load((path / "config.yaml").read_text()), **overrides}
        model = cls(
            VisionConfig(**config.pop("vision")), DecoderConfig(**config.pop("decoder")),
            tokenizer=str(path / config.pop("tokenizer")), **config,
        )
        missing, unexpected = safetensors.torch.load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path / 'model.safetensors'}: missing keys {missing}, unexpected keys {unexpected}")
        return model.eval()
