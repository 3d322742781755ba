"""Web-style captions through the whole data path, under the LLaMA-2 tokenizer and the default one.

The truth for labels is NLTK's own calls (``extract_labels_nltk`` on the fixture data); for token ids, the whole
text tokenized at once, as the reference does, wherever no label merges with the delimiter.
"""

import io
from collections import Counter

import pytest
import torch
import webdataset as wds
from conftest import LLAMA_TOKENIZER
from PIL import Image

from datamodules import NXTPDataModule
from datamodules.labels import extract_labels_nltk
from lightning_modules.decoder import DecoderConfig
from lightning_modules.nxtp import NXTP, NXTPConfig
from lightning_modules.vision import VisionConfig

# Abbreviations, HTML entities, emoji, other scripts, newlines and tabs, hashtags, a very long caption.
LONG = (
    " ".join(
        f"a {noun} next to"
        for noun in [
            "dog",
            "cat",
            "horse",
            "table",
            "chair",
            "lamp",
            "window",
            "door",
            "tree",
            "car",
            "boat",
            "bridge",
            "river",
            "house",
            "road",
            "bird",
            "flower",
            "cloud",
            "mountain",
            "lake",
        ]
        * 30
    )
    + " a fence."
)
WEB_CAPTIONS = [
    "Dr. Jones and a nurse in the hallway",
    "Mr. & Mrs. Smith at St. Mary's church, Jan. 5th",
    "U.S. Capitol building in Washington, D.C. at dusk",
    "Fish &amp; chips on a plate &#8211; London&nbsp;pub",
    "Sunset at the beach 🌅🔥 #travel #love #instagood",
    "東京タワー at night, a tower in Tokyo",
    "Кошка на диване: a cat on the sofa",
    "Café crème and a croissant on a table",
    "A dog\nand a cat\n\non a couch",
    "A boy\twith a kite\r\non the hill",
    "Vintage poster, c. 1950s, e.g. cars, trucks etc.",
    "A laptop on top of a desk next to a stop sign",
    "Photo by John Doe / Getty Images; all rights reserved.",
    "a cat...",
    "A woman holding an umbrella -- rain!!!",
    LONG,
    "very nice and quickly running",  # no noun at all: rejected as "no labels", the only reject allowed
]
PROMPT = "The objects in the image are"


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "blue").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("web") / "web.tar"
    image = jpeg()
    with wds.TarWriter(str(path)) as sink:
        for i, caption in enumerate(WEB_CAPTIONS):
            sink.write({"__key__": f"web_{i:03d}", "jpg": image, "txt": caption.encode()})
    return str(path)


def model_with(tokenizer: str, **kwargs) -> NXTP:
    torch.manual_seed(0)
    decoder = DecoderConfig(
        config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
        )
    )
    return NXTP(
        NXTPConfig(VisionConfig(model_name="nxtp-tiny-vit"), decoder, tokenizer, prompt=PROMPT, **kwargs)
    ).eval()


@pytest.fixture(scope="module", params=["llama2", "default"])
def tokenizer_dir(request, shapes) -> str:
    return str(LLAMA_TOKENIZER if request.param == "llama2" else shapes / "tokenizer")


def whole_text_ids(model: NXTP, labels: list[str]) -> list[int]:
    """The reference's way: prompt and labels as one text, tokenized at once."""
    seq = model.sequences
    text = f"{PROMPT} " + ", ".join(labels) + ("" if model.reference_compat else ",")
    ids = seq.prompt_ids(PROMPT)[:2] + model.tokenizer.encode(text, add_special_tokens=False)
    return ids + [seq.eos_id] if model.reference_compat else ids


def blocks(model: NXTP, ids: list[int], anchor: int, ends: list[int]) -> list[str]:
    """The text of each label block: the tokens between the anchor or a delimiter and the next delimiter."""
    starts = [anchor + 1] + [e + 1 for e in ends[:-1]]
    return [model.tokenizer.decode(ids[s:e]).strip() for s, e in zip(starts, ends)]


