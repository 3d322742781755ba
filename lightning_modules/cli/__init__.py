"""The ``nxtp`` command: LightningCLI subcommands (fit, validate, test, predict), ``label``, ``export``, ``sweep``,
``import-official``.

    nxtp fit --config configs/experiment/default.yaml
    nxtp label --checkpoint CKPT.ckpt images/ photo.jpg 'more/*.png' --format csv --output labels.csv
    nxtp export --checkpoint CKPT.ckpt --format onnx --out DIR
    nxtp sweep configs/sweep/decoder_depth.yaml [--launcher slurm]
    nxtp import-official --checkpoint ckpt_epoch_03_iter_0021360.pth --clip openai --tokenizer TOKENIZER --out DIR
"""

from __future__ import annotations

import sys


def main() -> None:
    """Entry point of the ``nxtp`` console script."""
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "label":
        from .label import label_main

        sys.exit(label_main(sys.argv[2:]))
    if command == "export":
        from ..export import export_main

        sys.exit(export_main(sys.argv[2:]))
    if command == "sweep":
        from ..sweep import sweep_main

        sys.exit(sweep_main(sys.argv[2:]))
    if command == "import-official":
        from ..official import import_main

        sys.exit(import_main(sys.argv[2:]))
    from .train import lightning_main

    lightning_main()
