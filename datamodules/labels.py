"""Object labels from free-form captions, following the NXTP reference.

The reference turns a caption into training labels by lowercasing it, deleting a
short list of "noise" words that web captions are full of, stripping unusual
characters, POS-tagging it with NLTK and keeping the common nouns (``NN``/``NNS``)
that contain no digit, lemmatized with WordNet and longer than two letters.

One deliberate difference: the reference deduplicates *before* lemmatizing (so
"dog" and "dogs" could both survive as "dog") and returns them in random order.
Here duplicates are removed after lemmatization and the order of first
appearance is kept; shuffling belongs to the data pipeline.

The tokens, tags and lemmas are exactly NLTK's (``word_tokenize``, ``pos_tag``,
``WordNetLemmatizer``), computed several times faster than NLTK's own calls so
that one data worker extracts well over 5,000 captions/s
(``experiments/bench_labels.py``); :func:`extract_labels_nltk` is the same
extraction through NLTK's calls, kept as the yardstick.
"""

from __future__ import annotations

import re
from functools import lru_cache

import nltk
import numpy as np

__all__ = [
    "NLTK_RESOURCES",
    "NOISE_WORDS",
    "clean_caption",
    "ensure_nltk_data",
    "extract_labels",
    "extract_labels_batch",
    "extract_labels_nltk",
    "tokenize",
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


# --- Fast path -------------------------------------------------------------------
# NLTK's own calls spend most of their time on overhead, not on the work: the word
# tokenizer runs ~25 timeout-guarded regexes per sentence, most of which can never
# match a cleaned caption, and the perceptron tagger scores each word with a Python
# loop over nested dicts. The functions below give the same tokens, tags and lemmas
# (tests/test_labels.py compares them with NLTK's public calls on thousands of
# captions) at several times the speed.

# A cleaned caption only holds these characters; anything else goes to NLTK itself.
_CLEAN_TEXT = re.compile(r"[a-z0-9' .-]*")

# NLTKWordTokenizer's rules that can match the cleaned alphabet, in NLTK's order,
# each behind a cheap substring test so that a plain caption skips them.
_DOUBLE_QUOTE_AFTER_SPACE = re.compile(r"( )('')")
_OPENING_QUOTE = re.compile(r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)")
_FINAL_PERIOD_1 = re.compile("([^\\.])(\\.)([\\]\\)}>\"'\u00bb\u201d\u2019 ]*+)\\s*$")
_ELLIPSIS = re.compile(r"\.{2,}")
_FINAL_PERIOD_2 = re.compile(r"([^\.])(\.)([\]\)}>\"\']*)\s*$")
_QUOTE_BEFORE_SPACE = re.compile(r"([^'])' ")
_SPACES = re.compile(r"\s+")
_CLITICS_1 = re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') ")
_CLITICS_2 = re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ")
_SPLIT_WORDS = tuple(
    (word, re.compile(pattern))
    for word, pattern in (
        ("cannot", r"(?i)\b(can)(not)\b"),
        ("d'ye", r"(?i)\b(d)('ye)\b"),
        ("gimme", r"(?i)\b(gim)(me)\b"),
        ("gonna", r"(?i)\b(gon)(na)\b"),
        ("gotta", r"(?i)\b(got)(ta)\b"),
        ("lemme", r"(?i)\b(lem)(me)\b"),
        ("more'n", r"(?i)\b(more)('n)\b"),
        ("wanna", r"(?i)\b(wan)(na)(?=\s)"),
        ("'tis", r"(?i) ('t)(is)\b"),
        ("'twas", r"(?i) ('t)(was)\b"),
    )
)


def _tokenize_sentence(text: str) -> list[str]:
    """NLTKWordTokenizer.tokenize restricted to the cleaned alphabet (one sentence)."""
    quote = "'" in text
    period = "." in text
    if quote:
        if "''" in text:
            text = _DOUBLE_QUOTE_AFTER_SPACE.sub(r"\1 `` ", text)
        text = _OPENING_QUOTE.sub(r"\1 ", text)
    if period:
        text = _FINAL_PERIOD_1.sub(r"\1 \2 \3 ", text)
        if ".." in text:
            text = _ELLIPSIS.sub(r" \g<0> ", text)
        text = _FINAL_PERIOD_2.sub(r"\1 \2\3 ", text)
    if quote:
        text = _QUOTE_BEFORE_SPACE.sub(r"\1 ' ", text)
    if "--" in text:
        text = text.replace("--", " -- ")
    if quote:
        # Clitics need exactly one space after them, hence the padding and squeezing.
        text = _SPACES.sub(" ", " " + text.replace("''", " '' ") + " ")
        text = _CLITICS_1.sub(r"\1 \2 ", text)
        text = _CLITICS_2.sub(r"\1 \2 ", text)
    for word, pattern in _SPLIT_WORDS:
        if word in text:
            text = pattern.sub(r" \1 \2 ", " " + text + " ")
    return text.split()


def tokenize(text: str) -> list[str]:
    """Exactly ``nltk.word_tokenize(text)`` for a cleaned caption, several times faster."""
    if not _CLEAN_TEXT.fullmatch(text):
        return nltk.word_tokenize(text)
    return [token for sentence in nltk.sent_tokenize(text) for token in _tokenize_sentence(sentence)]


class _PerceptronTags:
    """NLTK's averaged-perceptron tagger with its weights in one dense matrix.

    ``PerceptronTagger.tag`` sums a word's feature weights label by label in
    Python. Here each feature is a row of a (features x tags) matrix and a word's
    scores are the running sum of its rows, added in the same order as NLTK adds
    them, so every score is bit-identical (adding the 0.0 of an absent tag changes
    nothing). Ties go to the larger tag name, as in NLTK, by ordering the columns
    from the largest name down so that ``argmax`` picks the first. The matrix
    takes about 34 MB (94k features x 45 tags in float64; float32 would round).
    """

    def __init__(self, tagger: nltk.tag.PerceptronTagger) -> None:
        self.tags = sorted(tagger.classes, reverse=True)
        column = {tag: j for j, tag in enumerate(self.tags)}
        self.rows = {feature: i for i, feature in enumerate(tagger.model.weights)}
        self.weights = np.zeros((len(self.rows), len(self.tags)))
        for feature, weights in tagger.model.weights.items():
            row = self.weights[self.rows[feature]]
            for tag, weight in weights.items():
                if tag in column:  # NLTK only ever picks one of its classes
                    row[column[tag]] = weight
        self.tagdict: dict[str, str] = dict(tagger.tagdict)

    @staticmethod
    def _normalize(word: str) -> str:
        # PerceptronTagger.normalize.
        if "-" in word and word[0] != "-":
            return "!HYPHEN"
        if word.isdigit() and len(word) == 4:
            return "!YEAR"
        if word and word[0].isdigit():
            return "!DIGITS"
        return word.lower()

    def _predict(self, features: list[str]) -> str:
        get = self.rows.get
        rows = [r for r in map(get, features) if r is not None]
        if not rows:
            return self.tags[0]  # all scores 0.0: the largest name wins
        # cumsum adds the rows strictly one after the other, like NLTK's loop.
        scores = self.weights.take(rows, axis=0).cumsum(axis=0)[-1]
        return self.tags[int(scores.argmax())]

    def tag(self, tokens: list[str]) -> list[str]:
        """The tags ``nltk.pos_tag(tokens)`` gives, without the words."""
        context = ["-START-", "-START2-", *map(self._normalize, tokens), "-END-", "-END2-"]
        prev, prev2 = "-START-", "-START2-"
        tags = []
        for i, word in enumerate(tokens, start=2):
            tag = self.tagdict.get(word)
            if not tag:
                # PerceptronTagger._get_features, in the same order.
                current, before, after = context[i], context[i - 1], context[i + 1]
                tag = self._predict([
                    "bias",
                    f"i suffix {word[-3:]}",
                    f"i pref1 {word[0] if word else ''}",
                    f"i-1 tag {prev}",
                    f"i-2 tag {prev2}",
                    f"i tag+i-2 tag {prev} {prev2}",
                    f"i word {current}",
                    f"i-1 tag+i word {prev} {current}",
                    f"i-1 word {before}",
                    f"i-1 suffix {before[-3:]}",
                    f"i-2 word {context[i - 2]}",
                    f"i+1 word {after}",
                    f"i+1 suffix {after[-3:]}",
                    f"i+2 word {context[i + 2]}",
                ])
            tags.append(tag)
            prev2, prev = prev, tag
        return tags


@lru_cache(maxsize=1)
def _tagger() -> _PerceptronTags:
    ensure_nltk_data()
    return _PerceptronTags(nltk.tag.PerceptronTagger())


@lru_cache(maxsize=1)
def _lemmatizer() -> nltk.stem.WordNetLemmatizer:
    return nltk.stem.WordNetLemmatizer()


@lru_cache(maxsize=1 << 18)
def _label(noun: str) -> str | None:
    """The label a noun gives, or None when it has a digit or its lemma is too short."""
    if any(c.isdigit() for c in noun):
        return None
    lemma = _lemmatizer().lemmatize(noun, pos="n")
    return lemma if len(lemma) >= _MIN_LABEL_LEN else None


@lru_cache(maxsize=65536)
def _extract(caption: str) -> tuple[str, ...]:
    ensure_nltk_data()
    tokens = tokenize(clean_caption(caption))
    if not tokens:
        return ()
    labels: dict[str, None] = {}  # insertion-ordered set
    for word, tag in zip(tokens, _tagger().tag(tokens)):
        if tag in _NOUN_TAGS:
            label = _label(word)
            if label is not None:
                labels.setdefault(label, None)
    return tuple(labels)


def extract_labels(caption: str) -> list[str]:
    """Return the deduplicated noun lemmas of ``caption`` in order of first appearance."""
    return list(_extract(caption))


def extract_labels_batch(captions: list[str]) -> list[list[str]]:
    """Apply :func:`extract_labels` to each caption."""
    return [extract_labels(c) for c in captions]


def extract_labels_nltk(caption: str) -> list[str]:
    """:func:`extract_labels` through NLTK's public calls only: slow, the yardstick for the fast path."""
    ensure_nltk_data()
    tokens = nltk.word_tokenize(clean_caption(caption))
    if not tokens:
        return []
    lemmatize = _lemmatizer().lemmatize
    labels: dict[str, None] = {}
    for word, tag in nltk.pos_tag(tokens):
        if tag in _NOUN_TAGS and not any(c.isdigit() for c in word):
            lemma = lemmatize(word, pos="n")
            if len(lemma) >= _MIN_LABEL_LEN:
                labels.setdefault(lemma, None)
    return list(labels)
