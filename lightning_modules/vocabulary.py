"""Closed vocabularies: exact probabilities of a user's label list, free labels mapped onto it, and closed-set metrics.

Scoring (:func:`score_vocabulary`). The probability NXTP gives a label is the product of its tokens' probabilities
and its closing delimiter's, every label read from the last prompt token, as one-shot sampling reads it. So every
candidate is an independent continuation of the same prefix: the image and prompt run once per image (their keys
and values cached), then the candidates are teacher-forced side by side, packed into one row per image with a
block mask (each candidate sees the prefix and its own earlier tokens, never another candidate) and the rotary
positions that follow the prompt. A vocabulary of thousands costs about the forward of its tokens; it is split
into chunks of at most ``chunk_tokens`` tokens per forward (the KV cache is cut back to the prefix after each).

Candidates are tokenized as training tokenizes a label (``SequenceBuilder``: the label as it reads after the
prompt, then the delimiter's own id). The result is the probability of that token sequence: open-set labelling
gives the same number for a label it found through the same tokens and closed by the delimiter (it adds in other
branches that decode to the same text, and in the default layout it also closes labels with ``</s>``). In
``reference_compat`` the scores are still read from the prompt, as the reference's sampler reads every label;
its open-set scores are float32 products rounded to 5 decimals, and a label cut by the step limit is mis-scored
there (``sampling.rank_labels_reference``), so they agree with these to 5e-6 where the branch closed normally.

Mapping (:class:`LabelMapper`): an open-set label goes to the vocabulary entry with the same name, else to the
first entry among its WordNet synonyms and hypernyms (nearest first: "puppy" -> "dog"), else to the entry whose
sentence embedding (the semantic metric's embedder) is most similar, if at least ``threshold``.

Vocabulary files (:meth:`Vocabulary.from_file`): plain text, one label per line; or JSON (``.json``): a list
whose items are a name or ``{"name": ..., "synonyms": [...]}``, or an object ``{name: [synonyms]}``; or JSON
lines (``.jsonl``), one such item per line. An entry's probability is the sum over its name and synonyms. Blank
lines are skipped and names are whitespace-normalized (case is kept: write labels as the model was trained on
them, lowercase for extracted nouns). A name given twice in one entry counts once; an entry name given again
(ImageNet has two "crane"s) merges into its first entry, with a warning. An empty file, and a name that is blank
(in an entry), contains the delimiter or tokenizes to a special token (``</s>``, ``<unk>``) raise
:class:`VocabularyError` naming the file and line (JSON: the entry's number).
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_average_precision
from torchmetrics.utilities.data import dim_zero_cat
from transformers import DynamicCache

from .masking import prefix_attention
from .metrics import normalize_label
from .nxtp import NXTP

__all__ = [
    "Entry",
    "LabelMapper",
    "Vocabulary",
    "VocabularyError",
    "VocabularyScore",
    "score_vocabulary",
    "vocabulary_targets",
]

VocabularyItem = str | Sequence[str] | Mapping[str, Any]


class VocabularyError(ValueError):
    """A vocabulary that cannot be scored: the message names the file and the line (or JSON entry)."""


@dataclass(frozen=True)
class Entry:
    """A vocabulary entry: its name (what is reported), every name scored for it (the name first), and where it
    was defined (``"FILE line 3"``)."""

    name: str
    names: tuple[str, ...]
    where: str


def _clean(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise VocabularyError(f"{where}: a name must be a string, not {name!r}")
    return " ".join(name.split())


class Vocabulary:
    """An ordered list of entries (see the module docstring for the rules on blanks and duplicates)."""

    def __init__(self, items: Iterable[tuple[VocabularyItem, str]], source: str = "vocabulary") -> None:
        """Build from ``(item, where)`` pairs; an item is a name, a list of names or ``{"name", "synonyms"}``."""
        self.source = source
        by_name: dict[str, int] = {}
        entries: list[tuple[str, list[str], str]] = []
        for item, where in items:
            if isinstance(item, Mapping):
                if "name" not in item:
                    raise VocabularyError(f"{where}: an entry object needs a 'name' (and optionally 'synonyms')")
                synonyms = item.get("synonyms", [])
                if isinstance(synonyms, str):
                    synonyms = [synonyms]
                names = [item["name"], *synonyms]
            elif isinstance(item, (list, tuple)):
                names = list(item)
            else:
                names = [item]
            names = [_clean(n, where) for n in names]
            if isinstance(item, str) and not names[0]:
                continue  # a blank line
            if not names or not all(names):
                raise VocabularyError(f"{where}: the entry has a blank name: {item!r}")
            if names[0] in by_name:
                first = entries[by_name[names[0]]]
                warnings.warn(f"{where}: {names[0]!r} is already an entry ({first[2]}); merged into it", stacklevel=2)
                first[1].extend(names[1:])
                continue
            by_name[names[0]] = len(entries)
            entries.append((names[0], names, where))
        if not entries:
            raise VocabularyError(f"{source}: the vocabulary has no entries")
        # Names given twice within an entry would be counted twice.
        self.entries = [Entry(name, tuple(dict.fromkeys(names)), where) for name, names, where in entries]

    @classmethod
    def from_file(cls, path: str | Path) -> Vocabulary:
        """Read a text, ``.json`` or ``.jsonl`` vocabulary file (see the module docstring)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise VocabularyError(f"{path}: cannot read the vocabulary: {e}") from e
        lines = text.splitlines()
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise VocabularyError(f"{path} line {e.lineno}: not valid JSON: {e.msg}") from e
            if isinstance(data, Mapping):
                data = [{"name": k, "synonyms": v} for k, v in data.items()]
            if not isinstance(data, list):
                raise VocabularyError(f"{path}: expected a JSON list of entries or an object {{name: [synonyms]}}")
            items = [(item, f"{path} entry {i}") for i, item in enumerate(data, 1)]
        elif path.suffix == ".jsonl":
            items = []
            for i, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        items.append((json.loads(line), f"{path} line {i}"))
                    except json.JSONDecodeError as e:
                        raise VocabularyError(f"{path} line {i}: not valid JSON: {e.msg}") from e
        else:
            items = [(line, f"{path} line {i}") for i, line in enumerate(lines, 1)]
        return cls(items, str(path))

    @classmethod
    def coerce(cls, vocabulary: Vocabulary | str | Path | Sequence[VocabularyItem]) -> Vocabulary:
        """A ``Vocabulary`` from itself, a file path, or a list of items (names, name lists or entry objects)."""
        if isinstance(vocabulary, Vocabulary):
            return vocabulary
        if isinstance(vocabulary, (str, Path)):
            return cls.from_file(vocabulary)
        return cls(((item, f"vocabulary entry {i}") for i, item in enumerate(vocabulary, 1)), "vocabulary")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        """The entries' names, in order."""
        return [e.name for e in self.entries]


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class Candidates:
    """Every name of a vocabulary as model tokens: ``ids[i]`` (label ids then the delimiter id) is a name of entry
    ``entry[i]``."""

    ids: list[list[int]]
    entry: list[int]


