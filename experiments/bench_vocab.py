"""Closed-vocabulary scoring speed: a 1,000-entry vocabulary scored exactly per image, against brute force and
against open-set sampling, on random models of the default size and of medium size.

    python experiments/bench_vocab.py [--configs tiny medium] [--entries 1000] [--images 4] [--brute-names 100]
                                      [--threads 1]

Models, random weights: ``tiny``, the default model (``configs/model/nxtp_tiny.yaml`` with a tokenizer fitted to the
synthetic scenes, as ``make data`` makes it: ``experiments/bench_label.py``'s), and ``experiments/bench_train.py``'s
``medium`` (256 image tokens, a 6-block decoder of width 1024, LLaMA-2's tokenizer), both with labels that end
after a few tokens, as a trained model's do; images: ``experiments/random_model.py``'s photos. The vocabulary is
``--entries`` WordNet noun lemmas drawn with a fixed seed (from the packaged ``index.noun``: no download). Per
model it prints ms/image of

* ``exact``: ``vocabulary.score_candidates`` (prefix once per image, the names teacher-forced over its KV cache);
* ``brute``: brute force, one forward per name over the whole sequence image, prompt, name (the vision tower
  run once per image, to the baseline's advantage), timed on one image and the first ``--brute-names`` names and
  scaled to the whole vocabulary (its cost is linear in the names);
* ``brute x64``: the same with 64 names per forward (padded), the strongest plain baseline;
* ``open-set``: ``sampling.recognize`` with 10 branches;

then the ratios and the largest difference between exact and brute-force probabilities. ``--threads`` sets torch's
CPU threads (on a shared machine one thread gives steadier figures).

The gain over brute force is about (prefix + name tokens) / name tokens plus the per-forward overhead that brute
force pays once per name: large for a real prefix (``medium``: 256 image tokens), small for the default model,
whose prefix is 24 tokens while its caption-fitted tokenizer spells an unseen noun in about 10.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import nltk  # noqa: E402
import torch  # noqa: E402
from bench_label import default_model  # noqa: E402
from bench_train import build  # noqa: E402
from PIL import Image  # noqa: E402
from random_model import photos  # noqa: E402

from datamodules.labels import ensure_nltk_data  # noqa: E402
from lightning_modules.masking import prefix_attention  # noqa: E402
from lightning_modules.sampling import recognize  # noqa: E402
from lightning_modules.vocabulary import Vocabulary, score_candidates, tokenize  # noqa: E402


def wordnet_nouns(n: int, seed: int = 0) -> list[str]:
    """``n`` WordNet noun lemmas (spaces for underscores), drawn with a fixed seed."""
    root = str(ensure_nltk_data())  # the packaged copy, put on NLTK's search path
    index = nltk.data.find("corpora/wordnet/index.noun", paths=[root])
    lemmas = [
        line.split(" ", 1)[0].replace("_", " ")
        for line in index.open().read().decode().splitlines()
        if line and not line.startswith(" ")
    ]
    return random.Random(seed).sample([w for w in lemmas if w.replace(" ", "").isalpha()], n)


@torch.no_grad()
def brute_force(model, pixels, candidates: list[list[int]], per_forward: int) -> torch.Tensor:
    """P(candidate) [B, N] by running the whole sequence (image tokens, prompt, candidate) for every candidate,
    ``per_forward`` candidates per forward (right-padded; the causal mask keeps padding out of earlier rows)."""
    image = model.embed_images(pixels)
    head = model.sequences.prompt_ids(model.prompt)
    out = torch.empty(len(pixels), len(candidates), dtype=torch.float64)
    for b in range(len(pixels)):
        for start in range(0, len(candidates), per_forward):
            group = candidates[start : start + per_forward]
            width = max(len(c) for c in group) - 1
            text = torch.tensor([head + c[:-1] + [model.sequences.pad_id] * (width - len(c) + 1) for c in group])
            length = image.shape[1] + text.shape[1]
            mask = prefix_attention(image.shape[1], text.shape[1]).expand(len(group), -1, -1, -1)
            hidden = model.hidden_states(
                image[b : b + 1].expand(len(group), -1, -1), text, mask, torch.arange(length).expand(len(group), -1)
            )
            logp = model.logits(hidden[:, length - width - 1 :]).float().log_softmax(-1).double()
            for j, c in enumerate(group):
                out[b, start + j] = logp[j, torch.arange(len(c)), torch.tensor(c)].sum().exp()
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench(config: str, names: list[str], pixels_of, n_images: int, n_brute: int) -> None:
    if config == "tiny":
        model = default_model(None, Path(tempfile.mkdtemp(prefix="bench-vocab-tokenizer-")))
    else:
        torch.manual_seed(0)
        model = build(config, torch.device("cpu"))[0].eval()
        with torch.no_grad():  # labels that end after a few tokens, as in bench_label's default model
            model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 8
    pixels = pixels_of(model)[:n_images]
    seconds, candidates = timed(lambda: tokenize(model, Vocabulary.coerce(names)))
    tokens = sum(len(c) for c in candidates.ids)
    print(
        f"{config}: {sum(p.numel() for p in model.parameters()):,} parameters, {model.n_image_tokens} image tokens; "
        f"{len(names)} names -> {tokens} tokens (delimiters included), tokenized in {seconds * 1e3:.0f} ms"
    )
    score_candidates(model, pixels[:1], candidates.ids[:50])  # warm-up
    exact_s, exact = timed(lambda: score_candidates(model, pixels, candidates.ids))
    open_s, _ = timed(lambda: recognize(model, pixels, topk=10))
    subset = candidates.ids[:n_brute]
    brute_s, brute = timed(lambda: brute_force(model, pixels[:1], subset, 1))
    batched_s, _ = timed(lambda: brute_force(model, pixels[:1], subset, 64))
    scale = len(candidates.ids) / len(subset)
    ms = {
        "exact": exact_s / len(pixels),
        "open-set": open_s / len(pixels),
        "brute": brute_s * scale,
        "brute x64": batched_s * scale,
    }
    print("  ms/image: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in ms.items()))
    diff = (exact[:1, : len(subset)] - brute).abs().max().item()
    print(
        f"  brute/exact: {ms['brute'] / ms['exact']:.1f}x, brute x64/exact: {ms['brute x64'] / ms['exact']:.1f}x, "
        f"exact/open-set: {ms['exact'] / ms['open-set']:.2f}x; max |exact - brute| = {diff:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--images", type=int, default=4, help="images per batch for exact scoring and open-set")
    parser.add_argument("--brute-names", type=int, default=100, help="names brute force is timed on (it is slow)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = wordnet_nouns(args.entries)
    folder = Path(tempfile.mkdtemp(prefix="bench-vocab-"))
    photos(folder, args.images)

    def pixels_of(model) -> torch.Tensor:
        return torch.stack([model.eval_transform(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.jpg"))])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for config in args.configs:
        bench(config, names, pixels_of, args.images, args.brute_names)


if __name__ == "__main__":
    main()
