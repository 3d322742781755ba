"""The token layout of an NXTP sequence: what the decoder reads and what it must predict.

A sequence is ``[image embeddings] <|image|> <s> PROMPT label_1 , label_2 , ... label_N ,``.
The image part is not text: text positions are counted from ``<|image|>``, and sequence position
``n_image + j`` holds text position ``j``.

Two layouts exist:

* default: every label ends with the delimiter, so every label is its own block (see ``masking``),
  and the first token of *every* label is predicted from the last prompt token (the *anchor*),
  exactly where one-shot sampling reads it at inference. Nothing follows the last delimiter.
* ``reference_compat``: the official code's layout, kept for parity. The last label has no delimiter
  and is followed by ``</s>`` (which is never a target); the first token of label ``i + 1`` is
  predicted from the delimiter of label ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PROMPT = "The objects in the image are"  # what the decoder continues with the labels (the paper's prompt)
IMAGE_TOKEN = "<|image|>"
EMPTY_TOKEN = "<|empty|>"
IGNORE = -1
# Segment ids (``segment_ids``): the block each sequence position belongs to; label blocks are 1, 2, ...
IMAGE_SEGMENT, PREFIX_SEGMENT, OTHER_SEGMENT = -1, 0, -2


@dataclass
class TextSequence:
    """One tokenized sample.

    ``ids`` are the text ids; ``anchor`` is the text position of the last prompt token;
    ``label_ends`` are the text positions of the delimiters that close the labels' blocks.
    """

    ids: list[int]
    anchor: int
    label_ends: list[int]


def add_nxtp_tokens(tokenizer) -> None:
    """Add ``<|image|>`` and ``<|empty|>`` to ``tokenizer`` (no-op when present) and set ``<|empty|>`` as pad."""
    missing = [t for t in (IMAGE_TOKEN, EMPTY_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.pad_token = EMPTY_TOKEN


class SequenceBuilder:
    """Turns a prompt and a list of labels into a :class:`TextSequence` with a given tokenizer."""

    def __init__(self, tokenizer, delimiter: str = ",", reference_compat: bool = False) -> None:
        add_nxtp_tokens(tokenizer)
        self.tokenizer = tokenizer
        self.reference_compat = reference_compat
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_id = tokenizer.convert_tokens_to_ids(EMPTY_TOKEN)
        self.new_token_ids = [self.image_id, self.pad_id]
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        delimiter_ids = tokenizer.encode(f"a{delimiter}", add_special_tokens=False)
        if len(delimiter_ids) < 2 or tokenizer.decode(delimiter_ids[-1:]) != delimiter:
            raise ValueError(f"tokenizer has no single token for the delimiter {delimiter!r}")
        self.delimiter = delimiter
        self.delimiter_id = delimiter_ids[-1]
        if self.bos_id is None or self.eos_id is None:
            raise ValueError("tokenizer needs a bos_token and an eos_token")
        self._context_ids: dict[str, list[int]] = {}  # the prompt's and the delimiter's ids, tokenized once

    def _ids_of(self, context: str) -> list[int]:
        if context not in self._context_ids:
            self._context_ids[context] = self.tokenizer.encode(context, add_special_tokens=False)
        return self._context_ids[context]

    def prompt_ids(self, prompt: str) -> list[int]:
        """Text ids of the inference sequence: ``<|image|> <s> PROMPT``."""
        return [self.image_id, self.bos_id, *self._ids_of(prompt)]

    def __call__(self, prompt: str, labels: list[str]) -> TextSequence:
        """Tokenize ``prompt`` followed by ``labels``, label by label, each closed by the delimiter's own id.

        The ids are those of the whole text ``"PROMPT l1, l2, ... lN,"`` (reference: ``"PROMPT l1, ... lN"``
        ``</s>``) tokenized at once, as the reference does, except where a label's end would merge with the
        delimiter into one token (LLaMA-2 has ``".,"``): here the delimiter stays its own token, so every label
        closes where its block ends whatever characters it ends with.

        Raises:
            ValueError: the prompt tokenizes differently when labels follow it, or a label is empty, has no tokens
                or contains the delimiter token (it would close its block early).
        """
        head = self.prompt_ids(prompt)
        ids, anchor, label_ends = list(head), len(head) - 1, []
        for i, label_ids in enumerate(self._label_ids(prompt, labels)):
            ids += label_ids
            if self.reference_compat and i == len(labels) - 1:
                ids.append(self.eos_id)  # the reference's last label has no delimiter
            else:
                label_ends.append(len(ids))
                ids.append(self.delimiter_id)
        return TextSequence(ids, anchor, label_ends)

    def _label_ids(self, prompt: str, labels: list[str]) -> list[list[int]]:
        """Each label's ids as they are in the whole text: tokenized after the text before it (the prompt for the
        first label, the delimiter for the others) and cut off from the ids of that text alone."""
        if not labels:
            return []
        blank = [label for label in labels if not label.strip()]
        if blank:  # it would still give a token (a space)
            raise ValueError(f"label {blank[0]!r} is empty")
        contexts = [prompt, *[self.delimiter] * (len(labels) - 1)]
        texts = [f"{c} {label}" for c, label in zip(contexts, labels)]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        before = {prompt: self._ids_of(prompt), self.delimiter: self._ids_of(self.delimiter)}
        out = []
        for i, (context, label, ids) in enumerate(zip(contexts, labels, encoded)):
            n = len(before[context])
            if ids[:n] != before[context]:
                what = f"prompt {prompt!r}" if i == 0 else f"delimiter {self.delimiter!r}"
                raise ValueError(f"{what} does not tokenize to the same ids when label {label!r} follows it")
            if len(ids) == n:
                raise ValueError(f"label {label!r} has no tokens")
            if self.delimiter_id in ids[n:]:
                raise ValueError(f"label {label!r} contains the delimiter token {self.delimiter!r}")
            out.append(ids[n:])
        return out


@dataclass
class TextBatch:
    """Padded text part of a batch (tensors on CPU until moved)."""

    ids: Tensor  # [B, T] long, padded with the <|empty|> id
    lengths: Tensor  # [B] long
    anchors: Tensor  # [B] long
    label_ends: Tensor  # [B, max_labels] long, -1 padded

    def to(self, device) -> TextBatch:
        return TextBatch(*(t.to(device) for t in (self.ids, self.lengths, self.anchors, self.label_ends)))


def collate_text(samples: list[TextSequence], pad_id: int, pad_to: int | None = None) -> TextBatch:
    """Pad text sequences to the longest one (or to ``pad_to``)."""
    length = max(len(s.ids) for s in samples)
    length = max(length, pad_to or 0)
    n_labels = max(1, max(len(s.label_ends) for s in samples))
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    ends = torch.full((len(samples), n_labels), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        ends[i, : len(s.label_ends)] = torch.tensor(s.label_ends, dtype=torch.long)
    lengths = torch.tensor([len(s.ids) for s in samples])
    anchors = torch.tensor([s.anchor for s in samples])
    return TextBatch(ids, lengths, anchors, ends)


def pad_text(text: TextBatch, length: int, pad_id: int) -> TextBatch:
    """``text`` padded with ``pad_id`` to ``length`` text positions (never shortened); padding is never a target."""
    extra = length - text.ids.shape[1]
    if extra <= 0:
        return text
    ids = torch.cat([text.ids, text.ids.new_full((text.ids.shape[0], extra), pad_id)], dim=1)
    return TextBatch(ids, text.lengths, text.anchors, text.label_ends)


def segment_ids(text: TextBatch, n_image: int, reference_compat: bool = False) -> Tensor:
    """Label each sequence position with the block it belongs to, shape [B, n_image + T].

    ``IMAGE_SEGMENT`` image, ``PREFIX_SEGMENT`` prefix (``<|image|>``, ``<s>`` and the prompt up to the anchor),
    ``k >= 1`` the k-th label block (its tokens and its closing delimiter), ``OTHER_SEGMENT`` anything else
    (padding; in ``reference_compat`` also the last label and ``</s>``).
    In ``reference_compat`` the anchor of the *last* sample is used for every sample (the reference's quirk).
    """
    batch, length = text.ids.shape
    pos = torch.arange(length, device=text.ids.device).expand(batch, length)
    anchors = text.anchors[-1:].expand(batch) if reference_compat else text.anchors
    seg = torch.full_like(pos, OTHER_SEGMENT)
    seg[pos <= anchors[:, None]] = PREFIX_SEGMENT
    ends = text.label_ends
    block = torch.searchsorted(torch.where(ends < 0, torch.iinfo(torch.long).max, ends).contiguous(), pos.contiguous())
    in_block = (pos > anchors[:, None]) & (block < (ends >= 0).sum(1, keepdim=True))
    seg = torch.where(in_block, block + 1, seg)
    image = torch.full((batch, n_image), IMAGE_SEGMENT, dtype=seg.dtype, device=seg.device)
    return torch.cat([image, seg], dim=1)


def position_ids(seg: Tensor, reset_label_positions: bool = False) -> Tensor:
    """Rotary positions [B, S]: ``0..S-1``, or, with ``reset_label_positions``, every label block restarts
    right after the prompt, so each label sits where one-shot sampling puts it at inference."""
    batch, length = seg.shape
    pos = torch.arange(length, device=seg.device).expand(batch, length).clone()
    if not reset_label_positions:
        return pos
    first_label_pos = (seg <= PREFIX_SEGMENT).long().cumprod(1).sum(1, keepdim=True)  # prefix length incl. image
    # A label block is one run of positions: its start is the latest run start at or before each position
    # (computed without a host sync, so that a GPU step does not wait here).
    run_start = (seg > 0) & (seg != F.pad(seg, (1, 0), value=PREFIX_SEGMENT)[:, :-1])
    start = torch.where(run_start, pos, 0).cummax(1).values
    return torch.where(seg > 0, first_label_pos + pos - start, pos)


def loss_targets(text: TextBatch, seg: Tensor, n_image: int, reference_compat: bool = False) -> tuple[Tensor, Tensor]:
    """Which sequence rows predict which token ids.

    Returns ``rows`` and ``targets``, both [B, P] long, ``targets == -1`` where unused. Every text
    token from ``<s>`` on is predicted from the row before it (the prompt included, as in the reference),
    except, by default, the first token of each label, which is predicted from the anchor row.
    ``</s>`` and padding are never targets.
    """
    batch, length = text.ids.shape
    rows = torch.arange(n_image, n_image + length - 1, device=text.ids.device).expand(batch, -1).clone()
    targets = text.ids[:, 1:].clone()
    target_pos = torch.arange(1, length, device=targets.device)[None]
    valid = target_pos < text.lengths[:, None]
    if reference_compat:
        # rm_eos_token_for_objs: the reference never trains the closing </s>.
        closing = (target_pos == text.lengths[:, None] - 1) & (text.lengths[:, None] - 1 > text.anchors[:, None])
        valid &= ~closing
    else:
        text_seg = seg[:, n_image + 1 :]  # block of each target token
        prev_seg = seg[:, n_image:-1]
        first_of_label = (text_seg > 0) & (text_seg != prev_seg)
        anchor_rows = (n_image + text.anchors)[:, None].expand_as(rows)
        rows = torch.where(first_of_label, anchor_rows, rows)
    return rows, torch.where(valid, targets, torch.full_like(targets, IGNORE))
