"""Training throughput: one full step (forward, backward, AdamW step) per attention path.

    python experiments/bench_train.py [--configs tiny medium paper] [--steps 7] [--warmup 2] [--compile]

Configs:

* ``tiny``: ``configs/model/nxtp_tiny.yaml`` (its tokenizer from ``make data``, else the LLaMA-2 test tokenizer);
* ``medium``: 256 image tokens from a 4-block ViT (the first 2 blocks frozen), a LLaMA-type decoder of width 1024
  with 6 blocks, 10 labels per image, batch 4: runs in a few minutes on a small CPU;
* ``paper``: ``configs/model/nxtp_paper.yaml`` (ViT-L/14 + the first 6 blocks of LLaMA-2-7B, the paper's trainable
  parts) with random weights built from the architecture (nothing is downloaded), batch 16; GPU only.

On a GPU every step runs under bf16 autocast (as ``trainer.precision: bf16-mixed``); on the CPU in float32.

Each config is timed with every attention path of ``NXTP`` that can train on the device (``dense``: the full
boolean mask, the reference; ``compact``; ``flex`` on a GPU) and with a plain causal step over the same sequence
length (SDPA's ``is_causal``, the same loss rows): the baseline of the target "label-masked step at most 1.2x the
causal step". The paths take turns step by step, so that a change in machine load hits them alike, and each
reports the median of ``--steps`` timed steps after ``--warmup`` untimed ones. ``fast`` is the quickest path
other than ``dense``.

FLOPs per image are counted from the model and the batch's shapes: every weight matrix costs 2 FLOPs per
parameter and token forward (tokens: 257 per image for ViT-L/14, the padded sequence length for the decoder, the
loss rows only for the output layer), and 2 more each for the input gradient (needed when anything upstream trains)
and the weight gradient (when the weights train): 6 x parameters x tokens for a trained block, 2 x for a frozen
block with nothing trainable before it (forward only). Attention adds 4 x S^2 x width FLOPs per block forward
(scores and weighted sum over the full S x S matrix, for every path, so that all paths are credited the same work)
and twice that backward. On a GPU the achieved TFLOP/s is compared with the card's dense bf16 peak (MFU).

The last lines are machine-readable: ``speedup <config> dense/fast: 1.23x``, ``fast/causal <config>: 1.05x`` and
``label-masked/causal <config>: 1.05x``, the last for the path ``attention: auto`` trains with on this device
(``flex`` on a GPU, ``dense`` on the CPU, where the three paths measure within a few percent of each other).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from lightning_modules.decoder import DecoderConfig  # noqa: E402
from lightning_modules.lit_nxtp import LitNXTP  # noqa: E402
from lightning_modules.nxtp import NXTP, flex_available  # noqa: E402
from lightning_modules.sequence import collate_text, loss_targets, segment_ids  # noqa: E402
from lightning_modules.vision import VisionConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEST_TOKENIZER = ROOT / "tests/fixtures/llama2-tokenizer"
# LLaMA-2-7B's architecture (its config.json), for random weights without a download.
LLAMA2_7B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    rms_norm_eps=1e-5,
    vocab_size=32000,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
MEDIUM_VIT = {
    "embed_dim": 384,
    "vision_cfg": {"image_size": 128, "layers": 4, "width": 384, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 4, "vocab_size": 8, "width": 32, "heads": 1, "layers": 1},
}
MEDIUM_DECODER = dict(
    model_type="llama",
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=6,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=1024,
)
LABELS = [
    "dog",
    "cat",
    "frisbee",
    "grass",
    "traffic light",
    "bus",
    "person",
    "umbrella",
    "bicycle",
    "tree",
    "red circle",
    "blue square",
    "kite",
    "sky",
    "boat",
    "water",
    "table",
    "cup",
    "pizza",
    "window",
]
# Dense bf16 tensor-core peak in TFLOP/s, by a part of the device name (first match wins).
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989), ("A100", 312)]


def build(name: str, device: torch.device) -> tuple[NXTP, int, int]:
    """The model of a config on ``device`` with its trainable parts set, its batch size and labels per image."""
    if name == "tiny":
        cfg = yaml.safe_load((ROOT / "configs/model/nxtp_tiny.yaml").read_text())
        tokenizer = ROOT / cfg["nxtp"]["tokenizer"]
        cfg["nxtp"]["tokenizer"] = str(tokenizer if tokenizer.exists() else TEST_TOKENIZER)
        batch, labels = 64, 4
    elif name == "medium":
        cfg = dict(
            nxtp=dict(
                vision=VisionConfig(model_name="bench-medium-vit", config=MEDIUM_VIT),
                decoder=DecoderConfig(config=MEDIUM_DECODER),
                tokenizer=str(TEST_TOKENIZER),
            ),
            optimization=dict(
                trainable=["visual.transformer.resblocks.[23].*", "visual.ln_post.*", "projection.*", "decoder.*"]
            ),
        )
        batch, labels = 4, 10
    elif name == "paper":
        cfg = yaml.safe_load((ROOT / "configs/model/nxtp_paper.yaml").read_text())
        nxtp = cfg["nxtp"]
        nxtp["vision"] = VisionConfig(model_name=nxtp["vision"]["model_name"])  # the architecture, no download
        nxtp["decoder"] = DecoderConfig(config=LLAMA2_7B, num_blocks=nxtp["decoder"]["num_blocks"])
        nxtp["tokenizer"] = str(TEST_TOKENIZER)  # LLaMA-2's tokenizer
        batch, labels = 16, 10
    else:
        raise ValueError(f"unknown config {name!r}")
    cfg["evaluation"] = {"semantic_metric": False}
    with device:  # random init straight on the device: the paper model is 7 GB in float32
        model = LitNXTP.from_config(cfg).model
    return model.train(), batch, labels


def image_size(model: NXTP) -> int:
    size = model.visual.image_size
    return size if isinstance(size, int) else size[0]


def make_batch(model: NXTP, batch: int, n_labels: int, device: torch.device, seed: int = 0):
    """Random pixels and ``n_labels`` distinct labels per image (different images, different lengths)."""
    rng = random.Random(seed)
    size = image_size(model)
    pixels = torch.randn(batch, 3, size, size, device=device)
    seqs = [model.sequences(model.prompt, rng.sample(LABELS, n_labels)) for _ in range(batch)]
    return pixels, collate_text(seqs, model.sequences.pad_id).to(device)


def causal_loss(model: NXTP, pixels: torch.Tensor, text) -> torch.Tensor:
    """The training loss with plain causal attention instead of the label mask: the baseline's cost, same rows."""
    text = model.pad(text)
    seg = segment_ids(text, model.n_image_tokens, model.reference_compat)
    # Plain positions: label-reset positions would read as packed sequences to transformers' mask builder.
    positions = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    hidden = model.hidden_states(model.embed_images(pixels), text.ids, None, positions)
    rows, targets = loss_targets(text, seg, model.n_image_tokens, model.reference_compat)
    keep = targets >= 0
    batch_index = torch.arange(len(rows), device=rows.device)[:, None].expand_as(rows)
    return F.cross_entropy(model.logits(hidden[batch_index[keep], rows[keep]]).float(), targets[keep])


