"""Calibrated label probabilities: the fit recovers a known truth, ECE is what it says, a calibration travels with
its weights (folder, export, .ckpt) and is refused for others, and `nxtp label`, the serve API and `nxtp calibrate`
use it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import NXTP_CLI, OFFICIAL, fit_command, run, tiny_nxtp
from PIL import Image

from lightning_modules.calibration import (
    FEATURES,
    Calibration,
    CalibrationBins,
    CalibrationError,
    Examples,
    Scored,
    ece,
    fit,
    fit_label_thresholds,
    image_features,
    mean_f1,
)
from lightning_modules.checkpoint import (
    CALIBRATION_FILE,
    CALIBRATION_KEY,
    load_model,
    model_identity,
    read_calibration,
    save_model_record,
    write_calibration,
)
from lightning_modules.cli.label import label_main
from lightning_modules.recognizer import Recognizer

KINDS = [f"kind{i}" for i in range(12)]


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def scenes(n: int, truth, seed: int, mass: tuple[float, float] = (1.0, 1.0)):
    """``n`` images of 8 ranked labels with Dirichlet scores times an image's score mass (uniform in ``mass``);
    each label is right with probability ``truth(image_features row)``, drawn independently. Returns predictions,
    references and the true probability of every label."""
    rng = np.random.default_rng(seed)
    predictions, references, true_p = [], [], []
    for _ in range(n):
        scores = np.sort(rng.dirichlet(np.full(8, 0.5)))[::-1] * rng.uniform(*mass)
        labels = [(k, float(s)) for k, s in zip(rng.permutation(KINDS)[:8], scores)]
        q = truth(image_features(labels))
        right = rng.random(8) < q
        predictions.append(labels)
        references.append([k for (k, _), r in zip(labels, right) if r] + ["never-emitted"])
        true_p += list(q)
    return predictions, references, np.array(true_p)


def share_truth(x):  # right more often the larger the label's share of its image's score mass
    return sigmoid(2.0 * x[:, FEATURES.index("log_share")] + 3.0)


def test_the_fit_recovers_a_known_probability():
    ex = Examples.build(*scenes(3000, share_truth, seed=0)[:2])
    calibration = fit(ex, "sha256:test")
    predictions, references, true_p = scenes(1000, share_truth, seed=1)
    fresh = Examples.build(predictions, references)
    probs = calibration.map_features(fresh.x)
    assert np.abs(probs - true_p).mean() < 0.03
    assert ece(probs, fresh.right) < 0.03
    # the raw score does not say it: a label of share 0.3 is right 82% of the time
    assert ece(fresh.score, fresh.right) > 3 * ece(probs, fresh.right)
    # applying to one image gives the same numbers, sorted, with the raw score kept
    applied = calibration.apply(predictions[0])
    by_label = dict(zip([l for l, _ in predictions[0]], calibration.probs(predictions[0])))
    assert [x.prob for x in applied] == sorted(by_label.values(), reverse=True)
    assert all(x.prob == pytest.approx(by_label[x.label]) for x in applied)
    assert {x.label: x.score for x in applied} == dict(predictions[0])


def test_isotonic_on_the_raw_score_recovers_a_monotone_truth():
    def truth(x):
        return np.sqrt(np.exp(x[:, FEATURES.index("log_score")]))

    calibration = fit(Examples.build(*scenes(3000, truth, seed=2)[:2]), "sha256:test", method="isotonic")
    predictions, references, true_p = scenes(1000, truth, seed=3)
    probs = calibration.map_features(Examples.build(predictions, references).x)
    assert np.abs(probs - true_p).mean() < 0.04


def test_ece_by_hand():
    # 15 bins: 0.1 -> bin 1 (1 of 2 right: |0.5 - 0.1| for two labels), 0.9 -> bin 13, 0.95 -> bin 14
    assert ece(np.array([0.1, 0.1, 0.9, 0.95]), np.array([0, 1, 1, 1])) == pytest.approx((0.8 + 0.1 + 0.05) / 4)
    assert ece(np.array([0.25] * 4), np.array([1, 0, 0, 0])) == pytest.approx(0.0)
    metric = CalibrationBins()
    metric.update([[("a", 0.1), ("b", 0.9)], [("A ", 0.1), ("c", 0.95)]], [["b"], ["a", "c"]])
    from lightning_modules.calibration import ece_from_bins

    assert ece_from_bins(**metric.compute()) == pytest.approx(0.2375)


def test_per_label_thresholds_are_fitted():
    # "kind0" is right exactly above 0.3, "kind1" never: its threshold keeps nothing
    probs = np.array([0.1, 0.2, 0.25, 0.35, 0.5, 0.9] * 10 + [0.8] * 40)
    labels = [["kind0"] for _ in range(60)] + [["kind1"] for _ in range(40)]
    predictions = [[(l[0], float(p))] for l, p in zip(labels, probs)]
    references = [[l[0]] if (l[0] == "kind0" and p > 0.3) else ["other"] for l, p in zip(labels, probs)]
    ex = Examples.build(predictions, references)
    thresholds = fit_label_thresholds(ex, probs, min_examples=30)
    assert 0.25 < thresholds["kind0"] <= 0.35 and thresholds["kind1"] == 1.0
    precise = fit_label_thresholds(ex, probs, "precision", 0.9, min_examples=30)
    assert 0.25 < precise["kind0"] <= 0.35
    assert fit_label_thresholds(ex, probs, min_examples=41) == {"kind0": thresholds["kind0"]}


def test_auto_chooses_the_method_that_ranks_best_on_held_out_images():
    # right-ness follows the label's share of its image, which the raw score alone does not rank when images' score
    # masses differ: auto must find a method with the features, and it must score better on fresh images than the
    # raw-score method
    split = Examples.build(*scenes(3000, share_truth, seed=0, mass=(0.05, 1.0))[:2])
    calibration = fit(split, "sha256:test")
    assert calibration.method != "isotonic"
    held_out = calibration.fitted_on["method"]["held_out_f1"]
    assert held_out[calibration.method] == max(held_out.values())
    fresh = Examples.build(*scenes(1000, share_truth, seed=1, mass=(0.05, 1.0))[:2])
    raw = fit(split, "sha256:test", method="isotonic")

    def f1(c):
        return mean_f1(fresh, c.map_features(fresh.x) >= c.threshold)

    assert f1(calibration) > f1(raw) + 0.01


def cut_world(n: int, cuts: dict[str, float], seed: int) -> Examples:
    """Images of 4 labels with uniform scores; a label is right exactly when its score is above its kind's cut."""
    rng = np.random.default_rng(seed)
    kinds = list(cuts)
    predictions, references = [], []
    for _ in range(n):
        labels = [(k, float(s)) for k, s in zip(rng.permutation(kinds)[:4], rng.random(4))]
        predictions.append(labels)
        references.append([k for k, s in labels if s > cuts[k]] + ["never-emitted"])
    return Examples.build(predictions, references)


