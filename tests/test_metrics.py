"""Tests for the exact and semantic label metrics.

The semantic metric is checked against numbers produced by the official NXTP metric
code on toy data (``tests/fixtures/nxtp-official-tiny/metric.json``); gathered over DDP ranks in
test_metric_sync.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_modules.metrics import ExactLabelScore, SemanticLabelScore, normalize_label

FIXTURE = Path(__file__).parent / "fixtures" / "nxtp-official-tiny" / "metric.json"
SEMANTIC_KEYS = ("recall", "precision", "f", "div_avg", "div_std")
TOL = 1e-6


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def _loaded_semantic() -> SemanticLabelScore:
    # Load MiniLM once for the module; the embedder is local, so no network is needed.
    with pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("HF_HUB_OFFLINE", "1")
        metric = SemanticLabelScore()
        metric.embed(["warm up"])
    return metric


@pytest.fixture
def semantic(_loaded_semantic: SemanticLabelScore) -> SemanticLabelScore:
    _loaded_semantic.reset()
    return _loaded_semantic


def _as_floats(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()}


def _assert_close(got: dict[str, float], want: dict[str, float], tol: float = TOL) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert math.isclose(got[k], want[k], abs_tol=tol), (k, got[k], want[k])


# ---------------------------------------------------------------- semantic


def test_semantic_matches_official(semantic: SemanticLabelScore, reference: dict[str, Any]) -> None:
    semantic.update(reference["predictions"], reference["references"])
    got = _as_floats(semantic.compute())
    _assert_close(got, {k: reference[k] for k in SEMANTIC_KEYS})
    assert int(semantic.num_images) == 3 and int(semantic.num_skipped) == 0


def test_semantic_per_sample_matches_official(semantic: SemanticLabelScore, reference: dict[str, Any]) -> None:
    for preds, refs, want in zip(reference["predictions"], reference["references"], reference["per_sample"]):
        semantic.reset()
        semantic.update([preds], [refs])
        _assert_close(_as_floats(semantic.compute()), {k: want[k] for k in SEMANTIC_KEYS})
        sim = semantic.embed(refs) @ semantic.embed(preds).T
        torch.testing.assert_close(sim, torch.tensor(want["sim_ref_x_pred"]), atol=TOL, rtol=0)


def test_semantic_split_updates_and_merge(semantic: SemanticLabelScore, reference: dict[str, Any]) -> None:
    preds, refs = reference["predictions"], reference["references"]
    want = {k: reference[k] for k in SEMANTIC_KEYS}

    semantic.update(preds[:1], refs[:1])
    semantic.update(preds[1:], refs[1:])
    _assert_close(_as_floats(semantic.compute()), want)

    # Merging the states of two independent passes equals one pass.
    semantic.reset()
    semantic.update(preds[:2], refs[:2])
    first_half = {k: v.clone() for k, v in semantic.metric_state.items()}
    semantic.reset()
    semantic.update(preds[2:], refs[2:])
    semantic.merge_state(first_half)
    _assert_close(_as_floats(semantic.compute()), want)


def test_semantic_empty_cases(semantic: SemanticLabelScore, reference: dict[str, Any]) -> None:
    preds, refs = reference["predictions"], reference["references"]
    # An empty prediction list is scored as the official evaluation scores it, as the prediction "" (its "dummy
    # voc"): with one reference and one prediction, R = P = F = cos("cat", "") and there is no diversity.
    # An empty reference list is skipped.
    semantic.update([*preds, [], ["dog"]], [*refs, ["cat"], []])
    cos = float(semantic.embed(["cat"])[0] @ semantic.embed([""])[0])
    assert 0.05 < cos < 0.95  # a real score, neither 0 nor a match
    empty = {"recall": cos, "precision": cos, "f": cos, "div_avg": 0.0, "div_std": 0.0}
    got = _as_floats(semantic.compute())
    _assert_close(got, {k: (reference[k] * 3 + empty[k]) / 4 for k in SEMANTIC_KEYS})
    assert int(semantic.num_images) == 4 and int(semantic.num_skipped) == 1


def test_semantic_empty_prediction_among_others(semantic: SemanticLabelScore) -> None:
    # Only an image without any prediction gets the empty label; the others in the batch are scored as given.
    semantic.update([[], ["dog"]], [["cat"], ["dog"]])
    both = _as_floats(semantic.compute())
    semantic.reset()
    semantic.update([[""], ["dog"]], [["cat"], ["dog"]])
    _assert_close(both, _as_floats(semantic.compute()))
    assert math.isclose(
        both["recall"], (float(semantic.embed(["cat"])[0] @ semantic.embed([""])[0]) + 1) / 2, abs_tol=TOL
    )


def test_semantic_keeps_embedder_out_of_state(semantic: SemanticLabelScore) -> None:
    assert list(semantic.parameters()) == []
    assert not any("embed" in k for k in semantic.state_dict())
    assert semantic.clone().__dict__["_embedder"] is None


# ---------------------------------------------------------------- exact


def test_normalize_label() -> None:
    assert normalize_label("  Traffic \t Light ") == "traffic light"
    assert normalize_label("DOG") == "dog"


def test_exact_hand_computed() -> None:
    metric = ExactLabelScore()
    metric.update([["a", "b", "c"]], [["a", "d"]])
    _assert_close(_as_floats(metric.compute()), {"recall": 0.5, "precision": 1 / 3, "f1": 0.4})

    # A second image: 2 of 2 refs hit by 2 of 4 preds -> R 1, P .5, F 2/3.
    metric.update([["x", "y", "z", "w"]], [["x", "y"]])
    _assert_close(
        _as_floats(metric.compute()),
        {"recall": (0.5 + 1) / 2, "precision": (1 / 3 + 0.5) / 2, "f1": (0.4 + 2 / 3) / 2},
    )


def test_exact_normalization_and_duplicates() -> None:
    metric = ExactLabelScore()
    # {"traffic light", "dog"} vs {"traffic light", "cat"}: R .5, P .5, F .5.
    metric.update([["Traffic  Light", " DOG ", "dog"]], [["traffic light", "Cat", "cat"]])
    _assert_close(_as_floats(metric.compute()), {"recall": 0.5, "precision": 0.5, "f1": 0.5})


def test_exact_empty_cases() -> None:
    metric = ExactLabelScore()
    metric.update([[]], [["a"]])  # the official evaluation's empty label "" matches no reference
    _assert_close(_as_floats(metric.compute()), {"recall": 0.0, "precision": 0.0, "f1": 0.0})
    # No references: skipped, the means stay those of the scored images.
    metric.update([["a", "b", "c"], ["a"]], [["a", "d"], []])
    _assert_close(_as_floats(metric.compute()), {"recall": 0.25, "precision": 1 / 6, "f1": 0.2})
    assert int(metric.num_images) == 2 and int(metric.num_skipped) == 1


def test_exact_merge_equals_one_pass() -> None:
    preds = [["a", "b", "c"], [], ["x", "y", "z", "w"], ["q"]]
    refs = [["a", "d"], ["a"], ["x", "y"], []]
    full = ExactLabelScore()
    full.update(preds, refs)
    first, second = ExactLabelScore(), ExactLabelScore()
    first.update(preds[:2], refs[:2])
    second.update(preds[2:], refs[2:])
    first.merge_state(second)
    _assert_close(_as_floats(first.compute()), _as_floats(full.compute()))
    assert int(first.num_skipped) == 1


def test_input_validation() -> None:
    metric = ExactLabelScore()
    with pytest.raises(ValueError, match="same length"):
        metric.update([["a"]], [["a"], ["b"]])
    with pytest.raises(TypeError, match="lists of label lists"):
        metric.update(["a", "b"], ["a", "b"])
