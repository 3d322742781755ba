"""Where each label is: the view geometry against open_clip's own eval transform, points and boxes on hand-made
maps, and --locate through Recognizer, `nxtp label` (JSON, CSV) and the serve API, in the pixels of the image given
(EXIF orientation applied, the crop undone)."""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json

import numpy as np
import open_clip
import pytest
import torch
from conftest import OFFICIAL, TEST_SHARD, TRAINED_DEFAULT, eval_attention_maps, needs_trained_default, tiny_nxtp
from PIL import Image, ImageOps

from lightning_modules.attention_maps import finer_maps
from lightning_modules.cli.label import label_main
from lightning_modules.locate import (
    Located,
    Location,
    ViewGeometry,
    best_iou,
    centre_box,
    inside,
    iou,
    locate,
    model_geometry,
)
from lightning_modules.recognizer import Recognizer

# the geometry --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(200, 100), (90, 160), (64, 64), (33, 70)])
@pytest.mark.parametrize("view", [(64, 64), (64, 48)])
def test_the_view_geometry_is_open_clips_eval_transform(mode, size, view):
    """A white box drawn on the original lands, through open_clip's eval transform itself, where ``to_view`` puts
    it; and ``to_original`` brings the seen box back to the drawn one, clipped to what the view shows."""
    box = [size[0] * 0.55, size[1] * 0.3, size[0] * 0.8, size[1] * 0.7]
    box = [float(round(v)) for v in box]
    image = Image.new("RGB", size)
    image.paste((255, 255, 255), tuple(int(v) for v in box))
    transform = open_clip.image_transform(
        (view[1], view[0]), is_train=False, mean=(0, 0, 0), std=(1, 1, 1), resize_mode=mode, interpolation="bicubic"
    )
    seen_pixels = transform(image)[0].numpy() > 0.5
    ys, xs = np.nonzero(seen_pixels)
    seen = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    geometry = ViewGeometry.of(size, view, mode)
    expected = geometry.to_view(box)
    expected = [min(max(v, 0), view[i % 2]) for i, v in enumerate(expected)]
    np.testing.assert_allclose(expected, seen, atol=1.5)
    back = geometry.to_original(seen)
    scale = [1 / s for s in geometry.scale]
    clipped = [min(max(v, lo), hi) for v, lo, hi in zip(box, geometry.seen()[:2] * 2, geometry.seen()[2:] * 2)]
    np.testing.assert_allclose(back, clipped, atol=1.5 * max(scale))


def test_to_original_inverts_to_view_inside_the_seen_part():
    geometry = ViewGeometry.of((300, 200), (64, 64))  # 96x64 resized, the middle 64 columns kept
    assert geometry.seen() == pytest.approx([50.0, 0.0, 250.0, 200.0], abs=1.6)
    box = [100.0, 20.0, 180.0, 150.0]
    assert geometry.to_original(geometry.to_view(box)) == pytest.approx(box)
    # a box that reaches into the cropped margin is clipped to what the model saw
    assert geometry.to_original(geometry.to_view([0, 0, 120, 50]))[0] == pytest.approx(geometry.seen()[0])


# points and boxes on hand-made maps -------------------------------------------------------------------------------

IDENTITY = ViewGeometry.of((64, 64), (64, 64))  # 4x4 cells of 16 pixels


def one_hot(*cells: tuple[int, int], values=None) -> np.ndarray:
    grid = np.zeros((4, 4))
    for cell, value in zip(cells, values or [1.0] * len(cells)):
        grid[cell] = value
    return grid


def test_one_cell_gives_its_centre_and_its_square():
    where = locate(one_hot((1, 2)), IDENTITY)  # row 1, column 2
    assert where.point == pytest.approx([40, 24])
    assert where.box == pytest.approx([32, 16, 48, 32]) and where.boxes == [where.box]


def test_two_cells_give_the_point_between_them_and_a_box_of_their_spread():
    # weights 1 and 1 at columns 1 and 2: centre 1.5 cells -> x 32; sd 0.5 cell, 1.5 sd = 12 px; one row: half a
    # cell (8 px) up and down
    where = locate(one_hot((1, 1), (1, 2)), IDENTITY)
    assert where.point == pytest.approx([32, 24])
    assert where.box == pytest.approx([20, 16, 44, 32])
    assert locate(one_hot((1, 1), (1, 2)), IDENTITY, spread=1.0).box == pytest.approx([24, 16, 40, 32])


