"""Where each label looks: a map over the image patches of how a label's tokens attend to the image tokens.

A label is explained the way it is scored: the image and prompt run once (the prefix, cached as in one-shot
sampling), then every label of an image is teacher-forced after the prompt, ``label tokens + delimiter``, all
labels of a batch in one short pass over that cache. The attention weights of those label rows over the image
keys make the map. Four ways to read them (``METHODS``):

* ``head``: one decoder layer and head (``layer``, ``head``), as the official demo shows;
* ``mean``: the mean over all layers and heads;
* ``rollout``: attention rollout (Abnar & Zuidema 2020) through the decoder: per layer the head-mean attention
  plus the residual (``0.5 A + 0.5 I``), multiplied from the label rows down to the decoder's input, so that an
  image token that has itself attended to other image tokens passes its share on to them;
* ``gradient``: gradient-weighted attention (Chefer et al. 2021): ``relu(dA * A)`` averaged over layers and heads,
  for the rows that predict the label (the anchor, which picks its first token, and the label's own tokens), with
  respect to the label's log-probability.

Why ``gradient`` is the default (``DEFAULT_METHOD``): the label-token rows of the other three only predict the
label's later tokens and its delimiter; for a one-token label (every kind of the synthetic scenes) that is the
delimiter alone, which needs no look at the image. The label is chosen at the anchor row (its first token), and
that row is shared by all labels of an image: only its gradient tells the labels apart. The price is one forward
and backward pass of the whole sequence per (image, label) pair (the anchor row's gradient differs per label, so
the cached prefix cannot be shared). ``experiments/eval_attention_maps.py`` measures all four against the boxes;
change ``DEFAULT_METHOD`` if a trained model's table says otherwise.

The other three need no extra full pass: their weights come from a transformers attention function
(``EXPLAIN``) switched in on the decoder for the explain call only (and restored after): it computes the output
exactly as the model's own ``decoder.LABEL_MASKED`` path does, so predictions do not change, and computes
``softmax(QK^T)`` beside it for the rows it records. With predicted labels (``labels=None``) the sampler itself
runs the prefix once; its keys and values are kept and the label pass reuses them; only the label tokens (and
delimiter) run again, all labels of the batch at once.

The maps are distributions over the image patches (CLS, where the image tokens hold one, excluded), on the
tower's ``grid_size``; ``finer_maps`` makes them twice as fine from views of the image shifted by half a patch
(``--locate-views``). Writers: ``overlay`` (PNG heat map on the image, numpy colormap), ``write_maps`` (PNG,
``.npy`` and JSON per label). Metrics against boxes: ``box_coverage``, ``pointing_hit``, ``mass_in_box``, with the
``uniform_map`` and ``centre_prior`` baselines.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .decoder import label_masked_attention_forward
from .locate import VIEWS
from .masking import prefix_attention
from .nxtp import NXTP
from .sampling import decode_branches, rank_images

Method = Literal["rollout", "mean", "head", "gradient"]
METHODS: tuple[str, ...] = Method.__args__
DEFAULT_METHOD: Method = "gradient"
EXPLAIN = "nxtp_explain"


# recording attention weights --------------------------------------------------------------------------------------


def attention_weights(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
    """``softmax(Q K^T * scaling)`` in float32: [B, heads, q, k]; keys may have fewer (grouped) heads.

    ``mask`` as the decoder gets it: boolean (True attends), additive float, or None (causal, aligned to the end).
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # what transformers' repeat_kv does: head h reads kv head h // groups
    scores = query.float() @ key.float().transpose(-1, -2) * scaling
    if mask is None:
        q, k = scores.shape[-2:]
        mask = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(k - q)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    return scores.softmax(-1)


