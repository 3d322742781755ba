"""``nxtp import-official``: convert a released NXTP checkpoint (.pth) into a model folder (see
``lightning_modules.official``)."""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path

from . import imported


def summary() -> str:
    """The first paragraph of ``official``'s docstring, read from its source: importing it would import torch."""
    source = Path(importlib.util.find_spec("..official", __package__).origin).read_text()
    return ast.get_docstring(ast.parse(source)).split("\n\n")[0]


def import_main(argv: list[str]) -> int:
    """``nxtp import-official``."""
    parser = argparse.ArgumentParser(prog="nxtp import-official", description=summary())
    parser.add_argument("--checkpoint", required=True, help="official ckpt_epoch_03_iter_*.pth")
    parser.add_argument(
        "--clip",
        default="openai",
        help="'openai' (downloaded by open_clip), or an OpenAI CLIP "
        "file: OpenAI's TorchScript archive (ViT-L-14.pt) or a state dict with OpenAI's key names",
    )
    parser.add_argument("--tokenizer", required=True, help="LLaMA-2 tokenizer name or folder")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors, config.yaml, tokenizer/)")
    parser.add_argument("--vision-heads", type=int, default=None, help="default: width / 64")
    parser.add_argument("--decoder-heads", type=int, default=None, help="default: dim / 128")
    parser.add_argument("--decoder-norm-eps", type=float, default=1e-5)
    parser.add_argument("--reference-compat", action="store_true", help="reproduce the reference's quirks")
    args = parser.parse_args(argv)
    from ..official import import_official

    imported()
    import_official(
        args.checkpoint,
        args.clip,
        args.tokenizer,
        args.out,
        args.vision_heads,
        args.decoder_heads,
        args.decoder_norm_eps,
        args.reference_compat,
    )
    print(f"wrote {Path(args.out).resolve()}")
    return 0
