"""The WebDataset DataModule reading shards it did not write itself, with broken members among them."""

import functools
import io
import json
from types import SimpleNamespace

import pytest
import webdataset as wds
from conftest import tiny_nxtp
from PIL import Image

from datamodules import NXTPDataModule
from datamodules.labels import extract_labels_nltk

CAPTIONS = ["a dog on the grass", "two cats and a sofa", "a red bus in the street", "a boat on the lake"]


def jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder, n_shards=2, per_shard=6):
    keys = []
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                key = f"s{s}_{i:03d}"
                sample = {"__key__": key, "jpg": jpeg((40 * i, 20 * s, 90)), "txt": CAPTIONS[i % 4].encode()}
                if key == "s0_002":
                    sample["jpg"] = b"\xff\xd8 not really a jpeg"
                elif key == "s1_004":
                    del sample["txt"]
                else:
                    keys.append(key)
                sink.write(sample)
    return keys


@pytest.fixture(scope="module")
def model():
    return tiny_nxtp()


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.e2e)])
def test_every_good_sample_once_and_bad_ones_counted(tmp_path, model, num_workers):
    good_keys = write_shards(tmp_path)
    dm = NXTPDataModule(val_shards=str(tmp_path / "shard-{000000..000001}.tar"), batch_size=4, num_workers=num_workers)
    dm.bind(model.inputs)
    seen, skipped = [], {}
    for batch in dm.val_dataloader():
        seen += batch.keys
        for reason, count in batch.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
        assert batch.pixels.shape[1:] == (3, 64, 64)
        text = batch.text
        assert text.ids.shape[0] == len(batch.keys) == len(batch.labels)
        for ids, length, anchor in zip(text.ids, text.lengths, text.anchors):
            assert ids[anchor].item() == model.sequences.prompt_ids(model.prompt)[-1]
            assert (ids[length:] == model.sequences.pad_id).all()
    assert sorted(seen) == sorted(good_keys)
    assert skipped == {"corrupt image": 1, "no caption": 1}


def test_labels_come_from_the_caption_and_are_shuffled(tmp_path, model):
    write_shards(tmp_path, n_shards=1)
    dm = NXTPDataModule(train_shards=str(tmp_path / "shard-000000.tar"), batch_size=5, num_workers=0, seed=3)
    dm.bind(model.inputs)
    batch = next(iter(dm.train_dataloader()))
    captions = dict(zip([f"s0_{i:03d}" for i in range(6)], [CAPTIONS[i % 4] for i in range(6)]))
    expected = {
        "a dog on the grass": {"dog", "grass"},
        "two cats and a sofa": {"cat", "sofa"},
        "a red bus in the street": {"bus", "street"},
        "a boat on the lake": {"boat", "lake"},
    }
    for key, labels in zip(batch.keys, batch.labels):
        assert set(labels) == expected[captions[key]]
    decoded = [
        model.tokenizer.decode(ids[a + 1 : l])
        for ids, a, l in zip(batch.text.ids, batch.text.anchors, batch.text.lengths)
    ]
    assert decoded == [", ".join(labels) + "," for labels in batch.labels]


def test_missing_shards_config_names_the_key(model):
    dm = NXTPDataModule(train_shards=None)
    dm.bind(model.inputs)
    with pytest.raises(ValueError, match="data.train_shards"):
        dm.train_dataloader()


def test_shards_that_do_not_exist_name_the_key(tmp_path, model):
    write_shards(tmp_path, n_shards=1)
    dm = NXTPDataModule(val_shards=str(tmp_path / "shard-{000000..000002}.tar"))
    dm.bind(model.inputs)
    with pytest.raises(FileNotFoundError, match=r"data.val_shards: 2 of 3 shards do not exist"):
        dm.val_dataloader()


