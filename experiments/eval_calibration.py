"""Calibrated label probabilities on a trained model: fit on one split, report on another.

    python experiments/eval_calibration.py --checkpoint logs/default/version_0/checkpoints/last.ckpt \
        --fit-shards data/shapes/val/shard-000000.tar --test-shards data/shapes/test/shard-000000.tar

Runs the model once over each split (top-10, no min_prob), fits every calibration method on the fit split and
prints, on the test split: the expected calibration error (15 equal-width bins over every emitted label) of the raw
one-shot scores and of the calibrated probabilities, and the mean per-image exact F1 (as ``ExactLabelScore``) at raw
0.5, at the best single raw threshold (chosen on the test split itself: a bound no threshold fitted elsewhere can
beat on average), at calibrated 0.5 and with the fitted per-label thresholds (``--threshold auto``). The model is
not changed.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="logs/default/version_0/checkpoints/last.ckpt")
    parser.add_argument("--fit-shards", default="data/shapes/val/shard-000000.tar")
    parser.add_argument("--test-shards", default="data/shapes/test/shard-000000.tar")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--limit", type=int, help="at most this many images of each split")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads")
    args = parser.parse_args()

    from datamodules.webdataset import NXTPDataModule
    from lightning_modules.calibration import METHODS, Examples, evaluate, fit
    from lightning_modules.checkpoint import load_model, model_identity
    from lightning_modules.sampling import recognize

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, calibration=False)

    def examples(shards: str) -> Examples:
        data = NXTPDataModule(val_shards=shards, batch_size=32, num_workers=args.workers, inputs=model.inputs)
        predictions, references = [], []
        for batch in data.val_dataloader():
            if len(batch):
                with torch.no_grad():
                    predictions += recognize(model, batch.pixels, topk=args.topk)
                references += batch.labels
            if args.limit and len(references) >= args.limit:
                break
        return Examples.build(predictions[: args.limit], references[: args.limit])

    start = time.time()
    fit_ex, test_ex = examples(args.fit_shards), examples(args.test_shards)
    print(
        f"model {model_identity(model)}; fit split {len(fit_ex.refs)} images ({len(fit_ex)} labels), test split "
        f"{len(test_ex.refs)} images ({len(test_ex)} labels), top-{args.topk}; sampling {time.time() - start:.0f} s"
    )
    rows = []
    for method in ("auto", *METHODS):
        calibration = fit(fit_ex, model_identity(model), method)
        m = evaluate(calibration, test_ex)
        rows.append((method, m, len(calibration.thresholds), calibration.threshold))
    m = rows[0][1]
    print(
        f"\nraw one-shot scores on the test split: ECE {m['ece_raw']:.4f}; F1 at 0.5 {m['f1_raw_0.5']:.4f}; best "
        f"single threshold {m['raw_best_threshold']:.3g} (chosen on the test split) F1 {m['f1_raw_best']:.4f}\n"
    )
    print("| method | ECE calibrated | F1 at calibrated 0.5 | F1 at global threshold | F1 --threshold auto |")
    print("|---|---|---|---|---|")
    for method, m, n, threshold in rows:
        print(
            f"| {method} | {m['ece_calibrated']:.4f} | {m['f1_calibrated_0.5']:.4f} | {m['f1_calibrated_global']:.4f} "
            f"({threshold:.3g}) | {m['f1_auto']:.4f} ({n} labels with their own) |"
        )


if __name__ == "__main__":
    main()
