"""Where each label looks, measured: attention maps of the true labels against the synthetic scenes' boxes.

    python experiments/eval_attention_maps.py --checkpoint logs/default/version_0/checkpoints/last.ckpt \
        --shards 'data/shapes/test/shard-000000.tar' [--limit 500] [--out maps/]

Every image of the shards is teacher-forced with each object kind it shows (``KEY.json``: ``labels`` and every
object's ``kind`` and ``bbox``); each (image, kind) map is scored by the pointing game (its peak patch overlaps a
box of that kind; ties count as a random pick) and by the share of its mass inside those boxes. Rows: every map
method of ``lightning_modules.attention_maps`` on the checkpoint and on a random-init model of the same
architecture, and the uniform and centre-prior maps. ``+-`` is a 95% normal interval over the pairs.
Without ``--checkpoint`` only the random-init model (``--model``, ``--tokenizer``) and the baselines are measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.images import decode_image  # noqa: E402
from lightning_modules import attention_maps as am  # noqa: E402
from lightning_modules.decoder import DecoderConfig  # noqa: E402
from lightning_modules.nxtp import NXTP, NXTPConfig  # noqa: E402
from lightning_modules.vision import VisionConfig  # noqa: E402


def read_scenes(patterns: list[str]) -> Iterator[tuple[str, bytes, dict]]:
    """(key, JPEG bytes, KEY.json) of every sample in the shards (brace patterns as in the data config)."""
    import webdataset as wds

    for pattern in patterns:
        for url in wds.shardlists.expand_urls(pattern):
            with tarfile.open(url) as tar:
                members: dict[str, dict[str, bytes]] = {}
                for m in tar:
                    if m.isfile():
                        key, ext = m.name.rsplit(".", 1)
                        members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            for key, files in members.items():
                if "jpg" in files and "json" in files:
                    yield key, files["jpg"], json.loads(files["json"])


def load_model(checkpoint: str) -> NXTP:
    from lightning_modules.recognizer import Recognizer

    return Recognizer.from_checkpoint(checkpoint).model


def random_like(model: NXTP, seed: int = 0) -> NXTP:
    """A model of ``model``'s architecture, tokenizer and prompt, freshly initialised as training starts it."""
    config = model.config
    config.vision = replace(config.vision, pretrained=None)
    config.decoder = DecoderConfig(
        config={"model_type": model.decoder.config.model_type, **model.decoder.config.to_diff_dict()}
    )
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="nxtp-tokenizer-") as folder:  # read into memory by NXTP
        model.tokenizer.save_pretrained(folder)
        config.tokenizer = folder
        return NXTP(config).eval()


def random_from_config(config: str, tokenizer: str, seed: int = 0) -> NXTP:
    cfg = yaml.safe_load(Path(config).read_text())
    torch.manual_seed(seed)
    return NXTP(
        NXTPConfig(
            VisionConfig(**cfg["vision"]),
            DecoderConfig(**cfg["decoder"]),
            tokenizer,
            reset_label_positions=cfg.get("reset_label_positions", False),
        )
    ).eval()


def variants(record: am.LabelAttention) -> dict[str, torch.Tensor]:
    """Every map of the record: the aggregates (with and without the delimiter's row) and every single head."""
    out = {f"{m}": am.maps(record, m) for m in ("rollout", "mean", "gradient")}
    out.update({f"{m} (label tokens only)": am.maps(record, m, include_delimiter=False) for m in ("rollout", "mean")})
    for layer in range(record.n_layers):
        for head in range(record.n_heads):
            out[f"head L{layer} H{head}"] = am.maps(record, "head", layer, head)
    return out


def evaluate(
    model: NXTP, scenes: list[tuple[str, bytes, dict]], batch_size: int, device: torch.device, out: Path | None = None
) -> dict[str, tuple[list[float], list[float]]]:
    """Pointing hits and in-box mass per map kind, over every (image, kind) pair of ``scenes``."""
    model = model.to(device)
    size = tuple(model.visual.image_size)
    results: dict[str, tuple[list[float], list[float]]] = {}
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        images = [decode_image(jpg) for _, jpg, _ in chunk]
        pixels = torch.stack([model.eval_transform(im) for im in images]).to(device)
        labels = [meta["labels"] for _, _, meta in chunk]
        record = am.label_attention(model, pixels, labels, gradient=True)
        grids = {k: v.cpu().numpy() for k, v in variants(record).items()}
        grids["uniform"] = np.broadcast_to(am.uniform_map(record.grid), (len(record.image_index), *record.grid))
        grids["centre prior"] = np.broadcast_to(am.centre_prior(record.grid), (len(record.image_index), *record.grid))
        n = 0
        for b, ((key, _, meta), image, kinds) in enumerate(zip(chunk, images, labels)):
            first = n
            for kind in kinds:
                boxes = [am.transform_box(o["bbox"], image.size, size) for o in meta["objects"] if o["kind"] == kind]
                coverage = am.box_coverage(boxes, record.grid, size)
                for name, g in grids.items():
                    hits, mass = results.setdefault(name, ([], []))
                    hits.append(am.pointing_hit(g[n], coverage))
                    mass.append(am.mass_in_box(g[n], coverage))
                n += 1
            if out is not None:
                maps = [
                    am.LabelMap(k, s, grids[am.DEFAULT_METHOD][first + j])
                    for j, (k, s) in enumerate(zip(kinds, record.scores[b]))
                ]
                am.write_maps(out, key, am.pixels_to_image(model, pixels[b]), maps)
    return results


