"""One-shot sampling: every label of an image decoded in parallel from one next-token distribution.

The labels are independent continuations of the prompt, so inference need not generate them one after
another: take the top-k first tokens at the last prompt position, continue each of the k branches greedily
until the delimiter (or the end token, or a step limit), and score each branch by the product of its token
probabilities, the closing delimiter's included. Branches that decode to the same string are merged by
adding their scores. The image and prompt are run once; the k branches share their key/value cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from transformers import DynamicCache

from .masking import prefix_attention
from .nxtp import NXTP


@dataclass
class Branch:
    """One decoded branch: its tokens (stop token excluded), their probabilities, and how it ended."""

    tokens: list[int]
    probs: list[float]
    stop_prob: float | None  # probability of the closing delimiter / end token; None if the step limit hit


# A backend's decoding step: ``step(tokens, keep, offset)`` returns the next-token probabilities [N, V] of the N
# active branches once their newest ``tokens`` [N] are appended at label position ``offset`` (1, 2, ...). ``keep``
# marks which of the previously active branches are still active (None: all of them), so that the backend drops
# the finished ones from its cache first.
StepFn = Callable[[Tensor, "Tensor | None", int], Tensor]


def one_shot(
    first_probs: Tensor,
    step: StepFn,
    topk: int,
    stop_ids: list[int],
    reference_compat: bool = False,
    max_label_tokens: int = 19,
) -> list[list[Branch]]:
    """The decoding loop every backend shares: the ``topk`` most likely first tokens of each image
    (``first_probs`` [B, V], the distribution at the last prompt position) start ``topk`` branches, each continued
    greedily through ``step`` until a stop token or ``max_label_tokens`` tokens (the closing one included).

    Branch ``b * topk + j`` continues image ``b``; a backend's cache must be laid out the same way. The reference
    stops only at the delimiter (``stop_ids[0]``), and not at one drawn as the first token (``reference_compat``).
    """
    batch = first_probs.shape[0]
    first_p, first_t = first_probs.float().topk(topk, dim=-1)  # [B, k]
    stops = torch.tensor(stop_ids[:1] if reference_compat else stop_ids, device=first_probs.device)
    tokens = [first_t.reshape(-1)]
    token_probs = [first_p.reshape(-1)]
    done = torch.zeros_like(tokens[0], dtype=torch.bool) if reference_compat else torch.isin(tokens[0], stops)
    # Branches that have ended leave the batch (and the cache): later steps run the unfinished ones only.
    # Their later tokens are filled with a stop token; ``split_branches`` cuts every branch at its first stop.
    active = torch.arange(batch * topk, device=first_probs.device)
    for offset in range(1, max_label_tokens):
        keep = ~done[active]
        if not keep.any():
            break
        keep = None if keep.all() else keep
        if keep is not None:
            active = active[keep]
        p, t = step(tokens[-1][active], keep, offset).float().max(-1)
        tokens.append(torch.full_like(tokens[0], int(stops[0])).index_copy(0, active, t))
        token_probs.append(torch.ones_like(token_probs[0]).index_copy(0, active, p))
        done[active] |= torch.isin(t, stops)
    tok = torch.stack(tokens, 1).view(batch, topk, -1).tolist()
    prob = torch.stack(token_probs, 1).view(batch, topk, -1).tolist()
    return split_branches(tok, prob, set(stops.tolist()))


def _stop_ids(model: NXTP) -> list[int]:
    return [model.sequences.delimiter_id, model.sequences.eos_id]


def _prefix(model: NXTP, pixels: Tensor) -> tuple[Tensor, int]:
    """The embedded image and prompt [B, n_image + P, D], and the number of image tokens."""
    prompt = torch.tensor(model.sequences.prompt_ids(model.prompt), device=pixels.device)
    image = model.embed_images(pixels)
    text = model.embed_text(prompt.expand(image.shape[0], -1)).to(image.dtype)
    return torch.cat([image, text], dim=1), image.shape[1]


@torch.no_grad()
def decode_branches(model: NXTP, pixels: Tensor, topk: int, max_label_tokens: int = 19) -> list[list[Branch]]:
    """Run the prefix once, then greedy-decode ``topk`` branches per image with a shared KV cache.

    ``max_label_tokens`` bounds the tokens of a label, its closing delimiter included (the reference's 19).
    """
    embeds, n_image = _prefix(model, pixels)
    batch, length = embeds.shape[:2]
    mask = prefix_attention(n_image, length - n_image, device=pixels.device).expand(batch, -1, -1, -1)
    positions = torch.arange(length, device=pixels.device).expand(batch, -1)
    base = model.decoder.get_decoder()
    cache = DynamicCache()
    # transformers renamed ``past_key_values`` to ``cache``; the cache object is filled in place either way.
    cache_kwarg = {("cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"): cache}
    out = base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwarg)
    first_probs = model.logits(out.last_hidden_state[:, -1]).float().softmax(-1)
    cache.batch_repeat_interleave(topk)

    def step(tokens: Tensor, keep: Tensor | None, offset: int) -> Tensor:
        if keep is not None:
            cache.batch_select_indices(keep.nonzero().squeeze(1))
        out = base(
            inputs_embeds=model.embed_text(tokens[:, None]).to(embeds.dtype),
            position_ids=torch.full((len(tokens), 1), length + offset - 1, device=pixels.device),
            use_cache=True,
            **cache_kwarg,
        )
        return model.logits(out.last_hidden_state[:, -1]).float().softmax(-1)

    return one_shot(first_probs, step, topk, _stop_ids(model), model.reference_compat, max_label_tokens)


@torch.no_grad()
def decode_recompute(model: NXTP, pixels: Tensor, topk: int, max_label_tokens: int = 19) -> list[list[Branch]]:
    """``decode_branches`` without a cache, as the reference decodes: the whole sequence of every active branch is
    run again at every step. Slow; the baseline of ``experiments/bench_sampling.py`` and the tests' check of the
    cache."""
    embeds, n_image = _prefix(model, pixels)

    def probs_after(embeds: Tensor) -> Tensor:
        batch, length = embeds.shape[:2]
        mask = prefix_attention(n_image, length - n_image, pixels.device).expand(batch, -1, -1, -1)
        pos = torch.arange(length, device=pixels.device).expand(batch, -1)
        out = model.decoder.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
        return model.logits(out.last_hidden_state[:, -1]).float().softmax(-1)

    first_probs = probs_after(embeds)
    branches = embeds.repeat_interleave(topk, 0)

    def step(tokens: Tensor, keep: Tensor | None, offset: int) -> Tensor:
        nonlocal branches
        if keep is not None:
            branches = branches[keep]
        branches = torch.cat([branches, model.embed_text(tokens[:, None]).to(branches.dtype)], 1)
        return probs_after(branches)

    return one_shot(first_probs, step, topk, _stop_ids(model), model.reference_compat, max_label_tokens)


def split_branches(
    tokens: list[list[list[int]]], probs: list[list[list[float]]], stops: set[int]
) -> list[list[Branch]]:
    """Cut every decoded branch ([image][branch][step]) at its first stop token."""
    result = []
    for image_tokens, image_probs in zip(tokens, probs):
        branches = []
        for t, p in zip(image_tokens, image_probs):
            end = next((i for i, x in enumerate(t) if x in stops), None)
            branches.append(Branch(t, p, None) if end is None else Branch(t[:end], p[:end], p[end]))
        result.append(branches)
    return result


def rank_labels(branches: list[Branch], decode, min_prob: float = 0.0, delimiter: str = ",") -> list[tuple[str, float]]:
    """Score, merge and sort the branches of one image into ``(label, probability)`` pairs.

    A branch's score is the product of its token probabilities and its stop token's; a branch cut by the
    step limit keeps the product of the probabilities it has. A label never contains the delimiter (a token
    may carry one inside a longer piece); empty labels are dropped.
    """
    scores: dict[str, float] = {}
    for br in branches:
        label = decode(br.tokens).replace(delimiter, "").strip()
        if not label:
            continue
        score = torch.tensor(br.probs + ([br.stop_prob] if br.stop_prob is not None else []), dtype=torch.float64)
        scores[label] = scores.get(label, 0.0) + score.prod().item()
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)  # stable: ties keep branch order
    return [(label, p) for label, p in ranked if p >= min_prob]


def rank_labels_reference(branches: list[Branch], decode, delimiter_id: int) -> list[tuple[str, float]]:
    """The reference's ranking, quirks included, for parity with the official implementation.

    The branches are concatenated into one token list and one probability list and split again at every
    delimiter. A branch cut by the step limit gets a delimiter token without a probability, so every later
    token is paired with its neighbour's probability and the last label, left without its delimiter, is
    lost. Scores are float32 products, merged by the decoded text (delimiter included), sorted, then
    rounded to 5 decimals.
    """
    flat_tokens: list[int] = []
    flat_probs: list[float] = []
    for br in branches:
        flat_tokens += br.tokens + [delimiter_id]
        flat_probs += br.probs + ([br.stop_prob] if br.stop_prob is not None else [])
    scores: dict[str, torch.Tensor] = {}
    label_tokens: list[int] = []
    label_probs: list[float] = []
    for token, prob in zip(flat_tokens, flat_probs):
        label_tokens.append(token)
        label_probs.append(prob)
        if token == delimiter_id:
            key = decode(label_tokens)
            score = torch.tensor(label_probs, dtype=torch.float32).prod()
            scores[key] = scores[key] + score if key in scores else score
            label_tokens, label_probs = [], []
    ranked = sorted(scores.items(), key=lambda kv: kv[1].item(), reverse=True)
    return [(key.replace(",", ""), round(score.item(), 5)) for key, score in ranked]


def recognize(
    model: NXTP, pixels: Tensor, topk: int = 10, min_prob: float = 0.0, max_label_tokens: int = 19
) -> list[list[tuple[str, float]]]:
    """Labels with probabilities, sorted, for every image of a batch of preprocessed pixels."""
    seqs = model.sequences
    branches = decode_branches(model, pixels, topk, max_label_tokens)
    return rank_images(
        branches, model.tokenizer.decode, min_prob, model.reference_compat, seqs.delimiter, seqs.delimiter_id
    )


def rank_images(
    branches: list[list[Branch]], decode, min_prob: float, reference_compat: bool, delimiter: str, delimiter_id: int
) -> list[list[tuple[str, float]]]:
    """Rank the branches of every image, the reference's way in ``reference_compat``."""
    if reference_compat:
        return [[(l, p) for l, p in rank_labels_reference(b, decode, delimiter_id) if p >= min_prob] for b in branches]
    return [rank_labels(b, decode, min_prob, delimiter) for b in branches]


# Greedy and beam search: the paper's baselines --------------------------------------------------------------

Sampler = Literal["one-shot", "greedy", "beam"]


@torch.no_grad()
def generate_text(model: NXTP, pixels: Tensor, beams: int = 1, max_new_tokens: int = 64) -> tuple[Tensor, Tensor]:
    """The tokens [B, T] generated after the prompt by greedy search (``beams=1``) or beam search (the best beam),
    with transformers' ``generate``, and each token's probability given everything before it [B, T] (padding after
    the end token: ``pad_id``, probability 1).

    The image and the prompt but its last token are run once with the model's own attention (image rows see the
    whole image) into the key/value cache ``generate`` continues from: ``generate`` itself would lay a causal mask
    over the image.
    """
    if beams < 1:
        raise ValueError(f"beams={beams}: beam search needs at least 1 beam")
    embeds, n_image = _prefix(model, pixels)
    batch, length = embeds.shape[:2]
    mask = prefix_attention(n_image, length - 1 - n_image, device=pixels.device).expand(batch, -1, -1, -1)
    positions = torch.arange(length - 1, device=pixels.device).expand(batch, -1)
    base = model.decoder.get_decoder()
    cache = DynamicCache()
    cache_name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    base(
        inputs_embeds=embeds[:, :-1], attention_mask=mask, position_ids=positions, use_cache=True, **{cache_name: cache}
    )
    if beams > 1:
        cache.batch_repeat_interleave(beams)  # generate expands its inputs for the beams, not a cache given to it
    seqs = model.sequences
    prompt = torch.tensor(seqs.prompt_ids(model.prompt), device=pixels.device)
    # generate runs only the ids after the cache (the last prompt token); the image positions' ids are never read.
    ids = torch.cat([prompt.new_full((n_image,), seqs.pad_id), prompt]).expand(batch, -1)
    search = {"num_beams": beams, "length_penalty": 0.0} if beams > 1 else {}  # 0: the most probable list
    out = model.decoder.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=seqs.eos_id,
        pad_token_id=seqs.pad_id,
        output_scores=True,
        return_dict_in_generate=True,
        **search,
        **{cache_name: cache},
    )
    log_probs = model.decoder.compute_transition_scores(
        out.sequences, out.scores, getattr(out, "beam_indices", None), normalize_logits=beams == 1
    )
    return out.sequences[:, ids.shape[1] :], log_probs.float().exp()


