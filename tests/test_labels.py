"""Label extraction from captions, as the NXTP reference does it (nouns, lemmatized, filtered).

NLTK's own calls (the yardstick) read tests/fixtures/nltk_data through NLTK_DATA (set in conftest); label extraction
reads only its packaged copy, so every comparison of the two also checks that copy.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nltk
import pytest

from datamodules import labels
from datamodules.labels import (
    PACKAGED_NLTK_DATA,
    LabelError,
    NLTKDataError,
    check_labels,
    clean_caption,
    ensure_nltk_data,
    extract_labels,
    extract_labels_batch,
    extract_labels_nltk,
    given_labels,
    tokenize,
)

ROOT = Path(__file__).parents[1]
FIXTURE_NLTK_DATA = Path(__file__).parent / "fixtures" / "nltk_data"

CAPTIONS = {
    "Two dogs playing with a frisbee on the grass.": ["dog", "frisbee", "grass"],
    "A man riding a wave on top of a surfboard.": ["man", "wave", "surfboard"],  # "top" is a noise word
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
        "afternoon",
        "beach",
        "kid",
        "sandcastles",
        "water",
    ],
    "Close-up of a woman's hands kneading dough on a floured counter.": [
        "close-up",
        "woman",
        "hand",
        "dough",
        "counter",
    ],
    # Lowercased, "u.s." reads as an adjective and "d.c" (its final period split off) as a noun.
    "Vintage photo of the U.S. Capitol building in Washington, D.C.": [
        "photo",
        "capitol",
        "building",
        "washington",
        "d.c",
    ],
    "Stock image of a red-and-white striped umbrella on the sand": ["umbrella", "sand"],
    "Two 4x4 trucks and 3 SUVs parked outside a café.": ["truck", "suv", "caf"],  # "é" is stripped
    # The tagger takes "slicing" between a noun and plural nouns for a noun, and so does the reference.
    "A chef in a white apron slicing tomatoes, onions & peppers.": [
        "chef",
        "apron",
        "slicing",
        "tomato",
        "onion",
        "pepper",
    ],
    "Aerial view of New York City at night": ["view", "york", "city", "night"],
    # The tagger reads "birthday" before "card" as an adjective; "today" is a noun.
    "Happy birthday card with balloons -- 50% off today!": ["card", "balloon", "today"],
    "Portrait of a smiling girl holding her cat's paw.": ["portrait", "girl", "cat", "paw"],
    "The dogs' owner walks them along the river every morning.": ["dog", "owner", "river", "morning"],
    "Rock 'n' roll band performing on stage in the 1980s.": ["rock", "roll", "band", "stage"],
    # Lowercased, the title "mr." is a common noun; without its period it is too short.
    "Mr. Smith's old car... rusting in the yard.": ["smith", "car", "yard"],
    "Glasses of wine on a table at sunset; a great evening with friends!": [
        "glass",
        "wine",
        "table",
        "sunset",
        "evening",
        "friend",
    ],
    "An illustration of a T-shirt design with a skull and roses": ["t-shirt", "design", "skull", "rose"],
    "Three women in saris walking past a temple, India": ["woman", "sari", "temple", "india"],
    "Kids' bikes leaning against the fence of a school.": ["kid", "bike", "fence", "school"],
}


# Where reference_compat gives other labels: the reference's raw substrings and edge punctuation.
COMPAT_LABELS = {
    "A cat sitting on a laptop keyboard.": ["cat", "lap", "keyboard"],  # "laptop" loses "top"
    # "birthday" and "today" lose their "day": "birth" stays, "to" is too short anyway.
    "Happy birthday card with balloons -- 50% off today!": ["birth", "card", "balloon"],
    "Mr. Smith's old car... rusting in the yard.": ["mr.", "smith", "car", "yard"],
}


@pytest.mark.parametrize("caption", list(CAPTIONS))
def test_real_captions(caption):
    assert extract_labels(caption) == CAPTIONS[caption]
    assert extract_labels(caption, reference_compat=True) == COMPAT_LABELS.get(caption, CAPTIONS[caption])


@pytest.mark.parametrize("caption", list(WEB_CAPTIONS))
def test_web_captions(caption):
    assert extract_labels(caption) == WEB_CAPTIONS[caption]
    assert extract_labels(caption, reference_compat=True) == COMPAT_LABELS.get(caption, WEB_CAPTIONS[caption])


# --- The reference's current cleaning (kaiyuyue/nxtp src/utils.py, 11cf60c): what changed since its first commit,
# in both modes, and where the default fixes it.


@pytest.mark.parametrize("compat", [False, True])
def test_newlines_separate_words(compat):
    assert clean_caption("A dog\ncat", compat) == "a dog cat"  # was "a dogcat"
    assert extract_labels("A dog\ncat", compat) == ["dog", "cat"]


@pytest.mark.parametrize("compat", [False, True])
def test_foreground_and_top_are_noise_words(compat):
    assert extract_labels("A tree in the foreground", compat) == ["tree"]
    assert extract_labels("A cake on top of the table", compat) == ["cake", "table"]


@pytest.mark.parametrize("compat", [False, True])
def test_spaces_are_squeezed_and_stripped(compat):
    assert clean_caption("  a   dog,  and  a cat  ", compat) == "a dog and a cat"


def test_noise_words_are_whole_words_by_default_and_substrings_in_compat():
    caption = "A laptop by a stop sign in daylight"
    assert clean_caption(caption) == "a laptop by a stop sign in daylight"
    assert clean_caption(caption, reference_compat=True) == "a lap by a s sign in light"  # the reference's bug
    assert extract_labels(caption) == ["laptop", "stop", "sign", "daylight"]
    assert extract_labels(caption, reference_compat=True) == ["lap", "sign", "light"]
    # Plurals of noise words go too; a hyphenated compound is a word of its own.
    assert clean_caption("Two persons, backgrounds and top-notch days") == "two and top-notch"
    assert clean_caption("Two persons, backgrounds and top-notch days", True) == "two s s and -notch s"


def test_every_whitespace_separates_words_by_default():
    for caption in ("A dog\tsitting on a couch", "A dog\u00a0sitting on a couch", "A dog\r\nsitting on a couch"):
        assert clean_caption(caption) == "a dog sitting on a couch", repr(caption)
        assert extract_labels(caption) == ["dog", "couch"]
    # The reference only turns newlines into spaces; other whitespace is deleted and joins words.
    assert extract_labels("A dog\tsitting on a couch", reference_compat=True) == ["dogsitting", "couch"]
    assert clean_caption("A dog\r\nsitting on a couch", reference_compat=True) == "a dog sitting on a couch"


def test_html_entities_are_decoded_by_default():
    caption = "Dogs &amp; cats on a sofa&nbsp;bed"
    assert clean_caption(caption) == "dogs cats on a sofa bed"
    assert extract_labels(caption) == ["dog", "cat", "sofa", "bed"]
    assert clean_caption(caption, reference_compat=True) == "dogs amp cats on a sofa nbspbed"


def test_labels_lose_edge_punctuation_by_default():
    # NLTK keeps the period of "dr." (an abbreviation) and tags it a noun: without it, "dr" is too short.
    caption = "Dr. Jones and a nurse in the hallway"
    assert [w for w, t in nltk.pos_tag(nltk.word_tokenize(clean_caption(caption))) if t in ("NN", "NNS")][0] == "dr."
    assert extract_labels(caption) == ["jones", "nurse", "hallway"]
    assert extract_labels(caption, reference_compat=True) == ["dr.", "jones", "nurse", "hallway"]
    assert extract_labels("The etc. and the u.s.a. team") == [
        label.strip(".") for label in extract_labels("The etc. and the u.s.a. team", reference_compat=True)
    ]


def test_digits_are_dropped():
    assert extract_labels("A plate of food with broccoli and 2 slices of pizza.") == [
        "plate",
        "food",
        "broccoli",
        "slice",
        "pizza",
    ]
    assert extract_labels("Route 66 sign next to 2 buses") == ["route", "sign", "bus"]
    assert extract_labels("A 3D render of 4x4 cars") == ["render", "car"]


def test_short_words_are_dropped():
    assert extract_labels("An ox and a cat by the sea.") == ["cat", "sea"]


def test_plurals_are_lemmatized_and_deduplicated():
    assert extract_labels("A dog chasing dogs and another dog.") == ["dog"]
    assert extract_labels("A woman holding 3 umbrellas") == ["woman", "umbrella"]


@pytest.mark.parametrize("compat", [False, True])
def test_noise_words_are_removed(compat):
    assert extract_labels("Person holding an umbrella in the rain, background blurred.", compat) == ["umbrella", "rain"]
    assert extract_labels("Stock photo of a red car parked in front of a house", compat) == ["photo", "car", "house"]
    assert extract_labels("Images & stock, Day!", compat) == []


def test_noise_substrings_like_the_reference_in_compat():
    # Noise words go as substrings, so "daylight" keeps only "light", as in the reference.
    assert extract_labels("Stock illustration of a lighthouse in daylight", True) == ["lighthouse", "light"]
    assert extract_labels("Stock illustration of a lighthouse in daylight") == ["lighthouse", "daylight"]
    assert clean_caption("Images & stock, Day!", True).split() == ["s"]  # the "s" of "images" stays
    assert clean_caption("Images & stock, Day!") == ""


def test_empty_and_punctuation_only():
    assert extract_labels("") == []
    assert extract_labels("...") == []
    assert extract_labels("   ") == []


def test_batch_matches_single():
    captions = list(CAPTIONS)
    assert extract_labels_batch(captions) == [extract_labels(c) for c in captions]
    assert extract_labels_batch(captions, True) == [extract_labels(c, True) for c in captions]
    assert extract_labels_batch([]) == []


def test_result_is_a_fresh_list():
    first = extract_labels("Two dogs playing with a frisbee on the grass.")
    first.append("mutated")
    assert extract_labels("Two dogs playing with a frisbee on the grass.") == ["dog", "frisbee", "grass"]


# --- The NLTK data: packaged, used whatever NLTK_DATA says, another folder only when asked for


def test_ensure_nltk_data_finds_the_packaged_data():
    assert ensure_nltk_data() == PACKAGED_NLTK_DATA.resolve()


def test_packaged_data_is_only_what_is_read_and_wordnet_is_complete():
    files = sorted(str(p.relative_to(PACKAGED_NLTK_DATA)) for p in PACKAGED_NLTK_DATA.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "corpora/wordnet.zip",
        "taggers/averaged_perceptron_tagger_eng.zip",
        "tokenizers/punkt_tab.zip",
    ]
    assert sum(p.stat().st_size for p in PACKAGED_NLTK_DATA.rglob("*")) < 14_000_000
    # The whole of WordNet 3.0 (synonyms and hypernyms for vocabulary mapping), the fixture's own bytes.
    with (
        zipfile.ZipFile(PACKAGED_NLTK_DATA / "corpora/wordnet.zip") as ours,
        zipfile.ZipFile(FIXTURE_NLTK_DATA / "corpora/wordnet.zip") as full,
    ):
        assert sorted(ours.namelist()) == sorted(full.namelist())
        assert all(ours.read(name) == full.read(name) for name in ours.namelist() if not name.endswith("/"))


MAP_PUPPY = """
import json
from lightning_modules.vocabulary import LabelMapper, Vocabulary
mapper = LabelMapper(Vocabulary.coerce(["dog", "car", "tree"]), by=["wordnet"])
mapper.prepare()
print(json.dumps([mapper.vocabulary.entries[i].name for i in map(mapper._by_wordnet, ["puppy", "oak", "taxi"])]))
"""


@pytest.mark.e2e
def test_puppy_maps_to_dog_through_the_packaged_wordnet_offline(tmp_path):
    # A clean environment: NLTK_DATA and NXTP_NLTK_DATA unset, a HOME without nltk_data, no network (offline hubs,
    # and NLTK never downloads), so the only WordNet there is is the packaged one.
    env = {k: os.environ[k] for k in ("PATH", "LANG", "OMP_NUM_THREADS") if k in os.environ}
    env.update(
        HOME=str(tmp_path), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", NO_PROXY="*", http_proxy="http://0.0.0.0:9"
    )
    done = subprocess.run(
        [sys.executable, "-c", MAP_PUPPY], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == ["dog", "tree", "car"]


# --- Labels a sample gives itself


def test_given_labels_from_json_and_tags():
    assert given_labels(meta=b'{"labels": ["Red  Dress", " stop\\tsign ", "red dress", ""]}') == [
        "red dress",
        "stop sign",
    ]
    assert given_labels(tags=b"Dog\ncat, Stop Sign\n\n") == ["dog", "cat", "stop sign"]
    assert given_labels(tags=b"dog", meta=b'{"labels": ["cat"]}') == ["cat"]  # the .json's list wins
    assert given_labels(tags=b"dog", meta=b'{"objects": []}') == ["dog"]
    assert given_labels(meta=b'{"objects": []}') is None and given_labels(meta=b"[1, 2]") is None
    assert given_labels() is None and given_labels(tags=b" ,\n") == []
    for meta, reason in [
        (b"{no", "malformed labels"),
        (b'{"labels": "dog"}', "malformed labels"),
        (b"\xff", "labels not utf-8"),
    ]:
        with pytest.raises(LabelError) as info:
            given_labels(meta=meta)
        assert info.value.reason == reason
    with pytest.raises(LabelError, match="labels not utf-8"):
        given_labels(tags="caf\xe9".encode("latin-1"))


def test_check_labels_refuses_the_delimiter_and_special_tokens():
    assert check_labels(["red dress"], ",", ("</s>",)) == ["red dress"]
    with pytest.raises(LabelError) as info:
        check_labels(["dog", "salt, pepper"], ",")
    assert info.value.reason == "label has delimiter" and "salt, pepper" in str(info.value)
    with pytest.raises(LabelError) as info:
        check_labels(["a </s> b"], ",", ("</s>",))
    assert info.value.reason == "label has special token"


def test_another_folder_is_read_only_when_asked_for(tmp_path, monkeypatch):
    tried = []
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: tried.append(args) or False)
    caption = "Two dogs playing with a frisbee on the grass."
    assert extract_labels(caption, nltk_data=FIXTURE_NLTK_DATA) == ["dog", "frisbee", "grass"]
    with pytest.raises(NLTKDataError) as info:
        extract_labels(caption, nltk_data=tmp_path)
    message = str(info.value)
    assert "tokenizers/punkt_tab" in message and str(tmp_path) in message and "NXTP_NLTK_DATA" in message
    monkeypatch.setenv("NXTP_NLTK_DATA", str(tmp_path))
    with pytest.raises(NLTKDataError, match="punkt_tab"):
        ensure_nltk_data()
    with pytest.raises(NLTKDataError, match="punkt_tab"):
        extract_labels("A different caption with a cat.")
    assert tried == []  # never a download


def test_a_folder_missing_one_resource_names_it(tmp_path):
    shutil.copytree(FIXTURE_NLTK_DATA / "tokenizers", tmp_path / "tokenizers")
    shutil.copytree(FIXTURE_NLTK_DATA / "corpora", tmp_path / "corpora")
    with pytest.raises(NLTKDataError, match="taggers/averaged_perceptron_tagger_eng"):
        ensure_nltk_data(tmp_path)


EXTRACT = """
import json, sys
from datamodules.labels import extract_labels
print(json.dumps([extract_labels(c, compat) for c in json.load(sys.stdin) for compat in (False, True)]))
"""


def _garbage_nltk_data(folder: Path) -> Path:
    """A folder with every resource NLTK would look for, all broken: reading any of it fails."""
    for name in ("tokenizers/punkt_tab.zip", "taggers/averaged_perceptron_tagger_eng.zip", "corpora/wordnet.zip"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"not a zip file")
    return folder


@pytest.mark.e2e
@pytest.mark.parametrize("nltk_env", ["unset", "garbage", "fixture"])
def test_same_labels_from_any_folder_whatever_nltk_data_says(tmp_path, nltk_env):
    # From a temporary folder, without the repository on the path (the installed package), with a HOME that has no
    # nltk_data, and with NLTK_DATA unset, broken, or pointing at other data.
    captions = list(CAPTIONS) + list(WEB_CAPTIONS) + list(COMPAT_LABELS)
    env = {k: v for k, v in os.environ.items() if k not in ("NLTK_DATA", "PYTHONPATH", "NXTP_NLTK_DATA")}
    env["HOME"] = str(tmp_path)
    if nltk_env == "garbage":
        env["NLTK_DATA"] = str(_garbage_nltk_data(tmp_path / "elsewhere"))
    elif nltk_env == "fixture":
        env["NLTK_DATA"] = str(FIXTURE_NLTK_DATA)
    done = subprocess.run(
        [sys.executable, "-c", EXTRACT],
        input=json.dumps(captions),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The truth: NLTK's own calls on the fixture data, in this process.
    assert json.loads(done.stdout) == [extract_labels_nltk(c, compat) for c in captions for compat in (False, True)]


@pytest.mark.e2e
def test_a_wheel_ships_the_nltk_data(tmp_path):
    # Built from a copy of the sources, so that the build leaves nothing in the repository.
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for package in ("datamodules", "lightning_modules"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {
        f"datamodules/nltk_data/{p.relative_to(PACKAGED_NLTK_DATA)}"
        for p in PACKAGED_NLTK_DATA.rglob("*")
        if p.is_file()
    }
    assert packaged <= names, packaged - names


# --- The fast path against NLTK's own calls --------------------------------------

SUBJECTS = [
    "a dog",
    "Two CATS",
    "the man's wife",
    "kids'",
    "an old fisherman",
    "3 horses",
    "a U.S. soldier",
    "Mr. Brown",
    "the t-shirt",
    "a well-known chef",
    "rock'n'roll fans",
    "a 4x4",
    "our neighbours' kids",
]
VERBS = [
    "sitting on",
    "isn't running across",
    "can't stand near",
    "is gonna jump over",
    "won't leave",
    "cannot find",
    "wanna play in",
    "'s parked by",
    "walks along",
    "looks at",
    "-- waiting for --",
]
OBJECTS = [
    "the grass",
    "a sandy beach",
    "N.Y.C. streets",
    "the kitchen counter",
    "a snowy mountain (Alps)",
    "'the sofa'",
    "a 1990s car",
    "the 'old' bridge",
    "rock 'n' roll posters",
    "e.g. apples & pears",
    "two ''quoted'' words",
    "the dog's bowl",
    "St. Paul's cathedral",
    "a café",
    "10.5 km of road",
]
ENDINGS = [
    ".",
    "!",
    "?",
    "...",
    "",
    " .",
    ". It's sunny.",
    ". Don't they look happy?",
    "; stock photo",
    "\n#travel #sunset",
    " &amp; a laptop",
    " 🌅🔥",
    "\ton top of a stop sign",
    " (Dr. Who)",
    ", background image.",
    " - illustration",
    ". 'Tis the season.",
    " in the U.S.",
    " at 5 p.m.",
]
PIECES = [
    "'",
    "''",
    "'s",
    "n't",
    "'ll",
    "'re",
    "'ve",
    "'m",
    "'d",
    "'t",
    "'tis",
    "'twas",
    ".",
    "..",
    "...",
    "-",
    "--",
    " ",
    "  ",
    "cannot",
    "gonna",
    "gotta",
    "wanna",
    "gimme",
    "lemme",
    "d'ye",
    "more'n",
    "u.s.",
    "e.g.",
    "mr.",
    "don't",
    "it's",
    "dog",
    "cats",
    "t-shirt",
    "3.5",
    "1990",
    "'90s",
    "o'clock",
    "a",
    "the",
    "st.",
    "no.",
]
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789'.- "


def _captions(n: int, seed: int = 0) -> list[str]:
    """Real-looking captions built from phrases full of punctuation, contractions and abbreviations."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}" for _ in range(n)]