def evaluate_boxes(
    model: NXTP | None,
    scenes: list[tuple[str, bytes, dict]],
    batch_size: int,
    device: torch.device,
    method: str,
    variants: list[tuple[int, float]] = ((1, 1.5),),
    views: int = 1,
) -> dict[str, dict[str, list[float]]]:
    """Points and boxes in the original image's pixels, per (image, true kind) pair: pointing (the point lies in
    an object of that kind), best IoU of ``box`` with those objects, and the share of those objects that ``box``,
    or one of ``boxes``, matches at IoU 0.5 (several objects of one kind); for every (radius, spread) of
    ``variants`` of ``method``'s map (radius 0: the peak cell's centre and a box of that cell), or with
    ``model=None`` the centre-box and whole-image baselines. ``views``: maps twice as fine, over shifted views
    (``attention_maps.finer_maps``; radius in half-patch cells)."""
    from lightning_modules import locate as lc

    out: dict[str, dict[str, list[float]]] = {}

    def add(name: str, location: lc.Location, truth: list[list[float]]) -> None:
        row = out.setdefault(
            name, {"pointing": [], "iou": [], "iou>=0.5": [], "objects by box": [], "objects found": []}
        )
        row["pointing"].append(float(lc.inside(location.point, truth)))
        best = lc.best_iou(location.box, truth)
        row["iou"].append(best)
        row["iou>=0.5"].append(float(best >= 0.5))
        row["objects by box"].append(float(np.mean([lc.iou(t, location.box) >= 0.5 for t in truth])))
        row["objects found"].append(float(np.mean([lc.best_iou(t, location.boxes) >= 0.5 for t in truth])))

    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        images = [decode_image(jpg) for _, jpg, _ in chunk]
        labels = [meta["labels"] for _, _, meta in chunk]
        if model is not None:
            view = model.image_size[::-1]
            pixels = torch.stack([model.eval_transform(im) for im in images]).to(device)
            record = am.label_attention(model.to(device), pixels, labels, gradient=method == "gradient")
            grids = am.maps(record, method).cpu().numpy()
            if views > 1:
                ends = np.cumsum([len(k) for k in labels])
                per_image = [list(grids[e - len(k) : e]) for e, k in zip(ends, labels)]
                grids = [g for gs in am.finer_maps(model, pixels, labels, per_image, views, method) for g in gs]
        n = 0
        for (_, _, meta), image, kinds in zip(chunk, images, labels):
            for kind in kinds:
                truth = [o["bbox"] for o in meta["objects"] if o["kind"] == kind]
                if model is None:
                    geometry = lc.ViewGeometry.of(image.size, image.size)
                    whole = geometry.seen()
                    centre = [(whole[0] + whole[2]) / 2, (whole[1] + whole[3]) / 2]
                    add("whole image", lc.Location(centre, whole, [whole]), truth)
                    box = lc.centre_box(geometry)
                    add("centre box (half each side)", lc.Location(centre, box, [box]), truth)
                    continue
                geometry = lc.ViewGeometry.of(image.size, view, model.preprocessing.resize_mode)
                for radius, spread in variants:
                    name = f"{method}{f' x{views} views' if views > 1 else ''}, radius {radius}, spread {spread}"
                    add(name, lc.locate(grids[n], geometry, radius, spread), truth)
                n += 1
    return out


