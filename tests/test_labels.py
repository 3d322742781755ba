"""Label extraction from captions, as the NXTP reference does it (nouns, lemmatized, filtered)."""

import os
from pathlib import Path

os.environ.setdefault("NLTK_DATA", str(Path(__file__).parent / "fixtures" / "nltk_data"))

import nltk  # noqa: E402
import pytest  # noqa: E402

from datamodules import labels  # noqa: E402
from datamodules.labels import clean_caption, ensure_nltk_data, extract_labels, extract_labels_batch  # noqa: E402

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


@pytest.mark.parametrize("caption", list(CAPTIONS))
def test_real_captions(caption):
    assert extract_labels(caption) == CAPTIONS[caption]


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
