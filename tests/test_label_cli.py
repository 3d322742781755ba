"""`nxtp label` over files, folders, globs and file lists, with unreadable images, as JSON lines or CSV."""

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL, tiny_nxtp
from PIL import Image

from lightning_modules.cli.label import build_parser, label_main
from lightning_modules.inference import InferenceOptions, autocast, dtype, label_files
from lightning_modules.recognizer import Recognizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    model = tiny_nxtp(seed=5)
    with torch.no_grad():  # labels that end, as in a trained model
        model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 4
    model.save_pretrained(root / "model")
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    Image.open(OFFICIAL / "image_0_300x200.png").save(folder / "a.png")
    Image.open(OFFICIAL / "image_1_224x224.png").convert("RGB").save(folder / "sub" / "b.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    extra = root / "c.png"
    Image.open(OFFICIAL / "image_2_180x320.png").save(extra)
    listing = root / "list.txt"
    listing.write_text(f"{extra}\n{root / 'missing.png'}\n")
    return root, folder, listing


def test_jsonl_over_folder_glob_and_list(setup, capsys):
    root, folder, listing = setup
    code = label_main(
        [
            "--checkpoint",
            str(root / "model"),
            "--topk",
            "3",
            "--workers",
            "0",
            str(folder),
            str(root / "*.png"),
            "--files-from",
            str(listing),
        ]
    )
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and "broken.jpg" in err and "missing.png" in err
    by_name = {line["image"].split("/")[-1]: line for line in lines}
    assert set(by_name) == {"a.png", "b.jpg", "broken.jpg", "c.png", "missing.png"}
    assert "error" in by_name["broken.jpg"] and "error" in by_name["missing.png"]
    expected = Recognizer.from_checkpoint(root / "model").label([folder / "a.png"], topk=3)[0]
    assert [x["label"] for x in by_name["a.png"]["labels"]] == [label for label, _ in expected]


@pytest.mark.e2e  # data workers
def test_csv_output_file_with_min_prob(setup, tmp_path):
    root, folder, _ = setup
    out = tmp_path / "labels.csv"
    code = label_main(
        [
            "--checkpoint",
            str(root / "model"),
            "--topk",
            "5",
            "--min-prob",
            "0.01",
            "--workers",
            "2",
            "--format",
            "csv",
            "--output",
            str(out),
            str(folder / "a.png"),
            str(folder / "sub"),
        ]
    )
    rows = list(csv.DictReader(out.open()))
    assert code == 0 and rows and {r["image"].split("/")[-1] for r in rows} == {"a.png", "b.jpg"}
    assert all(r["error"] == "" for r in rows)
    assert all(float(r["prob"]) >= 0.01 for r in rows if r["label"])  # an image with no label left gets one empty row


def test_images_over_max_image_pixels_are_reported_with_their_size(setup, capsys):
    root, folder, _ = setup
    code = label_main(
        [
            "--checkpoint",
            str(root / "model"),
            "--workers",
            "0",
            "--max-image-pixels",
            "55000",
            str(folder / "a.png"),
            str(folder / "sub" / "b.jpg"),
        ]
    )
    entries = {line["image"].split("/")[-1]: line for line in map(json.loads, capsys.readouterr().out.splitlines())}
    assert code == 1 and "300x200 = 60000 pixels, more than max_image_pixels=55000" in entries["a.png"]["error"]
    assert "labels" in entries["b.jpg"]  # 224 x 224 = 50,176 pixels: within the limit


def test_attention_maps_are_written_for_every_label_and_equal_recognizer_explain(setup, tmp_path, capsys):
    import numpy as np

    root, folder, _ = setup
    out_dir = tmp_path / "maps"
    code = label_main(
        [
            "--checkpoint",
            str(root / "model"),
            "--topk",
            "3",
            "--workers",
            "0",
            "--attention-maps",
            str(out_dir),
            str(folder / "a.png"),
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(lines) == 1 and lines[0]["labels"]
    labels = [x["label"] for x in lines[0]["labels"]]
    grids = sorted(out_dir.glob("a.*.npy"))
    assert len(grids) == len(labels) == len(sorted(out_dir.glob("a.*.png")))
    explained = Recognizer.from_checkpoint(root / "model").explain([folder / "a.png"], [labels])[0]
    for grid, label_map in zip(grids, explained):
        values = np.load(grid)
        assert values.shape == label_map.grid.shape and abs(values.sum() - 1) < 1e-4 and (values >= 0).all()
        assert np.allclose(values, label_map.grid, atol=1e-6)
    assert json.loads((out_dir / "a.json").read_text())


def test_options_are_declared_once_for_the_command_line_and_the_library(setup):
    root, folder, _ = setup
    args = build_parser().parse_args(["--checkpoint", "x", "--precision", "bf16", "--decode", "draft", "--topk", "2"])
    options = InferenceOptions.from_args(args)
    assert options == InferenceOptions(precision="bf16", decode="draft", topk=2)
    assert InferenceOptions.from_args(build_parser().parse_args(["--checkpoint", "x"])).decode is None  # the model's
    assert InferenceOptions.from_args(build_parser().parse_args(["--checkpoint", "x", "--no-draft"])).decode == "full"
    assert (dtype("32"), dtype("bf16"), dtype("16")) == (None, torch.bfloat16, torch.float16)
    with autocast("cpu", "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    # the library loop yields what the command writes: an error entry for an unreadable file, labels for the rest
    recognizer = InferenceOptions().load(root / "model")
    results = {Path(r.image).name: r for r in label_files(recognizer, [folder / "broken.jpg", folder / "a.png"])}
    assert results["broken.jpg"].error and results["broken.jpg"].labels is None
    expected = recognizer.label([folder / "a.png"], topk=10)[0]
    assert [label for label, _ in results["a.png"].labels] == [label for label, _ in expected]
