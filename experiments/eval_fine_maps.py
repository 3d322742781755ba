"""Can a map finer than the patch grid point better? Pixel- and stem-level gradient maps against the scenes' boxes.

    python experiments/eval_fine_maps.py --checkpoint logs/default/version_0/checkpoints/last.ckpt \\
        --shards data/shapes/val/shard-000000.tar [--limit 160]

The default model sees 4x4 patches of 16 pixels, as large as the objects, and ``--locate`` points into an object of
the label's kind 85% of the time (README "What and where"). This asks whether the gradient of each true label's
log-probability below the patch grid, at the input pixels or at the conv stem's stages (every grid finer than the
4x4 patches), says where the object is within the patch:

* ``|grad|``, ``|grad x input|``, ``relu(grad x input)``: at the input pixels;
* ``grad x act stageK``: the gradient times the activation at the ReLU of stem stage K, summed over channels;
* ``gradcam stageK``: Grad-CAM there (channel weights: the mean gradient);

each as it is and multiplied by the coarse map (``attention_maps``' default, bicubically upsampled), smoothed by a
Gaussian of 0, 2 or 4 pixels; the point is the map's maximum. Every (image, true kind) pair costs a forward and a
backward pass of the whole model. Printed: the pointing rate of each, best first, beside the default rule
(``locate``'s point on the coarse map) on the same pairs.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_attention_maps import load_model, read_scenes  # noqa: E402

from datamodules.images import decode_image  # noqa: E402
from lightning_modules import attention_maps as am  # noqa: E402
from lightning_modules import locate as lc  # noqa: E402
from lightning_modules.sequence import collate_text  # noqa: E402

SIGMAS = (0, 2, 4)


def stem_activations(model) -> dict[str, torch.Tensor]:
    """Hooks on the conv stem's ReLUs that keep their outputs (with their gradients) while gradients are on."""
    kept: dict[str, torch.Tensor] = {}
    relus = [m for m in model.visual.conv1 if isinstance(m, torch.nn.ReLU)]
    if not relus:
        raise SystemExit("the checkpoint's vision tower has no conv stem (vision.conv_stem)")

    def keep(name: str):
        def hook(module, inputs, output):
            if output.requires_grad:
                output.retain_grad()
                kept[name] = output

        return hook

    for k, relu in enumerate(relus):
        relu.register_forward_hook(keep(f"stage{k + 1}"))
    return kept


def fine_maps(model, pixels: torch.Tensor, labels: list[list[str]], kept: dict) -> dict[str, np.ndarray]:
    """Every fine map [N, H, W] of the (image, label) pairs, in ``labels``' order."""
    index = [b for b, ls in enumerate(labels) for _ in ls]
    px = pixels[index].clone().requires_grad_(True)
    text = collate_text(
        [model.sequences(model.prompt, [label]) for ls in labels for label in ls], model.sequences.pad_id
    )
    with torch.enable_grad():
        loss, _ = model(px, text)  # eval mode: BatchNorm's running statistics, so the pairs do not mix
        (-loss).backward()  # the pairs' log-probabilities, up to one shared positive factor
    grad, size = px.grad, px.shape[-2:]
    gi = (grad * px).sum(1).detach()
    out = {"|grad|": grad.norm(dim=1), "|grad x input|": gi.abs(), "relu(grad x input)": gi.clamp(min=0)}
    for name, act in kept.items():
        weights = act.grad.mean((2, 3), keepdim=True)
        for kind, m in (("gradcam", (weights * act).sum(1)), ("grad x act", (act.grad * act).sum(1))):
            up = F.interpolate(m.clamp(min=0)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            out[f"{kind} {name} ({act.shape[-1]} px)"] = up
    model.zero_grad(set_to_none=True)
    kept.clear()
    return {k: v.detach().numpy() for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shards", nargs="+", required=True)
    parser.add_argument("--limit", type=int, default=160, help="at most this many images")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    model = load_model(args.checkpoint).eval()
    kept = stem_activations(model)
    scenes = list(itertools.islice(read_scenes(args.shards), args.limit))
    hits: dict[str, list[float]] = {}
    for start in range(0, len(scenes), args.batch_size):
        chunk = scenes[start : start + args.batch_size]
        images = [decode_image(jpg) for _, jpg, _ in chunk]
        labels = [meta["labels"] for _, _, meta in chunk]
        pixels = torch.stack([model.eval_transform(im) for im in images])
        coarse = am.maps(am.label_attention(model, pixels, labels, gradient=True), "gradient")
        up = F.interpolate(coarse[:, None], size=pixels.shape[-2:], mode="bicubic", align_corners=False)
        up = up[:, 0].clamp(min=0).numpy()
        fine = fine_maps(model, pixels, labels, kept)
        n = 0
        for (_, _, meta), image, kinds in zip(chunk, images, labels):
            geometry = lc.model_geometry(model, image.size)
            for kind in kinds:
                truth = [o["bbox"] for o in meta["objects"] if o["kind"] == kind]
                hits.setdefault("default rule (locate on the coarse map)", []).append(
                    float(lc.inside(lc.locate(coarse[n].numpy(), geometry).point, truth))
                )
                for name, maps in fine.items():
                    for sigma in SIGMAS:
                        smooth = ndimage.gaussian_filter(maps[n], sigma) if sigma else maps[n]
                        for suffix, m in (("", smooth), (" x coarse", smooth * up[n])):
                            y, x = np.unravel_index(np.argmax(m), m.shape)
                            point = geometry.to_original([x + 0.5, y + 0.5])
                            hits.setdefault(f"{name}, sigma {sigma}{suffix}", []).append(float(lc.inside(point, truth)))
                n += 1
    pairs = len(hits["default rule (locate on the coarse map)"])
    print(f"{len(scenes)} images, {pairs} (image, kind) pairs: pointing, best first\n")
    print("| map | pointing |\n|---|---|")
    for name, values in sorted(hits.items(), key=lambda kv: -np.mean(kv[1])):
        print(f"| {name} | {np.mean(values):.3f} |")


if __name__ == "__main__":
    main()
