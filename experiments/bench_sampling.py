"""One-shot sampling speed: the reference's recompute-everything decoding vs the KV-cached sampler.

    python experiments/bench_sampling.py [--device cpu] [--batch 4] [--configs tiny medium] [--bf16]
    python experiments/bench_sampling.py --device cuda --configs paper --bf16   # the 1.78B model, random weights

Same random model, same images, same top-k, in one run. The recompute baseline (``sampling.decode_recompute``)
decodes as the reference does: every step runs the decoder over the whole sequence (image + prompt + tokens so
far) of every unfinished branch. Both run the same decoding loop (``sampling.one_shot``) until every branch has
ended or the step limit, so the ratio is the KV cache's; both produce the same labels (checked).
Beside them, the paper's baselines on the same images: greedy search and beam search (``--beams``) generating the
label list as text (``sampling.generate_labels``, up to 64 new tokens), in ms/image, and the labels per image each
sampler gives (one-shot: distinct by construction; greedy and beam: after merging their repeats).
The last line reads ``speedup medium top-10: N.NNx``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_modules.decoder import DecoderConfig
from lightning_modules.nxtp import NXTP, NXTPConfig
from lightning_modules.sampling import decode_branches, decode_recompute, generate_labels, recognize
from lightning_modules.vision import VisionConfig

TOKENIZER = Path(__file__).parents[1] / "tests" / "fixtures" / "llama2-tokenizer"

CONFIGS = {
    # the default experiment's size: 16 image tokens, decoder 128 x 1 block
    "tiny": (
        VisionConfig(model_name="nxtp-tiny-vit", conv_stem=True),
        dict(hidden_size=128, intermediate_size=384, num_hidden_layers=1, num_attention_heads=4),
    ),
    # 257 image tokens (16 x 16 patches + CLS), decoder 1024 x 6 blocks
    "medium": (
        VisionConfig(
            model_name="bench-medium-vit",
            config={
                "embed_dim": 256,
                "quick_gelu": True,
                "vision_cfg": {"image_size": 224, "patch_size": 14, "width": 256, "layers": 2, "head_width": 64},
                "text_cfg": {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1},
            },
        ),
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16),
    ),
}


def timed(fn, repeats: int, warmup: bool = True) -> tuple[float, object]:
    if warmup:
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    return (time.perf_counter() - start) / repeats, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=[*CONFIGS, "paper"])
    parser.add_argument("--bf16", action="store_true", help="decode under bf16 autocast (as --precision bf16)")
    parser.add_argument("--beams", type=int, default=3, help="beams of the beam-search baseline")
    args = parser.parse_args()
    torch.manual_seed(0)
    ratios = {}
    for name in args.configs:
        if name == "paper":  # ViT-L/14 + 6 blocks of LLaMA-2-7B, built as the training benchmark builds it
            from bench_train import LLAMA2_7B, build

            model, decoder = build(name, torch.device(args.device))[0].eval(), {**LLAMA2_7B, "num_hidden_layers": 6}
        else:
            vision, decoder = CONFIGS[name]
            model = (
                NXTP(
                    NXTPConfig(
                        vision,
                        DecoderConfig(config={**decoder, "num_key_value_heads": decoder["num_attention_heads"]}),
                        str(TOKENIZER),
                    )
                )
                .to(args.device)
                .eval()
            )
        with torch.no_grad():  # labels of varied length, ended by the delimiter, as in a trained model
            model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 3
        size = model.visual.image_size[0]
        pixels = torch.randn(args.batch, 3, size, size, device=args.device)
        amp = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)
        with amp:  # the recompute baseline is long enough that one-off start-up costs do not matter
            slow, ref = timed(lambda m=model, x=pixels: decode_recompute(m, x, args.topk), 1, warmup=False)
            fast, got = timed(lambda m=model, x=pixels: decode_branches(m, x, args.topk), args.repeats)
            with torch.no_grad():
                one_shot = recognize(model, pixels, args.topk)
                greedy_s, greedy = timed(lambda m=model, x=pixels: generate_labels(m, x, 1), args.repeats)
                beam_s, beam = timed(lambda m=model, x=pixels: generate_labels(m, x, args.beams), args.repeats)
        same = all(a.tokens == b.tokens for x, y in zip(ref, got) for a, b in zip(x, y))
        ratios[name] = slow / fast
        print(
            f"{name}: {model.n_image_tokens} image tokens, decoder {decoder['hidden_size']} x "
            f"{decoder['num_hidden_layers']}, batch {args.batch}, top-{args.topk}, {args.device}: "
            f"recompute {1000 * slow / args.batch:.1f} ms/image, cached {1000 * fast / args.batch:.1f} ms/image, "
            f"same labels: {same}"
        )

        def per_image(found: list) -> float:
            return sum(len(x) for x in found) / len(found)

        print(
            f"{name}: one-shot {1000 * fast / args.batch:.1f} ms/image ({per_image(one_shot):.1f} labels), greedy "
            f"{1000 * greedy_s / args.batch:.1f} ms/image ({per_image(greedy):.1f} labels), beam x{args.beams} "
            f"{1000 * beam_s / args.batch:.1f} ms/image ({per_image(beam):.1f} labels)"
        )
    for name, ratio in ratios.items():
        print(f"speedup {name} top-{args.topk}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