def tokenize(model: NXTP, vocabulary: Vocabulary) -> Candidates:
    """Tokenize every name as training does (``SequenceBuilder``); a bad name raises ``VocabularyError``."""
    seqs = model.sequences
    # A name spelled like a special token ("</s>", "<unk>", "<|image|>") is read as one; no label is made of them.
    special = set(model.tokenizer.all_special_ids) | set(seqs.new_token_ids)
    ids, entry = [], []
    for e_index, e in enumerate(vocabulary.entries):
        seen: set[tuple[int, ...]] = set()
        for name in e.names:
            try:
                seq = seqs(model.prompt, [name])
            except ValueError as err:
                raise VocabularyError(f"{e.where}: {err}") from err
            # The label's ids follow the anchor; the last id closes it (the delimiter, or </s> in reference_compat,
            # whose sampler still closes every label by the delimiter).
            label = (*seq.ids[seq.anchor + 1 : -1], seqs.delimiter_id)
            if special & set(label[:-1]):
                raise VocabularyError(
                    f"{e.where}: {name!r} tokenizes to special tokens "
                    f"{model.tokenizer.convert_ids_to_tokens(sorted(special & set(label)))}"
                )
            if label not in seen:  # two spellings with the same ids are one candidate
                seen.add(label)
                ids.append(list(label))
                entry.append(e_index)
    return Candidates(ids, entry)


def _chunks(lengths: list[int], budget: int) -> list[range]:
    """Consecutive candidate ranges whose fed tokens (each candidate's length minus its delimiter) fit ``budget``
    (a candidate longer than the budget gets a chunk of its own)."""
    out, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n - 1 > budget:
            out.append(range(start, i))
            start, used = i, 0
        used += n - 1
    out.append(range(start, len(lengths)))
    return out


