"""Label extraction from captions, as the NXTP reference does it (nouns, lemmatized, filtered)."""

import os
from pathlib import Path

os.environ.setdefault("NLTK_DATA", str(Path(__file__).parent / "fixtures" / "nltk_data"))

import random  # noqa: E402

import nltk  # noqa: E402
import pytest  # noqa: E402

from datamodules import labels  # noqa: E402
from datamodules.labels import (  # noqa: E402
    clean_caption,
    ensure_nltk_data,
    extract_labels,
    extract_labels_batch,
    extract_labels_nltk,
    tokenize,
)

CAPTIONS = {
    "Two dogs playing with a frisbee on the grass.": ["dog", "frisbee", "grass"],
    "A man riding a wave on top of a surfboard.": ["man", "wave", "top", "surfboard"],
    "A kitchen with a stove, a sink and wooden cabinets.": ["kitchen", "stove", "sink", "cabinet"],
    "A cat sitting on a laptop keyboard.": ["cat", "laptop", "keyboard"],
    "Three giraffes standing near a tall tree at the zoo.": ["giraffe", "tree", "zoo"],
    "A bowl of apples and bananas on a table.": ["bowl", "apple", "banana", "table"],
    "Horses grazing in a field next to a wooden fence.": ["horse", "field", "fence"],
    "A bus & a truck on the city street at night": ["bus", "truck", "city", "street", "night"],
    "Children playing soccer in the park.": ["child", "soccer", "park"],
    "THE MOUNTAINS AT SUNSET!!!": ["mountain", "sunset"],
}


# Web-style captions with the usual troublemakers (contractions, possessives, abbreviations, hyphens,
# numbers, several sentences, noise words inside other words), labels worked out by hand from the rules.
WEB_CAPTIONS = {
    "Don't miss the view: a lighthouse on the rocky coast.": ["view", "lighthouse", "coast"],
    # WordNet does not know "sandcastle", so the plural is its own lemma.
    "It's a sunny afternoon at the beach. Kids build sandcastles near the water.": [
        "afternoon", "beach", "kid", "sandcastles", "water"],
    "Close-up of a woman's hands kneading dough on a floured counter.": ["close-up", "woman", "hand", "dough", "counter"],
    # Lowercased, "u.s." reads as an adjective and "d.c" (its final period split off) as a noun.
    "Vintage photo of the U.S. Capitol building in Washington, D.C.": [
        "photo", "capitol", "building", "washington", "d.c"],
    "Stock image of a red-and-white striped umbrella on the sand": ["umbrella", "sand"],
    "Two 4x4 trucks and 3 SUVs parked outside a café.": ["truck", "suv", "caf"],  # "é" is stripped
    # The tagger takes "slicing" between a noun and plural nouns for a noun, and so does the reference.
    "A chef in a white apron slicing tomatoes, onions & peppers.": [
        "chef", "apron", "slicing", "tomato", "onion", "pepper"],
    "Aerial view of New York City at night": ["view", "york", "city", "night"],
    # "birthday" and "today" lose their "day": "birth" stays, "to" is too short anyway.
    "Happy birthday card with balloons -- 50% off today!": ["birth", "card", "balloon"],
    "Portrait of a smiling girl holding her cat's paw.": ["portrait", "girl", "cat", "paw"],
    "The dogs' owner walks them along the river every morning.": ["dog", "owner", "river", "morning"],
    "Rock 'n' roll band performing on stage in the 1980s.": ["rock", "roll", "band", "stage"],
    # Lowercased, the title "mr." is a common noun of three characters.
    "Mr. Smith's old car... rusting in the yard.": ["mr.", "smith", "car", "yard"],
    "Glasses of wine on a table at sunset; a great evening with friends!": [
        "glass", "wine", "table", "sunset", "evening", "friend"],
    "An illustration of a T-shirt design with a skull and roses": ["t-shirt", "design", "skull", "rose"],
    "Three women in saris walking past a temple, India": ["woman", "sari", "temple", "india"],
    "Kids' bikes leaning against the fence of a school.": ["kid", "bike", "fence", "school"],
}


@pytest.mark.parametrize("caption", list(CAPTIONS))
def test_real_captions(caption):
    assert extract_labels(caption) == CAPTIONS[caption]


@pytest.mark.parametrize("caption", list(WEB_CAPTIONS))
def test_web_captions(caption):
    assert extract_labels(caption) == WEB_CAPTIONS[caption]


def test_digits_are_dropped():
    assert extract_labels("A plate of food with broccoli and 2 slices of pizza.") == [
        "plate", "food", "broccoli", "slice", "pizza"]
    assert extract_labels("Route 66 sign next to 2 buses") == ["route", "sign", "bus"]
    assert extract_labels("A 3D render of 4x4 cars") == ["render", "car"]


def test_short_words_are_dropped():
    assert extract_labels("An ox and a cat by the sea.") == ["cat", "sea"]


def test_plurals_are_lemmatized_and_deduplicated():
    assert extract_labels("A dog chasing dogs and another dog.") == ["dog"]
    assert extract_labels("A woman holding 3 umbrellas") == ["woman", "umbrella"]