def test_separate_regions_get_a_box_each_the_peaks_first():
    grid = one_hot((0, 0), (3, 3), values=[0.6, 1.0])
    where = locate(grid, IDENTITY)
    assert where.boxes == [pytest.approx([48, 48, 64, 64]), pytest.approx([0, 0, 16, 16])]
    assert where.box == where.boxes[0] and where.point == pytest.approx([56, 56])
    assert len(locate(grid, IDENTITY, fraction=0.7).boxes) == 1  # 0.6 is under 70% of the way to the peak


def test_a_flat_map_says_nothing_more_than_the_whole_seen_image():
    where = locate(np.full((4, 4), 1 / 16), ViewGeometry.of((300, 200), (64, 64)))
    seen = ViewGeometry.of((300, 200), (64, 64)).seen()
    assert where.box == pytest.approx(seen) and where.point == pytest.approx([150, 100], abs=1)


def test_locations_come_back_to_the_original_pixels_and_are_clipped_to_the_crop():
    wide = ViewGeometry.of((256, 128), (64, 64))  # resized to 128x64 (scale 1/2), columns 32..96 kept
    where = locate(one_hot((1, 2)), wide)
    assert where.point == pytest.approx([(40 + 32) * 2, 24 * 2])
    assert where.box == pytest.approx([(32 + 32) * 2, 32, (48 + 32) * 2, 64])
    # at the crop's left edge, the box would reach into the cut margin: it stops at the seen part
    edge = locate(one_hot((1, 0), (1, 1)), wide, spread=3.0)  # centre x 16 in the view, 24 px either side
    assert edge.box[0] == pytest.approx(wide.seen()[0]) and edge.box[0] > 0


def test_the_box_metrics_by_hand():
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert best_iou([0, 0, 10, 10], [[20, 20, 30, 30], [0, 0, 10, 20]]) == pytest.approx(0.5)
    assert best_iou([0, 0, 1, 1], []) == 0.0
    assert inside([5, 5], [[0, 0, 10, 10]]) and not inside([10, 5], [[0, 0, 10, 10]])
    assert centre_box(IDENTITY) == pytest.approx([16, 16, 48, 48])


# through the recognizer, the command and the serve API --------------------------------------------------------


@pytest.fixture(scope="module")
def located(tmp_path_factory):
    """A tiny model folder, and one photo stored as a sideways JPEG with an EXIF rotation and as the upright PNG
    it shows; a wide picture (the crop cuts its sides) and a 3x2-pixel one (smaller than the 4x4 grid)."""
    root = tmp_path_factory.mktemp("locate")
    model = tiny_nxtp(seed=5)
    with torch.no_grad():  # labels that end, as in a trained model
        model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 4
    model.save_pretrained(root / "model")
    upright = Image.open(OFFICIAL / "image_2_180x320.png").convert("RGB")  # 180 wide, 320 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter: shown upright
    buf = io.BytesIO()
    upright.rotate(90, expand=True).save(buf, "JPEG", quality=95, exif=exif)
    (root / "photo.jpg").write_bytes(buf.getvalue())
    ImageOps.exif_transpose(Image.open(root / "photo.jpg")).save(root / "upright.png")
    Image.open(OFFICIAL / "image_0_300x200.png").convert("RGB").save(root / "wide.png")
    Image.new("RGB", (3, 2), (200, 30, 30)).save(root / "tiny.png")
    return root


def assert_inside_the_image(item: Located, size: tuple[int, int]) -> None:
    x0, y0, x1, y1 = item.location.box
    assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1], (item.location, size)
    assert x0 <= item.location.point[0] <= x1 and y0 <= item.location.point[1] <= y1


def test_recognizer_locates_in_the_upright_image_whatever_its_storage(located):
    recognizer = Recognizer.from_checkpoint(located / "model")
    photo, upright = (recognizer.label(located / name, topk=4, locate=True)[0] for name in ("photo.jpg", "upright.png"))
    plain = recognizer.label(located / "upright.png", topk=4)[0]
    assert [tuple(x) for x in upright] == plain and len(plain) >= 2  # locate changes no label nor probability
    assert [x.location for x in photo] == [x.location for x in upright]
    size = Image.open(located / "upright.png").size
    assert size == (180, 320)
    for item in upright:
        assert_inside_the_image(item, size)
    # the same labels given: teacher-forced, the same places
    given = recognizer.locate(located / "upright.png", [[label for label, _ in plain]])[0]
    assert [x.location for x in given] == [x.location for x in upright]
    assert [x.prob for x in given] == pytest.approx([p for _, p in plain], rel=1e-4)


