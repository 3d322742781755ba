"""`nxtp shards`: each input form converted on data made here, read back with the project's own reader; bad input
skipped and counted with its file; interrupted runs resumed to the same bytes; and one end-to-end training run."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from pathlib import Path

import pytest
from conftest import fit_command, run, tiny_nxtp
from PIL import Image

from datamodules import NXTPDataModule
from datamodules.images import decode_image
from datamodules.shards import ConversionError, convert, read_source, split_of, writing
from datamodules.shards.sources import LISTING_ERRORS
from datamodules.webdataset import REJECT_REASONS, Rejects, read_shards
from lightning_modules.cli.shards import shards_main


def save(path: Path, size=(40, 30), color=(200, 30, 30), fmt=None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt, **kwargs)
    return path


def rotated_jpeg(path: Path) -> Path:
    """A 40x20 picture stored sideways (20x40) with EXIF orientation 6, as phones write portrait photos."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(path, (20, 40), exif=exif.tobytes())


def samples(out: Path, split: str = "train") -> dict[str, dict]:
    """Every sample of a split, read by the training reader (``read_shards``), by key."""
    import webdataset as wds

    urls = [{"url": str(p)} for p in sorted((out / split).glob("shard-*.tar"))]
    files = read_shards(urls, Rejects(split), retries=0, retry_wait=0)
    return {s["__key__"]: s for s in wds.tariterators.group_by_keys(files) if s}


def every_sample(out: Path) -> dict[str, dict]:
    return {**samples(out, "train"), **samples(out, "val")}


def tags(sample: dict) -> list[str]:
    return sample["tags"].decode().split("\n")


@pytest.fixture(scope="module")
def model():
    return tiny_nxtp()


def tag_folder(root: Path) -> Path:
    """Images with every kind of sidecar, a multi-word tag and an EXIF-rotated JPEG among them."""
    save(root / "a.jpg")
    (root / "a.txt").write_text("Red  Dress, Stop Sign\n")
    save(root / "sub/b.png", fmt="PNG")
    (root / "sub/b.tags").write_text("dog\ncat\n")
    rotated_jpeg(root / "sub/c.jpg")
    (root / "sub/c.json").write_text(json.dumps({"labels": ["Traffic Light"], "url": "http://example.com/c"}))
    save(root / "d.v2.jpg")
    (root / "d.v2.txt").write_text("boat")
    return root


def test_a_tag_folder_reads_back_with_its_labels_through_the_datamodule(tmp_path, model):
    summary = convert(tag_folder(tmp_path / "src"), tmp_path / "out", txt="tags", val_fraction=0, progress=False)
    assert summary["written"] == {"train": 4, "val": 0} and summary["rejects"] == []
    assert summary["labels"] == {"red dress": 1, "stop sign": 1, "dog": 1, "cat": 1, "traffic light": 1, "boat": 1}
    read = samples(tmp_path / "out")
    assert sorted(read) == ["a", "d_v2", "sub/b", "sub/c"]
    assert json.loads(read["sub/c"]["json"]) == {
        "source": str(tmp_path / "src/sub/c.jpg"),
        "url": "http://example.com/c",
    }
    assert "png" in read["sub/b"] and "jpg" in read["a"]  # stored as they were
    assert decode_image(read["sub/c"]["jpg"]).size == (40, 20)  # upright for the reader
    # The datamodule, with the model's tokenizer: given labels reach the batch whole and unchanged.
    dm = NXTPDataModule(val_shards=str(tmp_path / "out/train/shard-000000.tar"), batch_size=8, num_workers=0)
    dm.bind(model.inputs)
    (batch,) = list(dm.val_dataloader())
    labels = dict(zip(batch.keys, batch.labels))
    assert labels == {
        "a": ["red dress", "stop sign"],
        "sub/b": ["dog", "cat"],
        "sub/c": ["traffic light"],
        "d_v2": ["boat"],
    }
    assert batch.skipped == {}


def test_txt_as_captions_keeps_the_caption_and_its_nouns(tmp_path):
    save(tmp_path / "src/a.jpg")
    (tmp_path / "src/a.txt").write_text("Two dogs playing with a frisbee on the grass.")
    summary = convert(tmp_path / "src", tmp_path / "out", val_fraction=0, progress=False)
    assert summary["labels"] == {"dog": 1, "frisbee": 1, "grass": 1}
    sample = samples(tmp_path / "out")["a"]
    assert sample["txt"] == b"Two dogs playing with a frisbee on the grass." and "tags" not in sample