def test_per_label_thresholds_are_kept_only_where_they_help_held_out_images():
    differ = fit(cut_world(800, {"kind0": 0.2, "kind1": 0.2, "kind2": 0.7, "kind3": 0.7}, 0), "id", "isotonic")
    assert set(differ.thresholds) == {"kind0", "kind1", "kind2", "kind3"}
    assert differ.fitted_on["label_thresholds"]["held_out_f1_gain"] > 0
    # one rule for every kind: per-label thresholds only fit noise, and the global one serves them all
    same = fit(cut_world(800, dict.fromkeys(["kind0", "kind1", "kind2", "kind3"], 0.5), 0), "id", "isotonic")
    assert same.thresholds == {} and same.fitted_on["label_thresholds"]["held_out_f1_gain"] <= 0


def test_too_few_examples_are_refused_with_the_counts():
    ex = Examples.build(*scenes(5, share_truth, seed=0)[:2])
    with pytest.raises(CalibrationError, match=r"40 labels emitted .* at least 100"):
        fit(ex, "sha256:test")


# stored with the model -----------------------------------------------------------------------------------------


def hand_calibration(model_id: str, thresholds: dict[str, float] | None = None, threshold: float = 0.5):
    """prob = 1 + log10(score) / 45 (clipped to [0, 1]): an isotonic map on log(score) from (ln 1e-45, 0) to (0, 1)
    (the random test model's scores span 1e-9 to 1e-43)."""
    return Calibration(
        model_id=model_id,
        method="isotonic",
        features=["log_score"],
        mean=[0.0],
        scale=[1.0],
        coef=[1.0],
        intercept=0.0,
        iso_x=[math.log(1e-45), 0.0],
        iso_y=[0.0, 1.0],
        presence_x=[math.log(1e-45), 0.0],
        presence_y=[0.0, 1.0],
        threshold=threshold,
        thresholds=thresholds or {},
    )


