"""Closed-vocabulary scoring speed: a 1,000-entry vocabulary scored exactly per image, against brute force and
against open-set sampling, on random models of the default size and of medium size.

    python experiments/bench_vocab.py [--configs tiny medium] [--entries 1000] [--images 4] [--brute-images 1]

Models: ``experiments/bench_train.py``'s ``tiny`` (``configs/model/nxtp_tiny.yaml``, the default model) and ``medium``
(256 image tokens, a 6-block decoder of width 1024, LLaMA-2's tokenizer), random weights, as
``experiments/random_model.py`` writes them; images: that script's photos. The vocabulary is ``--entries`` WordNet
noun lemmas drawn with a fixed seed (from the packaged ``index.noun``: no download). Per model it prints ms/image of

* ``exact``: ``vocabulary.score_vocabulary`` (prefix once per image, the names teacher-forced over its KV cache);
* ``brute``: brute force, one forward per name over the whole sequence image, prompt, name (the vision tower
  run once per image, to the baseline's advantage), on ``--brute-images`` images;
* ``brute x64``: the same with 64 names per forward (padded), the strongest plain baseline;
* ``open-set``: ``sampling.recognize`` with 10 branches;

then the ratios and the largest difference between exact and brute-force probabilities.
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
from bench_train import build  # noqa: E402
from PIL import Image  # noqa: E402
from random_model import photos  # noqa: E402

from datamodules.labels import nltk_data_dir  # noqa: E402
from lightning_modules.masking import prefix_attention  # noqa: E402
from lightning_modules.sampling import recognize  # noqa: E402
from lightning_modules.vocabulary import Vocabulary, score_candidates, tokenize  # noqa: E402


def wordnet_nouns(n: int, seed: int = 0) -> list[str]:
    """``n`` WordNet noun lemmas (spaces for underscores), drawn with a fixed seed."""
    index = nltk.data.find("corpora/wordnet/index.noun", paths=[str(nltk_data_dir())])
    lemmas = [line.split(" ", 1)[0].replace("_", " ") for line in index.open().read().decode().splitlines()
              if line and not line.startswith(" ")]
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
            hidden = model.hidden_states(image[b : b + 1].expand(len(group), -1, -1), text, mask,
                                         torch.arange(length).expand(len(group), -1))
            logp = model.logits(hidden[:, length - width - 1 :]).float().log_softmax(-1).double()
            for j, c in enumerate(group):
                out[b, start + j] = logp[j, torch.arange(len(c)), torch.tensor(c)].sum().exp()
    return out


def timed(fn, repeats: int = 1):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench(config: str, names: list[str], pixels_of, n_images: int, n_brute: int) -> None:
    torch.manual_seed(0)
    model, _, _ = build(config, torch.device("cpu"))
    model.eval()
    pixels = pixels_of(model)[:n_images]
    seconds, candidates = timed(lambda: tokenize(model, Vocabulary.coerce(names)))
    tokens = sum(len(c) for c in candidates.ids)
    print(f"{config}: {sum(p.numel() for p in model.parameters()):,} parameters, {model.n_image_tokens} image tokens; "
          f"{len(names)} names -> {tokens} tokens (delimiters included), tokenized in {seconds * 1e3:.0f} ms")
    score_candidates(model, pixels[:1], candidates.ids[:50])  # warm-up
    exact_s, exact = timed(lambda: score_candidates(model, pixels, candidates.ids), repeats=2)
    open_s, _ = timed(lambda: recognize(model, pixels, topk=10), repeats=2)
    brute_s, brute = timed(lambda: brute_force(model, pixels[:n_brute], candidates.ids, 1))
    batched_s, _ = timed(lambda: brute_force(model, pixels[:n_brute], candidates.ids, 64))
    ms = {"exact": exact_s / len(pixels), "open-set": open_s / len(pixels), "brute": brute_s / n_brute,
          "brute x64": batched_s / n_brute}
    print("  ms/image: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in ms.items()))
    diff = (exact[:n_brute] - brute).abs().max().item()
    print(f"  brute/exact: {ms['brute'] / ms['exact']:.1f}x, brute x64/exact: {ms['brute x64'] / ms['exact']:.1f}x, "
          f"exact/open-set: {ms['exact'] / ms['open-set']:.2f}x; max |exact - brute| = {diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--images", type=int, default=4, help="images per batch for exact scoring and open-set")
    parser.add_argument("--brute-images", type=int, default=1, help="images for brute force (it is slow)")
    args = parser.parse_args()
    names = wordnet_nouns(args.entries)
    folder = Path(tempfile.mkdtemp(prefix="bench-vocab-"))
    photos(folder, args.images)

    def pixels_of(model) -> torch.Tensor:
        return torch.stack([model.eval_transform(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.jpg"))])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for config in args.configs:
        bench(config, names, pixels_of, args.images, args.brute_images)


if __name__ == "__main__":
    main()
