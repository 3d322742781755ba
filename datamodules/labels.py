"""Object labels from free-form captions, following the NXTP reference.

The reference (kaiyuyue/nxtp ``src/utils.py`` at its latest commit, 11cf60c) turns a caption into training labels
by lowercasing it, turning newlines into spaces, deleting a short list of "noise" words that web captions are full
of, stripping unusual characters, POS-tagging it with NLTK and keeping the common nouns (``NN``/``NNS``) that
contain no digit, lemmatized with WordNet and longer than two letters. ``reference_compat=True`` does exactly that.

By default four things differ, each a fix of something that turns web captions into wrong labels:

* noise words are removed as whole words (a noise word or its plural, not joined to letters, digits or a hyphen),
  where the reference removes raw substrings ("laptop" -> "lap", "stop sign" -> "s sign", "birthday" -> "birth");
* every kind of whitespace (tabs, carriage returns, no-break spaces) separates words, where the reference only
  turns newlines into spaces and deletes the rest ("dog\\tcat" -> "dogcat");
* HTML entities are decoded first ("dogs &amp; cats" gives no label "amp");
* leading and trailing periods, hyphens and apostrophes leave a label ("dr." -> "dr", too short, so dropped;
  "mr." likewise; "d.c" keeps its inner period).

Both ways, duplicates are removed after lemmatization (the reference deduplicates before, so "dog" and "dogs" could
both survive as "dog") and the order of first appearance is kept (the reference shuffles; the data pipeline does).

Samples may also carry their labels (``given_labels``): a ``.json`` with a ``labels`` list, or ``.tags`` (one per
line or comma-separated). Those are used as they are, lowercased and whitespace-normalised; ``data.labels_from``
says whether they or the caption's nouns win when a sample has both.

Self-contained: the NLTK data (tokenizer, tagger, WordNet) ships in ``datamodules/nltk_data`` and is the only data
read, whatever ``NLTK_DATA`` says and without ever downloading, so a caption gives the same labels on every machine.
``nltk_data=`` (or the ``NXTP_NLTK_DATA`` environment variable) selects another folder of the same layout.

The tokens, tags and lemmas are exactly NLTK's (``word_tokenize``, ``pos_tag``, ``WordNetLemmatizer``), computed
several times faster than NLTK's own calls so that one data worker extracts well over 5,000 captions/s
(``experiments/bench_labels.py``); :func:`extract_labels_nltk` is the same extraction through NLTK's calls, kept as
the yardstick.
"""

from __future__ import annotations

import html
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # NLTK is imported where labels are first extracted: a command that extracts none starts faster
    import nltk

    from datamodules.nltk_readers import NLTKData

__all__ = [
    "NLTK_DATA_ENV",
    "NLTK_RESOURCES",
    "NOISE_WORDS",
    "PACKAGED_NLTK_DATA",
    "LABEL_ERRORS",
    "LABEL_SOURCES",
    "LabelError",
    "NLTKDataError",
    "check_labels",
    "clean_caption",
    "decode_caption",
    "ensure_nltk_data",
    "load_nltk_data",
    "extract_labels",
    "extract_labels_batch",
    "extract_labels_nltk",
    "given_labels",
    "nltk_data_dir",
    "normalize_label",
    "normalize_labels",
    "split_tags",
    "tokenize",
]

# Removed in this order (as raw substrings under reference_compat): these words dominate web captions without
# naming anything that is visible.
NOISE_WORDS: tuple[str, ...] = (
    "person",
    "persons",
    "stock",
    "illustration",
    "foreground",
    "background",
    "photography",
    "image",
    "images",
    "front",
    "day",
    "ounce",
    "top",
)
_NOISE_ALTERNATIVES = "|".join(sorted(NOISE_WORDS, key=len, reverse=True))
_NOISE_WORD = re.compile(rf"(?<![\w-])(?:{_NOISE_ALTERNATIVES})s?(?![\w-])")