def test_wide_and_tiny_images(located):
    recognizer = Recognizer.from_checkpoint(located / "model")
    wide, tiny = recognizer.label([located / "wide.png", located / "tiny.png"], topk=3, locate=True)
    seen = ViewGeometry.of((300, 200), recognizer.model.image_size[::-1]).seen()
    for item in wide:
        assert_inside_the_image(item, (300, 200))
        assert seen[0] <= item.location.box[0] and item.location.box[2] <= seen[2]  # never in the cut margins
    for item in tiny:
        assert_inside_the_image(item, (3, 2))
    # a preprocessed tensor without its size: locations in the tensor's own pixels
    pixels = recognizer.preprocess(located / "wide.png")
    (own,) = recognizer.label(pixels, topk=3, locate=True)
    for item in own:
        assert_inside_the_image(item, (64, 64))
    (given,) = recognizer.label(pixels, topk=3, locate=True, sizes=[(300, 200)])  # alone: not bitwise the batch's
    assert [x.location.box for x in given] == [pytest.approx(x.location.box, abs=1e-3) for x in wide]


def test_a_closed_vocabulary_is_located_too(located):
    recognizer = Recognizer.from_checkpoint(located / "model")
    (scored,) = recognizer.score(located / "upright.png", ["cat", "dog", "car"], topk=2, locate=True)
    (plain,) = recognizer.score(located / "upright.png", ["cat", "dog", "car"], topk=2)
    assert [tuple(x) for x in scored] == plain
    expected = recognizer.locate(located / "upright.png", [[name for name, _ in plain]])[0]
    assert [x.location for x in scored] == [x.location for x in expected]


