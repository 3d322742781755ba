"""``nxtp export``: write a checkpoint as safetensors (pickle-free) or ONNX (see ``lightning_modules.export``)."""

from __future__ import annotations

import argparse
import sys

from . import imported


def export_main(argv: list[str]) -> int:
    """``nxtp export --checkpoint CKPT --format safetensors|onnx --out DIR [--opset 17]``."""
    parser = argparse.ArgumentParser(prog="nxtp export", description="Export a model as safetensors or ONNX.")
    parser.add_argument("--checkpoint", required=True, help="a Lightning .ckpt or a save_pretrained folder")
    parser.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="let a .ckpt's pickle create any Python object, which can run code: only for files you "
        "trust (by default only what the project's own checkpoints contain is loaded)",
    )
    args = parser.parse_args(argv)
    from ..checkpoint_io import UntrustedCheckpointError
    from ..export import export

    imported()
    try:
        out = export(args.checkpoint, args.out, args.format, args.opset, trust=args.trust_checkpoint)
    except (UntrustedCheckpointError, ValueError) as e:  # an untrusted file, a decoder ONNX cannot hold
        print(f"nxtp export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} export to {out}")
    return 0