# Everything except letters, digits, spaces and ' . , & - is dropped; commas and
# ampersands then become spaces so that lists of nouns tokenize cleanly.
_DROP_CHARS = re.compile(r"[^a-zA-Z' 0-9.,&-]")
_SEPARATORS = re.compile(r"[,&]")
_WHITESPACE = re.compile(r"\s+")
# Stripped from both ends of a label by default: "dr." -> "dr", "-notch" -> "notch".
_LABEL_EDGES = ".-'"

_NOUN_TAGS = frozenset({"NN", "NNS"})
_MIN_LABEL_LEN = 3

PACKAGED_NLTK_DATA = Path(__file__).parent / "nltk_data"
NLTK_DATA_ENV = "NXTP_NLTK_DATA"
# nltk.data.find names of what label extraction reads -> name for nltk.download.
NLTK_RESOURCES: dict[str, str] = {
    "tokenizers/punkt_tab/english/": "punkt_tab",
    "taggers/averaged_perceptron_tagger_eng/": "averaged_perceptron_tagger_eng",
    "corpora/wordnet/": "wordnet",
}


# data.labels_from: which wins when a sample has both given labels and a caption (either is used when alone).
LABEL_SOURCES = ("given", "caption")
# Why a sample's text gives no usable labels (``LabelError.reason``); reject reasons of the data pipeline too.
LABEL_ERRORS = (
    "no caption",
    "caption not utf-8",
    "empty caption",
    "labels not utf-8",
    "malformed labels",
    "label has delimiter",
    "label has special token",
    "no labels",
)
# .tags holds one label per line, or comma-separated ones.
_TAG_SEPARATORS = re.compile(r"[\n,]")


class LabelError(ValueError):
    """A sample whose caption or given labels cannot be used; ``reason`` is one of ``LABEL_ERRORS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def normalize_label(label: str) -> str:
    """Lowercase and collapse whitespace: ``" Stop  Sign"`` -> ``"stop sign"`` (as the metrics compare labels)."""
    return " ".join(label.lower().split())


def decode_caption(data: bytes) -> str:
    """A caption's text; ``LabelError`` (``caption not utf-8``, ``empty caption``) when it has none."""
    try:
        caption = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LabelError("caption not utf-8", str(e)) from e
    if not caption.strip():
        raise LabelError("empty caption")
    return caption


def split_tags(text: str) -> list[str]:
    """The labels of a ``.tags`` text: one per line, or comma-separated."""
    return _TAG_SEPARATORS.split(text)


def normalize_labels(labels: list[str]) -> list[str]:
    """Given labels as they are used: normalised (:func:`normalize_label`), blank ones dropped, repeats removed,
    in the given order."""
    return list(dict.fromkeys(label for label in map(normalize_label, labels) if label))


