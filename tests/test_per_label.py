"""Label by label: the per-label counts of the exact metric (by hand; across DDP ranks in test_metric_sync.py), the
report `nxtp test` writes (per_label_test.csv, TensorBoard's `test/per_label`), and `nxtp compare` of two such files."""

import math

import pytest
from conftest import NXTP_CLI, run, run_with_imports

from datamodules.synthetic import iter_split_metadata
from lightning_modules.cli import COMMANDS
from lightning_modules.cli.compare import compare_main
from lightning_modules.metrics import PerLabelScore, per_label_topk
from lightning_modules.per_label import (
    COLUMNS,
    PER_LABEL_FILE,
    LabelScore,
    compare,
    label_scores,
    markdown_report,
    read_csv,
    worst_and_best,
    write_csv,
)

# Five images; the fourth has no references and is skipped, as ExactLabelScore skips it.
PREDS = [["Cat", "dog", "car", "cat"], ["cat", "dog"], [], ["dog"], ["  Stop  Sign", "tree"]]
REFS = [["cat", "sofa"], ["cat", "dog"], ["sofa"], [], ["stop sign"]]
# By hand: (references, predicted, hits) per normalized label over the four scored images.
COUNTS = {
    "cat": (2, 2, 2),  # images 1 and 2 have it, both predict it
    "dog": (1, 2, 1),  # image 2 has it; 1 and 2 predict it (the skipped image 4 counts for nothing)
    "car": (0, 1, 0),
    "sofa": (2, 0, 0),  # images 1 and 3 have it, none predicts it
    "stop sign": (1, 1, 1),
    "tree": (0, 1, 0),
}


def test_counts_per_label_by_hand():
    metric = PerLabelScore()
    metric.update(PREDS[:2], REFS[:2])  # two batches: the counts add up
    metric.update(PREDS[2:], REFS[2:])
    assert metric.compute() == {"images": 4, "labels": COUNTS}
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute() == {"images": 0, "labels": {}}


def test_scores_from_counts_by_hand():
    scores = {s.label: s for s in label_scores(COUNTS)}
    assert list(scores) == sorted(COUNTS)
    assert scores["cat"] == LabelScore("cat", 2, 2, 2, 1.0, 1.0, 1.0)
    dog = scores["dog"]
    assert (dog.recall, dog.precision) == (1.0, 0.5) and math.isclose(dog.f1, 2 * 1.0 * 0.5 / 1.5)
    assert scores["sofa"] == LabelScore("sofa", 2, 0, 0, 0.0, None, 0.0)  # never predicted: no precision
    assert scores["car"] == LabelScore("car", 0, 1, 0, None, 0.0, 0.0)  # never referenced: no recall


def test_the_report_is_at_top5_or_the_nearest_topk():
    assert per_label_topk([5, 10]) == per_label_topk([1, 5]) == 5
    assert per_label_topk([10, 3]) == 3 and per_label_topk([4, 6]) == 4 and per_label_topk([1]) == 1


def test_csv_round_trip(tmp_path):
    path = write_csv(label_scores(COUNTS), tmp_path / "run" / PER_LABEL_FILE)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) == "label,references,predicted,hits,recall,precision,f1"
    assert "dog,1,2,1,1.000000,0.500000,0.666667" in lines and "sofa,2,0,0,0.000000,,0.000000" in lines
    back = {s.label: s for s in read_csv(path)}
    assert back["sofa"] == LabelScore("sofa", 2, 0, 0, 0.0, None, 0.0)
    assert back["car"].recall is None and math.isclose(back["dog"].f1, 2 / 3, abs_tol=1e-6)
    assert not list(tmp_path.glob("run/*.partial"))


def test_worst_and_best_have_enough_references():
    many = {f"label{i}": (10, 10, i) for i in range(12)} | {"rare": (2, 0, 0), "perfect rare": (2, 2, 2)}
    worst, best = worst_and_best(label_scores(many), n=10, min_references=5)
    assert [s.label for s in worst] == [f"label{i}" for i in range(10)]
    assert [s.label for s in best] == [f"label{i}" for i in range(11, 1, -1)]
    report = markdown_report(label_scores(many), 5, 100, min_references=5)
    assert report.startswith("Exact labels at top-5 over 100 test images: 14 labels")
    assert "**10 worst**" in report and "| label0 | 10 | 10 | 0 | 0.000 | 0.000 | 0.000 |" in report
    assert "rare" not in report
    assert "with at least 5 references." in markdown_report(label_scores(COUNTS), 5)  # none has 5: no table
    assert "|" not in markdown_report(label_scores(COUNTS), 5)