def test_nxtp_label_writes_points_and_boxes_in_json_and_csv(located, tmp_path, capsys):
    names = ["photo.jpg", "wide.png", "tiny.png"]
    args = ["--checkpoint", str(located / "model"), "--topk", "3", "--workers", "0", "--locate"]
    assert label_main(args + [str(located / n) for n in names]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    recognizer = Recognizer.from_checkpoint(located / "model")
    for name, line in zip(names, lines):
        (expected,) = recognizer.label(located / name, topk=3, locate=True)
        assert [x["label"] for x in line["labels"]] == [x.label for x in expected]
        for entry, item in zip(line["labels"], expected):
            assert entry["point"] == pytest.approx(item.location.point, abs=0.051)
            assert entry["box"] == pytest.approx(item.location.box, abs=0.051)
            assert len(entry["boxes"]) == len(item.location.boxes)
    out = tmp_path / "labels.csv"
    assert label_main(args + ["--format", "csv", "--output", str(out), str(located / "photo.jpg")]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["image", "label", "prob", "x", "y", "x0", "y0", "x1", "y1", "error"]
    first = lines[0]["labels"][0]
    assert [float(rows[0][k]) for k in ("x", "y", "x0", "y0", "x1", "y1")] == pytest.approx(
        first["point"] + first["box"], abs=0.051
    )


def test_locate_with_map_to_is_refused_by_name(located, capsys):
    with pytest.raises(SystemExit) as stop:
        label_main(["--checkpoint", str(located / "model"), "--locate", "--map-to", "x.txt", "a.png"])
    assert stop.value.code == 2 and "--locate" in capsys.readouterr().err


def test_the_serve_api_locates_on_request(located):
    pytest.importorskip("litserve")
    from lightning_modules.serving import FIELDS, RecognizerAPI, RequestError

    api = RecognizerAPI(str(located / "model"))
    api.setup("cpu")
    data = base64.b64encode((located / "photo.jpg").read_bytes()).decode()
    requests = [{"image": data, "topk": 3, "min_prob": 0.0, "locate": flag} for flag in (True, False)]
    answers = api.predict([api.decode_request(r) for r in requests])
    with_place, without = (json.loads(api.encode_response(a).body)["labels"] for a in answers)
    (expected,) = Recognizer.from_checkpoint(located / "model").label(located / "upright.png", topk=3, locate=True)
    assert [x["label"] for x in with_place] == [x.label for x in expected]
    assert [x["box"] for x in with_place] == [pytest.approx(x.location.box, abs=0.051) for x in expected]
    assert all("box" not in x and "point" not in x for x in without)
    assert FIELDS["locate"]("true", True) is True and FIELDS["locate"](False, False) is False
    with pytest.raises(RequestError, match="locate") as bad:
        FIELDS["locate"]("maybe", True)
    assert bad.value.field == "locate" and bad.value.status == 400


def test_a_location_round_trips_through_json():
    where = Location([1.04, 2.0], [0.0, 0.5, 3.26, 4.0], [[0.0, 0.5, 3.26, 4.0]])
    assert where.to_json() == {"point": [1.0, 2.0], "box": [0.0, 0.5, 3.3, 4.0], "boxes": [[0.0, 0.5, 3.3, 4.0]]}
    item = Located(("cat", 0.5), where)
    label, prob = item
    assert (label, prob) == ("cat", 0.5) and item == ("cat", 0.5) and item.score is None


# the trained default model against the objects ----------------------------------------------------------------


@pytest.mark.slow
@needs_trained_default
def test_the_trained_default_model_boxes_beat_the_baselines():
    """On 100 test scenes, the default rule's points and boxes beat the centre box and the whole image by more than
    the noise (experiments/eval_attention_maps.py --boxes)."""
    evaluation = eval_attention_maps()
    scenes = list(itertools.islice(evaluation.read_scenes([str(TEST_SHARD)]), 100))
    model = evaluation.load_model(str(TRAINED_DEFAULT)).eval()
    trained = evaluation.evaluate_boxes(model, scenes, 50, torch.device("cpu"), "gradient")[
        "gradient, radius 1, spread 1.5"
    ]
    baselines = evaluation.evaluate_boxes(None, scenes, 50, torch.device("cpu"), "gradient")
    for name in ("whole image", "centre box (half each side)"):
        for metric in ("pointing", "iou"):
            ours, theirs = np.asarray(trained[metric]), np.asarray(baselines[name][metric])
            assert ours.mean() > theirs.mean() + 2 * np.sqrt(ours.var() / len(ours)), (name, metric)


def test_a_tower_without_a_patch_grid_is_refused_by_name(located, monkeypatch, capsys):
    import types

    from lightning_modules.attention_maps import patch_grid

    tower = types.SimpleNamespace(visual=types.SimpleNamespace(), config=types.SimpleNamespace())
    tower.config.vision = types.SimpleNamespace(model_name="convnext_base")
    with pytest.raises(ValueError, match="'convnext_base' has no patch grid"):
        patch_grid(tower)
    # nxtp label says so before any image is read, and the serve API answers a locate request with a 400
    monkeypatch.setattr("lightning_modules.attention_maps.patch_grid", lambda model: patch_grid(tower))
    assert label_main(["--checkpoint", str(located / "model"), "--locate", str(located / "tiny.png")]) == 2
    assert "no patch grid" in capsys.readouterr().err
    pytest.importorskip("litserve")
    from lightning_modules.serving import RecognizerAPI, RequestError

    api = RecognizerAPI(str(located / "model"))
    api.setup("cpu")
    data = base64.b64encode((located / "tiny.png").read_bytes()).decode()
    answer = api.decode_request({"image": data, "topk": 3, "min_prob": 0.0, "locate": True})
    assert isinstance(answer, RequestError) and answer.field == "locate" and answer.status == 400


# finer maps from shifted views ---------------------------------------------------------------------------------


def test_shifted_views_find_the_half_patch_a_single_view_cannot(monkeypatch):
    """A map that is each patch's brightness (standing in for the model's) sees a bright square of half a patch
    only as its whole patch; the mean over the views shifted by half a patch (and the mirror image) puts its peak
    on that half-patch cell. Next to the right and bottom edges, where a shifted view has cropped the image's last
    half patch (that cell is the mean of the views that saw it), the square's cell is among the peaks, and they lie
    in its patch."""
    import types

    from lightning_modules import attention_maps as am

    def brightness(model, pixels, labels, method, *where):  # per patch of 16 pixels, one map per label
        cells = pixels[:, 0].reshape(len(pixels), 4, 16, 4, 16).sum((2, 4)).numpy() + 1e-6
        return [[am.LabelMap(label, 1.0, cells[i] / cells[i].sum()) for label in ls] for i, ls in enumerate(labels)]

    monkeypatch.setattr(am, "explain", brightness)
    model = types.SimpleNamespace(visual=types.SimpleNamespace(grid_size=(4, 4)))
    for views in (4, 5):
        for row, col in itertools.product(range(8), repeat=2):
            pixels = torch.zeros(1, 3, 64, 64)
            pixels[:, :, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8] = 1
            (coarse,) = brightness(model, pixels, [["square"]], "gradient")
            ((fine,),) = am.finer_maps(model, pixels, [["square"]], [[coarse[0].grid]], views)
            assert fine.shape == (8, 8) and fine.sum() == pytest.approx(1)
            peaks = set(zip(*np.nonzero(fine == fine.max())))
            if row < 6 and col < 6:
                assert peaks == {(row, col)}, (views, row, col)
            else:
                assert (row, col) in peaks and all(r // 2 == row // 2 and c // 2 == col // 2 for r, c in peaks)
    assert am.finer_maps(model, pixels, [["square"]], [[coarse[0].grid]], 1) == [[coarse[0].grid]]
    with pytest.raises(ValueError, match="views=3"):
        am.finer_maps(model, pixels, [["square"]], [[coarse[0].grid]], 3)


def test_locate_views_run_through_the_recognizer_label_and_serve(located, capsys, tmp_path):
    """--locate-views 4 and 5: the same labels and probabilities, locations inside the image, the same answer from
    Python, `nxtp label` and the serve API; a number of views that is not offered is refused by name."""
    recognizer = Recognizer.from_checkpoint(located / "model")
    plain = recognizer.label(located / "photo.jpg", topk=3)[0]
    for views in (4, 5):
        (found,) = recognizer.label(located / "photo.jpg", topk=3, locate=True, views=views, radius=2, spread=3)
        assert [tuple(x) for x in found] == plain
        for item in found:
            assert_inside_the_image(item, (180, 320))
    args = ["--checkpoint", str(located / "model"), "--topk", "3", "--workers", "0", "--locate"]
    rule = ["--locate-views", "5", "--locate-radius", "2", "--locate-spread", "3"]
    assert label_main(args + rule + [str(located / "photo.jpg")]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["box"] for x in line["labels"]] == [pytest.approx(x.location.box, abs=0.051) for x in found]
    with pytest.raises(SystemExit) as stop:
        label_main(args + ["--locate-views", "3", str(located / "photo.jpg")])
    assert stop.value.code == 2 and "--locate-views" in capsys.readouterr().err
    # with pictures of another map method, the added views are read by that method too
    maps = ["--attention-maps", str(tmp_path), "--attention-method", "head", "--attention-head", "1"]
    assert label_main(args + rule + maps + [str(located / "photo.jpg")]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    pixels = recognizer.preprocess(located / "photo.jpg")
    head = recognizer.explain(pixels, [[x["label"] for x in line["labels"]]], "head", -1, 1)
    labels = [[m.label for m in head[0]]]
    (grids,) = finer_maps(recognizer.model, pixels[None], labels, [[m.grid for m in head[0]]], 5, "head", -1, 1)
    geometry = model_geometry(recognizer.model, (180, 320))
    expected = [locate(g, geometry, radius=2, spread=3).box for g in grids]
    assert [x["box"] for x in line["labels"]] == [pytest.approx(box, abs=0.051) for box in expected]
    pytest.importorskip("litserve")
    from lightning_modules.inference import InferenceOptions
    from lightning_modules.serving import RecognizerAPI

    options = InferenceOptions(locate_views=5, locate_radius=2, locate_spread=3)
    api = RecognizerAPI(str(located / "model"), options=options)
    api.setup("cpu")
    data = base64.b64encode((located / "photo.jpg").read_bytes()).decode()
    (answer,) = api.predict([api.decode_request({"image": data, "topk": 3, "min_prob": 0.0, "locate": True})])
    served = json.loads(api.encode_response(answer).body)["labels"]
    assert [x["box"] for x in served] == [pytest.approx(x.location.box, abs=0.051) for x in found]