class _Recorder:
    """What the explain pass keeps, per decoder layer (filled by ``_explain_attention_forward``)."""

    def __init__(self, prefix_weights: bool) -> None:
        self.phase: Literal["prefix", "labels", "gradient"] = "prefix"
        self.prefix_weights = prefix_weights
        self.prefix_kv: dict[int, tuple[Tensor, Tensor]] = {}
        self.prefix_attn: dict[int, Tensor] = {}  # head-mean [B, S, S] (rollout needs it)
        self.heads: dict[int, Tensor] = {}  # label rows, every head, image columns [N, H, T, n_image]
        self.rows: dict[int, Tensor] = {}  # label rows, head-mean, every column [N, T, S + T]
        self.n_image = 0
        self.first_row = 0  # gradient phase: the anchor's position; rows from it on are recorded with their graph
        self.grad_rows: dict[int, Tensor] = {}  # [N, H, L - first_row, L]

    def attend_with_graph(self, module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor, **kwargs) -> Tensor:
        """Attention whose weights from ``first_row`` on are kept on the autograd graph (gradient phase)."""
        r0 = self.first_row
        w = attention_weights(query[:, :, r0:], key, mask[:, :, r0:], kwargs.get("scaling", module.scaling))
        self.grad_rows[module.layer_idx] = w
        groups = query.shape[1] // value.shape[1]
        tail = (w.to(value.dtype) @ value.repeat_interleave(groups, dim=1)).transpose(1, 2)
        if r0 == 0:
            return tail
        head, _ = label_masked_attention_forward(module, query[:, :, :r0], key, value, mask[:, :, :r0], **kwargs)
        return torch.cat([head, tail], dim=1)

    def record(
        self, layer: int, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float
    ) -> None:
        q_len, k_len = query.shape[2], key.shape[2]
        if self.phase == "prefix":
            if q_len != k_len:  # a sampler step: the labels are explained in their own pass
                return
            self.prefix_kv[layer] = (key, value)
            if self.prefix_weights:
                self.prefix_attn[layer] = attention_weights(query, key, mask, scaling).mean(1)
            return
        w = attention_weights(query, key, mask, scaling)
        self.heads[layer] = w[..., : self.n_image]
        self.rows[layer] = w.mean(1)


_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("nxtp_attention_recorder", default=None)


def _explain_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """The model's own attention (same kernel, same output), with the weights recorded beside it."""
    recorder = _RECORDER.get()
    if recorder is not None and recorder.phase == "gradient":
        return recorder.attend_with_graph(module, query, key, value, attention_mask, **kwargs), None
    out = label_masked_attention_forward(module, query, key, value, attention_mask, **kwargs)
    full_mask = attention_mask is None or (
        isinstance(attention_mask, Tensor) and attention_mask.shape[2] == query.shape[2]
    )
    if recorder is not None and full_mask:
        recorder.record(module.layer_idx, query, key, value, attention_mask, kwargs.get("scaling", module.scaling))
    return out


AttentionInterface.register(EXPLAIN, _explain_attention_forward)
AttentionMaskInterface.register(EXPLAIN, sdpa_mask)  # masks are prepared as for the model's own path


@contextlib.contextmanager
def _explaining(model: NXTP, recorder: _Recorder) -> Iterator[None]:
    """Switch the decoder to ``EXPLAIN`` and record into ``recorder``; restore both afterwards."""
    configs = {
        id(m.config): m.config
        for m in model.decoder.modules()
        if hasattr(getattr(m, "config", None), "_attn_implementation")
    }
    before = {k: c._attn_implementation for k, c in configs.items()}
    token = _RECORDER.set(recorder)
    try:
        for c in configs.values():
            c._attn_implementation = EXPLAIN
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]
        _RECORDER.reset(token)


# the explain pass ------------------------------------------------------------------------------------------------


@dataclass
class LabelAttention:
    """The recorded attention of every (image, label) pair of a batch; ``maps`` turns it into grids.

    ``image_index[n]`` is the image of pair ``n``; ``lengths[n]`` its label's token count (the delimiter follows).
    """

    labels: list[list[str]]
    scores: list[list[float]]
    image_index: Tensor  # [N]
    lengths: Tensor  # [N]
    heads: list[Tensor]  # per layer [N, H, T, n_image]
    rows: list[Tensor]  # per layer [N, T, S + T]
    prefix: list[Tensor] | None  # per layer [B, S, S]
    grid: tuple[int, int]
    patches: slice  # the image columns that are patches (CLS left out)
    gradient: Tensor | None = None  # [N, n_image]: gradient-weighted attention, when asked for

    @property
    def n_layers(self) -> int:
        return len(self.heads)

    @property
    def n_heads(self) -> int:
        return self.heads[0].shape[1] if self.heads else 0


def patch_grid(model: NXTP) -> tuple[int, int]:
    """The (rows, columns) of the vision tower's patch grid that maps are drawn on; ``ValueError`` naming the tower
    when it has none (its labels then have no map and cannot be located)."""
    grid = getattr(model.visual, "grid_size", None)
    if grid is None:
        name = model.config.vision.model_name
        raise ValueError(f"the vision tower {name!r} has no patch grid: its labels have no map and cannot be located")
    return tuple(int(g) for g in grid)