def generate_labels(
    model: NXTP, pixels: Tensor, beams: int = 1, max_new_tokens: int = 64
) -> list[list[tuple[str, float]]]:
    """The paper's baselines: the label list generated as text (``generate_text``), split at the delimiter. A
    label's probability is the product of its tokens' probabilities and its closing delimiter's (or end token's),
    each given the labels before it (for beam search, along the best beam). Repeated labels (greedy and beam search
    repeat themselves; one-shot sampling does not) are merged, keeping the first; sorted by probability."""
    tokens, probs = generate_text(model, pixels, beams, max_new_tokens)
    return [_split_labels(model, t.tolist(), p.tolist()) for t, p in zip(tokens, probs)]


def _split_labels(model: NXTP, tokens: list[int], probs: list[float]) -> list[tuple[str, float]]:
    """``(label, probability)`` from generated text: split at the delimiter, until the end token or padding."""
    seqs, labels, current, p = model.sequences, {}, [], 1.0
    for token, prob in zip(tokens, probs):
        if token == seqs.pad_id:
            break
        p *= prob
        if token in (seqs.delimiter_id, seqs.eos_id):
            label = model.tokenizer.decode(current).replace(seqs.delimiter, "").strip()
            if label and label not in labels:
                labels[label] = p
            current, p = [], 1.0
            if token == seqs.eos_id:
                break
        else:
            current.append(token)
    return sorted(labels.items(), key=lambda kv: kv[1], reverse=True)


def label_images(
    model: NXTP,
    pixels: Tensor,
    sampler: Sampler = "one-shot",
    topk: int = 10,
    min_prob: float = 0.0,
    beams: int = 3,
    max_new_tokens: int = 64,
) -> list[list[tuple[str, float]]]:
    """Labels with probabilities, sorted, for a batch of preprocessed pixels, by the chosen ``sampler``: one-shot
    sampling (``recognize``, NXTP's), or the baselines ``greedy`` and ``beam`` (``generate_labels``); at most
    ``topk`` labels, none below ``min_prob``."""
    if sampler == "one-shot":
        return recognize(model, pixels, topk, min_prob)
    if sampler not in ("greedy", "beam"):
        raise ValueError(f"sampler {sampler!r}: choose one-shot, greedy or beam")
    labels = generate_labels(model, pixels, beams if sampler == "beam" else 1, max_new_tokens)
    return [[(label, p) for label, p in image[:topk] if p >= min_prob] for image in labels]