def by_hand(score: float) -> float:
    return min(max(1 + math.log10(score) / 45, 0.0), 1 - 1e-4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    model = tiny_nxtp(seed=5)
    with torch.no_grad():  # labels that end, as in a trained model
        model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 4
    model.save_pretrained(root / "plain")
    model.save_pretrained(root / "calibrated")
    write_calibration(root / "calibrated", hand_calibration(model_identity(model)))
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    save_model_record(checkpoint, model)
    torch.save(checkpoint, root / "model.ckpt")
    image = root / "a.png"
    Image.open(OFFICIAL / "image_0_300x200.png").save(image)
    return root, model, image


def test_round_trip_through_a_folder_an_export_and_a_ckpt(models, tmp_path):
    root, model, _ = models
    identity = model_identity(model)
    assert load_model(root / "plain").calibration is None
    loaded = load_model(root / "calibrated")
    assert loaded.calibration == hand_calibration(identity) and model_identity(loaded) == identity
    from lightning_modules.export import export

    out = export(root / "calibrated", tmp_path / "exported")
    assert (out / CALIBRATION_FILE).is_file() and load_model(out).calibration == loaded.calibration
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes((root / "model.ckpt").read_bytes())
    assert load_model(ckpt).calibration is None
    write_calibration(ckpt, loaded.calibration)
    assert isinstance(torch.load(ckpt, weights_only=True)[CALIBRATION_KEY], str)  # plain JSON, no pickle
    assert load_model(ckpt).calibration == loaded.calibration == read_calibration(ckpt)
    export(ckpt, tmp_path / "from-ckpt")
    assert load_model(tmp_path / "from-ckpt").calibration == loaded.calibration


def test_another_models_calibration_is_refused_naming_both(models, tmp_path):
    root, model, _ = models
    other = tiny_nxtp(seed=6)
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / CALIBRATION_FILE).write_text((root / "calibrated" / CALIBRATION_FILE).read_text())
    with pytest.raises(CalibrationError) as e:
        Recognizer.from_checkpoint(tmp_path / "other")
    assert model_identity(model) in str(e.value) and model_identity(other) in str(e.value)
    assert CALIBRATION_FILE in str(e.value)
    # fine-tuned weights leave the old calibration behind when saved
    with torch.no_grad():
        loaded = load_model(root / "calibrated")
        next(loaded.parameters()).add_(1.0)
    loaded.save_pretrained(tmp_path / "tuned")
    assert not (tmp_path / "tuned" / CALIBRATION_FILE).exists()


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "not valid JSON"),
        ('{"a": 1}', "not a label calibration"),
        (None, "thresholds must be numbers from 0 to 1"),
    ],
)
def test_a_hand_edited_calibration_that_does_not_parse_is_named(models, tmp_path, capsys, text, words):
    root, model, image = models
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    if text is None:  # a threshold edited out of range
        data = json.loads(hand_calibration(model_identity(model)).to_json())
        data["threshold"] = 5
        text = json.dumps(data)
    (folder / CALIBRATION_FILE).write_text(text)
    with pytest.raises(CalibrationError, match=words) as e:
        load_model(folder)
    assert str(folder / CALIBRATION_FILE) in str(e.value)
    assert label_main(["--checkpoint", str(folder), "--workers", "0", str(image)]) == 2
    assert words in capsys.readouterr().err


