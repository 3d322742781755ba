"""The Python API: name the objects in images.

    from lightning_modules import Recognizer
    recognizer = Recognizer.from_checkpoint("logs/default/version_0/checkpoints/last.ckpt")
    recognizer.label(["cat.jpg", pil_image], topk=10, min_prob=0.1)
    # [[("cat", 0.71), ("sofa", 0.12)], [...]]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .nxtp import NXTP
from .sampling import recognize

ImageInput = str | Path | Image.Image | Tensor


class Recognizer:
    """An ``NXTP`` model in eval mode with its preprocessing, for labelling images."""

    def __init__(self, model: NXTP, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", trust: bool = False,
                        **options) -> "Recognizer":
        """Load a Lightning ``.ckpt`` written by ``nxtp fit`` or a folder written by ``save_pretrained`` /
        ``nxtp import-official``; ``options`` go to ``Recognizer``.

        A ``.ckpt`` is read without running code from its pickle (see ``checkpoint_io.load_checkpoint``) unless
        ``trust`` is set; a folder holds safetensors and JSON only.
        """
        if Path(path).is_dir():
            return cls(NXTP.from_pretrained(path), device, **options)
        from .checkpoint_io import SAFE_GLOBALS, load_checkpoint
        from .lit_nxtp import TOKENIZER_KEY, LitNXTP

        checkpoint = load_checkpoint(path, trust=trust)
        overrides = {}
        if not Path(checkpoint["hyper_parameters"]["tokenizer"]).exists() and TOKENIZER_KEY in checkpoint:
            # moved to another machine or folder: use the copy of the tokenizer stored in the checkpoint
            folder = Path(tempfile.mkdtemp(prefix="nxtp-tokenizer-"))
            for name, data in checkpoint[TOKENIZER_KEY].items():
                (folder / name).write_bytes(data)
            overrides["tokenizer"] = str(folder)
        del checkpoint
        # Lightning reads the file again (its hyperparameter and version migrations are not public API),
        # under the same allow-list.
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            module = LitNXTP.load_from_checkpoint(path, map_location="cpu", weights_only=not trust,
                                                  semantic_metric=False, **overrides)
        return cls(module.model, device, **options)

    def preprocess(self, image: ImageInput) -> Tensor:
        """Pixels [3, H, W] for one image: a path, a PIL image, or an already preprocessed tensor."""
        if isinstance(image, Tensor):
            return image
        if isinstance(image, (str, Path)):
            with Image.open(image) as img:
                return self.model.eval_transform(img.convert("RGB"))
        return self.model.eval_transform(image.convert("RGB"))

    @torch.no_grad()
    def label(self, images: ImageInput | list[ImageInput], topk: int = 10, min_prob: float = 0.0,
              batch_size: int = 32) -> list[list[tuple[str, float]]]:
        """``(label, probability)`` pairs sorted by probability, one list per image."""
        if not isinstance(images, list):
            images = [images]
        results: list[list[tuple[str, float]]] = []
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([self.preprocess(x) for x in images[start : start + batch_size]]).to(self.device)
            results += recognize(self.model, pixels, topk=topk, min_prob=min_prob)
        return results