@pytest.mark.e2e
def test_two_ranks_with_two_workers_each_see_disjoint_halves(tmp_path, model, monkeypatch):
    good_keys = write_shards(tmp_path, n_shards=4, per_shard=3)
    seen = []
    for rank in (0, 1):  # what each DDP rank reads (webdataset takes the rank from RANK / WORLD_SIZE)
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = NXTPDataModule(val_shards=str(tmp_path / "shard-{000000..000003}.tar"), batch_size=2, num_workers=2)
        dm.bind(model.inputs)
        seen.append([key for batch in dm.val_dataloader() for key in batch.keys])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(good_keys)  # every good sample exactly once across ranks


def training_stream(tmp_path, model, epochs=1, batches=None, seed=0, resumed_at=0, rank=0, **data):
    """Per epoch, the keys and label orders of the training batches that two workers deliver."""
    dm = NXTPDataModule(
        train_shards=str(tmp_path / "shard-{000000..000003}.tar"),
        batch_size=2,
        num_workers=2,
        seed=seed,
        hflip=True,
        **data,
    )
    dm.bind(model.inputs)
    dm.trainer = SimpleNamespace(global_step=resumed_at, current_epoch=0, global_rank=rank, world_size=1)
    loader = dm.train_dataloader()
    return [
        [(batch.keys, batch.labels, batch.pixels.sum().item()) for batch, _ in zip(loader, range(batches or 10**9))]
        for _ in range(epochs)
    ]


@pytest.mark.e2e
def test_the_resampled_stream_is_the_same_in_every_run_with_its_seed(tmp_path, model):
    write_shards(tmp_path, n_shards=4, per_shard=3)
    first = training_stream(tmp_path, model, batches=12, resampled=True)
    assert training_stream(tmp_path, model, batches=12, resampled=True) == first  # shards, samples, labels, flips
    assert training_stream(tmp_path, model, batches=12, resampled=True, seed=1) != first
    # a resumed run draws a stream of its own, not the one its first part was trained on
    assert training_stream(tmp_path, model, batches=12, resampled=True, resumed_at=500) != first
    assert training_stream(tmp_path, model, batches=12, resampled=True, rank=1) != first  # each rank its own data


@pytest.mark.e2e
def test_epochs_are_reproducible_and_each_in_another_order(tmp_path, model):
    good_keys = write_shards(tmp_path, n_shards=4, per_shard=3)
    epochs = training_stream(tmp_path, model, epochs=3)
    keys = [[key for batch_keys, _, _ in epoch for key in batch_keys] for epoch in epochs]
    for epoch in keys:  # 11 good samples; the worker with shards 0 and 2 has 5: 2 batches, 1 left over is dropped
        assert len(epoch) == len(set(epoch)) == 10 and set(epoch) <= set(good_keys)
    assert len({tuple(epoch) for epoch in keys}) == 3  # every epoch in its own order
    assert training_stream(tmp_path, model, epochs=3) == epochs


@pytest.mark.parametrize("compat", [False, True])
def test_evaluation_references_are_every_label_and_extraction_follows_the_model(tmp_path, compat):
    caption = "A laptop, a dog, a cat, a sofa and a lamp on a table"
    truth = extract_labels_nltk(caption, compat)  # NLTK's own calls
    assert len(truth) == 6 and ("lap" in truth) == compat  # the reference's substring rule, only in compat
    with wds.TarWriter(str(tmp_path / "one.tar")) as sink:
        sink.write({"__key__": "one", "jpg": jpeg("blue"), "txt": caption.encode()})
    model = tiny_nxtp(reference_compat=compat)
    dm = NXTPDataModule(
        train_shards=str(tmp_path / "one.tar"),
        val_shards=str(tmp_path / "one.tar"),
        batch_size=1,
        num_workers=0,
        max_labels=2,
    )
    dm.bind(model.inputs)
    val, train = next(iter(dm.val_dataloader())), next(iter(dm.train_dataloader()))
    assert val.labels == [truth]  # not cut to max_labels, in caption order
    assert len(train.labels[0]) == 2 and set(train.labels[0]) <= set(truth)
    for batch in (val, train):  # both sequences hold max_labels labels (the last one without a delimiter in compat)
        assert int((batch.text.label_ends[0] >= 0).sum()) == 2 - compat