# where probabilities are shown ---------------------------------------------------------------------------------


def test_recognizer_shows_calibrated_probabilities_and_keeps_the_score(models):
    root, _, image = models
    raw = Recognizer.from_checkpoint(root / "plain").label(image, topk=5)[0]
    calibrated = Recognizer.from_checkpoint(root / "calibrated")
    labels = calibrated.label(image, topk=5)[0]
    assert all(isinstance(x, Scored) for x in labels)
    assert {x.label: x.score for x in labels} == pytest.approx(dict(raw))
    assert {x.label: x.prob for x in labels} == pytest.approx({l: by_hand(s) for l, s in raw})
    (even,) = calibrated.label(image, topk=5, min_prob=0.5)
    assert [x.label for x in even] == [l for l, s in raw if by_hand(s) >= 0.5]
    with pytest.raises(CalibrationError, match="calibrated model"):
        Recognizer.from_checkpoint(root / "plain").label(image, threshold="auto")
    # closed vocabulary: each entry's presence probability, from its exact score
    names = [l for l, _ in raw[:3]] + ["zebra"]
    exact = dict(Recognizer.from_checkpoint(root / "plain").score(image, names)[0])
    scored = calibrated.score(image, names)[0]
    assert {x.label: x.prob for x in scored} == pytest.approx({n: by_hand(p) for n, p in exact.items()})


def test_nxtp_label_min_prob_and_threshold_auto(models, tmp_path, capsys):
    root, model, image = models
    raw = Recognizer.from_checkpoint(root / "plain").label(image, topk=5)[0]
    assert 0 < sum(by_hand(s) >= 0.5 for _, s in raw) < len(raw)  # min_prob 0.5 drops some and keeps some
    top = raw[0][0]
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    # the top label's own threshold above its probability; the rest keep the global 0.2
    write_calibration(folder, hand_calibration(model_identity(model), {top: 0.9999}, threshold=0.2))
    out = tmp_path / "labels.jsonl"
    args = ["--checkpoint", str(folder), "--topk", "5", "--workers", "0", "--output", str(out), str(image)]
    assert label_main(args) == 0
    (line,) = map(json.loads, out.read_text().splitlines())
    assert [x["label"] for x in line["labels"]] == [l for l, _ in raw]
    assert [x["score"] for x in line["labels"]] == pytest.approx([s for _, s in raw])
    assert [x["prob"] for x in line["labels"]] == pytest.approx([by_hand(s) for _, s in raw])
    assert label_main(args + ["--threshold", "auto"]) == 0
    (line,) = map(json.loads, out.read_text().splitlines())
    assert [x["label"] for x in line["labels"]] == [l for l, s in raw[1:] if by_hand(s) >= 0.2]
    csv_out = tmp_path / "labels.csv"
    assert label_main(args[:-3] + ["--format", "csv", "--output", str(csv_out), "--min-prob", "0.5", str(image)]) == 0
    rows = csv_out.read_text().splitlines()
    assert rows[0] == "image,label,prob,score,error"
    assert len(rows) - 1 == max(1, sum(by_hand(s) >= 0.5 for _, s in raw))
    plain = ["--checkpoint", str(root / "plain"), "--workers", "0", "--threshold", "auto", str(image)]
    assert label_main(plain) == 2 and "has no calibration" in capsys.readouterr().err


