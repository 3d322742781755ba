"""Replay mixing: `data.train_shards` as several weighted sources, mixed at their weights, repeatably."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, print_config, tiny_nxtp

from datamodules import NXTPDataModule
from datamodules.synthetic import SPLITS, build_dataset, iter_split_metadata

NEW_KINDS = ("kite", "ladder")


@pytest.fixture(scope="module")
def model():
    return tiny_nxtp()


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    """The data a model was first trained on: every kind but the new ones (192 training scenes, 3 shards)."""
    root = tmp_path_factory.mktemp("old") / "old"
    return build_dataset(root, 192, 8, 8, samples_per_shard=64, workers=1, exclude_kinds=NEW_KINDS)


@pytest.fixture(scope="module")
def new(tmp_path_factory) -> Path:
    """The data that teaches the new kinds: only them (128 training scenes, 2 shards)."""
    root = tmp_path_factory.mktemp("new") / "new"
    return build_dataset(root, 128, 8, 8, seed=7, samples_per_shard=64, workers=1, kinds=NEW_KINDS)


def patterns(old: Path, new: Path) -> tuple[str, str]:
    return str(old / "train/shard-{000000..000002}.tar"), str(new / "train/shard-{000000..000001}.tar")


def source_of(sample: tuple[str, frozenset]) -> str:
    """Which dataset a training sample is from (both number their keys alike): its labels say."""
    return "new" if sample[1] & set(NEW_KINDS) else "old"


def stream(train_shards, model, n: int, seed: int = 0, num_workers: int = 0, **data) -> list[tuple[str, frozenset]]:
    """The first ``n`` training samples (key, labels) the data module delivers."""
    data = {"resampled": True, **data}
    dm = NXTPDataModule(train_shards, batch_size=16, num_workers=num_workers, seed=seed, shuffle_buffer=64, **data)
    dm.bind(model.inputs)
    dm.trainer = SimpleNamespace(global_step=0, current_epoch=0, global_rank=0, world_size=1)
    samples = []
    for batch in dm.train_dataloader():
        samples += [(key, frozenset(labels)) for key, labels in zip(batch.keys, batch.labels)]
        if len(samples) >= n:
            break
    return samples[:n]


@pytest.mark.parametrize("weights", [(3, 1), (1, 3)])
def test_samples_come_from_each_source_at_its_weight(old, new, model, weights):
    old_shards, new_shards = patterns(old, new)
    sources = [{"shards": old_shards, "weight": weights[0]}, {"shards": new_shards, "weight": weights[1]}]
    n = 480
    samples = stream(sources, model, n)
    share = sum(source_of(s) == "new" for s in samples) / n
    p = weights[1] / sum(weights)
    # each sample is from `new` with probability p: 5 standard deviations of a binomial share
    assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / n), (share, p)


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.e2e)])
def test_the_same_seed_gives_the_same_mix(old, new, model, num_workers):
    old_shards, new_shards = patterns(old, new)
    sources = [{"shards": old_shards, "weight": 3}, {"shards": new_shards, "weight": 1}]
    first = stream(sources, model, 160, num_workers=num_workers)
    assert {source_of(s) for s in first} == {"old", "new"}
    assert stream(sources, model, 160, num_workers=num_workers) == first
    assert stream(sources, model, 160, seed=1, num_workers=num_workers) != first


def test_one_source_is_read_as_a_single_pattern_is(old, model):
    pattern = patterns(old, old)[0]
    assert stream([{"shards": pattern, "weight": 2.5}], model, 64) == stream(pattern, model, 64)


def test_in_epochs_the_mix_ends_when_a_source_runs_out(old, new, model):
    old_shards, new_shards = patterns(old, new)
    sources = [{"shards": old_shards}, {"shards": new_shards}]  # weight 1 each: `new` (128 samples) runs out first
    epoch = stream(sources, model, 10**6, resampled=False)
    assert len(epoch) == len(set(epoch))  # no sample twice
    from_new = sum(source_of(s) == "new" for s in epoch)
    assert 128 - 16 < from_new <= 128  # all of `new` but what a dropped partial last batch held
    assert len(epoch) < 192 + 128 - 16  # not all of `old`


@pytest.mark.parametrize(
    ("sources", "error", "message"),
    [
        ([{"shards": "a.tar", "weight": 3}, {"shards": "b.tar", "weight": 0}], ValueError, r"\[1\]\.weight: .* not 0"),
        ([{"shards": "a.tar", "weight": -1}, {"shards": "b.tar"}], ValueError, r"\[0\]\.weight: must be a number > 0"),
        ([{"shards": "a.tar", "weight": "x"}, {"shards": "b.tar"}], ValueError, r"\[0\]\.weight: must be a number"),
        ([{"shards": "a.tar"}, {"shards": ""}], ValueError, r"\[1\]\.shards: give a non-empty shard pattern"),
        ([{"shards": "a.tar"}, {"weight": 2}], ValueError, r"\[1\]\.shards: give a non-empty shard pattern"),
        ([{"shards": "a.tar", "wieght": 2}, {"shards": "b"}], ValueError, r"\[0\]: unknown key\(s\) \['wieght'\]"),
        (["a.tar", {"shards": "b.tar"}], ValueError, r"\[0\]: 'a.tar' is not a source"),
        # what jsonargparse leaves as a string: a misspelt key, a brace pattern YAML cannot read unquoted
        ("[{shards: a.tar, wieght: 2}, {shards: b.tar}]", ValueError, r"\[0\]: unknown key\(s\) \['wieght'\]"),
        ("[{shards: a/{0..1}.tar}, {shards: b}]", ValueError, r": .* is no YAML list of sources .* quote brace"),
    ],
)
def test_a_bad_source_is_refused_naming_its_key(sources, error, message):
    with pytest.raises(error, match=r"data\.train_shards" + message):
        NXTPDataModule(train_shards=sources)


def test_a_source_whose_shards_do_not_exist_is_named(new, model, tmp_path):
    sources = [{"shards": str(new / "train/shard-000000.tar")}, {"shards": str(tmp_path / "old-{0..1}.tar")}]
    dm = NXTPDataModule(train_shards=sources)
    dm.bind(model.inputs)
    with pytest.raises(FileNotFoundError, match=r"data\.train_shards\[1\]\.shards: 2 of 2 shards do not exist"):
        dm.train_dataloader()


def test_sources_parse_from_the_command_line_and_from_a_config_file(monkeypatch, capsys, tmp_path):
    default = ["fit", "--config", str(ROOT / "configs/experiment/default.yaml")]
    expected = [{"shards": "new/{0..1}.tar", "weight": 3.0}, {"shards": "old/{0..3}.tar", "weight": 1.0}]
    given = '[{shards: "new/{0..1}.tar", weight: 3}, {shards: "old/{0..3}.tar", weight: 1}]'
    assert (
        print_config([*default, "--data.train_shards", given], monkeypatch, capsys)["data"]["train_shards"] == expected
    )
    config = tmp_path / "replay.yaml"
    config.write_text(yaml.safe_dump({"data": {"train_shards": expected}}))
    printed = print_config([*default, "--config", str(config)], monkeypatch, capsys)
    assert printed["data"]["train_shards"] == expected
    # a single pattern stays what it was
    printed = print_config([*default, "--data.train_shards", "a/{0..1}.tar"], monkeypatch, capsys)
    assert printed["data"]["train_shards"] == "a/{0..1}.tar"


def test_every_split_of_the_new_data_has_only_its_kinds(new):
    assert {kind for split in SPLITS for r in iter_split_metadata(new, split) for kind in r["labels"]} == set(NEW_KINDS)