def test_an_imagefolder_tree_labels_images_by_class_folder(tmp_path, model):
    save(tmp_path / "src/stop_sign/1.jpg")
    save(tmp_path / "src/red dress/2.jpg")
    save(tmp_path / "src/red dress/more/3.png", fmt="PNG")
    save(tmp_path / "src/loose.jpg")  # in no class folder
    summary = convert(tmp_path / "src", tmp_path / "out", val_fraction=0, progress=False)
    assert summary["labels"] == {"red dress": 2, "stop sign": 1}
    assert [(r["reason"], Path(r["file"]).name) for r in summary["rejects"]] == [("no labels", "loose.jpg")]
    read = samples(tmp_path / "out")
    assert {k: tags(s) for k, s in read.items()} == {
        "stop_sign/1": ["stop sign"],
        "red dress/2": ["red dress"],
        "red dress/more/3": ["red dress"],
    }


def test_a_csv_with_broken_rows_writes_the_good_ones_and_names_the_rest(tmp_path):
    src = tmp_path / "src"
    save(src / "img/good.jpg")
    rotated_jpeg(src / "img/rotated.jpg")
    (src / "img/corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    save(src / "img/huge.png", size=(300, 300), fmt="PNG")
    save(src / "img/notags.jpg")
    save(src / "img/comma.jpg")
    rows = [
        ("img/good.jpg", "", "Dog, Red Dress"),
        ("img/rotated.jpg", "A cat on a sofa.", ""),
        ("img/missing.jpg", "", "dog"),
        ("img/corrupt.jpg", "", "dog"),
        ("img/huge.png", "", "dog"),
        ("img/notags.jpg", "", " , ,"),
        ("img/good.jpg", "", "cat"),  # the same image (key) again
        ("", "", "dog"),
    ]
    with (src / "data.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "tags"])
        writer.writerows(rows)
    summary = convert(src / "data.csv", tmp_path / "out", val_fraction=0, max_pixels=200 * 200, progress=False)
    read = samples(tmp_path / "out")
    assert {k: (tags(s) if "tags" in s else s["txt"].decode()) for k, s in read.items()} == {
        "img/good": ["dog", "red dress"],
        "img/rotated": "A cat on a sofa.",
    }
    assert decode_image(read["img/rotated"]["jpg"]).size == (40, 20)
    where = {r["reason"]: r["file"] for r in summary["rejects"]}
    assert summary["rejected"] == {r: 1 for r in where} and set(where) == {
        "no image",
        "corrupt image",
        "image too large",
        "no labels",
        "duplicate key",
        "malformed row",
    }
    assert where["no image"] == f"{src / 'data.csv'}:4" and where["malformed row"] == f"{src / 'data.csv'}:9"
    assert where["corrupt image"].endswith("corrupt.jpg") and where["image too large"].endswith("huge.png")
    assert where["no labels"].endswith("notags.jpg") and where["duplicate key"].endswith("good.jpg")
    assert set(summary["rejected"]) <= set(REJECT_REASONS) | set(LISTING_ERRORS)


def test_jsonl_tags_lists_and_a_label_with_the_delimiter(tmp_path):
    save(tmp_path / "a.jpg")
    save(tmp_path / "b.jpg")
    lines = [{"path": "a.jpg", "labels": ["Stop Sign", "car"]}, {"path": "b.jpg", "labels": ["salt, pepper"]}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n")
    summary = convert(tmp_path / "data.jsonl", tmp_path / "out", val_fraction=0, progress=False)
    assert {k: tags(s) for k, s in samples(tmp_path / "out").items()} == {"a": ["stop sign", "car"]}
    assert summary["rejected"] == {"label has delimiter": 1, "malformed row": 1}


def test_coco_instances_give_the_category_names_and_absent_images_are_named(tmp_path):
    save(tmp_path / "images/000000000001.jpg")
    save(tmp_path / "images/000000000002.jpg")
    coco = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "stop sign"}, {"id": 4, "name": "dog"}],
        "annotations": [
            {"image_id": 1, "category_id": 3},
            {"image_id": 1, "category_id": 1},
            {"image_id": 1, "category_id": 3},
            {"image_id": 3, "category_id": 4},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    summary = convert(
        tmp_path / "instances.json", tmp_path / "out", images=tmp_path / "images", val_fraction=0, progress=False
    )
    read = samples(tmp_path / "out")
    assert {k: tags(s) for k, s in read.items()} == {"000000000001": ["stop sign", "person"]}
    assert json.loads(read["000000000001"]["json"])["categories"] == ["stop sign", "person"]
    assert {(r["reason"], Path(r["file"]).name) for r in summary["rejects"]} == {
        ("no labels", "000000000002.jpg"),  # no objects
        ("no image", "000000000003.jpg"),
    }


def test_non_utf8_sidecars_duplicate_keys_and_an_empty_folder(tmp_path):
    src = tmp_path / "src"
    save(src / "a.jpg")
    (src / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    save(src / "b.jpg")
    (src / "b.tags").write_bytes(b"\xff\xfe")
    save(src / "c.jpg")
    save(src / "c.png", fmt="PNG")
    (src / "c.tags").write_text("dog")
    save(src / "e.jpg")
    (src / "e.tags").write_text("\n")
    summary = convert(src, tmp_path / "out", val_fraction=0, progress=False)
    assert list(samples(tmp_path / "out")) == ["c"]
    assert {(r["reason"], Path(r["file"]).name) for r in summary["rejects"]} == {
        ("caption not utf-8", "a.txt"),
        ("labels not utf-8", "b.tags"),
        ("duplicate key", "c.png"),
        ("no labels", "e.jpg"),
    }
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        convert(tmp_path / "empty", tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/x.txt").write_text("a dog")
    with pytest.raises(ConversionError, match="no image to write"):
        convert(tmp_path / "bad", tmp_path / "out3", progress=False)
    assert not (tmp_path / "out3").exists()


def test_max_side_shrinks_upright_keeping_the_aspect(tmp_path):
    save(tmp_path / "src/wide.png", size=(400, 100), fmt="PNG")
    (tmp_path / "src/wide.tags").write_text("bar")
    rotated_jpeg(tmp_path / "src/phone.jpg")
    (tmp_path / "src/phone.tags").write_text("phone")
    convert(tmp_path / "src", tmp_path / "out", val_fraction=0, max_side=20, progress=False)
    read = samples(tmp_path / "out")
    assert decode_image(read["wide"]["jpg"]).size == (20, 5)
    image = Image.open(io.BytesIO(read["phone"]["jpg"]))
    assert image.size == (20, 10) and image.getexif().get(0x0112) is None  # turned, not tagged


def many_images(root: Path, n: int) -> Path:
    for i in range(n):
        save(root / f"{i:03d}.jpg", color=(i, 2 * i, 3 * i))
        (root / f"{i:03d}.tags").write_text(f"kind{i % 3}")
    (root / "broken.jpg").write_bytes(b"")
    (root / "broken.tags").write_text("kind0")
    return root


def test_the_split_is_by_key_and_stays_when_images_are_added(tmp_path):
    keys = [f"img{i}" for i in range(2000)]
    val = {k for k in keys if split_of(k, 7, 0.1) == "val"}
    assert 150 < len(val) < 250 and val != {k for k in keys if split_of(k, 8, 0.1) == "val"}
    src = many_images(tmp_path / "src", 30)
    first = convert(src, tmp_path / "a", val_fraction=0.3, seed=7, shard_size=4, progress=False)
    assert {k for k in every_sample(tmp_path / "a") if split_of(k, 7, 0.3) == "val"} == set(
        samples(tmp_path / "a", "val")
    )
    assert first["written"]["val"] > 0 and sum(first["written"].values()) == 30
    many_images(tmp_path / "src2", 45)
    convert(tmp_path / "src2", tmp_path / "b", val_fraction=0.3, seed=7, shard_size=4, progress=False)
    assert set(samples(tmp_path / "a", "val")) <= set(samples(tmp_path / "b", "val"))
    assert set(samples(tmp_path / "a", "train")) <= set(samples(tmp_path / "b", "train"))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_an_interrupted_conversion_resumes_to_the_same_shards(tmp_path, monkeypatch):
    src = many_images(tmp_path / "src", 23)
    options = dict(val_fraction=0.3, seed=1, shard_size=3, progress=False)
    whole = convert(src, tmp_path / "whole", **options)
    real, calls = writing.encode_image, []

    def failing(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 11:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of a shard
        return real(*args, **kwargs)

    monkeypatch.setattr(writing, "encode_image", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "cut", **options)
    kept = sorted(p.name for p in (tmp_path / "cut/train").iterdir())
    assert kept == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]  # no half shard left
    state = json.loads((tmp_path / "cut/nxtp-shards.json").read_text())
    assert not state["complete"] and state["splits"]["train"]["shards"] == 3
    # A run killed outright leaves its temporary shard: the next run throws it away.
    (tmp_path / "cut/train/.shard-000003.tar.partial").write_bytes(b"half a shard")
    monkeypatch.setattr(writing, "encode_image", real)
    assert convert(src, tmp_path / "cut", **options) == whole
    assert shard_bytes(tmp_path / "cut") == shard_bytes(tmp_path / "whole")
    assert whole["rejected"] == {"empty image": 1} and whole["rejects"][0]["file"] == str(src / "broken.jpg")
    # Run again when complete: nothing to do, the same summary.
    assert convert(src, tmp_path / "cut", **options) == whole


def test_a_non_empty_output_needs_force(tmp_path, capsys):
    src = many_images(tmp_path / "src", 5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert shards_main([str(src), "--out", str(out), "--no-progress"]) == 1
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert shards_main([str(src), "--out", str(out), "--no-progress", "--force", "--val-fraction", "0"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 images (train 5 in 1 shard)" in printed and "empty image: 1" in printed
    assert f"--data.train_shards '{out}/train/shard-000000.tar'" in printed
    # Other options: refused, then --force starts over, deleting the earlier shards (and only those).
    assert shards_main([str(src), "--out", str(out), "--no-progress", "--shard-size", "2", "--val-fraction", "0"]) == 1
    assert "other options" in capsys.readouterr().err
    assert shards_main([str(src), "--out", str(out), "--shard-size", "2", "--val-fraction", "0", "--force"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"shard-00000{i}.tar" for i in range(3)]
    assert (out / "notes.txt").read_text() == "mine"
    assert f"'{out}/train/shard-{{000000..000002}}.tar'" in capsys.readouterr().out


def test_read_source_lists_in_a_fixed_order(tmp_path):
    src = tag_folder(tmp_path / "src")
    assert [e.key for e in read_source(src, txt="tags")] == ["a", "d_v2", "sub/b", "sub/c"]


@pytest.mark.slow
def test_shards_from_a_tag_folder_train_and_evaluate_on_their_tags(tmp_path, shapes, capsys):
    kinds = ["circle", "red star", "boat", "house"]
    src = tmp_path / "tagged"
    for i in range(72):
        save(src / f"{i:03d}.jpg", size=(64, 64), color=(60 * (i % 4), 40, 200 - 50 * (i % 4)))
        (src / f"{i:03d}.txt").write_text(f"{kinds[i % 4]}, {kinds[(i + 1) % 4]}")
    odd = next(f"{i:03d}" for i in range(72) if split_of(f"{i:03d}", 0, 0.25) == "val")
    (src / f"{odd}.txt").write_text("boat, </s>")  # passes conversion; the tokenizer's special token is rejected
    n_train = sum(split_of(f"{i:03d}", 0, 0.25) == "train" for i in range(72))
    out = tmp_path / "out"
    size = str(math.ceil(n_train / 2))  # two train shards and one val shard, as fit_command reads them
    capsys.readouterr()
    assert shards_main([str(src), "--out", str(out), "--txt", "tags", "--val-fraction", "0.25"] + [
        "--shard-size", size, "--seed", "0"]) == 0  # fmt: skip
    printed = capsys.readouterr().out  # the converter runs in this process; `nxtp fit` as a user starts it
    assert "--data.train_shards" in printed and "red star" in printed
    logs = tmp_path / "logs"
    fit = run(fit_command(out, logs, 10, tokenizer=shapes / "tokenizer"))
    assert fit.returncode == 0, fit.stderr[-3000:]
    (version,) = logs.glob("*/version_*")
    rejects = [json.loads(line) for line in (version / "rejects.jsonl").open()]
    assert {(r["split"], r["key"], r["reason"]) for r in rejects} == {("val", odd, "label has special token")}
    metrics = json.loads((version / "metrics.json").read_text())
    assert any(k.startswith("val/exact_top5") for k in metrics.get("metrics", metrics))
    assert Counter(every_sample(out)[odd]["tags"].decode().split("\n")) == Counter(["boat", "</s>"])