def test_noise_words_are_removed_like_the_reference():
    assert extract_labels("Person holding an umbrella in the rain, background blurred.") == ["umbrella", "rain"]
    assert extract_labels("Stock photo of a red car parked in front of a house") == ["photo", "car", "house"]
    # Noise words go as substrings, so "daylight" keeps only "light", as in the reference.
    assert extract_labels("Stock illustration of a lighthouse in daylight") == ["lighthouse", "light"]
    assert clean_caption("Images & stock, Day!").split() == ["s"]  # the "s" of "images" stays
    assert extract_labels("Images & stock, Day!") == []


def test_empty_and_punctuation_only():
    assert extract_labels("") == []
    assert extract_labels("...") == []
    assert extract_labels("   ") == []


def test_batch_matches_single():
    captions = list(CAPTIONS)
    assert extract_labels_batch(captions) == [extract_labels(c) for c in captions]
    assert extract_labels_batch([]) == []


def test_result_is_a_fresh_list():
    first = extract_labels("Two dogs playing with a frisbee on the grass.")
    first.append("mutated")
    assert extract_labels("Two dogs playing with a frisbee on the grass.") == ["dog", "frisbee", "grass"]


def test_ensure_nltk_data_finds_the_offline_data():
    ensure_nltk_data()


def test_missing_nltk_data_raises_a_helpful_error(tmp_path, monkeypatch):
    tried = []
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(nltk, "download", lambda name, **kwargs: tried.append(name) or False)
    monkeypatch.setattr(labels, "_nltk_ready", False)
    with pytest.raises(RuntimeError) as info:
        ensure_nltk_data()
    message = str(info.value)
    assert "tokenizers/punkt_tab" in message
    assert "NLTK_DATA" in message
    assert "python -m nltk.downloader punkt_tab" in message
    assert tried == ["punkt_tab"]


def test_download_errors_count_as_missing(tmp_path, monkeypatch):
    def offline(name, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(nltk, "download", offline)
    monkeypatch.setattr(labels, "_nltk_ready", False)
    with pytest.raises(RuntimeError, match="punkt_tab"):
        ensure_nltk_data()


# --- The fast path against NLTK's own calls --------------------------------------

SUBJECTS = ["a dog", "Two CATS", "the man's wife", "kids'", "an old fisherman", "3 horses", "a U.S. soldier",
            "Mr. Brown", "the t-shirt", "a well-known chef", "rock'n'roll fans", "a 4x4", "our neighbours' kids"]
VERBS = ["sitting on", "isn't running across", "can't stand near", "is gonna jump over", "won't leave",
         "cannot find", "wanna play in", "'s parked by", "walks along", "looks at", "-- waiting for --"]
OBJECTS = ["the grass", "a sandy beach", "N.Y.C. streets", "the kitchen counter", "a snowy mountain (Alps)",
           "'the sofa'", "a 1990s car", "the 'old' bridge", "rock 'n' roll posters", "e.g. apples & pears",
           "two ''quoted'' words", "the dog's bowl", "St. Paul's cathedral", "a café", "10.5 km of road"]
ENDINGS = [".", "!", "?", "...", "", " .", ". It's sunny.", ". Don't they look happy?", "; stock photo",
           ", background image.", " - illustration", ". 'Tis the season.", " in the U.S.", " at 5 p.m."]
PIECES = ["'", "''", "'s", "n't", "'ll", "'re", "'ve", "'m", "'d", "'t", "'tis", "'twas", ".", "..", "...", "-", "--",
          " ", "  ", "cannot", "gonna", "gotta", "wanna", "gimme", "lemme", "d'ye", "more'n", "u.s.", "e.g.", "mr.",
          "don't", "it's", "dog", "cats", "t-shirt", "3.5", "1990", "'90s", "o'clock", "a", "the", "st.", "no."]
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789'.- "


def _captions(n: int, seed: int = 0) -> list[str]:
    """Real-looking captions built from phrases full of punctuation, contractions and abbreviations."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
            for _ in range(n)]


def _cleaned_noise(n: int, seed: int = 0) -> list[str]:
    """Strings over the alphabet a cleaned caption can have, dense in quotes, periods and dashes."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        if rng.random() < 0.5:
            texts.append("".join(rng.choice(PIECES) if rng.random() < 0.7 else rng.choice(ALPHABET)
                                 for _ in range(rng.randint(1, 12))))
        else:
            words = PIECES + ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6)))]
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))
    return texts


def test_tokenizer_matches_nltk():
    for text in _cleaned_noise(3000) + [clean_caption(c) for c in _captions(1000)]:
        assert tokenize(text) == nltk.word_tokenize(text), text


def test_tokenizer_falls_back_to_nltk_outside_the_cleaned_alphabet():
    text = 'He said "Hello, World!" (twice) & left; costs $3.50.'
    assert tokenize(text) == nltk.word_tokenize(text)


def test_tagger_matches_nltk():
    tagger = labels._tagger()
    for text in _cleaned_noise(1000, seed=1) + [clean_caption(c) for c in _captions(1000, seed=1)]:
        tokens = nltk.word_tokenize(text)
        assert tagger.tag(tokens) == [tag for _, tag in nltk.pos_tag(tokens)], text


def test_labels_match_nltk():
    captions = _captions(2000, seed=2) + list(CAPTIONS) + list(WEB_CAPTIONS)
    assert extract_labels_batch(captions) == [extract_labels_nltk(c) for c in captions]
