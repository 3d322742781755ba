"""The image encoder: an open_clip vision tower that returns every patch token after ``ln_post``.

NXTP keeps all tokens (CLS dropped later), not CLIP's pooled embedding, so the tower's own
projection is removed. Towers are built by open_clip from a model name (``ViT-L-14``), a pretrained
tag or checkpoint path (``openai``), or a JSON config: the project's own configs live in
``model_configs/`` and are registered with open_clip at import, and any other JSON file path works too.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIGS)


@dataclass
class VisionConfig:
    """How to build the vision tower.

    Args:
        model_name: an open_clip model name (``ViT-L-14``) or a path to an open_clip JSON model config.
        pretrained: an open_clip pretrained tag (``openai``), a checkpoint path, or None for random init.
        conv_stem: replace the patchify convolution by a small convolutional stem (same token grid).
            It gives a tiny tower trained from scratch the locality prior it lacks; paper-scale towers keep
            their patchify convolution.
        stem_pool_first: in each stage of the conv stem, max-pool right after the convolution, so that BatchNorm
            and ReLU run on a quarter of the pixels: the stem's step is 1.8x cheaper on a CPU, and on the
            synthetic scenes it learns faster too (``experiments/speedrun.md``). False: conv, BatchNorm, ReLU,
            then max-pool, the stem of the models saved before this option.
        config: an open_clip model config given inline (``embed_dim``, ``vision_cfg``, ``text_cfg``), registered
            under ``model_name``; used by imported checkpoints, whose tower is described by their shapes.
    """

    model_name: str = "nxtp-tiny-vit"
    pretrained: str | None = None
    conv_stem: bool = False
    stem_pool_first: bool = False
    config: dict | None = None


class ConvStem(nn.Sequential):
    """``log2(patch)`` stages of 3x3 conv + BatchNorm + ReLU + 2x2 max-pool (``pool_first``: conv + max-pool +
    BatchNorm + ReLU), then a 3x3 conv to ``width``.

    Maps [B, 3, H, W] to [B, width, H / patch, W / patch], like the patchify convolution it replaces.
    """

    def __init__(self, width: int, patch_size: int, pool_first: bool = False) -> None:
        stages = int(math.log2(patch_size))
        if 2**stages != patch_size:
            raise ValueError(f"vision.conv_stem needs a power-of-two patch size, got {patch_size}")
        channels = [3] + [min(width, 16 * 2**i) for i in range(stages)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            conv, norm = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), [nn.BatchNorm2d(c_out), nn.ReLU()]
            layers += [conv, nn.MaxPool2d(2), *norm] if pool_first else [conv, *norm, nn.MaxPool2d(2)]
        layers.append(nn.Conv2d(channels[-1], width, 3, padding=1))
        super().__init__(*layers)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        # Channels-last: the CPU's convolution, BatchNorm and max-pool kernels run about 1.2x as fast on it.
        return super().forward(x.contiguous(memory_format=torch.channels_last))


def _resolve_name(model_name: str) -> str:
    path = Path(model_name)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"vision.model_name: no open_clip config at {model_name}")
        open_clip.add_model_config(path)
        return path.stem
    if model_name not in open_clip.list_models():
        raise ValueError(f"vision.model_name: {model_name!r} is neither an open_clip model nor a .json config")
    return model_name


class _RandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_init(random_init: bool):
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" where random init is what the config
    asks for (``pretrained: null``): a trained checkpoint loads its weights right after, and every `nxtp label`
    printed the notice."""
    notice = _RandomInitNotice()
    if random_init:
        logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


def build_vision_tower(cfg: VisionConfig) -> tuple[nn.Module, object, object]:
    """Build the tower and open_clip's (train, eval) preprocessing for it."""
    if cfg.config is not None:
        clip = open_clip.CLIP(**cfg.config)
        if cfg.pretrained:
            open_clip.load_checkpoint(clip, cfg.pretrained)
        size = clip.visual.image_size
        train_tf, eval_tf = (open_clip.image_transform(size, is_train=train) for train in (True, False))
    else:
        name = _resolve_name(cfg.model_name)
        # Build where the caller builds (e.g. under ``torch.device("meta")``), not always on the CPU.
        device = torch.empty(0).device
        with _quiet_random_init(cfg.pretrained is None):
            clip, train_tf, eval_tf = open_clip.create_model_and_transforms(
                name, pretrained=cfg.pretrained, device=device
            )
    visual = clip.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise ValueError(f"vision.model_name: {cfg.model_name!r} is not a ViT; NXTP needs its patch tokens")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError(
            f"vision.model_name: {cfg.model_name!r} does not expose its tokens after ln_post with CLS first"
        )
    image, patch = tuple(visual.image_size), tuple(visual.patch_size)
    if image[0] % patch[0] or image[1] % patch[1]:
        # The patchify convolution would silently drop the pixels past the last whole patch.
        raise ValueError(
            f"vision: image size {image[0]}x{image[1]} of {cfg.model_name!r} is not a multiple of its patch "
            f"size {patch[0]}x{patch[1]}; set vision_cfg.image_size (in vision.config or the model's "
            "JSON config) to a multiple"
        )
    visual.proj = None  # NXTP learns its own projection into the decoder
    visual.output_tokens = True
    if cfg.conv_stem:
        visual.conv1 = ConvStem(visual.conv1.out_channels, patch[0], cfg.stem_pool_first)
    return visual, train_tf, eval_tf


def frozen_prefix(visual: nn.Module) -> int:
    """How many leading blocks of the tower are frozen together with everything before them (the patch
    embedding, class and position embeddings, ``ln_pre``): -1 if one of those trains, the number of blocks + 1
    if nothing in the tower trains."""
    blocks = visual.transformer.resblocks
    in_blocks = {id(p) for p in blocks.parameters()}
    head = {id(p) for p in visual.ln_post.parameters()}
    if any(p.requires_grad for p in visual.parameters() if id(p) not in in_blocks and id(p) not in head):
        return -1
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(blocks) + int(not any(p.requires_grad for p in visual.ln_post.parameters()))


def encode_patches(visual: nn.Module, pixels: Tensor) -> Tensor:
    """The patch tokens after ``ln_post``, CLS dropped: [B, n_patches, width].

    The frozen part of the tower (all of it, or its first blocks as when only the last blocks train) runs
    without autograd: it needs no graph, and no activation of it is kept for the backward pass.
    """
    frozen = frozen_prefix(visual) if torch.is_grad_enabled() else -1
    blocks = visual.transformer.resblocks
    if frozen > len(blocks):
        with torch.no_grad():
            _, patches = visual(pixels)
        return patches
    if frozen <= 0:
        _, patches = visual(pixels)
        return patches
    # open_clip's VisionTransformer.forward, cut after the frozen blocks.
    with torch.no_grad():
        x = _run_blocks(visual, visual._embeds(pixels), blocks[:frozen])
    x = _run_blocks(visual, x, blocks[frozen:])
    _, patches = visual._pool(x)
    return patches


def _run_blocks(visual: nn.Module, x: Tensor, blocks) -> Tensor:
    """``visual.transformer`` restricted to ``blocks``, on and back to batch-first tokens."""
    transformer = visual.transformer
    if not transformer.batch_first:
        x = x.transpose(0, 1).contiguous()
    for block in blocks:
        if transformer.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, None, None, None, use_reentrant=False)
        else:
            x = block(x)
    return x if transformer.batch_first else x.transpose(0, 1)