@torch.no_grad()
def score_candidates(
    model: NXTP, pixels: Tensor, candidates: Sequence[Sequence[int]], chunk_tokens: int = 2048
) -> Tensor:
    """Probability [B, N] (float64) of every candidate token sequence (label ids then the closing delimiter)
    for every image: the prefix once, then the candidates teacher-forced over its KV cache, in chunks of at
    most ``chunk_tokens`` fed tokens per forward (over the batch; a longer candidate gets a chunk of its own)."""
    device = pixels.device
    image = model.embed_images(pixels)
    batch, n_image = image.shape[:2]
    prompt = torch.tensor(model.sequences.prompt_ids(model.prompt), device=device).expand(batch, -1)
    length = n_image + prompt.shape[1]
    # The prefix exactly as sampling.decode_branches runs it, so that the first-token distribution is the same.
    base = model.decoder.get_decoder()
    cache = DynamicCache()
    cache_kwarg = {("cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"): cache}
    out = base(
        inputs_embeds=torch.cat([image, model.embed_text(prompt).to(image.dtype)], 1),
        attention_mask=prefix_attention(n_image, prompt.shape[1], device=device).expand(batch, -1, -1, -1),
        position_ids=torch.arange(length, device=device).expand(batch, -1),
        use_cache=True,
        **cache_kwarg,
    )
    first = model.logits(out.last_hidden_state[:, -1]).float().log_softmax(-1).double()  # [B, V]
    scores = torch.empty(batch, len(candidates), dtype=torch.float64, device=device)
    # The budget bounds the tokens of one forward over the whole batch: its logits are [tokens, vocabulary].
    for chunk in _chunks([len(c) for c in candidates], max(1, chunk_tokens // batch)):
        cands = [candidates[i] for i in chunk]
        # Each candidate feeds its label tokens; the output at each predicts the next one, the last the delimiter.
        fed = torch.tensor([t for c in cands for t in c[:-1]], device=device)
        targets = torch.tensor([t for c in cands for t in c[1:]], device=device)
        owner = torch.repeat_interleave(
            torch.arange(len(cands), device=device), torch.tensor([len(c) - 1 for c in cands], device=device)
        )
        offset = torch.cat([torch.arange(len(c) - 1, device=device) for c in cands])  # token index in its label
        n = len(fed)
        # Every fed token sees the whole prefix, and the earlier tokens of its own candidate only.
        own = (owner[:, None] == owner[None, :]) & (offset[:, None] >= offset[None, :])
        mask = torch.cat([own.new_ones(n, length), own], 1)[None, None].expand(batch, -1, -1, -1)
        embeds = model.embed_text(fed).to(image.dtype)[None].expand(batch, -1, -1)
        step = base(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=(length + offset)[None].expand(batch, -1),
            use_cache=True,
            **cache_kwarg,
        )
        cache.crop(length - cache.get_seq_length())  # back to the prefix for the next chunk
        logits = model.logits(step.last_hidden_state).float()  # [B, n, V]
        # log softmax at the targets only: no second [B, n, V] tensor
        token_logp = (
            logits.gather(2, targets[None, :, None].expand(batch, -1, -1))[..., 0] - logits.logsumexp(-1)
        ).double()
        total = torch.zeros(batch, len(cands), dtype=torch.float64, device=device).index_add_(1, owner, token_logp)
        firsts = torch.tensor([c[0] for c in cands], device=device)
        scores[:, chunk.start : chunk.stop] = (total + first[:, firsts]).exp()
    return scores


def score_vocabulary(
    model: NXTP,
    pixels: Tensor,
    vocabulary: Vocabulary | Candidates,
    num_entries: int | None = None,
    chunk_tokens: int = 2048,
) -> Tensor:
    """Probability [B, E] (float64) of every vocabulary entry for every image: the sum over its names.

    ``vocabulary`` may be tokenized once beforehand (:func:`tokenize`; then give ``num_entries``) when many batches
    are scored.
    """
    if isinstance(vocabulary, Vocabulary):
        num_entries, vocabulary = len(vocabulary), tokenize(model, vocabulary)
    probs = score_candidates(model, pixels, vocabulary.ids, chunk_tokens)
    entry = torch.tensor(vocabulary.entry, device=probs.device)
    return probs.new_zeros(len(probs), num_entries or int(entry.max()) + 1).index_add_(1, entry, probs)


def ranked(
    scores: Tensor, names: Sequence[str], topk: int | None = None, min_prob: float = 0.0
) -> list[list[tuple[str, float]]]:
    """``(name, probability)`` pairs sorted by probability (ties in vocabulary order), per row of ``scores``."""
    results = []
    for row in scores.tolist():
        pairs = sorted(zip(names, row), key=lambda kv: kv[1], reverse=True)
        results.append([(n, p) for n, p in pairs[:topk] if p >= min_prob])
    return results


# ------------------------------------------------------------------------------------------------ mapping


class LabelMapper:
    """Maps free labels onto a vocabulary: same name, else WordNet, else the sentence embedder (module docstring).

    Args:
        vocabulary: the entries to map onto.
        threshold: the least cosine similarity at which the embedder maps a label (above 1: never).
        by: the methods to use after the exact name match, in this order: ``"wordnet"``, ``"embedding"``; None:
            both, WordNet where its noun data is found (``NLTKDataError`` where it is asked for and not found).
        hypernym_hops: how far up WordNet's hypernyms to look (the top, "entity", "object", is far from every
            concrete noun, so it is never reached from one).
        embedder: a sentence-transformers folder or hub name; default the semantic metric's offline copy.
        nltk_data: the NLTK data folder, as for label extraction (``datamodules.labels.nltk_data_dir``).
    """

    def __init__(
        self,
        vocabulary: Vocabulary,
        threshold: float = 0.6,
        by: Sequence[str] | None = None,
        hypernym_hops: int = 3,
        embedder: str | None = None,
        nltk_data: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        # None: both, WordNet only where its noun data is found (with a warning where not).
        self._auto = by is None
        by = ("wordnet", "embedding") if by is None else tuple(by)
        unknown = set(by) - {"wordnet", "embedding"}
        if unknown:
            raise ValueError(f"by={list(by)}: unknown methods {sorted(unknown)}; use 'wordnet' and/or 'embedding'")
        self.vocabulary, self.threshold, self.by, self.hops = vocabulary, threshold, by, hypernym_hops
        self.embedder, self.nltk_data, self.device = embedder, nltk_data, torch.device(device)
        # Every name of every entry, normalized as labels are compared; the first entry to claim a name keeps it.
        self.index: dict[str, int] = {}
        for i, e in enumerate(vocabulary.entries):
            for name in e.names:
                self.index.setdefault(normalize_label(name), i)
        self._wordnet = self._model = self._name_emb = None
        self._cache: dict[str, tuple[int | None, str]] = {}

    def _wordnet_reader(self):
        """WordNet with its noun data, from the project's NLTK data folder (the packaged copy is the complete
        WordNet 3.0) if it has it, else from NLTK's own search path (``NLTK_DATA``, ``nltk.download("wordnet")``)."""
        if self._wordnet is None:
            import nltk
            from nltk.corpus.reader.wordnet import WordNetCorpusReader

            from datamodules.labels import NLTKDataError, nltk_data_dir

            class WordNet(WordNetCorpusReader):
                def map_wn(self, version: str = "wordnet") -> None:
                    """Skipped: the mapping to other WordNet versions (multilingual lookups only) reads
                    ``index.sense``, which a lemmatizing copy leaves out (as ``datamodules.labels`` does)."""

            own = str(nltk_data_dir(self.nltk_data))
            if own not in nltk.data.path:  # NLTK opens files only below its search path (appended, as labels does)
                nltk.data.path.append(own)
            root = None
            for folder in [own, *nltk.data.path]:  # never downloads
                try:
                    nltk.data.find("corpora/wordnet/data.noun", paths=[folder])
                    root = folder
                    break
                except LookupError:
                    continue
            if root is None:
                raise NLTKDataError(
                    f"mapping by WordNet needs WordNet's noun data (corpora/wordnet/data.noun), found "
                    f"neither in {nltk_data_dir(self.nltk_data)} nor on NLTK's search path: run "
                    f"`python -m nltk.downloader wordnet`, or map by embedding only"
                )
            with warnings.catch_warnings():  # "multilingual functions are not available": none is used
                warnings.simplefilter("ignore")
                self._wordnet = WordNet(nltk.data.find("corpora/wordnet/", paths=[root]), None)
        return self._wordnet

    def _by_wordnet(self, label: str) -> int | None:
        """The entry among the label's synonyms, else its nearest hypernyms (a breadth-first walk up WordNet's
        senses, most frequent sense first)."""
        wn = self._wordnet_reader()
        level = wn.synsets(label.replace(" ", "_"), pos="n")
        seen = set(level)
        for _ in range(self.hops + 1):
            for synset in level:
                for lemma in synset.lemma_names():
                    hit = self.index.get(normalize_label(lemma.replace("_", " ")))
                    if hit is not None:
                        return hit
            level = [h for s in level for h in s.hypernyms() + s.instance_hypernyms() if h not in seen]
            seen.update(level)
        return None

    def _embed(self, texts: list[str]) -> Tensor:
        if self._model is None:
            from .metrics import load_embedder

            self._model = load_embedder(self.embedder).to(self.device)
        emb = self._model.encode(texts, convert_to_tensor=True, show_progress_bar=False, batch_size=128)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def prepare(self) -> None:
        """Load what mapping needs (WordNet, the embedder and the entries' embeddings) now rather than at the first
        label, so that a missing resource fails before any work: ``NLTKDataError`` when WordNet was asked for."""
        if "wordnet" in self.by and self._wordnet is None:
            from datamodules.labels import NLTKDataError

            try:
                self._wordnet_reader()
            except NLTKDataError as e:
                if not self._auto:
                    raise
                warnings.warn(f"{e}; mapping without WordNet", stacklevel=2)
                self.by = tuple(m for m in self.by if m != "wordnet")
        if "embedding" in self.by and self._name_emb is None:
            self._name_emb, self._name_entry = self._embed(list(self.index)), torch.tensor(list(self.index.values()))

    def map_labels(self, labels: Sequence[str]) -> list[tuple[int | None, str]]:
        """For each label, ``(entry index or None, how)`` with ``how`` one of ``name``, ``wordnet``,
        ``embedding`` or ``none``."""
        todo = [l for l in dict.fromkeys(labels) if l not in self._cache]
        if todo:
            self.prepare()
        left = []
        for label in todo:
            key = normalize_label(label)
            if key in self.index:
                self._cache[label] = (self.index[key], "name")
            elif "wordnet" in self.by and (hit := self._by_wordnet(key)) is not None:
                self._cache[label] = (hit, "wordnet")
            else:
                left.append(label)
        if left and "embedding" in self.by:
            sim = self._embed(left) @ self._name_emb.T  # [labels, names]
            best, at = sim.max(1)
            for label, s, i in zip(left, best.tolist(), at.tolist()):
                hit = int(self._name_entry[i]) if s >= self.threshold else None
                self._cache[label] = (hit, "embedding" if hit is not None else "none")
        for label in left:
            self._cache.setdefault(label, (None, "none"))
        return [self._cache[l] for l in labels]

    def map(
        self, labels: Sequence[tuple[str, float]], keep_unmapped: bool = False, min_prob: float = 0.0
    ) -> list[tuple[str, float]]:
        """One image's ``(label, probability)`` pairs as ``(entry name, summed probability)``, sorted; unmapped
        labels are dropped, or kept under their own text (merged with an entry of that name, which cannot exist:
        such a label would have mapped)."""
        sums: dict[str, float] = {}
        for (label, p), (hit, _) in zip(labels, self.map_labels([l for l, _ in labels])):
            if hit is not None or keep_unmapped:
                key = self.vocabulary.entries[hit].name if hit is not None else label
                sums[key] = sums.get(key, 0.0) + p
        return [(k, p) for k, p in sorted(sums.items(), key=lambda kv: kv[1], reverse=True) if p >= min_prob]


# ------------------------------------------------------------------------------------------------ metric


def vocabulary_targets(vocabulary: Vocabulary, refs: Sequence[Sequence[str]]) -> Tensor:
    """Multi-hot targets [len(refs), E] (bool): the entries whose names match a reference label after
    ``normalize_label``; references in no entry are left out."""
    index: dict[str, list[int]] = {}
    for i, e in enumerate(vocabulary.entries):
        for name in e.names:
            index.setdefault(normalize_label(name), []).append(i)
    out = torch.zeros(len(refs), len(vocabulary), dtype=torch.bool)
    for row, labels in enumerate(refs):
        for label in labels:
            out[row, index.get(normalize_label(label), [])] = True
    return out


class VocabularyScore(Metric):
    """Closed-set metrics from per-image score vectors over a vocabulary of ``num_entries`` entries.

    ``update(scores, targets)``: ``scores`` [B, E] (any real numbers, higher = more likely), ``targets`` [B, E]
    (0/1 or bool). :meth:`compute` returns

    * ``map``: the mean over entries with at least one positive image of the entry's average precision (torchmetrics'
      ``binary_average_precision``), ranking every image by its score (tied scores form one threshold, as in
      sklearn's ``average_precision_score``); entries without a positive are left out, and ``map`` is 0 without any;
    * ``recall``, ``precision``, ``f1``: with the entries scoring at least ``threshold`` as an image's predictions,
      the means over images of the per-image values, defined as in ``metrics.ExactLabelScore`` (an image without
      predictions scores 0, an image without targets is skipped).

    Per-image sums are sum states; the scores and targets ``cat`` list states (a rank may have had no update;
    every value is 0 when no rank had one).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_entries: int, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_entries, self.threshold = num_entries, threshold
        # Flat float32 lists: torchmetrics syncs a rank without updates as one empty 1-D tensor of the metric's
        # dtype, which gathers with the other ranks' blocks only if they are 1-D and of that dtype too.
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("targets", [], dist_reduce_fx="cat")
        for name in ("recall", "precision", "f1"):
            self.add_state(f"{name}_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, scores: Tensor, targets: Tensor) -> None:
        """Add a batch of per-image scores and multi-hot targets, both [B, E]."""
        if scores.ndim != 2 or scores.shape != targets.shape or scores.shape[1] != self.num_entries:
            raise ValueError(
                f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must both be "
                f"[images, {self.num_entries}]"
            )
        scores, targets = scores.detach().float().to(self.device), targets.to(self.device).bool()
        self.scores.append(scores.flatten())
        self.targets.append(targets.float().flatten())
        pred = scores >= self.threshold
        has_refs = targets.any(1)
        hits = (pred & targets).sum(1).double()
        recall = hits / targets.sum(1).clamp(min=1)
        precision = hits / pred.sum(1).clamp(min=1)
        f1 = torch.nan_to_num(2 * recall * precision / (recall + precision))
        for name, value in (("recall", recall), ("precision", precision), ("f1", f1)):
            setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + value[has_refs].sum())
        self.num_images += has_refs.sum()

    def compute(self) -> dict[str, Tensor]:
        """``{"map", "recall", "precision", "f1"}`` as float32 scalars."""
        n = self.num_images.clamp(min=1)
        out = {name: (getattr(self, f"{name}_sum") / n).float() for name in ("recall", "precision", "f1")}
        scores, targets = (
            dim_zero_cat(x).view(-1, self.num_entries) if len(x) else torch.zeros(0, self.num_entries)
            for x in (self.scores, self.targets)
        )
        out["map"] = _mean_average_precision(scores, targets.bool())
        return out


def _mean_average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Mean over columns with a positive of torchmetrics' average precision (0 when no column has one).

    Columns without a positive are left out before torchmetrics sees them: it would score them ``nan`` and warn
    (``binary_average_precision``, one column at a time, as ``multilabel_average_precision`` loops internally; the
    multilabel form also refuses a single column). torchmetrics treats tied scores as one threshold, as sklearn.
    """
    positive = targets.any(0).nonzero().flatten().tolist()
    if not positive:
        return scores.new_zeros((), dtype=torch.float32)
    # torchmetrics applies a sigmoid to scores outside [0, 1], which in float32 turns distinct large (or very
    # negative) scores such as summed log-probabilities into ties of 1.0 (or 0.0). AP depends only on each column's
    # order and ties, so hand it each score's dense rank in its column, scaled into [0, 1]: exact in float64.
    ranks = _dense_ranks(scores) / max(len(scores), 1)
    aps = [binary_average_precision(ranks[:, c], targets[:, c].long(), validate_args=False) for c in positive]
    return torch.stack(aps).mean().float()


def _dense_ranks(scores: Tensor) -> Tensor:
    """Per column, 0 for the smallest distinct score, 1 for the next, ...; equal scores share a rank (float64)."""
    ordered, order = scores.sort(dim=0)
    new_value = torch.ones_like(ordered, dtype=torch.float64)
    new_value[0] = 0
    new_value[1:] = (ordered[1:] != ordered[:-1]).double()
    return torch.empty_like(new_value).scatter_(0, order, new_value.cumsum(0))