def _patch_columns(model: NXTP, n_image: int) -> tuple[tuple[int, int], slice]:
    grid = patch_grid(model)
    n_patches = grid[0] * grid[1]
    if n_image == n_patches:
        return grid, slice(0, n_image)
    if n_image == n_patches + 1:  # a tower that keeps CLS first
        return grid, slice(1, n_image)
    raise ValueError(f"{n_image} image tokens do not fit the tower's {grid[0]}x{grid[1]} patch grid")


def _cache_kwarg(base, cache) -> dict:
    # transformers renamed ``past_key_values`` to ``cache`` (as in ``sampling``).
    return {("cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"): cache}


def _prefix(model: NXTP, pixels: Tensor) -> Tensor:
    """Run image + prompt as the sampler does (weights recorded); the last prompt token's hidden state [B, hidden]."""
    prompt = torch.tensor(model.sequences.prompt_ids(model.prompt), device=pixels.device)
    image = model.embed_images(pixels)
    batch, n_image = image.shape[:2]
    mask = prefix_attention(n_image, len(prompt), device=pixels.device).expand(batch, -1, -1, -1)
    positions = torch.arange(n_image + len(prompt), device=pixels.device).expand(batch, -1)
    embeds = torch.cat([image, model.embed_text(prompt.expand(batch, -1)).to(image.dtype)], dim=1)
    out = model.decoder.get_decoder()(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
    )
    return out.last_hidden_state[:, -1]


def _label_ids(model: NXTP, label: str) -> list[int]:
    """The label's tokens as they follow the prompt (where one-shot sampling decodes them)."""
    seq = model.sequences(model.prompt, [label])
    return seq.ids[seq.anchor + 1 : -1]  # the last id closes the label (delimiter, or </s> in reference_compat)


@contextlib.contextmanager
def capture_prefix(model: NXTP) -> Iterator[_Recorder]:
    """Keep the keys and values of the image and prompt pass that one-shot sampling runs inside this block, for
    ``label_attention(..., prefix=)`` / ``explain(..., prefix=)`` to reuse: locating the labels found then costs
    no second pass over the image. The decoder computes exactly as without it."""
    recorder = _Recorder(prefix_weights=False)
    with _explaining(model, recorder):
        yield recorder


def _holds_prefix(model: NXTP, prefix: _Recorder | None, batch: int) -> bool:
    """Whether ``prefix`` recorded one image-and-prompt pass of ``batch`` images (else it is run again)."""
    if prefix is None or not prefix.prefix_kv:
        return False
    key = prefix.prefix_kv[0][0]
    try:
        _patch_columns(model, key.shape[2] - len(model.sequences.prompt_ids(model.prompt)))
    except ValueError:
        return False
    return key.shape[0] == batch and len(prefix.prefix_kv) == model.decoder.config.num_hidden_layers


