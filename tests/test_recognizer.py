"""The Python API: the same image as a path, encoded bytes, a PIL image or pixels gives the same labels."""

import pytest
from conftest import OFFICIAL, tiny_nxtp
from PIL import Image

from lightning_modules import Recognizer


def test_label_accepts_paths_pil_images_and_tensors(tmp_path):
    tiny_nxtp(seed=3).save_pretrained(tmp_path / "model")
    recognizer = Recognizer.from_checkpoint(tmp_path / "model")
    path = OFFICIAL / "image_0_300x200.png"
    pil = Image.open(path)
    pixels = recognizer.preprocess(pil)
    by_path, by_bytes, by_pil, by_tensor = recognizer.label(
        [path, path.read_bytes(), pil, pixels], topk=4, batch_size=2
    )
    for other in (by_bytes, by_pil, by_tensor):  # batch composition changes float rounding only
        assert [label for label, _ in other] == [label for label, _ in by_path]
        assert [p for _, p in other] == pytest.approx([p for _, p in by_path], rel=1e-4)
    assert 1 <= len(by_path) <= 4 and all(0 < p <= 1 for _, p in by_path)
    (single,) = recognizer.label(path, topk=4, min_prob=by_path[1][1] * 1.01)
    assert [label for label, _ in single] == [by_path[0][0]]
