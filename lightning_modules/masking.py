"""Label-masked attention: the labels of an image are a set, so no label may see another.

Given the block of every position (``sequence.segment_ids``), a query may attend to

* every image position, if it is an image or text position (image rows see only the image, both ways);
* prefix positions (``<|image|>``, ``<s>``, prompt) causally;
* earlier positions of its own label block, causally.

Rows in no block (padding; in ``reference_compat`` also the last label and ``</s>``) see the prefix only,
not even themselves: that is what the reference does, and it keeps every softmax row non-empty.
"""

from __future__ import annotations

import torch
from torch import Tensor


def label_masked_attention(seg: Tensor) -> Tensor:
    """Boolean mask [B, 1, S, S] from block ids [B, S]; True means "may attend"."""
    length = seg.shape[1]
    pos = torch.arange(length, device=seg.device)
    causal = pos[None, :, None] >= pos[None, None, :]  # [1, q, kv]
    q, kv = seg[:, :, None], seg[:, None, :]
    allowed = (kv == -1) | ((q != -1) & (kv == 0) & causal) | ((q > 0) & (kv == q) & causal)
    return allowed[:, None]


def prefix_attention(n_image: int, n_text: int, device=None) -> Tensor:
    """Mask [1, 1, L, L] of the inference prefix: image block bidirectional, text causal."""
    seg = torch.cat([torch.full((n_image,), -1), torch.zeros(n_text, dtype=torch.long)]).to(device)
    return label_masked_attention(seg[None])