def step_flops(model: NXTP, batch: int, seq_len: int, loss_rows: int) -> float:
    """FLOPs of one training step (see the module docstring)."""

    def trains(module: torch.nn.Module) -> bool:
        return any(p.requires_grad for p in module.parameters())

    visual, decoder = model.visual, model.decoder.get_decoder()
    n_vis = model.n_image_tokens + 1  # CLS
    total, upstream = 0.0, False

    def add(module: torch.nn.Module, matmul_flops: float, tokens: float = 0, attn_width: int = 0) -> None:
        nonlocal total, upstream
        own = trains(module)
        total += matmul_flops * (1 + upstream + own)  # forward, input gradient, weight gradient
        total += 4 * tokens**2 * attn_width * (1 + 2 * (upstream or own))
        upstream = upstream or own

    def matrices(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.ndim >= 2)

    add(visual.conv1, stem_flops(model))
    for block in visual.transformer.resblocks:
        add(block, 2 * matrices(block) * n_vis, n_vis, visual.ln_post.normalized_shape[0])
    add(visual.ln_post, 0)
    add(model.projection, 2 * matrices(model.projection) * model.n_image_tokens)
    upstream = upstream or trains(model.decoder.get_input_embeddings())  # the <|image|> row trains in the paper
    for block in decoder.layers:
        add(block, 2 * matrices(block) * seq_len, seq_len, model.decoder.config.hidden_size)
    head = model.decoder.get_output_embeddings()
    add(head, 2 * matrices(head) * loss_rows / batch)
    return total * batch