@torch.no_grad()
def label_attention(
    model: NXTP,
    pixels: Tensor,
    labels: Sequence[Sequence[str]] | None = None,
    topk: int = 10,
    min_prob: float = 0.0,
    max_label_tokens: int = 19,
    rollout: bool = True,
    gradient: bool = False,
    attention: bool = True,
    prefix: _Recorder | None = None,
) -> LabelAttention:
    """Record how each label of each image attends, for ``pixels`` [B, 3, H, W] (preprocessed).

    Args:
        labels: the labels per image; None labels each image by one-shot sampling (``topk``, ``min_prob``,
            ``max_label_tokens`` as in ``sampling.recognize``), whose prefix pass is then reused.
        rollout: also keep the prefix's attention matrices (needed by ``method="rollout"`` only).
        gradient: also compute the gradient-weighted attention (``method="gradient"``): one forward and backward
            pass of the anchor and label rows per (image, label) pair over the cached prefix (the anchor row is
            shared by an image's labels in the cached passes, and its gradient is not).
        attention: also record every head's attention of the label rows (``heads`` and ``rows``: what the
            ``head``, ``mean`` and ``rollout`` maps read). With ``gradient`` alone, False skips that pass.
        prefix: the image and prompt pass of these ``pixels`` as ``capture_prefix`` recorded it while they were
            sampled; with given ``labels``, ``gradient`` and not ``attention``, it is reused instead of run again.

    Returns the record; given labels are scored by teacher forcing (product of their tokens' and the delimiter's
    probabilities), predicted ones keep the sampler's merged scores.
    """
    seqs = model.sequences
    reuse = labels is not None and gradient and not attention and _holds_prefix(model, prefix, len(pixels))
    recorder = prefix if reuse else _Recorder(prefix_weights=rollout)
    with _explaining(model, recorder):
        if labels is None:
            branches = decode_branches(model, pixels, topk, max_label_tokens)
            ranked = rank_images(
                branches, model.tokenizer.decode, min_prob, model.reference_compat, seqs.delimiter, seqs.delimiter_id
            )
            labels = [[label for label, _ in r] for r in ranked]
            given_scores = [[p for _, p in r] for r in ranked]
            anchor_hidden = None
        else:
            if len(labels) != len(pixels):
                raise ValueError(f"{len(labels)} label lists for {len(pixels)} images")
            labels = [list(x) for x in labels]
            anchor_hidden = None if reuse else _prefix(model, pixels)
            given_scores = None

        device = pixels.device
        n_layers = len(recorder.prefix_kv)
        prefix_len = recorder.prefix_kv[0][0].shape[2]
        n_image = prefix_len - len(seqs.prompt_ids(model.prompt))
        grid, patches = _patch_columns(model, n_image)
        recorder.n_image = n_image
        image_index = torch.tensor([b for b, ls in enumerate(labels) for _ in ls], dtype=torch.long, device=device)
        tokenized = {label: _label_ids(model, label) for label in {label for ls in labels for label in ls}}
        ids = [tokenized[label] for ls in labels for label in ls]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long, device=device)
        if not ids:
            empty = [torch.zeros(0, 1, 1, n_image, device=device)] * n_layers
            return LabelAttention(labels, [[] for _ in labels], image_index, lengths, empty, [], None, grid, patches)

        # Every label, closed by the delimiter, right after its image's cached prefix; padding rows see the prefix.
        n, t = len(ids), int(lengths.max()) + 1
        tokens = torch.full((n, t), seqs.pad_id, dtype=torch.long, device=device)
        for i, x in enumerate(ids):
            tokens[i, : len(x) + 1] = torch.tensor(x + [seqs.delimiter_id], device=device)
        col = torch.arange(t, device=device)
        own = (col[None, :, None] >= col[None, None, :]) & (col[None, None, :] <= lengths[:, None, None])  # [N, T, T]
        mask = torch.cat([own.new_ones(n, t, prefix_len), own], dim=2)[:, None]
        if attention or not gradient:
            cache = DynamicCache()
            for layer in range(n_layers):
                k, v = recorder.prefix_kv[layer]
                cache.update(k[image_index], v[image_index], layer)
            base = model.decoder.get_decoder()
            recorder.phase = "labels"
            out = base(
                inputs_embeds=model.embed_text(tokens),
                attention_mask=mask,
                position_ids=(prefix_len + col).expand(n, -1),
                use_cache=True,
                **_cache_kwarg(base, cache),
            )

    cam = logp = None
    if gradient:
        cam, logp = _gradient_attention(model, pixels, recorder, image_index, tokens, lengths, n_layers)
    if given_scores is None:  # teacher-forced score: the product of its tokens' and the delimiter's probabilities
        if logp is not None:  # the gradient pass predicted every one of them
            flat = logp.double().exp().tolist()
        else:  # the first token from the prompt, the rest from the label rows
            first = model.logits(anchor_hidden[image_index]).float().softmax(-1).gather(1, tokens[:, :1])
            later = model.logits(out.last_hidden_state[:, :-1]).float().softmax(-1)
            later = later.gather(2, tokens[:, 1:, None])[..., 0]
            later = torch.where(col[None, 1:] <= lengths[:, None], later, torch.ones_like(later))
            flat = (first[:, 0].double() * later.double().prod(1)).tolist()
        given_scores, i = [], 0
        for ls in labels:
            given_scores.append(flat[i : i + len(ls)])
            i += len(ls)
    prefix = [recorder.prefix_attn[l] for l in range(n_layers)] if rollout else None
    return LabelAttention(
        labels,
        given_scores,
        image_index,
        lengths,
        [recorder.heads[l] for l in range(n_layers) if l in recorder.heads],
        [recorder.rows[l] for l in range(n_layers) if l in recorder.rows],
        prefix,
        grid,
        patches,
        cam,
    )


