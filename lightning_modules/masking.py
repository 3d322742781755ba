"""Label-masked attention: the labels of an image are a set, so no label may see another.

Given the block of every position (``sequence.segment_ids``), a query may attend to

* every image position, if it is an image or text position (image rows see only the image, both ways);
* prefix positions (``<|image|>``, ``<s>``, prompt) causally;
* earlier positions of its own label block, causally.

Rows in no block (padding; in ``reference_compat`` also the last label and ``</s>``) see the prefix only,
not even themselves: that is what the reference does, and it keeps every softmax row non-empty.

The same rule comes in three forms, one per attention path of the decoder (``decoder.LABEL_MASKED``):

* ``label_masked_attention``: the dense boolean mask [B, 1, S, S], the reference form;
* ``compact_label_mask``: only the text rows [B, 1, S - n_image, S]; the image rows, which see exactly the image
  block, run as plain bidirectional attention without a mask;
* ``label_block_mask``: a FlexAttention ``BlockMask`` built from ``label_mask_mod``, which skips the blocks of
  the score matrix that no query may see.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .sequence import IMAGE_SEGMENT, PREFIX_SEGMENT


def _allowed(q_seg: Tensor, kv_seg: Tensor, causal: Tensor) -> Tensor:
    """The attention rule on block ids that broadcast against each other (shared by every form)."""
    image, prefix = kv_seg == IMAGE_SEGMENT, kv_seg == PREFIX_SEGMENT
    return image | ((q_seg != IMAGE_SEGMENT) & prefix & causal) | ((q_seg > 0) & (kv_seg == q_seg) & causal)


def label_masked_attention(seg: Tensor) -> Tensor:
    """Boolean mask [B, 1, S, S] from block ids [B, S]; True means "may attend"."""
    return _query_rows(seg, 0)


def compact_label_mask(seg: Tensor, n_image: int) -> Tensor:
    """The text rows of ``label_masked_attention``: [B, 1, S - n_image, S].

    The first ``n_image`` positions must be the image block; their rows (all image columns, nothing else) are
    left out, which ``decoder.LABEL_MASKED`` reads as "the leading queries attend to the leading keys only".
    """
    return _query_rows(seg, n_image)


def _query_rows(seg: Tensor, first: int) -> Tensor:
    """The rows of the mask from query position ``first`` on: [B, 1, S - first, S]."""
    pos = torch.arange(seg.shape[1], device=seg.device)
    causal = pos[None, first:, None] >= pos[None, None, :]  # [1, q, kv]
    return _allowed(seg[:, first:, None], seg[:, None, :], causal)[:, None]


def label_mask_mod(seg: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention ``mask_mod`` of the label-masked rule for block ids [B, S] (same values as the dense mask)."""

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return _allowed(seg[b, q], seg[b, kv], q >= kv)

    return mask_mod


def label_block_mask(seg: Tensor):
    """FlexAttention ``BlockMask`` of the label-masked rule for block ids [B, S] (all heads share it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = seg.shape
    # Compiling the mask construction avoids materialising B x S x S on the GPU; on the CPU it only costs time.
    return create_block_mask(
        label_mask_mod(seg), batch, None, length, length, device=seg.device, _compile=seg.device.type == "cuda"
    )


def prefix_attention(n_image: int, n_text: int, device=None) -> Tensor:
    """Mask [1, 1, L, L] of the inference prefix: image block bidirectional, text causal."""
    seg = torch.cat([torch.full((n_image,), IMAGE_SEGMENT), torch.full((n_text,), PREFIX_SEGMENT)]).to(device)
    return label_masked_attention(seg[None])
