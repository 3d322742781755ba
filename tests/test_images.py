"""The one image loader: every odd way of storing a picture gives the pixels of the same picture stored plainly,
huge images are refused from their header, and draft decoding of large JPEGs keeps the model input."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import run_with_imports, tiny_nxtp
from PIL import Image, ImageDraw
from torchvision import transforms as T

from datamodules.images import DRAFT_FACTOR, ImageError, decode_image, draft_size
from lightning_modules import Recognizer

ORIENTATION = 0x0112  # the EXIF tag


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like content: smooth colour gradients, sensor-like noise and sharp-edged shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    a = np.stack(
        [
            120 + 100 * np.sin(3 * x + rng.uniform(0, 6)),
            120 + 100 * np.cos(2 * y + rng.uniform(0, 6)),
            128 + 80 * np.sin(4 * (x + y)),
        ],
        -1,
    ) + rng.normal(0, 12, (height, width, 3))
    image = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x0, y0, side = rng.integers(0, width), rng.integers(0, height), rng.integers(width // 30, width // 5)
        box = [x0, y0, x0 + side, y0 + side * rng.uniform(0.5, 1.5)]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# The EXIF definition of each orientation (where the stored image's row 0 and column 0 appear when displayed),
# written as numpy on [H, W, C] arrays; ``.swapaxes(0, 1)`` is the transpose.
UPRIGHT = {
    1: lambda s: s,  # row 0 top, column 0 left
    2: lambda s: s[:, ::-1],  # row 0 top, column 0 right
    3: lambda s: s[::-1, ::-1],  # row 0 bottom, column 0 right
    4: lambda s: s[::-1],  # row 0 bottom, column 0 left
    5: lambda s: s.swapaxes(0, 1),  # row 0 left, column 0 top
    6: lambda s: s.swapaxes(0, 1)[:, ::-1],  # row 0 right, column 0 top (a phone held upright)
    7: lambda s: s.swapaxes(0, 1)[::-1, ::-1],  # row 0 right, column 0 bottom
    8: lambda s: s.swapaxes(0, 1)[::-1],  # row 0 left, column 0 bottom
}


def with_orientation(stored: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(stored, fmt, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    stored = photo(60, 40, seed=orientation)  # not square: a missed rotation changes the size too
    # Lossless: the upright picture itself is the twin.
    want = UPRIGHT[orientation](pixels(stored))
    assert np.array_equal(pixels(decode_image(with_orientation(stored, "PNG", orientation))), want)
    # Lossy: the twin is the same JPEG decoded as stored (without its orientation), then turned upright.
    jpeg = with_orientation(stored, "JPEG", orientation)
    want = UPRIGHT[orientation](pixels(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    assert np.array_equal(pixels(decode_image(jpeg)), want)


def odd_twins() -> dict[str, tuple[bytes, np.ndarray, int]]:
    """Odd encodings of pictures and the RGB pixels of their plain twin (computed here, from the definition of
    each mode), with the largest difference allowed in 8-bit levels."""
    rng = np.random.default_rng(0)
    rgb = pixels(photo(48, 32))
    gray = rng.integers(0, 256, (32, 48))
    as_rgb = lambda g: np.repeat(g[..., None], 3, -1)  # noqa: E731

    # Transparency over white: a cut-out (alpha 0 or 255) is exact; partial alpha may round either way.
    alpha = np.where(rng.random((32, 48)) < 0.5, 0, 255)
    partial = rng.integers(0, 256, (32, 48))
    hidden = rgb.copy()
    hidden[alpha == 0] = 0  # what hides under transparent pixels (often black): must not show
    over_white = lambda a: np.rint(rgb * a[..., None] / 255 + 255 * (1 - a[..., None] / 255))  # noqa: E731

    palette = rng.integers(0, 256, (16, 3))
    index = rng.integers(0, 16, (32, 48))
    indexed = Image.fromarray(index.astype(np.uint8), "P")
    indexed.putpalette(palette.astype(np.uint8).flatten().tolist())
    transparent_index = indexed.copy()
    transparent_index.info["transparency"] = 3
    keyed = palette[index]
    keyed[index == 3] = 255

    cmy = rng.integers(0, 256, (32, 48, 3))
    k = rng.integers(0, 256, (32, 48, 1))
    cmyk = Image.fromarray(np.concatenate([cmy, k], -1).astype(np.uint8), "CMYK")

    return {
        "rgba cut-out png": (
            encode(Image.fromarray(np.dstack([hidden, alpha]).astype(np.uint8), "RGBA"), "PNG"),
            over_white(alpha),
            0,
        ),
        "rgba partial png": (
            encode(Image.fromarray(np.dstack([rgb, partial]).astype(np.uint8), "RGBA"), "PNG"),
            over_white(partial),
            1,
        ),
        "gray+alpha png": (
            encode(Image.fromarray(np.dstack([gray, alpha]).astype(np.uint8), "LA"), "PNG"),
            np.where(alpha[..., None] == 0, 255, as_rgb(gray)),
            0,
        ),
        "16-bit gray png": (encode(Image.fromarray((gray * 257).astype(np.uint16)), "PNG"), as_rgb(gray), 0),
        "16-bit gray tiff": (encode(Image.fromarray((gray * 256 + 200).astype(np.uint16)), "TIFF"), as_rgb(gray), 0),
        "palette png": (encode(indexed, "PNG"), palette[index], 0),
        "palette gif": (encode(indexed, "GIF"), palette[index], 0),
        "palette with transparent index": (encode(transparent_index, "PNG"), keyed, 0),
        # CMYK ink to light: each channel (255 - ink) scaled by (255 - black) / 255; PIL rounds either way.
        "cmyk tiff": (encode(cmyk, "TIFF"), np.rint((255 - cmy) * (255 - k) / 255), 1),
        "grayscale png": (encode(Image.fromarray(gray.astype(np.uint8), "L"), "PNG"), as_rgb(gray), 0),
        "bilevel png": (encode(Image.fromarray(gray > 127), "PNG"), as_rgb(np.where(gray > 127, 255, 0)), 0),
    }


@pytest.mark.parametrize("name", list(odd_twins()))
def test_odd_images_give_the_pixels_of_their_plain_twin(name):
    data, want, tolerance = odd_twins()[name]
    got = pixels(decode_image(data))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tolerance


def bomb_png(side: int) -> bytes:
    """A valid PNG header that claims side x side pixels, with far too little data: decoding it would fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_huge_images_are_refused_from_their_header_naming_the_size(tmp_path):
    too_large = "image too large: 9000x9000 = 81000000 pixels, more than max_image_pixels=1000000"
    with pytest.raises(ImageError, match=too_large):
        decode_image(bomb_png(9000), max_pixels=1_000_000)  # refused, not decoded: decoding would fail as corrupt
    with pytest.raises(ImageError, match="corrupt image"):
        decode_image(bomb_png(9000))  # within the default limit: decoded, and the missing data shows
    with pytest.raises(ImageError, match="image too large"):  # beyond PIL's own guard
        decode_image(bomb_png(20000))
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(9000))
    recognizer = Recognizer(tiny_nxtp(), max_image_pixels=1_000_000)  # the same guard at inference
    with pytest.raises(ImageError, match="9000x9000"):
        recognizer.label(path)


