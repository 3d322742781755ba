"""NXTP: object recognition as next-token prediction.

image -> open_clip ViT -> all patch tokens after ``ln_post`` (CLS dropped) -> linear projection (no bias)
-> prepended to ``<|image|> <s> The objects in the image are`` -> truncated LLaMA-type decoder -> labels.

Training uses the label-masked attention of ``masking``; inference reads the next-token distribution at
the last prompt token and decodes every label from it in parallel (``sampling``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .batch import ModelInputs
from .decoder import DecoderConfig, build_decoder
from .masking import compact_label_mask, label_block_mask, label_masked_attention
from .sequence import PROMPT, SequenceBuilder, TextBatch, loss_targets, pad_text, position_ids, segment_ids
from .vision import VisionConfig, build_vision_tower, encode_patches

Attention = Literal["auto", "dense", "compact", "flex"]
LabelAttention = Literal["masked", "causal"]
Decode = Literal["full", "draft"]
Interpolation = Literal["bicubic", "bilinear"]
ResizeMode = Literal["shortest", "longest", "squash"]


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


@dataclass
class Preprocessing:
    """How an image file becomes the vision tower's input. It is part of the model: the weights learnt from pixels
    made this way, and the same photo gives the same labels only when it is read the same way.

    Args:
        decode: ``full`` decodes every pixel of the stored image, as the reference did in training and evaluation
            (OpenAI CLIP's preprocessing). ``draft`` decodes a JPEG at least four times the input on its short side
            at 1/2, 1/4 or 1/8 scale in the DCT domain (``datamodules.images.draft_size``): several times faster on
            photos, with slightly different inputs, so that a JPEG and a PNG of the same pixels can get different
            probabilities (the README measures both).
        interpolation: of the resize to the input size. None: the tower's own (open_clip's; CLIP's is bicubic).
        resize_mode: ``shortest`` (short side to the input size, then the centre crop: CLIP's), ``longest`` (long
            side, padded) or ``squash``. None: the tower's own.
        mean / std: per-channel normalisation. None: the tower's own (open_clip's for its pretrained weights).

    A built model records every value it uses (``NXTP.config``), so a saved model states them all.
    """

    decode: Decode = "full"
    interpolation: Interpolation | None = None
    resize_mode: ResizeMode | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    def __post_init__(self) -> None:
        for name, kind in (("decode", Decode), ("interpolation", Interpolation), ("resize_mode", ResizeMode)):
            value = getattr(self, name)
            if value is not None and value not in kind.__args__:
                raise ValueError(f"model.nxtp.preprocessing.{name}={value!r}: choose one of {kind.__args__}")

    def resolved(self, tower: dict[str, Any]) -> Preprocessing:
        """Every value that is None taken from the tower's own preprocessing (open_clip's ``PreprocessCfg``)."""
        own = {k: getattr(self, k) or tower[k] for k in ("interpolation", "resize_mode")}
        own |= {k: [float(v) for v in getattr(self, k) or tower[k]] for k in ("mean", "std")}  # lists: YAML
        return replace(self, **own)

    def transforms(self, size: tuple[int, int]) -> tuple[Any, Any]:
        """open_clip's (train, eval) transforms of a resolved ``Preprocessing`` for a tower of input ``size``."""
        train, eval_ = (
            open_clip.image_transform(
                size[0] if size[0] == size[1] else size,
                is_train=is_train,
                mean=tuple(self.mean),
                std=tuple(self.std),
                resize_mode=self.resize_mode,
                interpolation=self.interpolation,
            )
            for is_train in (True, False)
        )
        return train, eval_