def _gradient_attention(
    model: NXTP,
    pixels: Tensor,
    recorder: _Recorder,
    image_index: Tensor,
    tokens: Tensor,
    lengths: Tensor,
    n_layers: int,
) -> tuple[Tensor, Tensor]:
    """Gradient-weighted attention (Chefer et al. 2021): mean over layers and heads of ``relu(dA * A)`` of the rows
    that predict the label's tokens and delimiter (the anchor and the label tokens) with respect to the label's
    log-probability, image columns: [N, n_image]; and that log-probability [N]. Model parameters get no
    ``.grad``.

    Only those rows run again, over the recorded keys and values of the image and prompt before the anchor: no
    position before the anchor attends to it or to a label token, so the prefix does not depend on these rows'
    attention, and the gradient is exactly that of a pass over the whole sequence, at a fraction of its cost."""
    prompt = model.sequences.prompt_ids(model.prompt)
    base = recorder.prefix_kv[0][0].shape[2] - 1  # image and prompt, the anchor (last prompt token) left out
    n, t = tokens.shape
    text = torch.cat([tokens.new_full((n, 1), prompt[-1]), tokens], dim=1)  # the anchor, then each label
    col = torch.arange(t + 1, device=pixels.device)
    own = (col[:, None] >= col[None, :]).expand(n, -1, -1)
    mask = torch.cat([own.new_ones(n, t + 1, base), own], dim=2)[:, None]
    cache = DynamicCache()
    for layer in range(n_layers):
        k, v = recorder.prefix_kv[layer]
        cache.update(k[image_index, :, :base], v[image_index, :, :base], layer)
    recorder.phase, recorder.first_row = "gradient", 0
    decoder = model.decoder.get_decoder()
    with torch.enable_grad(), _explaining(model, recorder):
        out = decoder(
            inputs_embeds=model.embed_text(text).detach(),
            attention_mask=mask,
            position_ids=(base + col).expand(n, -1),
            use_cache=True,
            **_cache_kwarg(decoder, cache),
        )
        rows = out.last_hidden_state[:, :t]  # row i predicts tokens[:, i]
        logp = model.logits(rows).float().log_softmax(-1).gather(2, tokens[..., None])[..., 0]
        valid = torch.arange(t, device=pixels.device)[None] <= lengths[:, None]
        weights = [recorder.grad_rows[l] for l in range(n_layers)]
        logp = (logp * valid).sum(1)
        grads = torch.autograd.grad(logp.sum(), weights)
    n_image = recorder.n_image
    cam = torch.stack([(g * w).clamp(min=0).mean(1) for g, w in zip(grads, weights)]).mean(0)  # [N, 1 + t, L]
    return cam[:, :, :n_image].sum(1).detach() + 1e-12, logp.detach()  # + 1e-12: a flat map, not 0/0


def row_weights(record: LabelAttention, include_delimiter: bool = True) -> Tensor:
    """Which query rows make a label's map, as weights summing to 1 per label: [N, T].

    The label's own tokens (each predicts the next one or the delimiter), and the delimiter's row by default.
    """
    t = record.heads[0].shape[2]
    col = torch.arange(t, device=record.lengths.device)
    keep = (col[None] < record.lengths[:, None]) | (include_delimiter & (col[None] == record.lengths[:, None]))
    w = keep.float()
    return w / w.sum(1, keepdim=True)


def maps(
    record: LabelAttention,
    method: Method = DEFAULT_METHOD,
    layer: int = -1,
    head: int = 0,
    include_delimiter: bool = True,
) -> Tensor:
    """One map per (image, label) pair: [N, grid_h, grid_w], each a distribution over the patches (sums to 1).

    ``layer`` and ``head`` choose the single head of ``method="head"`` (negative counts from the end).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {METHODS}")
    if method == "gradient":
        if record.gradient is None:
            raise ValueError("method='gradient' needs label_attention(..., gradient=True)")
        image = record.gradient
    elif not record.heads:
        raise ValueError(f"method={method!r} needs label_attention(..., attention=True)")
    else:
        w = row_weights(record, include_delimiter)  # [N, T]
        n_image = record.heads[0].shape[-1]
    if method == "head":
        if not -record.n_layers <= layer < record.n_layers or not -record.n_heads <= head < record.n_heads:
            raise ValueError(
                f"layer={layer}, head={head}: the decoder has {record.n_layers} layers of {record.n_heads} heads"
            )
        image = (w[:, :, None] * record.heads[layer][:, head]).sum(1)
    elif method == "mean":
        image = torch.stack([(w[:, None, :, None] * h).sum(2).mean(1) for h in record.heads]).mean(0)
    elif method == "rollout":
        if record.prefix is None:
            raise ValueError("method='rollout' needs label_attention(..., rollout=True)")
        image = _rollout(record, w)[:, :n_image]
    image = image[:, record.patches]
    image = image / image.sum(1, keepdim=True)
    return image.reshape(-1, *record.grid)


def _rollout(record: LabelAttention, w: Tensor) -> Tensor:
    """Attention rollout of the label rows down to the decoder's input: [N, S + T]."""
    s = record.prefix[0].shape[-1]
    t = record.rows[0].shape[1]
    eye_s = torch.eye(s, device=w.device)
    eye_t = torch.cat([torch.zeros(t, s, device=w.device), torch.eye(t, device=w.device)], dim=1)
    r = None
    for layer in reversed(range(record.n_layers)):
        rows = 0.5 * record.rows[layer] + 0.5 * eye_t  # [N, T, S + T]; a padding row is never reached
        if r is None:
            r = rows
            continue
        prefix = 0.5 * record.prefix[layer][record.image_index] + 0.5 * eye_s  # [N, S, S]
        # Prefix rows see only the prefix; label rows see the prefix and their own earlier tokens.
        r = torch.cat([r[..., :s] @ prefix, torch.zeros_like(r[..., s:])], dim=2) + r[..., s:] @ rows
    return (w[:, :, None] * r).sum(1)