def model_input(image: Image.Image, size: int) -> torch.Tensor:
    """What open_clip's eval transform makes of an image, before normalisation, in 8-bit levels."""
    transform = T.Compose(
        [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.PILToTensor()]
    )
    return transform(image).float()


def test_draft_decodes_only_what_the_final_resize_needs():
    for short in range(100, 3000, 37):  # over image sizes, for a 64-pixel and a 224-pixel tower
        jpeg = encode(Image.new("L", (short + 300, short), 128), "JPEG")
        for side in (64, (224, 224)):
            target = DRAFT_FACTOR * (side if isinstance(side, int) else min(side))
            request = draft_size((short + 300, short), side)
            if short < 2 * target:
                assert request is None  # not even a 1/2-scale decode would keep DRAFT_FACTOR x the input
                continue
            with Image.open(io.BytesIO(jpeg)) as image:
                image.draft("RGB", request)  # reads the header only: the decoded size, without decoding
                decoded = min(image.size)
            assert target <= decoded <= -(-short // 2)  # at least 1/2 scale, never below DRAFT_FACTOR x the input
            assert decoded < 2 * target or decoded == -(-short // 8)  # and no larger than needed, down to 1/8
    stored = photo(1500, 1000)
    decoded = decode_image(with_orientation(stored, "JPEG", 6), input_size=64)
    assert decoded.size == (250, 375)  # 1/4 scale (1/8 would leave 125 < 2 x 64 rows), and upright
    assert decode_image(encode(stored, "PNG"), input_size=64).size == (1500, 1000)  # only JPEG has a draft mode


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("size", [64, 224])
def test_draft_decoding_keeps_the_model_input(size, progressive):
    jpeg = encode(photo(2400, 1800, seed=size), "JPEG", quality=90, progressive=progressive)
    full, draft = decode_image(jpeg), decode_image(jpeg, input_size=size)
    assert min(draft.size) < min(full.size) // 2  # it was draft-decoded
    diff = (model_input(full, size) - model_input(draft, size)).abs()
    # Both paths low-pass the same picture (libjpeg's scaled IDCT, then the antialiased bicubic resize, against
    # the resize alone), so they differ by rounding in smooth areas and by a few levels at sharp edges only:
    # measured mean 0.1-0.5 and 99th percentile 1-3 levels of 255, against 12 levels of noise in the picture.
    assert diff.mean() < 1.0 and diff.flatten().quantile(0.99) <= 4


@pytest.fixture(scope="module")
def label_setup(tmp_path_factory):
    """A tiny random model, and a folder of odd photos, each with its plain twin next to it (as PNG)."""
    root = tmp_path_factory.mktemp("odd")
    model = tiny_nxtp(seed=5)
    with torch.no_grad():  # labels that end, as in a trained model
        model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 4
    model.save_pretrained(root / "model")
    images, twins = root / "odd", root / "plain"
    images.mkdir()
    twins.mkdir()

    stored = photo(150, 200, seed=1)  # a phone photo: stored sideways, with the orientation tag
    jpeg = with_orientation(stored, "JPEG", 6)
    (images / "exif_rotated.jpg").write_bytes(jpeg)
    upright = UPRIGHT[6](np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    Image.fromarray(np.ascontiguousarray(upright)).save(twins / "exif_rotated.png")
    (images / "sideways.jpg").write_bytes(encode(Image.open(io.BytesIO(jpeg)), "JPEG", quality=100))  # no tag

    cut_out = np.asarray(photo(200, 150, seed=2)).copy()
    alpha = np.full(cut_out.shape[:2], 255, np.uint8)
    alpha[:, :60] = 0
    flat = cut_out.copy()
    flat[:, :60] = 255
    cut_out[:, :60] = 0  # the hidden colour under the transparent part
    Image.fromarray(np.dstack([cut_out, alpha]), "RGBA").save(images / "transparent.png")
    Image.fromarray(flat).save(twins / "transparent.png")

    gray = np.asarray(photo(200, 150, seed=3).convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(images / "sixteen_bit.png")
    Image.fromarray(gray).convert("RGB").save(twins / "sixteen_bit.png")
    return root


def label(checkpoint, *folders) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """One `nxtp label` over the folders: {folder name: {image name: labels}}. It imports no NLTK on the way (only
    label extraction from captions needs it): a second a start, in every command that labels images."""
    result, imported = run_with_imports(
        ["label", "--checkpoint", str(checkpoint), "--topk", "4", "--workers", "0", *map(str, folders)]
    )
    assert result.returncode == 0, result.stderr
    assert "lightning_modules.inference" in imported and "nltk" not in imported
    found: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for line in map(json.loads, result.stdout.splitlines()):
        folder, name = line["image"].split("/")[-2:]
        found.setdefault(folder, {})[name.split(".")[0]] = [(x["label"], x["prob"]) for x in line["labels"]]
    return found


@pytest.mark.e2e
def test_nxtp_label_gives_odd_photos_the_labels_of_their_plain_twins(label_setup):
    found = label(label_setup / "model", label_setup / "odd", label_setup / "plain")
    odd, plain = found["odd"], found["plain"]
    for name in ("exif_rotated", "transparent", "sixteen_bit"):
        assert [lab for lab, _ in odd[name]] == [lab for lab, _ in plain[name]], name
        assert [p for _, p in odd[name]] == pytest.approx([p for _, p in plain[name]], rel=1e-5), name
    assert odd["sideways"] != odd["exif_rotated"]  # the labels do depend on the orientation
