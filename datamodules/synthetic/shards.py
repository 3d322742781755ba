"""Writing the dataset: every split's scenes as WebDataset shards, in parallel, byte-identical for a seed,
into a folder that appears only when complete; and the command line of ``python -m datamodules.synthetic``."""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.labels import extract_labels

from .drawing import KINDS, select_featured, select_kinds
from .scenes import draw_scene, render_preview, sample_seed

SPLITS: tuple[str, ...] = ("train", "val", "test")

_JPEG_QUALITY = 90
# Fixed tar member times keep shards byte-identical between builds.
_TAR_MTIME = 0


def _encode_sample(
    seed: int, split: str, index: int, image_size: int, kinds: tuple[str, ...] = KINDS, featured: tuple[str, ...] = ()
) -> tuple[dict[str, Any], list[str], str]:
    rng = random.Random(sample_seed(seed, split, index))
    image, caption, objects = draw_scene(rng, image_size, kinds, featured)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    labels = sorted({o["kind"] for o in objects})
    meta = {"labels": labels, "objects": objects, "caption": caption}
    sample = {
        "__key__": f"{split}-{index:08d}",
        "jpg": buf.getvalue(),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    return sample, labels, caption


@dataclass(frozen=True)
class _ShardJob:
    root: str
    split: str
    shard: int
    start: int
    stop: int
    seed: int
    image_size: int
    kinds: tuple[str, ...] = KINDS
    featured: tuple[str, ...] = ()


def _write_shard(job: _ShardJob) -> str:
    """Write one shard; returns its relative path."""
    from webdataset import TarWriter  # heavy import, only needed when writing

    rel = f"{job.split}/shard-{job.shard:06d}.tar"
    with open(Path(job.root) / rel, "wb") as f, TarWriter(f, encoder=False, mtime=_TAR_MTIME) as writer:
        for index in range(job.start, job.stop):
            writer.write(_encode_sample(job.seed, job.split, index, job.image_size, job.kinds, job.featured)[0])
    return rel


def _pool(workers: int) -> Any:
    # fork shares the already imported modules (and NLTK data) with the workers;
    # fall back to the platform default where fork does not exist.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else None).Pool(workers)


def _is_dataset_dir(path: Path) -> bool:
    """True for a folder this module may replace: an earlier build or an empty folder."""
    return path.is_dir() and ((path / "manifest.json").exists() or not any(path.iterdir()))


def build_dataset(
    out: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 64,
    samples_per_shard: int = 2000,
    workers: int = 2,
    kinds: Sequence[str] | None = None,
    exclude_kinds: Sequence[str] | None = None,
    featured_kinds: Sequence[str] | None = None,
) -> Path:
    """Generate the train/val/test shards and the manifest (the caption tokenizer is the next step:
    ``datamodules.tokenizer.build_tokenizer``).

    The scenes show objects of ``kinds`` (None: every one of ``KINDS``) except ``exclude_kinds``, e.g. a dataset
    without the kinds a model is to learn later from data of its own (see ``select_kinds``; an unknown kind is a
    ``ValueError`` naming it). The manifest's ``kinds`` lists the kinds drawn. The default scenes are the same as
    with every kind named. ``featured_kinds`` (some of those drawn) puts at least one object of one of them in
    every scene, among objects of any kind: photos collected for the kinds a model is to learn (``featured`` in the
    manifest).

    Everything is written to a temporary sibling folder that is renamed to ``out``
    only when complete (``out/done`` is its last file), so an interrupted build is
    never mistaken for a finished one. If ``out`` already holds a finished build
    with the same settings it is kept as is.
    """
    chosen = select_kinds(kinds, exclude_kinds)  # before anything is written: an unknown kind is a typo
    featured = select_featured(chosen, featured_kinds)
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    settings = {
        "seed": seed,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "counts": counts,
        "kinds": list(chosen),
        **({"featured": list(featured)} if featured else {}),  # absent by default: earlier builds stay valid
    }
    if (out / "done").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        if {k: manifest.get(k) for k in [*settings, "featured"]} == {"featured": None, **settings}:
            return out
    if out.exists() and not _is_dataset_dir(out):
        raise FileExistsError(f"{out} exists and does not look like a generated dataset")

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = []
    for split in SPLITS:
        (tmp / split).mkdir(parents=True)
        for shard, start in enumerate(range(0, counts[split], samples_per_shard)):
            stop = min(start + samples_per_shard, counts[split])
            jobs.append(_ShardJob(str(tmp), split, shard, start, stop, seed, image_size, chosen, featured))

    try:
        if workers > 1 and len(jobs) > 1:
            extract_labels("a circle.")  # load the NLTK data once, before the workers fork
            with _pool(workers) as pool:
                results = pool.map(_write_shard, jobs, chunksize=1)
        else:
            results = [_write_shard(job) for job in jobs]

        shards: dict[str, list[str]] = {s: [rel for job, rel in zip(jobs, results) if job.split == s] for s in SPLITS}
        manifest = {**settings, "splits": {s: {"count": counts[s], "shards": shards[s]} for s in SPLITS}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "done").write_text("")
        # Swap folders by renaming so that `out` is never a half-written build.
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def iter_split_metadata(root: str | Path, split: str) -> Iterator[dict[str, Any]]:
    """Yield the decoded ``.json`` record of every sample in a built split, in order."""
    import tarfile

    manifest = json.loads((Path(root) / "manifest.json").read_text())
    for rel in manifest["splits"][split]["shards"]:
        with tarfile.open(Path(root) / rel) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    yield json.load(tar.extractfile(member))  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: build the dataset and/or write a preview grid."""
    parser = argparse.ArgumentParser(description="Build the synthetic scenes as WebDataset shards.")
    parser.add_argument("--out", type=Path, help="output folder (e.g. data/shapes)")
    parser.add_argument("--train", type=int, default=40000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--preview", type=Path, help="write a grid of 16 scenes to this PNG")
    # choices: argparse names an unknown kind and lists the known ones
    kind = dict(nargs="+", choices=KINDS, metavar="KIND")
    parser.add_argument("--kinds", **kind, help=f"draw only these kinds (of: {' '.join(KINDS)})")
    parser.add_argument("--exclude-kinds", **kind, help="draw every kind but these")
    parser.add_argument("--feature-kinds", **kind, help="every scene holds at least one object of these kinds")
    args = parser.parse_args(argv)
    if args.out is None and args.preview is None:
        parser.error("give --out and/or --preview")
    try:
        kinds = select_kinds(args.kinds, args.exclude_kinds)
        select_featured(kinds, args.feature_kinds)
    except ValueError as e:  # nothing left to draw
        parser.error(str(e))

    if args.preview is not None:
        preview = render_preview(args.preview, seed=args.seed, image_size=args.image_size, kinds=kinds)
        print(f"preview: {preview}")
    if args.out is not None:
        t0 = time.perf_counter()
        out = build_dataset(
            args.out,
            args.train,
            args.val,
            args.test,
            seed=args.seed,
            image_size=args.image_size,
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            kinds=kinds,
            featured_kinds=args.feature_kinds,
        )
        n = args.train + args.val + args.test
        print(f"dataset: {out} ({n} samples, {len(kinds)} kinds) in {time.perf_counter() - t0:.1f} s")