@dataclass
class LabelMap:
    """One label's map: ``grid`` [grid_h, grid_w] float32, a distribution over the image patches."""

    label: str
    score: float
    grid: np.ndarray
    method: str = DEFAULT_METHOD
    extra: dict = field(default_factory=dict)


def explain(
    model: NXTP,
    pixels: Tensor,
    labels: Sequence[Sequence[str]] | None = None,
    method: Method = DEFAULT_METHOD,
    layer: int = -1,
    head: int = 0,
    topk: int = 10,
    min_prob: float = 0.0,
    max_label_tokens: int = 19,
    prefix: _Recorder | None = None,
) -> list[list[LabelMap]]:
    """The map of every label of every image (given, or predicted by one-shot sampling when ``labels`` is None);
    ``prefix``: see ``label_attention``."""
    record = label_attention(
        model,
        pixels,
        labels,
        topk,
        min_prob,
        max_label_tokens,
        rollout=method == "rollout",
        gradient=method == "gradient",
        attention=method != "gradient",
        prefix=prefix,
    )
    grids = maps(record, method, layer, head).cpu().numpy().astype(np.float32) if len(record.image_index) else None
    out, i = [], 0
    extra = {"layer": layer, "head": head} if method == "head" else {}
    for ls, ps in zip(record.labels, record.scores):
        out.append(
            [LabelMap(label, float(p), grids[i + j], method, dict(extra)) for j, (label, p) in enumerate(zip(ls, ps))]
        )
        i += len(ls)
    return out


def finer_maps(
    model: NXTP,
    pixels: Tensor,
    labels: Sequence[Sequence[str]],
    grids: list[list[np.ndarray]],
    views: int,
    method: Method = DEFAULT_METHOD,
    layer: int = -1,
    head: int = 0,
) -> list[list[np.ndarray]]:
    """Each label's map on a grid twice as fine as the patch grid: the mean of its maps over ``views`` views of
    ``pixels`` [B, 3, H, W], each put back in place. ``grids`` are the maps of the image itself (``explain``'s);
    ``views=4`` adds the image shifted by half a patch right, down and both (its patch cells then straddle the
    image's, so together the views tell apart the halves of each patch), ``views=5`` also its mirror image;
    ``views=1`` returns ``grids``. The labels are teacher-forced in every added view (one map pass each), by
    ``method`` (``layer`` and ``head``: see ``maps``), which must be the one ``grids`` were made by.

    A shifted view is padded with its edge pixels on the left or top and never sees the image's last half patch on
    the right or bottom: a fine cell is the mean of the views that saw it. An odd patch is shifted by its floor
    half."""
    if views not in VIEWS:
        raise ValueError(f"views={views}: one of {VIEWS}")
    if views == 1:
        return grids
    height, width = pixels.shape[-2:]
    gh, gw = patch_grid(model)
    dy, dx = height // gh // 2, width // gw // 2
    sums = [[np.kron(g, np.ones((2, 2))) for g in gs] for gs in grids]
    seen = np.ones((2 * gh, 2 * gw))  # how many views saw each fine cell

    def add(view: Tensor, down: bool = False, right: bool = False, mirrored: bool = False) -> None:
        # shifted by half a patch, the view's fine cell k is the image's cell k - 1; the image's last is cut off
        cut = ((0, int(down)), (0, int(right)))
        for totals, maps in zip(sums, explain(model, view, labels, method, layer, head)):
            for k, m in enumerate(maps):
                u = np.pad(np.kron(m.grid, np.ones((2, 2)))[int(down) :, int(right) :], cut)
                totals[k] = totals[k] + (u[:, ::-1] if mirrored else u)
        seen[:] += np.pad(np.ones((2 * gh - down, 2 * gw - right)), cut)

    for down, right in ((False, True), (True, False), (True, True)):
        shifted = torch.nn.functional.pad(pixels, (dx * right, 0, dy * down, 0), mode="replicate")
        add(shifted[..., :height, :width], down, right)
    if views == 5:
        add(pixels.flip(-1), mirrored=True)
    return [[(t / seen / (t / seen).sum()).astype(np.float32) for t in totals] for totals in sums]