def test_a_serve_request_gets_calibrated_probabilities(models):
    pytest.importorskip("litserve")
    import base64

    from lightning_modules.serving import RecognizerAPI, RequestError, parse_fields

    root, _, image = models
    raw = Recognizer.from_checkpoint(root / "plain").label(image, topk=4)[0]
    data = base64.b64encode(image.read_bytes()).decode()
    assert parse_fields({"threshold": "auto"}, {}, text=True) == {"threshold": "auto"}
    with pytest.raises(RequestError, match="threshold"):
        parse_fields({"threshold": "0.5"}, {}, text=True)
    api = RecognizerAPI(str(root / "calibrated"))
    api.setup("cpu")
    requests = [
        {"image": data, "topk": 4, "min_prob": 0.0},
        {"image": data, "topk": 4, "min_prob": 0.5, "threshold": "auto"},
    ]
    answers = [json.loads(api.encode_response(o).body) for o in api.predict([api.decode_request(r) for r in requests])]
    assert [x["label"] for x in answers[0]["labels"]] == [l for l, _ in raw]
    assert [x["score"] for x in answers[0]["labels"]] == pytest.approx([s for _, s in raw])
    assert [x["prob"] for x in answers[0]["labels"]] == pytest.approx([by_hand(s) for _, s in raw])
    assert [x["label"] for x in answers[1]["labels"]] == [l for l, s in raw if by_hand(s) >= 0.5]
    plain = RecognizerAPI(str(root / "plain"))
    plain.setup("cpu")
    refused = plain.decode_request({"image": data, "topk": 4, "min_prob": 0.0, "threshold": "auto"})
    assert isinstance(refused, RequestError) and refused.status == 400 and refused.field == "threshold"


# nxtp calibrate ------------------------------------------------------------------------------------------------


def test_a_split_without_enough_labels_is_refused(shapes, tmp_path):
    model = tiny_nxtp(seed=0)
    model.save_pretrained(tmp_path / "model")
    from lightning_modules.cli.calibrate import calibrate_main

    shards = str(shapes / "val" / "shard-000000.tar")
    common = ["--checkpoint", str(tmp_path / "model"), "--workers", "0", "--report-dir", str(tmp_path / "r")]
    assert calibrate_main([*common, "--shards", shards, "--limit", "4"]) == 2
    assert calibrate_main([*common, "--shards", str(tmp_path / "none-*.tar")]) == 2
    assert not (tmp_path / "model" / CALIBRATION_FILE).exists()


@pytest.mark.slow
def test_nxtp_calibrate_end_to_end(shapes, tmp_path, capsys):
    """Train briefly, calibrate on the validation shard, report on the test shard, use the result."""
    trained = run(fit_command(shapes, tmp_path / "logs", 60))
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(ckpt.parents[1])).Reload()  # validation measured the raw scores' calibration
    assert "val/ece" in events.Tags()["scalars"] and "val/reliability" in events.Tags()["images"]
    assert all(0 <= e.value <= 1 for e in events.Scalars("val/ece"))
    command = NXTP_CLI + [
        "calibrate",
        "--checkpoint",
        str(ckpt),
        "--shards",
        str(shapes / "val" / "shard-000000.tar"),
        "--report-shards",
        str(shapes / "test" / "shard-000000.tar"),
        "--workers",
        "0",
        "--min-label-examples",
        "5",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "expected calibration error" in result.stdout and "| threshold |" in result.stdout
    assert Image.open(tmp_path / "report" / "reliability.png").size[0] > 300
    calibration = read_calibration(ckpt)
    assert calibration.fitted_on["images"] == 32 and calibration.model_id == model_identity(load_model(ckpt))
    images = tmp_path / "images"
    images.mkdir()
    Image.open(OFFICIAL / "image_0_300x200.png").save(images / "a.png")
    capsys.readouterr()
    assert label_main(["--checkpoint", str(ckpt), "--threshold", "auto", str(images)]) == 0  # in this process
    assert all("score" in x for x in json.loads(capsys.readouterr().out)["labels"])
