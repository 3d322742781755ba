"""Captions for a scene: natural sentences that name every object kind in it and no other noun (checked with
``datamodules.labels.extract_labels``; a plain fallback caption otherwise)."""

from __future__ import annotations

import random

from datamodules.labels import extract_labels

from .drawing import _BARE_COLORS, _HYPHEN_KINDS, plural
from .layout import _Group

_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}
# No "little": "a little" is read as an adverb phrase.
_SIZE_WORDS = {"small": ("small", "tiny"), "large": ("big", "large")}
_NEXT_TO = ("near",)
_ABOVE = ("above",)
_BELOW = ("below", "under")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(group: _Group, rng: random.Random, need_colour: bool) -> str:
    n = len(group.members)
    words = []
    if group.size in _SIZE_WORDS and rng.random() < 0.5:
        words.append(rng.choice(_SIZE_WORDS[group.size]))
    if need_colour or rng.random() < 0.75:
        bare = (
            group.color in _BARE_COLORS
            and group.kind not in _HYPHEN_KINDS
            and n < 3  # "three blue ..." reads as a number of blues
            and rng.random() < 0.8
        )
        words.append(group.color if bare else f"{group.color}-colored")
    words.append(group.kind if n == 1 else plural(group.kind))
    if n == 1:
        head = _article(words[0])
    else:
        head = _NUMBERS[n]
    return " ".join([head, *words])


def _relation(a: _Group, b: _Group, size: int, rng: random.Random) -> str:
    """A spatial word for group ``a`` relative to ``b`` that is true in the image."""

    def centre(g: _Group) -> tuple[float, float]:
        xs = [(o.bbox[0] + o.bbox[2]) / 2 for o in g.members]
        ys = [(o.bbox[1] + o.bbox[3]) / 2 for o in g.members]
        return sum(xs) / len(xs), sum(ys) / len(ys)

    (ax, ay), (bx, by) = centre(a), centre(b)
    dx, dy = bx - ax, by - ay
    if abs(dy) > 0.25 * size and abs(dy) > 1.5 * abs(dx):
        return rng.choice(_ABOVE if dy > 0 else _BELOW)
    return rng.choice(_NEXT_TO)


def _clause(groups: list[_Group], phrases: list[str], size: int, rng: random.Random) -> str:
    """One or two groups as a short clause, e.g. "a red star above two circles"."""
    if len(groups) == 1:
        return phrases[0]
    form = rng.random()
    if form < 0.5:
        return f"{phrases[0]} {_relation(groups[0], groups[1], size, rng)} {phrases[1]}"
    if form < 0.7:
        return f"{phrases[0]} with {phrases[1]}"
    return f"{phrases[0]} and {phrases[1]}"


def _sentence(text: str, verb: str | None, rng: random.Random) -> str:
    """Capitalize and close a clause; ``verb`` allows an opener like "there is"."""
    if verb is not None and rng.random() < 0.3:
        text = rng.choice((f"there {verb} ", "we can see ", "here we see ", "only ")) + text
    return text[0].upper() + text[1:] + "."


def _compose(groups: list[_Group], size: int, rng: random.Random) -> str:
    """A caption naming every group, built from clauses of at most two groups.

    Lists are never joined with commas: the label extractor replaces commas with
    spaces, and the run-together words then fool the POS tagger.
    """
    repeated = {g.kind for g in groups if sum(h.kind == g.kind for h in groups) > 1}
    phrases = [_phrase(g, rng, g.kind in repeated) for g in groups]
    clauses = []
    i = 0
    while i < len(groups):
        step = 2 if len(groups) - i >= 2 and rng.random() < 0.8 else 1
        clauses.append((_clause(groups[i : i + step], phrases[i : i + step], size, rng), groups[i]))
        i += step
    sentences = []
    while clauses:
        (text, first), clauses = clauses[0], clauses[1:]
        if clauses and " and " not in text and rng.random() < 0.5:
            text += f" and {clauses[0][0]}"
            clauses = clauses[1:]
        verb = None if sentences else ("is" if len(first.members) == 1 else "are")
        sentences.append(_sentence(text, verb, rng))
    caption = " ".join(sentences)
    # Lower-case starts are common in real captions; keep some of them.
    return caption if rng.random() < 0.7 else caption[0].lower() + caption[1:]


def _plain_caption(groups: list[_Group]) -> str:
    """Fallback wording with only counts and kind names, one sentence per kind."""
    parts = []
    for g in groups:
        n = len(g.members)
        parts.append(
            f"{_article(g.kind).capitalize()} {g.kind}." if n == 1 else f"{_NUMBERS[n].capitalize()} {plural(g.kind)}."
        )
    return " ".join(parts)


def _labels_match(caption: str, kinds: set[str]) -> bool:
    labels = extract_labels(caption)
    return len(labels) == len(kinds) and set(labels) == kinds


def _caption(groups: list[_Group], size: int, rng: random.Random) -> str:
    kinds = {g.kind for g in groups}
    # The vocabulary is chosen so that the first draw nearly always passes;
    # checking with the real tagger makes the guarantee unconditional.
    for _ in range(8):
        text = _compose(groups, size, rng)
        if _labels_match(text, kinds):
            return text
    text = _plain_caption(groups)
    if not _labels_match(text, kinds):
        raise RuntimeError(f"no caption whose labels match {sorted(kinds)}: {text!r}")
    return text
