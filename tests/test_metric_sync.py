"""Every metric gathered over DDP ranks equals one pass over all the data: the exact and semantic label scores, the
closed-set vocabulary score and the per-label counts, on 2 gloo ranks with uneven shards and a rank that sees no
batch at all.

One pair of spawned ranks computes them all: a rank's start (importing torch and the metrics) is most of the cost.
A spawned rank imports this module to find its function, so the module imports only the metrics at its top; the
test helpers (conftest and the modules the data comes from) are imported where they are used, in the test process.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from lightning_modules.metrics import ExactLabelScore, PerLabelScore, SemanticLabelScore
from lightning_modules.vocabulary import VocabularyScore

pytestmark = [
    pytest.mark.e2e,  # spawns 2 processes
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


def _floats(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()}


def _per_label(result: dict[str, Any]) -> dict[str, Any]:
    return {"images": result["images"], "labels": {k: list(v) for k, v in result["labels"].items()}}


def _rank(rank: int, init_file: str, out_dir: str, data: dict[str, Any]) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        results: dict[str, Any] = {}
        # label scores, uneven: rank 0 gets one image, rank 1 the rest
        shard = slice(0, 1) if rank == 0 else slice(1, None)
        for name, metric in (("exact", ExactLabelScore()), ("semantic", SemanticLabelScore())):
            metric.update(data["preds"][shard], data["refs"][shard])
            results[name] = _floats(metric.compute())
        # the vocabulary score: rank 0 sees no batch at all
        metric = VocabularyScore(6, threshold=0.5)
        if rank == 1:
            metric.update(data["scores"][:25], data["targets"][:25])
            metric.update(data["scores"][25:], data["targets"][25:])
        results["vocabulary"] = _floats(metric.compute())
        # per-label counts: all on rank 0 (rank 1 counts nothing), then every other image on each rank
        preds, refs = data["label_preds"], data["label_refs"]
        for name, part in (("uneven", slice(0, 5) if rank == 0 else slice(0, 0)), ("split", slice(rank, None, 2))):
            metric = PerLabelScore()
            if part.stop != 0:
                metric.update(preds[part], refs[part])
            results[name] = _per_label(metric.compute())
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    from test_metrics import FIXTURE
    from test_per_label import PREDS, REFS
    from test_vocabulary import metric_data

    reference = json.loads(FIXTURE.read_text())
    scores, targets = metric_data()
    return {
        "preds": reference["predictions"] + [["cat"]],
        "refs": reference["references"] + [[]],
        "scores": scores,
        "targets": targets,
        "label_preds": PREDS,
        "label_refs": REFS,
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, data) -> list[dict[str, Any]]:
    """What each of the 2 ranks computed."""
    from conftest import run_ranks

    tmp = tmp_path_factory.mktemp("ranks")
    run_ranks(_rank, args=(str(tmp / "init"), str(tmp), data), nprocs=2)
    return [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_label_scores_over_ranks_equal_one_pass(ranks, data):
    from test_metrics import _assert_close

    for name, metric in (("exact", ExactLabelScore()), ("semantic", SemanticLabelScore())):
        metric.update(data["preds"], data["refs"])
        want = _floats(metric.compute())
        for rank in ranks:
            _assert_close(rank[name], want)


def test_the_vocabulary_score_over_ranks_with_an_idle_one_is_the_brute_force_one(ranks, data):
    from test_vocabulary import brute_metric

    want = brute_metric(data["scores"], data["targets"], 0.5)
    for rank in ranks:
        assert rank["vocabulary"] == pytest.approx(want, abs=1e-6)


def test_per_label_counts_over_ranks_sum_to_one_pass(ranks):
    from test_per_label import COUNTS

    want = {"images": 4, "labels": {k: list(v) for k, v in COUNTS.items()}}
    for rank in ranks:
        assert {name: rank[name] for name in ("uneven", "split")} == {"uneven": want, "split": want}