def _cleaned_noise(n: int, seed: int = 0) -> list[str]:
    """Strings over the alphabet a cleaned caption can have, dense in quotes, periods and dashes."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        if rng.random() < 0.5:
            texts.append(
                "".join(
                    rng.choice(PIECES) if rng.random() < 0.7 else rng.choice(ALPHABET)
                    for _ in range(rng.randint(1, 12))
                )
            )
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
    tagger = labels._data(labels.nltk_data_dir()).tagger
    for text in _cleaned_noise(1000, seed=1) + [clean_caption(c) for c in _captions(1000, seed=1)]:
        tokens = nltk.word_tokenize(text)
        assert tagger.tag(tokens) == [tag for _, tag in nltk.pos_tag(tokens)], text


@pytest.mark.parametrize("compat", [False, True])
def test_labels_match_nltk(compat):
    captions = _captions(2000, seed=2) + list(CAPTIONS) + list(WEB_CAPTIONS)
    assert extract_labels_batch(captions, compat) == [extract_labels_nltk(c, compat) for c in captions]


def test_lemmatizer_matches_nltk_on_every_wordnet_noun():
    # The packaged reader loads only which words WordNet has as nouns; NLTK's WordNetLemmatizer (over the fixture
    # copy, through NLTK_DATA) loads everything. Every noun, regular and odd plurals, the exception list (geese)
    # and non-nouns lemmatize alike.
    from nltk.corpus import wordnet
    from nltk.stem import WordNetLemmatizer

    ours, theirs = labels._data(labels.nltk_data_dir()).wordnet, WordNetLemmatizer()
    nouns = sorted(wordnet.all_lemma_names(pos="n"))
    assert len(nouns) > 100_000
    words = nouns + [n + s for n in nouns[::5] for s in ("s", "es", "ies", "ses", "men")]
    words += list(wordnet._exception_map["n"]) + ["running", "quickly", "xyzzy"]
    assert [ours.lemmatize(w) for w in words] == [theirs.lemmatize(w, pos="n") for w in words]