# --- Labels given by the sample (KEY.json "labels", KEY.tags) ------------------------------------------------


def test_given_labels_reach_the_batch_whole_and_labels_from_picks_the_winner(tmp_path, model):
    caption = b"a dog on the grass"
    with wds.TarWriter(str(tmp_path / "given.tar")) as sink:
        sink.write({"__key__": "tags", "jpg": jpeg("red"), "tags": b"Red  Dress\nstop sign,Red dress", "txt": caption})
        sink.write({"__key__": "json", "jpg": jpeg("red"), "json": json.dumps({"labels": ["Traffic Light"]}).encode()})
        # The synthetic shards' .json holds boxes; without "labels" it leaves the caption in charge.
        sink.write({"__key__": "boxes", "jpg": jpeg("red"), "json": b'{"objects": [[1, 2, 3, 4]]}', "txt": caption})
        sink.write({"__key__": "comma", "jpg": jpeg("red"), "json": json.dumps({"labels": ["salt, pepper"]}).encode()})
        sink.write({"__key__": "special", "jpg": jpeg("red"), "tags": b"dog\n</s>"})
        sink.write({"__key__": "empty", "jpg": jpeg("red"), "tags": b" \n,", "txt": caption})
        sink.write({"__key__": "latin1", "jpg": jpeg("red"), "tags": "caf\xe9".encode("latin-1")})
        sink.write({"__key__": "broken", "jpg": jpeg("red"), "json": b"{not json"})

    def read(labels_from):
        dm = NXTPDataModule(
            val_shards=str(tmp_path / "given.tar"), batch_size=16, num_workers=0, labels_from=labels_from
        )
        dm.bind(model.inputs)
        (batch,) = list(dm.val_dataloader())
        return dict(zip(batch.keys, batch.labels)), batch.skipped, batch.text, batch.keys

    labels, skipped, text, keys = read("given")
    assert labels == {"tags": ["red dress", "stop sign"], "json": ["traffic light"], "boxes": ["dog", "grass"]}
    assert skipped == {
        "label has delimiter": 1,
        "label has special token": 1,
        "no labels": 1,
        "labels not utf-8": 1,
        "malformed labels": 1,
    }
    # A multi-word label is one block of the sequence, tokenized whole.
    i = keys.index("tags")
    ids, anchor, ends = text.ids[i].tolist(), int(text.anchors[i]), [e for e in text.label_ends[i].tolist() if e >= 0]
    assert model.tokenizer.decode(ids[anchor + 1 : ends[0]]).strip() == "red dress"
    labels, skipped, _, _ = read("caption")
    assert labels["tags"] == labels["boxes"] == labels["empty"] == ["dog", "grass"] and labels["json"] == [
        "traffic light"
    ]
    with pytest.raises(ValueError, match="labels_from"):
        NXTPDataModule(labels_from="both")


def test_the_nltk_data_is_read_before_the_workers_start(tmp_path, model, monkeypatch):
    # Read in the main process as a loader is made, the data workers forked from it share it; each would otherwise
    # read it again at its first caption.
    from datamodules import labels

    write_shards(tmp_path, n_shards=1, per_shard=2)
    monkeypatch.setattr(labels, "_data", functools.lru_cache(maxsize=4)(labels._data.__wrapped__))  # empty
    dm = NXTPDataModule(val_shards=str(tmp_path / "shard-000000.tar"), batch_size=2, num_workers=1)
    dm.bind(model.inputs)
    dm.val_dataloader()  # made, not iterated: no worker has started
    assert labels._data.cache_info().currsize == 1
    assert labels._data(labels.nltk_data_dir()).tagger.tag(["a", "dog"]) == ["DT", "NN"]
