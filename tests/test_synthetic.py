"""The built-in synthetic dataset: scenes, captions, shards and the caption tokenizer."""

import hashlib
import io
import json
import os
import random
from pathlib import Path

os.environ.setdefault("NLTK_DATA", str(Path(__file__).parent / "fixtures" / "nltk_data"))

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules import synthetic  # noqa: E402
from datamodules.labels import extract_labels  # noqa: E402
from datamodules.synthetic import COLORS, KINDS, SPLITS, build_dataset, draw_scene, plural, sample_seed  # noqa: E402
from datamodules.tokenizer import PROMPT, build_tokenizer, train_caption_tokenizer  # noqa: E402
from datamodules.tokenizer import main as tokenizer_main  # noqa: E402

TINY = dict(n_train=24, n_val=8, n_test=8, seed=3, samples_per_shard=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = build_dataset(tmp_path_factory.mktemp("a") / "shapes", workers=1, **TINY)
    build_tokenizer(root)
    return root


def read_shards(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    """All members of a split's shards, as {key: {extension: bytes}}."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / split).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_kinds_are_many_distinct_nouns():
    assert len(KINDS) >= 24 and len(set(KINDS)) == len(KINDS)
    for kind in KINDS:
        # Each kind is its own lemma, in the singular and in the caption's plural.
        assert extract_labels(f"There is a {kind}.") == [kind]
        assert extract_labels(f"There are two {plural(kind)}.") == [kind]


def test_scenes_have_one_to_five_objects():
    rng = random.Random(0)
    counts = set()
    for _ in range(300):
        image, caption, objects = draw_scene(rng, 64)
        assert image.size == (64, 64) and image.mode == "RGB"
        assert 1 <= len(objects) <= 5
        counts.add(len(objects))
        for o in objects:
            assert o["kind"] in KINDS and o["color"] in COLORS
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    assert counts == {1, 2, 3, 4, 5}


def test_image_size_is_configurable():
    image, _, objects = draw_scene(random.Random(1), 96)
    assert image.size == (96, 96)
    assert all(0 <= v <= 96 for o in objects for v in o["bbox"])


def test_captions_give_exactly_the_true_kinds():
    seen = set()
    for i in range(1000):
        _, caption, objects = draw_scene(random.Random(sample_seed(7, "check", i)), 64)
        kinds = [o["kind"] for o in objects]
        assert sorted(extract_labels(caption)) == sorted(set(kinds)), caption
        seen.update(kinds)
    assert seen == set(KINDS)


def test_fallback_captions_are_correct_for_every_kind_and_count():
    for kind in KINDS:
        for n in range(1, 6):
            group = synthetic.layout._Group(kind, "red", "medium", [None] * n)
            assert extract_labels(synthetic.captions._plain_caption([group])) == [kind]


@pytest.mark.e2e
def test_build_is_deterministic_whatever_the_workers(tiny, tmp_path):
    again = build_dataset(tmp_path / "shapes", workers=2, **TINY)
    build_tokenizer(again)
    files = sorted(p.relative_to(tiny) for p in tiny.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (tiny / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = build_dataset(tmp_path / "other", workers=1, **{**TINY, "seed": 4})
    assert (other / "train/shard-000000.tar").read_bytes() != (tiny / "train/shard-000000.tar").read_bytes()


def test_layout_manifest_and_done(tiny):
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert (tiny / "done").exists()
    assert manifest["kinds"] == list(KINDS) and manifest["seed"] == 3 and manifest["image_size"] == 64
    assert manifest["splits"]["train"] == {
        "count": 24,
        "shards": ["train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar"],
    }
    assert manifest["splits"]["val"]["shards"] == ["val/shard-000000.tar"]
    for split in SPLITS:
        for rel in manifest["splits"][split]["shards"]:
            assert (tiny / rel).is_file()
    assert not list(tiny.parent.glob(".shapes.*"))  # no temporary folders left
    records = list(synthetic.iter_split_metadata(tiny, "val"))
    assert len(records) == 8 and all(set(r) == {"labels", "objects", "caption"} for r in records)


def test_finished_build_is_reused_and_failed_build_leaves_nothing(tiny, tmp_path, monkeypatch):
    stamp = (tiny / "done").stat().st_mtime_ns
    assert build_dataset(tiny, workers=1, **TINY) == tiny
    assert (tiny / "done").stat().st_mtime_ns == stamp

    def broken(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic.shards, "_write_shard", broken)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(tmp_path / "broken", workers=1, **TINY)
    assert not (tmp_path / "broken").exists()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_dataset(tmp_path / "mine", workers=1, **TINY)


def test_samples_are_complete_and_splits_disjoint(tiny):
    pairs = {}
    for split in SPLITS:
        samples = read_shards(tiny, split)
        assert len(samples) == TINY[f"n_{split}"]
        for sample in samples.values():
            assert set(sample) == {"jpg", "txt", "json"}
            meta = json.loads(sample["json"])
            caption = sample["txt"].decode("utf-8")
            assert meta["caption"] == caption
            assert meta["labels"] == sorted({o["kind"] for o in meta["objects"]})
            assert sorted(extract_labels(caption)) == meta["labels"]
            assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 64)
            pairs.setdefault((hashlib.sha256(sample["jpg"]).hexdigest(), caption), set()).add(split)
    assert all(len(splits) == 1 for splits in pairs.values())
    assert len({sample_seed(3, s, 0) for s in SPLITS}) == 3


def test_shards_read_back_with_webdataset(tiny):
    import webdataset as wds

    urls = [str(tiny / "val" / "shard-000000.tar")]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 8
    for s in samples:
        assert {"jpg", "txt", "json"} <= set(s)
        assert s["jpg"].size == (64, 64)
        assert s["json"]["caption"] == s["txt"]


def test_tokenizer_keeps_kinds_whole(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    assert (tok.unk_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    for kind in KINDS:
        assert len(tok.encode(f" {kind}", add_special_tokens=False)) == 1, kind
    ids = tok.encode(" star, circle,", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["\u0120star", ",", "\u0120circle", ","]  # "," is one token
    assert tok.decode(ids) == " star, circle,"
    text = f"{PROMPT} star, circle,"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.bos_token_id not in ids and tok.decode(ids).strip() == text


def test_tokenizer_reports_words_it_cannot_keep_whole(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_caption_tokenizer(["a b c"], tmp_path, vocab_size=260, required_words=["mushroom"])


def test_cli_and_preview(tmp_path, capsys):
    synthetic.main(
        [
            "--out",
            str(tmp_path / "cli"),
            "--train",
            "6",
            "--val",
            "2",
            "--test",
            "2",
            "--workers",
            "1",
            "--preview",
            str(tmp_path / "preview.png"),
        ]
    )
    assert "dataset:" in capsys.readouterr().out and (tmp_path / "cli" / "done").exists()
    tokenizer_main(["--data", str(tmp_path / "cli")])  # the second step of `make data`
    assert "tokenizer:" in capsys.readouterr().out and (tmp_path / "cli" / "tokenizer" / "tokenizer.json").exists()
    assert Image.open(tmp_path / "preview.png").size[0] > 4 * 64
