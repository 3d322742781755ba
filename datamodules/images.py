"""The one image loader: training shards, evaluation, ``nxtp label`` and ``Recognizer`` read images through it,
so that a picture gives the model the same pixels whichever way it arrives and however it is stored.

* EXIF orientation is applied (a phone's portrait photo is stored sideways with a rotation tag);
* transparency is composited over white, 16-bit images are scaled to 8 bits, palette, CMYK, grayscale and
  other modes are converted to RGB (``to_rgb``);
* images of more than ``max_pixels`` pixels are refused from their header, before anything is decoded;
* every pixel is decoded, unless the caller asks for draft decoding (a model whose ``Preprocessing`` says
  ``decode: draft``): then a JPEG much larger than the vision tower's input is decoded at 1/2, 1/4 or 1/8 scale
  (``draft_size``), several times faster, with a slightly different model input (see ``DRAFT_FACTOR``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps

# The default of ``data.max_image_pixels``: PIL's own Image.MAX_IMAGE_PIXELS (about 9500 x 9500).
MAX_IMAGE_PIXELS = 89_478_485
# Draft decoding keeps the short side at least this many times the tower's input: the final (antialiased)
# resize still averages 2 or more decoded pixels per input pixel, so the JPEG's own downscaling changes the model
# input by less than one level of 255 on average (tests/test_images.py measures it; the README, what it does to labels).
DRAFT_FACTOR = 2
ORIENTATION = 0x0112  # the EXIF tag

ImageSource = str | Path | bytes | IO[bytes] | Image.Image


IMAGE_ERRORS = ("empty image", "image too large", "corrupt image")


class ImageError(ValueError):
    """An image that cannot be used.

    ``reason`` is one of ``IMAGE_ERRORS`` (what training counts its rejects by); the message adds what was found.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """A decoded image of any mode as RGB (an RGB image is returned as it is).

    Transparent parts become white (dropping the alpha channel would leave whatever colour hides under it, often
    black), and 16-bit images are scaled to 8 bits (PIL's own conversion clips them, which turns them white).
    """
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        image = image.convert("I").point(lambda v: v / 256)
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, "white")
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag says; the image itself where it needs no turn (where
    ``ImageOps.exif_transpose`` copies it: tens of milliseconds on a photo)."""
    return ImageOps.exif_transpose(image) if image.getexif().get(ORIENTATION, 1) != 1 else image


def draft_size(size: tuple[int, int], input_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """The size to pass to ``Image.draft`` for an image of ``size`` (width, height) that will be resized to the
    tower's ``input_size``, or None where decoding at full size is needed (no input size, or the image is less
    than ``2 * DRAFT_FACTOR`` times the input on its short side, so that no 1/2-scale decode would be enough).

    The request is a square of ``DRAFT_FACTOR`` times the input's short side: ``draft`` picks the strongest
    reduction (1/2, 1/4, 1/8) that keeps both sides at or above it, so the image's short side decides.
    """
    if input_size is None:
        return None
    side = DRAFT_FACTOR * (min(input_size) if isinstance(input_size, (tuple, list)) else input_size)
    return (side, side) if min(size) >= 2 * side else None


def decode_image(
    source: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS, input_size: int | tuple[int, int] | None = None
) -> Image.Image:
    """Read an image (bytes, a path, a binary file or a PIL image) into upright RGB.

    Args:
        source: encoded bytes, a file path or object, or an already opened PIL image (then only orientation and
            mode are handled: it is in memory already).
        max_pixels: refuse images with more pixels (width x height, from the header) before decoding them.
        input_size: draft decoding, for a vision tower of this input size: a JPEG at least ``2 * DRAFT_FACTOR``
            times larger on its short side is decoded at reduced scale (``draft_size``). None (the reference's
            preprocessing) decodes every pixel.

    Raises:
        ImageError: ``empty image``, ``image too large`` (naming the size and the limit) or ``corrupt image``.
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty image")
        source = io.BytesIO(source)
    try:
        image = Image.open(source)  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own guard, at twice Image.MAX_IMAGE_PIXELS
        raise ImageError("image too large", str(e)) from e
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:
        raise ImageError("corrupt image", f"{type(e).__name__}: {e}") from e
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                "image too large",
                f"{width}x{height} = {width * height} pixels, more than max_image_pixels={max_pixels}",
            )
        size = draft_size(image.size, input_size)
        if size is not None:  # JPEG (and phones' MPO) only, a no-op for other formats
            image.draft("RGB", size)  # the mode stays as stored (RGB, L, CMYK): only the scale changes
        try:
            image.load()
            # After decoding: the orientation tag may sit in EXIF that follows the image data.
            return to_rgb(upright(image))
        except Exception as e:  # truncated or corrupt data shows only while decoding
            raise ImageError("corrupt image", f"{type(e).__name__}: {e}") from e