def given_labels(tags: bytes | None = None, meta: bytes | None = None) -> list[str] | None:
    """The labels a sample gives itself: its ``.json``'s ``labels`` list, else its ``.tags`` (:func:`split_tags`);
    None when it gives none (no ``.tags``, and no ``.json`` or one without ``labels``). They are normalised
    (:func:`normalize_labels`); an empty list means the sample gives no label (a ``no labels`` reject).

    Raises:
        LabelError: ``labels not utf-8``; ``malformed labels`` (a ``.json`` that is no JSON, or ``labels`` that is
            not a list of strings).
    """
    labels = None
    if meta is not None:
        try:
            record = json.loads(meta.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise LabelError("labels not utf-8", f".json: {e}") from e
        except ValueError as e:
            raise LabelError("malformed labels", f".json is not JSON: {e}") from e
        if isinstance(record, dict) and "labels" in record:
            labels = record["labels"]
            if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
                raise LabelError("malformed labels", f'.json "labels" is not a list of strings: {labels!r:.200}')
    if labels is None and tags is not None:
        try:
            labels = split_tags(tags.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise LabelError("labels not utf-8", f".tags: {e}") from e
    return None if labels is None else normalize_labels(labels)


def check_labels(labels: list[str], delimiter: str = ",", special: tuple[str, ...] = ()) -> list[str]:
    """``labels`` unchanged, or ``LabelError`` for the first one holding the ``delimiter`` (it would end the
    label's block early) or one of the tokenizer's ``special`` tokens (``label has delimiter``, ``label has special
    token``)."""
    for label in labels:
        if delimiter in label:
            raise LabelError("label has delimiter", f"{label!r} contains {delimiter!r}")
        token = next((t for t in special if t and t in label), None)
        if token is not None:
            raise LabelError("label has special token", f"{label!r} contains {token!r}")
    return labels


class NLTKDataError(RuntimeError):
    """The NLTK data for label extraction is missing or unreadable: a set-up error, never one sample's fault."""


def nltk_data_dir(nltk_data: str | os.PathLike | None = None) -> Path:
    """The folder label extraction reads: ``nltk_data``, else ``$NXTP_NLTK_DATA``, else the packaged copy."""
    return _resolved(str(nltk_data or os.environ.get(NLTK_DATA_ENV) or PACKAGED_NLTK_DATA))


@lru_cache(maxsize=16)
def _resolved(path: str) -> Path:  # cached: label extraction asks once per caption
    return Path(path).expanduser().resolve()


def _find(root: Path) -> dict[str, nltk.data.PathPointer]:
    """The three resources in ``root`` and nowhere else, or an NLTKDataError naming the folder and the resource."""
    # NLTK only opens files below a folder on its search path (its path sandbox); appended, the folder does not
    # change what other NLTK users in this process find. paths=[root] keeps every other folder out of our search.
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    found = {}
    for path, name in NLTK_RESOURCES.items():
        try:
            found[path] = nltk.data.find(path, paths=[str(root)])
        except LookupError as e:
            raise NLTKDataError(
                f"NLTK resource '{path.rstrip('/')}' was not found in {root}, the NLTK data label extraction reads "
                f"(set by the nltk_data argument, else ${NLTK_DATA_ENV}, else the copy packaged with nxtp-lightning); "
                f"NLTK also refuses folders that other accounts can write to. Point it at a folder holding "
                f"{name} (`python -m nltk.downloader -d DIR {name}`)."
            ) from e
    return found


def ensure_nltk_data(nltk_data: str | os.PathLike | None = None) -> Path:
    """Check that the NLTK data label extraction reads is complete; return its folder.

    Raises:
        NLTKDataError: naming the folder and the missing resource.
    """
    root = nltk_data_dir(nltk_data)
    _find(root)
    return root


def load_nltk_data(nltk_data: str | os.PathLike | None = None) -> Path:
    """:func:`ensure_nltk_data`, then read the data into this process (once); return its folder.

    Called in the main process before the data workers start, it is read once there: the workers forked from it
    (Linux's default) share it instead of each reading it again at its first caption (0.75 CPU-s and tens of MB
    per worker; a training run's train, validation and test loaders each have their own workers, on every rank).
    """
    root = ensure_nltk_data(nltk_data)
    _data(root)
    return root


def clean_caption(caption: str, reference_compat: bool = False) -> str:
    """Lowercase a caption, delete noise words and strip unusual characters (see the module docstring)."""
    if reference_compat:
        text = caption.lower().replace("\n", " ")
        for word in NOISE_WORDS:
            text = text.replace(word, " ")
    else:
        text = _WHITESPACE.sub(" ", html.unescape(caption).lower())
        text = _NOISE_WORD.sub(" ", text)
    text = _DROP_CHARS.sub("", text)
    text = _SEPARATORS.sub(" ", text)
    return _WHITESPACE.sub(" ", text).strip()


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


def tokenize(text: str, nltk_data: str | os.PathLike | None = None) -> list[str]:
    """Exactly ``nltk.word_tokenize(text)`` for a cleaned caption, several times faster (NLTK data: see
    :func:`nltk_data_dir`)."""
    return _tokenize(text, _data(nltk_data_dir(nltk_data)))


def _tokenize(text: str, data: NLTKData) -> list[str]:
    tokenize_sentence = _tokenize_sentence if _CLEAN_TEXT.fullmatch(text) else data.words.tokenize
    return [token for sentence in _sentences(text, data) for token in tokenize_sentence(sentence)]


def _sentences(text: str, data: NLTKData) -> list[str]:
    """``nltk.sent_tokenize(text)``. Punkt breaks only after a sentence-ending character followed by more text; a
    caption with none before its last character is one sentence, and Punkt is not run: its ReDoS-guarded regex
    made word tokenization 0.44 ms a caption instead of 0.10 (a quarter of a training sample's preparation)."""
    stripped = text.rstrip()
    if not any(end in stripped[:-1] for end in data.sentences._lang_vars.sent_end_chars):
        return [stripped] if stripped else []
    return data.sentences.tokenize(text)


@lru_cache(maxsize=4)
def _data(root: Path) -> NLTKData:
    from datamodules.nltk_readers import NLTKData

    return NLTKData(_find(root))


@lru_cache(maxsize=1 << 18)
def _label(word: str, reference_compat: bool, root: Path) -> str | None:
    """The label a noun gives, or None when it has a digit or its lemma is too short."""
    if not reference_compat:
        word = word.strip(_LABEL_EDGES)
    if not word or any(c.isdigit() for c in word):
        return None
    lemma = _data(root).wordnet.lemmatize(word)
    return lemma if len(lemma) >= _MIN_LABEL_LEN else None


@lru_cache(maxsize=65536)
def _extract(caption: str, reference_compat: bool, root: Path) -> tuple[str, ...]:
    tokens = _tokenize(clean_caption(caption, reference_compat), _data(root))
    if not tokens:
        return ()
    labels: dict[str, None] = {}  # insertion-ordered set
    for word, tag in zip(tokens, _data(root).tagger.tag(tokens)):
        if tag in _NOUN_TAGS:
            label = _label(word, reference_compat, root)
            if label is not None:
                labels.setdefault(label, None)
    return tuple(labels)


def extract_labels(
    caption: str, reference_compat: bool = False, nltk_data: str | os.PathLike | None = None
) -> list[str]:
    """Return the deduplicated noun lemmas of ``caption`` in order of first appearance.

    Args:
        caption: any text.
        reference_compat: clean the caption exactly as the reference does, its raw-substring noise-word rule
            included, and keep labels' edge punctuation (see the module docstring).
        nltk_data: the folder of NLTK data to read; default ``$NXTP_NLTK_DATA``, else the packaged copy.

    Raises:
        NLTKDataError: the NLTK data is missing or unreadable.
    """
    return list(_extract(caption, reference_compat, nltk_data_dir(nltk_data)))


def extract_labels_batch(
    captions: list[str], reference_compat: bool = False, nltk_data: str | os.PathLike | None = None
) -> list[list[str]]:
    """Apply :func:`extract_labels` to each caption."""
    return [extract_labels(c, reference_compat, nltk_data) for c in captions]


def extract_labels_nltk(caption: str, reference_compat: bool = False) -> list[str]:
    """:func:`extract_labels` through NLTK's public calls only: slow, the yardstick for the fast path.

    It reads whatever NLTK data NLTK's own search path finds (``NLTK_DATA``, ``~/nltk_data``...), so that a test
    can compare the packaged copy with independent data.
    """
    import nltk

    tokens = nltk.word_tokenize(clean_caption(caption, reference_compat))
    if not tokens:
        return []
    lemmatize = nltk.stem.WordNetLemmatizer().lemmatize
    labels: dict[str, None] = {}
    for word, tag in nltk.pos_tag(tokens):
        word = word if reference_compat else word.strip(_LABEL_EDGES)
        if tag in _NOUN_TAGS and word and not any(c.isdigit() for c in word):
            lemma = lemmatize(word, pos="n")
            if len(lemma) >= _MIN_LABEL_LEN:
                labels.setdefault(lemma, None)
    return list(labels)