# nxtp compare ------------------------------------------------------------------------------------------------------

BEFORE = """label,references,predicted,hits,recall,precision,f1
circle,10,10,9,0.9,0.9,0.9
star,10,8,6,0.6,0.75,0.666667
kite,5,0,0,0,,0
boat,4,4,4,1,1,1
ghost,0,3,0,,0,0
"""
AFTER = """label,references,predicted,hits,recall,precision,f1
circle,10,10,7,0.7,0.7,0.7
star,10,10,7,0.7,0.7,0.7
kite,5,5,4,0.8,0.8,0.8
ladder,3,3,3,1,1,1
"""


def test_compare_two_files(tmp_path, capsys):
    (tmp_path / "before").mkdir()
    (tmp_path / "before" / PER_LABEL_FILE).write_text(BEFORE)
    (tmp_path / "after.csv").write_text(AFTER)
    # the run folder holding the file, or the file itself
    assert compare_main(["--before", str(tmp_path / "before"), "--after", str(tmp_path / "after.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [line.split() for line in lines[1:6]]
    assert lines[0].split() == ["label", "F1", "before", "F1", "after", "change"]
    # by change, the largest drop first; then the labels of one file only; `ghost` (no references) is left out
    assert table == [
        ["circle", "0.9000", "0.7000", "-0.2000"],
        ["star", "0.6667", "0.7000", "+0.0333"],
        ["kite", "0.0000", "0.8000", "+0.8000"],
        ["boat", "1.0000", "-", "-"],
        ["ladder", "-", "1.0000", "-"],
    ]
    # the mean over the three labels in both: (0.9 + 0.666667 + 0) / 3 -> (0.7 + 0.7 + 0.8) / 3
    assert lines[6].split()[:4] == ["mean", "0.5222", "0.7333", "+0.2111"]
    assert "3 labels in both" in lines[6]
    assert lines[7] == "2 label(s) in one file only (no change): boat, ladder"
    changes = compare(read_csv(tmp_path / "before" / PER_LABEL_FILE), read_csv(tmp_path / "after.csv"), 5)
    assert [c.label for c in changes] == ["circle", "star", "kite"]  # --min-references 5


def test_compare_refuses_a_file_that_is_not_a_per_label_file(tmp_path, capsys):
    (tmp_path / "a.csv").write_text("label,f1\ncat,0.5\n")
    (tmp_path / "b.csv").write_text(AFTER)
    assert compare_main(["--before", str(tmp_path / "a.csv"), "--after", str(tmp_path / "b.csv")]) == 2
    assert "a.csv: not a per-label file, it lacks the column(s) ['references'" in capsys.readouterr().err
    assert compare_main(["--before", str(tmp_path / "nowhere"), "--after", str(tmp_path / "b.csv")]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.e2e
def test_compare_help_imports_no_torch():
    assert "compare" in COMMANDS
    result, imported = run_with_imports(["compare", "--help"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning_modules.per_label" in imported
    assert not {name.split(".")[0] for name in imported} & {"torch", "transformers", "lightning", "open_clip"}
    assert "--before" in result.stdout and "--after" in result.stdout


# nxtp test ---------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_nxtp_test_writes_the_per_label_report(shapes, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # an untrained model (the config's own weights): the counts of references are the test split's whatever it says
    command = NXTP_CLI + [
        "test",
        "--config",
        "configs/experiment/default.yaml",
        "--model.nxtp.tokenizer",
        str(shapes / "tokenizer"),
        "--model.evaluation.semantic_metric",
        "false",
        "--model.evaluation.min_prob",
        "0",
        "--data.test_shards",
        str(shapes / "test/shard-000000.tar"),
        "--data.batch_size",
        "16",
        "--data.num_workers",
        "0",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
    ]
    result = run(command, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    version = tmp_path / "logs" / "default" / "version_0"
    scores = {s.label: s for s in read_csv(version / PER_LABEL_FILE)}
    images = list(iter_split_metadata(shapes, "test"))
    truth = {kind: sum(kind in r["labels"] for r in images) for r in images for kind in r["labels"]}
    assert {label: s.references for label, s in scores.items() if s.references} == truth
    assert sum(s.predicted for s in scores.values()) > 0  # min_prob 0: five labels an image
    assert all(s.hits <= min(s.references, s.predicted) for s in scores.values())
    events = EventAccumulator(str(version), size_guidance={"tensors": 0}).Reload()
    text = events.Tensors("test/per_label/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text.startswith(f"Exact labels at top-5 over {len(images)} test images: {len(scores)} labels")
    assert f"per-label test scores ({len(scores)} labels)" in result.stdout + result.stderr