def box_table(rows: list[tuple[str, dict[str, dict[str, list[float]]]]]) -> str:
    """A Markdown table of ``evaluate_boxes`` results, one row per (model, variant)."""
    lines = [
        "| model | map, cells around the peak, spread | pointing | mean best IoU | IoU >= 0.5 "
        "| objects found by box | objects found by boxes |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, results in rows:
        for name, m in results.items():
            cells = " | ".join(
                interval(m[k]) for k in ("pointing", "iou", "iou>=0.5", "objects by box", "objects found")
            )
            lines.append(f"| {model} | {name} | {cells} |")
    return "\n".join(lines)


def interval(values: list[float]) -> str:
    v = np.asarray(values)
    return f"{v.mean():.3f} +- {1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0:.3f}"


def table(rows: list[tuple[str, dict[str, tuple[list[float], list[float]]]]], max_heads: int = 16) -> str:
    """A Markdown table: one row per (model, map kind); many heads are summed up by the best and the median."""
    lines = ["| model | map | pointing game | mass in box |", "|---|---|---|---|"]
    for model, results in rows:
        heads = {k: v for k, v in results.items() if k.startswith("head ")}
        shown = {k: v for k, v in results.items() if not k.startswith("head ")}
        if len(heads) <= max_heads:
            shown.update(heads)
        else:
            order = sorted(heads, key=lambda k: np.mean(heads[k][0]))
            shown[f"best head ({order[-1][5:]})"] = heads[order[-1]]
            shown[f"median head ({order[len(order) // 2][5:]})"] = heads[order[len(order) // 2]]
        for name, (hits, mass) in shown.items():
            lines.append(f"| {model} | {name} | {interval(hits)} | {interval(mass)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a .ckpt of nxtp fit or a save_pretrained folder")
    parser.add_argument(
        "--shards", nargs="+", required=True, help="synthetic shards, e.g. 'data/shapes/test/shard-000000.tar'"
    )
    parser.add_argument(
        "--model",
        default="configs/model/nxtp_tiny.yaml",
        help="architecture of the random-init model when no --checkpoint is given",
    )
    parser.add_argument("--tokenizer", help="tokenizer of that model (default: the shards' dataset's tokenizer/)")
    parser.add_argument("--limit", type=int, help="at most this many images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--boxes",
        action="store_true",
        help="score points and boxes (lightning_modules.locate) instead of the maps: pointing, IoU, objects found",
    )
    parser.add_argument("--method", default=am.DEFAULT_METHOD, help="--boxes: the map method")
    parser.add_argument(
        "--views", type=int, default=1, choices=(1, 4, 5), help="--boxes: --locate-views (maps from shifted views)"
    )
    parser.add_argument("--radii", type=int, nargs="+", default=[1, 2], help="--boxes: --locate-radius values")
    parser.add_argument(
        "--spreads", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="--boxes: --locate-spread values"
    )
    parser.add_argument("--out", type=Path, help="also write the checkpoint's maps (PNG, .npy, JSON) here")
    args = parser.parse_args()

    scenes = []
    for scene in read_scenes(args.shards):
        scenes.append(scene)
        if args.limit and len(scenes) >= args.limit:
            break
    if not scenes:
        raise SystemExit(f"no samples with .jpg and .json in {args.shards}")
    device = torch.device(args.device)
    if args.boxes:
        variants = [(0, 0.5), *((r, s) for r in args.radii for s in args.spreads)]
        rows = []
        if args.checkpoint:
            trained = load_model(args.checkpoint).eval()
            rows.append(
                ("trained", evaluate_boxes(trained, scenes, args.batch_size, device, args.method, variants, args.views))
            )
            random_model = random_like(trained, args.seed)
        else:
            tokenizer = args.tokenizer or str(Path(args.shards[0]).parents[1] / "tokenizer")
            random_model = random_from_config(args.model, tokenizer, args.seed)
        rows.append(
            (
                "random-init",
                evaluate_boxes(random_model, scenes, args.batch_size, device, args.method, variants, args.views),
            )
        )
        rows.append(("-", evaluate_boxes(None, scenes, args.batch_size, device, args.method)))
        n = len(next(iter(rows[-1][1].values()))["iou"])
        print(f"{len(scenes)} images, {n} (image, kind) pairs; boxes in the original images' pixels\n")
        print(box_table(rows))
        return
    rows = []
    if args.checkpoint:
        trained = load_model(args.checkpoint)
        rows.append(("trained", evaluate(trained, scenes, args.batch_size, device, args.out)))
        random_model = random_like(trained, args.seed)
        del trained
    else:
        # OUT/{split}/shard-*.tar: the dataset's own tokenizer is OUT/tokenizer.
        tokenizer = args.tokenizer or str(Path(args.shards[0]).parents[1] / "tokenizer")
        random_model = random_from_config(args.model, tokenizer, args.seed)
    rows.append(("random-init", evaluate(random_model, scenes, args.batch_size, device)))
    # The baselines do not depend on the model: one row each.
    baselines = {k: [r.pop(k) for _, r in rows][0] for k in ("uniform", "centre prior")}
    rows.append(("-", baselines))
    n = len(next(iter(baselines.values()))[0])
    print(f"{len(scenes)} images, {n} (image, kind) pairs; default map: {am.DEFAULT_METHOD}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