# pictures and files ------------------------------------------------------------------------------------------------

# Inferno-like anchors (dark purple -> red -> yellow): dark where the map is low, so the image shows through.
_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """RGB uint8 [..., 3] for ``values`` in [0, 1] (piecewise-linear between the anchors)."""
    x = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_ANCHORS) - 2)
    f = (x - lo)[..., None]
    return ((1 - f) * _ANCHORS[lo] + f * _ANCHORS[lo + 1]).round().astype(np.uint8)


def pixels_to_image(model: NXTP, pixels: Tensor) -> Image.Image:
    """The image the model saw ([3, H, W] preprocessed pixels), normalisation undone."""
    norm = next(
        (t for t in getattr(model.eval_transform, "transforms", []) if hasattr(t, "mean") and hasattr(t, "std")), None
    )
    x = pixels.detach().float().cpu()
    if norm is not None:
        x = x * torch.tensor(norm.std)[:, None, None] + torch.tensor(norm.mean)[:, None, None]
    return Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def overlay(
    image: Image.Image,
    grid: np.ndarray,
    alpha: float = 0.6,
    min_size: int = 256,
    label: str | None = None,
    prob: float | None = None,
    scale_bar: bool = True,
) -> Image.Image:
    """The map, stretched to [0, 1], upsampled (bicubic: smooth, no streaks along the cell edges) and coloured,
    blended over ``image`` (which must be the view the model saw); with ``label``, also the label's box and point
    (``locate.locate``) and ``label prob`` above the box; with ``scale_bar``, a strip below from the map's
    minimum (dark) to its peak (bright).

    Small images are enlarged (nearest) to at least ``min_size`` pixels so that a person can see them.
    """
    image = image.convert("RGB")
    scale = max(1, -(-min_size // min(image.size)))
    view = image.size
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    # Stretched from its minimum to its peak: a person looks for where the map is highest, not at its scale.
    lo, span = float(grid.min()), float(grid.max() - grid.min()) or 1.0
    heat = Image.fromarray(((grid - lo) / span).astype(np.float32), mode="F").resize(
        image.size, Image.Resampling.BICUBIC
    )
    value = np.clip(np.asarray(heat), 0, 1)
    colour = colormap(value).astype(np.float32)
    a = alpha * np.clip(value, 0.15, 1)[..., None]  # low attention dims the image only a little
    blended = Image.fromarray(((1 - a) * np.asarray(image, dtype=np.float32) + a * colour).round().astype(np.uint8))
    if label is not None:
        from .locate import ViewGeometry, locate

        where = locate(grid, ViewGeometry.of(view, view))
        draw_location(blended, label, prob, where.point, where.box, scale)
    if not scale_bar:
        return blended
    bar = max(6, blended.height // 32)
    out = Image.new("RGB", (blended.width, blended.height + bar), "white")
    out.paste(blended, (0, 0))
    ramp = colormap(np.linspace(0, 1, blended.width))[None].repeat(bar, 0)
    out.paste(Image.fromarray(ramp), (0, blended.height))
    return out


LOCATION_COLOURS = ((0, 230, 255), (255, 80, 200), (150, 255, 60), (255, 255, 255))  # cyan, pink, green, white


def draw_location(
    picture: Image.Image,
    label: str,
    prob: float | None,
    point: Sequence[float],
    box: Sequence[float],
    scale: float = 1.0,
    colour: tuple[int, int, int] = LOCATION_COLOURS[0],
) -> None:
    """Draw ``box`` and ``point`` (in pixels of the image ``picture`` shows enlarged ``scale`` times) and
    ``label prob`` on ``picture``, in place: a coloured outline over a dark one, legible on any background."""
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(picture)
    x0, y0, x1, y1 = (v * scale for v in box)
    x, y = point[0] * scale, point[1] * scale
    width = max(1, picture.width // 128)
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 0, 0), width=width + 2)
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=width)
    r = 2 * width + 1
    draw.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], fill=(0, 0, 0))
    draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    text = label if prob is None else f"{label} {prob:.2f}"
    font = ImageFont.load_default(size=max(10, picture.width // 22))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tx, ty = min(max(x0, 0), max(picture.width - (right - left) - 4, 0)), max(y0 - (bottom - top) - 5, 0)
    draw.rectangle([tx, ty, tx + right - left + 4, ty + bottom - top + 4], fill=(0, 0, 0))
    draw.text((tx + 2 - left, ty + 2 - top), text, fill=colour, font=font)


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40] or "label"


def write_maps(
    out_dir: str | Path,
    stem: str,
    image: Image.Image,
    label_maps: Sequence[LabelMap],
    probs: Sequence[float] | None = None,
) -> Path:
    """Write ``STEM.NN.LABEL.png`` (overlay with the label's box, point and probability: ``probs``, the ones the
    user reads, else the maps' scores) and ``STEM.NN.LABEL.npy`` (raw grid) per label and ``STEM.json`` (every
    label's score, grid and file names); returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, m in enumerate(label_maps):
        name = f"{stem}.{i:02d}.{_slug(m.label)}"
        overlay(image, m.grid, label=m.label, prob=m.score if probs is None else probs[i]).save(out / f"{name}.png")
        np.save(out / f"{name}.npy", m.grid)
        entries.append(
            {
                "label": m.label,
                "score": m.score,
                "method": m.method,
                **m.extra,
                "grid": m.grid.round(6).tolist(),
                "png": f"{name}.png",
                "npy": f"{name}.npy",
            }
        )
    path = out / f"{stem}.json"
    path.write_text(
        json.dumps({"grid_size": list(label_maps[0].grid.shape) if label_maps else None, "labels": entries}, indent=1)
    )
    return path


# measured against boxes ---------------------------------------------------------------------------------------------


def transform_box(box: Sequence[float], original_size: tuple[int, int], image_size: tuple[int, int]) -> list[float]:
    """A box ``[x0, y0, x1, y1]`` in original pixels (``original_size`` is width, height), in the pixels of the
    model's eval view (``image_size`` is height, width; shorter side resized, then centre-cropped, as open_clip's
    eval transform does: ``locate.ViewGeometry``), clipped to the view."""
    from .locate import ViewGeometry

    out_h, out_w = image_size
    view = ViewGeometry.of(tuple(original_size), (out_w, out_h)).to_view(box)
    return [min(max(v, 0), (out_w, out_h)[i % 2]) for i, v in enumerate(view)]


def box_coverage(boxes: Sequence[Sequence[float]], grid: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """The share of every patch [grid_h, grid_w] that the union of ``boxes`` (``[x0, y0, x1, y1]``, x1/y1
    exclusive, in the view's pixels) covers."""
    h, w = image_size
    covered = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        covered[int(round(y0)) : int(round(y1)), int(round(x0)) : int(round(x1))] = True
    ys = np.linspace(0, h, grid[0] + 1).round().astype(int)
    xs = np.linspace(0, w, grid[1] + 1).round().astype(int)
    return np.array(
        [[covered[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].mean() for j in range(grid[1])] for i in range(grid[0])]
    )


def pointing_hit(grid: np.ndarray, coverage: np.ndarray) -> float:
    """Pointing game on patches: 1 if the map's peak patch overlaps a box, else 0.

    Ties at the peak count as a random pick among them (a uniform map scores the share of patches that overlap).
    """
    peak = np.isclose(grid, grid.max(), rtol=1e-6, atol=0)
    return float((coverage[peak] > 0).mean())


def mass_in_box(grid: np.ndarray, coverage: np.ndarray) -> float:
    """The share of the map's mass inside the boxes (a patch counted by the share of it they cover)."""
    return float((grid * coverage).sum() / grid.sum())


def uniform_map(grid: tuple[int, int]) -> np.ndarray:
    return np.full(grid, 1.0 / (grid[0] * grid[1]))


def centre_prior(grid: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """A Gaussian centred on the image, ``sigma`` in image sides, over the patch centres (sums to 1)."""
    y = (np.arange(grid[0]) + 0.5) / grid[0] - 0.5
    x = (np.arange(grid[1]) + 0.5) / grid[1] - 0.5
    g = np.exp(-(y[:, None] ** 2 + x[None] ** 2) / (2 * sigma**2))
    return g / g.sum()