def stem_flops(model: NXTP) -> float:
    """Forward FLOPs per image of the convolutions before the transformer, from their output sizes."""
    flops = []
    hooks = [
        m.register_forward_hook(lambda m, i, out: flops.append(2 * m.weight.numel() * out.shape[-2] * out.shape[-1]))
        for m in model.visual.conv1.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    size = image_size(model)
    param = (
        model.visual.conv1.weight if hasattr(model.visual.conv1, "weight") else next(model.visual.conv1.parameters())
    )
    with torch.no_grad():
        model.visual.conv1.eval()(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
    model.visual.conv1.train()
    for hook in hooks:
        hook.remove()
    return float(sum(flops))


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_TFLOPS if part in name), None)


def bench(name: str, device: torch.device, steps: int, warmup: int, compile: bool) -> dict[str, float]:
    """Time every path on one config; print a table and return the step time of each path."""
    model, batch, n_labels = build(name, device)
    if compile:
        for block in model.decoder.get_decoder().layers:
            block.compile()
    pixels, text = make_batch(model, batch, n_labels, device)
    seq_len = model.n_image_tokens + model.pad(text).ids.shape[1]
    rows = int((loss_targets(text, segment_ids(text, model.n_image_tokens), model.n_image_tokens)[1] >= 0).sum())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    paths = ["dense", "compact"] + (["flex"] if flex_available(device) else []) + ["causal"]
    # GPU steps run as ``trainer.precision: bf16-mixed`` does; CPU steps in float32 (bf16 is slow on most CPUs).
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(path: str) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        with amp:
            if path == "causal":
                loss = causal_loss(model, pixels, text)
            else:
                model.attention = path
                loss, _ = model(pixels, text)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    for _ in range(warmup):
        for path in paths:
            step(path)
    times: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(steps):  # the paths take turns, so that load changes hit them alike
        for path in paths:
            times[path].append(step(path))
    median = {p: statistics.median(t) for p, t in times.items()}

    flops = step_flops(model, batch, seq_len, rows)
    peak = peak_tflops(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\n== {name}: {n_params / 1e6:.1f}M parameters ({sum(p.numel() for p in params) / 1e6:.1f}M trainable), "
        f"batch {batch}, {n_labels} labels/image, sequence {seq_len} ({model.n_image_tokens} image), "
        f"{rows} loss tokens, {flops / batch / 1e9:.1f} GFLOP/image, {device}"
    )
    print(
        f"{'path':8s} {'step ms':>9s} {'spread':>7s} {'images/s':>9s} {'tokens/s':>9s} {'loss tok/s':>10s} "
        f"{'TFLOP/s':>8s}" + (f" {'MFU':>6s}" if peak else "")
    )
    for path in paths:
        t = median[path]
        spread = (max(times[path]) - min(times[path])) / t
        line = (
            f"{path:8s} {t * 1e3:9.1f} {spread:6.0%} {batch / t:9.1f} {batch * seq_len / t:9.0f} {rows / t:10.0f} "
            f"{flops / t / 1e12:8.3f}"
        )
        print(line + (f" {flops / t / 1e12 / peak:6.1%}" if peak else ""))
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=None, help="tiny, medium, paper (default: all that can run)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per path (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per path first")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder blocks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = args.configs or ["tiny", "medium"] + (["paper"] if device.type == "cuda" else [])
    if "paper" in configs and device.type != "cuda":
        print("paper: skipped, it needs a GPU")
        configs = [c for c in configs if c != "paper"]
    torch.manual_seed(args.seed)
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    results = {name: bench(name, device, args.steps, args.warmup, args.compile) for name in configs}
    print()
    auto = "flex" if flex_available(device) else "dense"  # what ``attention: auto`` trains with here
    for name, median in results.items():
        fast = min((p for p in median if p not in ("dense", "causal")), key=median.get)
        print(f"fast path {name}: {fast}; auto path: {auto}")
        print(f"speedup {name} dense/fast: {median['dense'] / median[fast]:.2f}x")
        print(f"fast/causal {name}: {median[fast] / median['causal']:.2f}x")
        print(f"label-masked/causal {name}: {median[auto] / median['causal']:.2f}x")


if __name__ == "__main__":
    main()
