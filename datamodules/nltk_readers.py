"""NLTK's sentence splitter, word tokenizer, tagger and noun lemmatizer, read from one folder of NLTK data and
made fast for label extraction (``datamodules.labels``, which imports this module only when it first extracts
labels: the commands that never do, such as ``nxtp label``, do not pay for importing NLTK)."""

from __future__ import annotations

import warnings

import nltk
import numpy as np
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params


class PerceptronTags:
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
                tag = self._predict(
                    [
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
                    ]
                )
            tags.append(tag)
            prev2, prev = prev, tag
        return tags


class NounLemmas(WordNetCorpusReader):
    """NLTK's WordNet reader reduced to what the noun lemmatizer reads: which words WordNet has as nouns, and its
    exception lists. NLTK's reader also parses every synset offset of every part of speech (3 s at the start of
    each data worker) and maps other WordNet versions (reading ``index.sense``, 7 MB, from whatever WordNet NLTK's
    search path finds), for synset and multilingual lookups this reader never makes."""

    def map_wn(self, version: str = "wordnet") -> None:
        return None

    def _scan_satellites(self) -> None:  # adjective satellites: not nouns
        self.satellite_offsets = set()

    def _load_lemma_pos_offset_map(self) -> None:
        # ``_morphy(word, "n")`` asks only whether ``"n" in self._lemma_pos_offset_map[lemma]``.
        with self._root.join("index.noun").open() as index:  # bytes: NLTK's line-by-line text reader is slow
            lines = index.read().decode(self._ENCODING).splitlines()
        noun = {"n": ()}  # one shared entry, not 117k small objects for the garbage collector to walk
        self._lemma_pos_offset_map.update(
            (line.split(" ", 1)[0], noun) for line in lines if line and not line.startswith(" ")
        )  # " ": licence

    def lemmatize(self, noun: str) -> str:
        """``WordNetLemmatizer().lemmatize(noun, pos="n")``: the shortest WordNet lemma, else the word itself."""
        lemmas = self._morphy(noun, "n")
        return min(lemmas, key=len) if lemmas else noun


class NLTKData:
    """Sentence splitter, word tokenizer, tagger and lemmatizer from the resources ``found`` in one folder of NLTK
    data (``datamodules.labels``' ``nltk.data.find`` results), and from no other."""

    def __init__(self, found: dict[str, nltk.data.PathPointer]) -> None:
        self.sentences = PunktSentenceTokenizer()  # what nltk.sent_tokenize's PunktTokenizer("english") loads
        self.sentences._params = load_punkt_params(found["tokenizers/punkt_tab/english/"])
        tagger = nltk.tag.PerceptronTagger(load=False)
        tagger.load_from_json("eng", found["taggers/averaged_perceptron_tagger_eng/"])
        self.tagger = PerceptronTags(tagger)
        with warnings.catch_warnings():  # "multilingual functions are not available": none is used
            warnings.simplefilter("ignore")
            self.wordnet = NounLemmas(found["corpora/wordnet/"], None)
        self.words = nltk.tokenize.NLTKWordTokenizer()  # what nltk.word_tokenize runs on each sentence
