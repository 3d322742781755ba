"""The synthetic generator with kinds left out (``--exclude-kinds``) or chosen (``--kinds``): a base dataset without
the kinds a model is taught later."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from datamodules.synthetic import (
    KINDS,
    SPLITS,
    build_dataset,
    iter_split_metadata,
    main,
    plural,
    select_featured,
    select_kinds,
)

TINY = ["--train", "40", "--val", "8", "--test", "8", "--seed", "5", "--samples-per-shard", "20", "--workers", "1"]


def records(root: Path) -> list[dict]:
    """Every sample's KEY.json record, of every split."""
    return [record for split in SPLITS for record in iter_split_metadata(root, split)]


def named_kinds(caption: str) -> set[str]:
    """The kinds a caption names, as words (``star``, ``stars``), whatever its labels say."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return {kind for kind in KINDS if kind in words or plural(kind) in words}


def kinds_of(record: dict) -> set[str]:
    """Every kind a sample shows or names: its objects, its labels and its caption."""
    return {o["kind"] for o in record["objects"]} | set(record["labels"]) | named_kinds(record["caption"])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kinds") / "all"
    main(["--out", str(out), *TINY])
    return out


def test_excluded_kinds_are_never_drawn_named_or_labelled(baseline, tmp_path, capsys):
    # the kinds most frequent in the same dataset with every kind: they would be there but for the option
    counts = Counter(o["kind"] for r in records(baseline) for o in r["objects"])
    excluded = [kind for kind, _ in counts.most_common(3)]
    assert all(counts[kind] >= 3 for kind in excluded)
    assert all(named_kinds(r["caption"]) == {o["kind"] for o in r["objects"]} for r in records(baseline))

    main(["--out", str(tmp_path / "base"), *TINY, "--exclude-kinds", *excluded])
    assert "(56 samples, 27 kinds)" in capsys.readouterr().out
    samples = records(tmp_path / "base")
    assert len(samples) == 56
    seen = set().union(*map(kinds_of, samples))
    assert not seen & set(excluded)
    assert len(seen) > 10  # the other kinds are still drawn
    manifest = json.loads((tmp_path / "base" / "manifest.json").read_text())
    assert manifest["kinds"] == [kind for kind in KINDS if kind not in excluded]


def test_kinds_restricts_the_scenes_to_them(tmp_path):
    main(["--out", str(tmp_path / "two"), *TINY, "--kinds", "star", "circle"])
    samples = records(tmp_path / "two")
    assert set().union(*map(kinds_of, samples)) == {"circle", "star"}
    # scenes with more groups than kinds: another group of a kind already there, in another colour
    groups = [{(o["kind"], o["color"]) for o in r["objects"]} for r in samples]
    assert max(map(len, groups)) > 2
    for r in samples:
        assert set(r["labels"]) == {o["kind"] for o in r["objects"]} == named_kinds(r["caption"])
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["kinds"] == ["circle", "star"]


def test_the_order_the_kinds_are_given_in_does_not_matter():
    assert select_kinds(["star", "circle", "star"]) == select_kinds(["circle", "star"]) == ("circle", "star")
    assert select_kinds() == KINDS
    assert select_kinds(exclude=["apple"]) == KINDS[:-1]


def test_an_unknown_kind_is_named_with_the_known_ones(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"exclude_kinds: unknown kind\(s\) 'dragon'; known: circle, square, "):
        build_dataset(tmp_path / "out", 4, 1, 1, workers=1, exclude_kinds=["circle", "dragon"])
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(ValueError, match="no kinds left"):
        build_dataset(tmp_path / "out", 4, 1, 1, workers=1, kinds=["circle"], exclude_kinds=["circle"])
    with pytest.raises(SystemExit) as end:
        main(["--out", str(tmp_path / "out"), "--kinds", "circle", "unicorn"])
    assert end.value.code == 2
    err = capsys.readouterr().err
    assert "argument --kinds: invalid choice: 'unicorn'" in err and "'circle', 'square'" in err
    assert not (tmp_path / "out").exists()


def test_featured_kinds_are_in_every_scene_among_the_others(baseline, tmp_path):
    featured = ["umbrella", "anchor"]
    main(["--out", str(tmp_path / "featured"), *TINY, "--feature-kinds", *featured])
    samples = records(tmp_path / "featured")
    assert all(kinds_of(r) & set(featured) for r in samples)  # one of them in each scene
    assert all(set(r["labels"]) == {o["kind"] for o in r["objects"]} == named_kinds(r["caption"]) for r in samples)
    assert len(set().union(*map(kinds_of, samples)) - set(featured)) > 10  # the other kinds too, in the same scenes
    assert sum(len(kinds_of(r)) > 1 for r in samples) > len(samples) / 2
    in_baseline = sum(bool(kinds_of(r) & set(featured)) for r in records(baseline))
    assert in_baseline < len(samples) / 4  # without the option, few scenes show them
    manifest = json.loads((tmp_path / "featured" / "manifest.json").read_text())
    assert manifest["featured"] == [k for k in KINDS if k in featured] and manifest["kinds"] == list(KINDS)
    # the same folder asked for without the option is built anew, not taken for the default build
    main(["--out", str(tmp_path / "featured"), *TINY])
    assert "featured" not in json.loads((tmp_path / "featured" / "manifest.json").read_text())
    assert [r["caption"] for r in records(tmp_path / "featured")] == [r["caption"] for r in records(baseline)]


def test_a_featured_kind_must_be_drawn(tmp_path, capsys):
    assert select_featured(KINDS, ["star", "circle", "star"]) == ("circle", "star")
    assert select_featured(KINDS, None) == ()
    with pytest.raises(ValueError, match=r"feature_kinds: 'star' not drawn; drawn: circle, square"):
        build_dataset(tmp_path / "out", 4, 1, 1, workers=1, kinds=["circle", "square"], featured_kinds=["star"])
    with pytest.raises(SystemExit) as end:
        main(["--out", str(tmp_path / "out"), "--exclude-kinds", "star", "--feature-kinds", "star"])
    assert end.value.code == 2 and "feature_kinds: 'star' not drawn" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
