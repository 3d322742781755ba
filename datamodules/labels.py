"""Object labels from free-form captions, following the NXTP reference.

The reference turns a caption into training labels by lowercasing it, deleting a
short list of "noise" words that web captions are full of, stripping unusual
characters, POS-tagging it with NLTK and keeping the common nouns (``NN``/``NNS``)
that contain no digit, lemmatized with WordNet and longer than two letters.

One deliberate difference: the reference deduplicates *before* lemmatizing (so
"dog" and "dogs" could both survive as "dog") and returns them in random order.
Here duplicates are removed after lemmatization and the order of first
appearance is kept; shuffling belongs to the data pipeline.
"""

from __future__ import annotations

import re
from functools import lru_cache

import nltk

__all__ = [
    "NLTK_RESOURCES",
    "NOISE_WORDS",
    "clean_caption",
    "ensure_nltk_data",
    "extract_labels",
    "extract_labels_batch",
]

# Removed as raw substrings, in this order, exactly like the reference does (so
# "daylight" loses its "day" too): these words dominate web captions without
# naming anything that is visible.
NOISE_WORDS: tuple[str, ...] = (
    "person",
    "persons",
    "stock",
    "illustration",
    "background",
    "photography",
    "image",
    "images",
    "front",
    "day",
    "ounce",
)

# Everything except letters, digits, spaces and ' . , & - is dropped; commas and
# ampersands then become spaces so that lists of nouns tokenize cleanly.
_DROP_CHARS = re.compile(r"[^a-zA-Z' 0-9.,&-]")
_SEPARATORS = re.compile(r"[,&]")

_NOUN_TAGS = frozenset({"NN", "NNS"})
_MIN_LABEL_LEN = 3

# nltk.data.find path -> name for nltk.download.
NLTK_RESOURCES: dict[str, str] = {
    "tokenizers/punkt_tab": "punkt_tab",
    "taggers/averaged_perceptron_tagger_eng": "averaged_perceptron_tagger_eng",
    "corpora/wordnet": "wordnet",
}

_nltk_ready = False


def _has_resource(path: str) -> bool:
    # Zipped resources are only found by their folder form ("name/"), plain
    # folders by either form, so try both.
    for candidate in (path, path + "/"):
        try:
            nltk.data.find(candidate)
        except LookupError:
            continue
        return True
    return False


def ensure_nltk_data() -> None:
    """Make sure the NLTK tokenizer, tagger and WordNet data can be found.

    A missing resource is downloaded once (quietly); if that is impossible, e.g.
    offline, a ``RuntimeError`` names the resource and how to provide it.
    """
    global _nltk_ready
    if _nltk_ready:
        return
    for path, name in NLTK_RESOURCES.items():
        if _has_resource(path):
            continue
        try:
            nltk.download(name, quiet=True)
        except Exception:  # noqa: BLE001 - any failure means "not available"
            pass
        if not _has_resource(path):
            raise RuntimeError(
                f"NLTK resource '{path}' was not found and could not be downloaded. "
                f"Set NLTK_DATA to a folder that holds it, or run "
                f"`python -m nltk.downloader {name}`."
            )
    _nltk_ready = True


def clean_caption(caption: str) -> str:
    """Lowercase a caption, delete noise words and strip unusual characters."""
    text = caption.lower()
    for word in NOISE_WORDS:
        text = text.replace(word, " ")
    text = _DROP_CHARS.sub("", text)
    return _SEPARATORS.sub(" ", text)


@lru_cache(maxsize=1)
def _lemmatizer() -> nltk.stem.WordNetLemmatizer:
    return nltk.stem.WordNetLemmatizer()


@lru_cache(maxsize=65536)
def _extract(caption: str) -> tuple[str, ...]:
    ensure_nltk_data()
    tokens = nltk.word_tokenize(clean_caption(caption))
    if not tokens:
        return ()
    nouns = [w for w, tag in nltk.pos_tag(tokens) if tag in _NOUN_TAGS]
    lemmatize = _lemmatizer().lemmatize
    labels: dict[str, None] = {}  # insertion-ordered set
    for word in nouns:
        if any(c.isdigit() for c in word):
            continue
        lemma = lemmatize(word, pos="n")
        if len(lemma) >= _MIN_LABEL_LEN:
            labels.setdefault(lemma, None)
    return tuple(labels)


def extract_labels(caption: str) -> list[str]:
    """Return the deduplicated noun lemmas of ``caption`` in order of first appearance."""
    return list(_extract(caption))


def extract_labels_batch(captions: list[str]) -> list[list[str]]:
    """Apply :func:`extract_labels` to each caption."""
    return [extract_labels(c) for c in captions]