@pytest.mark.parametrize("compat", [False, True])
def test_labels_ending_in_punctuation_keep_the_delimiter_apart(tokenizer_dir, compat):
    model = model_with(tokenizer_dir, reference_compat=compat)
    seq = model.sequences
    plain = ["dog", "traffic light", "t-shirt", "d.c", "cat"]
    # Where nothing merges, the ids are exactly those of the whole text.
    assert seq(PROMPT, plain).ids == whole_text_ids(model, plain)
    # Labels ending in characters that can merge with "," (LLaMA-2 has ".,", "',", "-," and ",,").
    tricky = ["dr.", "kids'", "pre-", "u.s.", "dog", "mr.", "cat"]
    built = seq(PROMPT, tricky)
    n_blocks = len(tricky) - (1 if compat else 0)
    assert len(built.label_ends) == n_blocks
    assert all(built.ids[e] == seq.delimiter_id for e in built.label_ends)
    assert blocks(model, built.ids, built.anchor, built.label_ends) == tricky[:n_blocks]
    if compat:
        assert built.ids[-1] == seq.eos_id
        assert model.tokenizer.decode(built.ids[built.label_ends[-1] + 1 : -1]).strip() == tricky[-1]
    else:
        assert built.label_ends[-1] == len(built.ids) - 1


def test_the_merge_is_real_under_llama2():
    # The case that killed training: the whole text has one token ".," where a label ends and its delimiter is.
    model = model_with(str(LLAMA_TOKENIZER))
    assert ".," in model.tokenizer.convert_ids_to_tokens(whole_text_ids(model, ["dr.", "jones"]))
    built = model.sequences(PROMPT, ["dr.", "jones"])
    assert model.tokenizer.convert_ids_to_tokens(built.ids[built.label_ends[0] - 1 : built.label_ends[0] + 1]) == [
        ".",
        ",",
    ]


def test_labels_that_cannot_be_a_block_are_errors(tokenizer_dir):
    seq = model_with(tokenizer_dir).sequences
    for blank in ("", " ", "\n"):
        with pytest.raises(ValueError, match="is empty"):
            seq(PROMPT, ["dog", blank])
    with pytest.raises(ValueError, match="contains the delimiter"):
        seq(PROMPT, ["dog, cat"])


@pytest.mark.parametrize("compat", [False, True])
def test_web_captions_train_without_rejects(shard, tokenizer_dir, compat):
    model = model_with(tokenizer_dir, reference_compat=compat)
    dm = NXTPDataModule(train_shards=shard, val_shards=shard, batch_size=4, num_workers=0, max_labels=16)
    dm.bind(model.inputs)
    truth = {f"web_{i:03d}": extract_labels_nltk(c, compat) for i, c in enumerate(WEB_CAPTIONS)}
    named = {key for key, labels in truth.items() if labels}
    for loader, train in ((dm.train_dataloader(), True), (dm.val_dataloader(), False)):
        seen, skipped = [], Counter()
        for batch in loader:
            skipped.update(batch.skipped)
            text = batch.text
            for i, (key, labels) in enumerate(zip(batch.keys, batch.labels)):
                seen.append(key)
                n = int(text.lengths[i])
                ends = [int(e) for e in text.label_ends[i] if e >= 0]
                in_sequence = blocks(model, text.ids[i, :n].tolist(), int(text.anchors[i]), ends)
                if train:  # the labels of the sequence, shuffled and cut to max_labels
                    assert set(labels) <= set(truth[key])
                    assert len(labels) == min(len(truth[key]), 16)
                    expected = labels
                else:  # every label of the caption, in caption order: the references
                    assert labels == truth[key]
                    expected = labels[:16]
                assert in_sequence == expected[: len(expected) - (1 if compat else 0)]
        # Every caption that names an object arrives; only the one without nouns is rejected.
        assert sorted(seen) == sorted(named) and len(named) == len(WEB_CAPTIONS) - 1
        assert skipped == {"no labels": 1}
        assert len(truth[f"web_{WEB_CAPTIONS.index(LONG):03d}"]) > 16  # the long caption's references are not cut
