"""One-shot sampling: every label of an image decoded in parallel from one next-token distribution.

The labels are independent continuations of the prompt, so inference need not generate them one after
another: take the top-k first tokens at the last prompt position, continue each of the k branches greedily
until the delimiter (or the end token, or a step limit), and score each branch by the product of its token
probabilities, the closing delimiter's included. Branches that decode to the same string are merged by
adding their scores. The image and prompt are run once; the k branches share their key/value cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

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


@torch.no_grad()
def decode_branches(model: NXTP, pixels: Tensor, topk: int, max_label_tokens: int = 19) -> list[list[Branch]]:
    """Run the prefix once, then greedy-decode ``topk`` branches per image with a shared KV cache.

    ``max_label_tokens`` bounds the tokens of a label, its closing delimiter included (the reference's 19).
    """
    seqs = model.sequences
    prompt = torch.tensor(seqs.prompt_ids(model.prompt), device=pixels.device)
    image = model.embed_images(pixels)
    batch, n_image = image.shape[:2]
    text = prompt.expand(batch, -1)
    mask = prefix_attention(n_image, text.shape[1], device=pixels.device).expand(batch, -1, -1, -1)
    length = n_image + text.shape[1]
    positions = torch.arange(length, device=pixels.device).expand(batch, -1)
    embeds = torch.cat([image, model.embed_text(text).to(image.dtype)], dim=1)
    base = model.decoder.get_decoder()
    cache = DynamicCache()
    # transformers renamed ``past_key_values`` to ``cache``; the cache object is filled in place either way.
    cache_kwarg = {("cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"): cache}
    out = base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwarg)
    probs = model.logits(out.last_hidden_state[:, -1]).float().softmax(-1)
    first_probs, first_tokens = probs.topk(topk, dim=-1)  # [B, k]

    cache.batch_repeat_interleave(topk)
    # The reference stops only at the delimiter, and not at a delimiter drawn as the first token.
    compat = model.reference_compat
    stop_ids = torch.tensor([seqs.delimiter_id] if compat else [seqs.delimiter_id, seqs.eos_id], device=pixels.device)
    tokens = [first_tokens.reshape(-1)]
    token_probs = [first_probs.reshape(-1)]
    done = torch.zeros_like(tokens[0], dtype=torch.bool) if compat else torch.isin(tokens[0], stop_ids)
    # Branches that have ended leave the batch (and the cache): later steps run the unfinished ones only.
    # Their later tokens are filled with a stop token; ``split_branches`` cuts every branch at its first stop.
    active = torch.arange(batch * topk, device=pixels.device)
    for step in range(1, max_label_tokens):
        keep = ~done[active]
        if not keep.any():
            break
        if not keep.all():
            cache.batch_select_indices(keep.nonzero().squeeze(1))
            active = active[keep]
        step_pos = torch.full((len(active), 1), length + step - 1, device=pixels.device)
        step_out = base(
            inputs_embeds=model.embed_text(tokens[-1][active][:, None]).to(image.dtype),
            position_ids=step_pos,
            use_cache=True,
            **cache_kwarg,
        )
        p, t = model.logits(step_out.last_hidden_state[:, -1]).float().softmax(-1).max(-1)
        tokens.append(torch.full_like(tokens[0], int(stop_ids[0])).index_copy(0, active, t))
        token_probs.append(torch.ones_like(token_probs[0]).index_copy(0, active, p))
        done[active] |= torch.isin(t, stop_ids)

    tok = torch.stack(tokens, 1).view(batch, topk, -1).tolist()
    prob = torch.stack(token_probs, 1).view(batch, topk, -1).tolist()
    return split_branches(tok, prob, set(stop_ids.tolist()))


def split_branches(tokens: list[list[list[int]]], probs: list[list[list[float]]], stops: set[int]) -> list[list[Branch]]:
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


def recognize(model: NXTP, pixels: Tensor, topk: int = 10, min_prob: float = 0.0, max_label_tokens: int = 19) -> list[list[tuple[str, float]]]:
    """Labels with probabilities, sorted, for every image of a batch of preprocessed pixels."""
    seqs = model.sequences
    branches = decode_branches(model, pixels, topk, max_label_tokens)
    return rank_images(branches, model.tokenizer.decode, min_prob, model.reference_compat, seqs.delimiter, seqs.delimiter_id)


def rank_images(branches: list[list[Branch]], decode, min_prob: float, reference_compat: bool, delimiter: str,
                delimiter_id: int) -> list[list[tuple[str, float]]]:
    """Rank the branches of every image, the reference's way in ``reference_compat``."""
    if reference_compat:
        return [[(l, p) for l, p in rank_labels_reference(b, decode, delimiter_id) if p >= min_prob] for b in branches]
    return [rank_labels(b, decode, min_prob, delimiter) for b in branches]