@dataclass
class NXTPConfig:
    """What gives a model's weights their shapes and meaning: all that a saved model records beside its weights.

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
        label_attention: how labels are trained. ``masked`` (NXTP's): each label sees the image and the prompt but
            not the other labels, and its first token is predicted from the last prompt token, where one-shot
            sampling reads it. ``causal`` (the paper's baseline): the labels are one causal sequence after the
            prompt, each seeing the ones before it and its first token predicted from the delimiter before it.
            Inference is the same for both.
        preprocessing: how images become the tower's input (``Preprocessing``); the default reproduces the
            reference's, and is what a saved model without this entry (of an earlier version) was made for.
    """

    vision: VisionConfig
    decoder: DecoderConfig
    tokenizer: str
    prompt: str = PROMPT
    reference_compat: bool = False
    reset_label_positions: bool = False
    label_attention: LabelAttention = "masked"
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "the config") -> NXTPConfig:
        """A config from its plain form (``to_dict``, a ``config.yaml``); unknown keys are an error naming them."""
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown model config keys {unknown}")
        vision, decoder = config.get("vision"), config.get("decoder")
        preprocessing = config.get("preprocessing")
        return cls(
            **{
                **config,
                "vision": vision if isinstance(vision, VisionConfig) else VisionConfig(**(vision or {})),
                "decoder": decoder if isinstance(decoder, DecoderConfig) else DecoderConfig(**(decoder or {})),
                "tokenizer": str(config["tokenizer"]),
                "preprocessing": preprocessing
                if isinstance(preprocessing, Preprocessing)
                else Preprocessing(**(preprocessing or {})),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML / JSON), the form ``from_dict`` reads."""
        return asdict(self)


class NXTP(nn.Module):
    """The recognizer: vision tower, projection and truncated decoder, with its tokenizer.

    Args:
        config: the architecture, tokenizer and prompt (``NXTPConfig``).
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
        config: NXTPConfig,
        attention: Attention = "auto",
        pad_to_multiple: int | None = None,
    ) -> None:
        super().__init__()
        if config.label_attention not in LabelAttention.__args__:
            raise ValueError(
                f"model.nxtp.label_attention={config.label_attention!r}: choose one of {LabelAttention.__args__}"
            )
        if attention not in Attention.__args__:
            raise ValueError(f"attention={attention!r}: choose one of {Attention.__args__}")
        if pad_to_multiple is not None and pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple={pad_to_multiple}: must be a positive length")
        self._config = config
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.sequences = SequenceBuilder(self.tokenizer, reference_compat=config.reference_compat)
        self.prompt = config.prompt
        self.reset_label_positions = config.reset_label_positions
        # Speed settings, not part of the model: ``save_pretrained`` leaves them out of the config.
        self.attention = attention
        self.pad_to_multiple = pad_to_multiple
        self.visual, _, _ = build_vision_tower(config.vision)
        # open_clip's transforms for the tower, with what the config sets in place of the tower's own
        tower = getattr(self.visual, "preprocess_cfg", None) or asdict(open_clip.transform.PreprocessCfg())
        self.preprocessing = config.preprocessing.resolved(tower)
        self.train_transform, self.eval_transform = self.preprocessing.transforms(self.image_size)
        self.decoder = build_decoder(config.decoder, vocab_size=len(self.tokenizer))
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

    def segments(self, text: TextBatch) -> Tensor:
        """The block of every sequence position [B, S] (``sequence.segment_ids``); with ``causal`` label attention
        every label is in one block, so that the labels form one causal sequence (mask, loss rows and positions
        follow from the blocks)."""
        seg = segment_ids(text, self.n_image_tokens, self.reference_compat)
        return seg.clamp(max=1) if self._config.label_attention == "causal" else seg

    def layout(self, text: TextBatch, attention: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Block ids [B, S], attention mask and rotary positions [B, S] of a training batch.

        The mask is in the form ``attention`` (default: this model's path) asks for: a [B, 1, S, S] boolean
        tensor (``dense``), a [B, 1, S - n_image, S] one (``compact``) or a FlexAttention ``BlockMask`` (``flex``).
        """
        seg = self.segments(text)
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
    def image_size(self) -> tuple[int, int]:
        """The tower's input size (height, width)."""
        size = self.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def inputs(self) -> ModelInputs:
        """What the data pipeline needs from this model (``NXTPDataModule(inputs=...)``)."""
        return ModelInputs(
            self.sequences, self.prompt, self.train_transform, self.eval_transform, self.image_size, self.preprocessing
        )

    @property
    def config(self) -> NXTPConfig:
        """This model's config, as built: its preprocessing with every value it uses, and ``reference_compat`` as it
        is now (it may be switched after building)."""
        return replace(self._config, reference_compat=self.reference_compat, preprocessing=self.preprocessing)

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
        # The anchor row predicts the first token of every label, so rows repeat. index_select's backward adds the
        # repeated rows' gradients in a fixed order (index_add_); advanced indexing's (index_put_ with accumulate)
        # adds them in whatever order the CPU threads finish, which made two runs of one command drift apart.
        flat = (torch.arange(len(rows), device=rows.device)[:, None] * hidden.shape[1] + rows)[keep]
        logits = self.logits(hidden.flatten(0, 1).index_select(0, flat))
        return F.cross_entropy(logits.float(), targets[keep]), keep.sum()

    # pickle-free model folders (the format: ``checkpoint``) ------------------------------------------------

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``model.safetensors``, ``config.yaml`` and ``tokenizer/``: all that ``from_pretrained`` needs."""
        from .checkpoint import save_folder

        return save_folder(self, out_dir)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> NXTP:
        """Rebuild a model written by ``save_pretrained`` (no pickle involved)."""
        from .checkpoint import load_folder

        return load_folder(path)
