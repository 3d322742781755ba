"""The COCO-captions-to-shards converter on a tiny fake COCO made here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

pytestmark = pytest.mark.e2e  # every test here starts a command

ROOT = Path(__file__).parents[1]


def fake_coco(root: Path) -> tuple[Path, Path]:
    images = root / "val2017"
    images.mkdir(parents=True)
    captions = {1: ["A dog on the grass.", "A  brown dog runs."], 2: ["Two cats on a sofa."], 3: ["A bus."]}
    for image_id in (1, 2):  # image 3 is listed but missing
        Image.new("RGB", (32, 24), (image_id * 60, 0, 0)).save(images / f"{image_id:012d}.jpg")
    data = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in captions],
        "annotations": [{"image_id": i, "caption": c} for i, cs in captions.items() for c in cs],
    }
    ann = root / "captions_val2017.json"
    ann.write_text(json.dumps(data))
    return images, ann


def read(out: Path) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False).decode("pil"))


def test_pairs_and_per_image(tmp_path):
    images, ann = fake_coco(tmp_path)
    script = ROOT / "experiments" / "data" / "coco_to_shards.py"
    run = subprocess.run(
        [
            sys.executable,
            str(script),
            "--images",
            str(images),
            "--captions",
            str(ann),
            "--out",
            str(tmp_path / "pairs"),
            "--samples-per-shard",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == {"samples": 3, "shards": 2, "missing_images": 1}
    samples = read(tmp_path / "pairs")
    assert sorted(s["txt"] for s in samples) == ["A brown dog runs.", "A dog on the grass.", "Two cats on a sofa."]
    assert all(s["jpg"].size == (32, 24) for s in samples)

    run = subprocess.run(
        [
            sys.executable,
            str(script),
            "--images",
            str(images),
            "--captions",
            str(ann),
            "--out",
            str(tmp_path / "per_image"),
            "--per-image",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    samples = {s["json"]["image_id"]: s for s in read(tmp_path / "per_image")}
    assert samples[1]["txt"] == "A dog on the grass.. A brown dog runs." and samples[2]["json"]["captions"] == [
        "Two cats on a sofa."
    ]
