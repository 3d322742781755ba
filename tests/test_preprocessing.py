"""A model's preprocessing travels with it: every saved form records it, old models load with the reference's, and
with the default (every pixel decoded) a photo gets the same labels and probabilities whether it is stored as JPEG
or PNG, EXIF-rotated or upright, through ``Recognizer``, ``nxtp label`` and ``nxtp serve`` alike."""

import base64
import io
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from conftest import tiny_nxtp
from PIL import Image, ImageDraw, ImageOps

from datamodules.images import ORIENTATION, decode_image
from datamodules.webdataset import NXTPDataModule
from lightning_modules.checkpoint import CONFIG_KEY, load_model, save_model_record
from lightning_modules.cli.label import label_main
from lightning_modules.nxtp import NXTPConfig, Preprocessing
from lightning_modules.official import REFERENCE_PREPROCESSING
from lightning_modules.recognizer import Recognizer

SIZE = (3000, 2200)  # a camera's photo, 15 times the tiny tower's input: draft decoding would read it at 1/8


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like content: smooth colour fields, sensor-like noise and sharp-edged shapes."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 10, (height, width, 3)).astype(np.int16)
    image = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x, y, side = rng.integers(0, width), rng.integers(0, height), rng.integers(width // 30, width // 5)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + side, y + side], fill=colour)
    return image


def ending_labels(model):
    with torch.no_grad():  # labels that end after a few tokens, as a trained model's do
        model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 4
    return model


def saved_ckpt(model, path, drop_preprocessing: bool = False):
    """A ``.ckpt`` as ``nxtp fit`` stores the model (its record and weights), optionally as an earlier version wrote
    it (no preprocessing entry)."""
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    save_model_record(checkpoint, model)
    if drop_preprocessing:
        del checkpoint[CONFIG_KEY]["preprocessing"]
    torch.save(checkpoint, path)
    return path


def test_every_saved_form_records_the_preprocessing_and_old_models_load_the_reference(tmp_path):
    model = tiny_nxtp()
    assert model.config.preprocessing == REFERENCE_PREPROCESSING  # the default resolved: OpenAI CLIP's, in full
    assert str(model.eval_transform) == str(tiny_nxtp().eval_transform)
    draft = tiny_nxtp(preprocessing=Preprocessing(decode="draft", interpolation="bilinear"))
    draft.save_pretrained(tmp_path / "folder")
    recorded = yaml.safe_load((tmp_path / "folder" / "config.yaml").read_text())["preprocessing"]
    assert recorded == asdict(replace(REFERENCE_PREPROCESSING, decode="draft", interpolation="bilinear"))
    for source in (tmp_path / "folder", saved_ckpt(draft, tmp_path / "draft.ckpt")):
        loaded = load_model(source)
        assert loaded.preprocessing == draft.preprocessing and "bilinear" in str(loaded.eval_transform)
        assert Recognizer(loaded).decode == "draft" and Recognizer(loaded, decode="full").draft_input_size is None
    old = load_model(saved_ckpt(draft, tmp_path / "old.ckpt", drop_preprocessing=True))
    assert old.preprocessing == REFERENCE_PREPROCESSING
    with pytest.raises(ValueError, match=r"preprocessing\.decode='fast'"):
        NXTPConfig.from_dict({**model.config.to_dict(), "preprocessing": {"decode": "fast"}})
    with pytest.raises(ValueError, match="decode='fast'"):
        Recognizer(model, decode="fast")


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A tiny model, and one photo stored three ways: a phone's sideways JPEG with an EXIF rotation, the upright
    pixels it decodes to as a PNG, and the sideways pixels as a PNG with the same EXIF rotation."""
    root = tmp_path_factory.mktemp("twins")
    ending_labels(tiny_nxtp(seed=5)).save_pretrained(root / "model")
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored = photo(SIZE[1], SIZE[0])  # sideways: the camera's rows are the picture's columns
    (root / "photo.jpg").write_bytes(jpeg := _encode(stored, "JPEG", quality=90, exif=exif))
    decoded = Image.open(io.BytesIO(jpeg)).convert("RGB")
    ImageOps.exif_transpose(decoded).save(root / "upright.png")
    decoded.save(root / "rotated.png", exif=exif)
    return root


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


NAMES = ("photo.jpg", "upright.png", "rotated.png")


def test_the_same_photo_gets_the_same_labels_from_recognizer_label_and_serve(twins, capsys):
    recognizer = Recognizer.from_checkpoint(twins / "model")
    assert recognizer.decode == "full"
    inputs = [recognizer.preprocess(twins / name) for name in NAMES]
    assert all(torch.equal(inputs[0], x) for x in inputs[1:])
    assert Image.open(twins / "upright.png").size == SIZE
    by_recognizer = [recognizer.label(twins / name, topk=5)[0] for name in NAMES]  # one at a time: same batch shape
    assert len(by_recognizer[0]) >= 2 and by_recognizer[1:] == by_recognizer[:1] * 2

    assert label_main(["--checkpoint", str(twins / "model"), "--topk", "5", "--workers", "0", "--batch-size", "1"]
                      + [str(twins / name) for name in NAMES]) == 0  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_command = [[(x["label"], x["prob"]) for x in line["labels"]] for line in lines]
    assert by_command == by_recognizer

    pytest.importorskip("litserve")
    from lightning_modules.serving import RecognizerAPI

    api = RecognizerAPI(str(twins / "model"))
    api.setup("cpu")
    by_serve = []
    for name in NAMES:
        request = {"image": base64.b64encode((twins / name).read_bytes()).decode(), "topk": 5, "min_prob": 0.0}
        (answer,) = api.predict([api.decode_request(request)])
        by_serve.append([(x["label"], x["prob"]) for x in json.loads(api.encode_response(answer).body)["labels"]])
    assert by_serve == by_recognizer


def test_draft_decoding_is_an_explicit_option_that_changes_the_inputs(twins, capsys):
    draft = Recognizer.from_checkpoint(twins / "model", decode="draft")
    jpeg, png = (draft.preprocess(twins / name) for name in NAMES[:2])
    assert not torch.equal(jpeg, png)  # the JPEG was decoded at 1/8 scale, the PNG in full
    assert (jpeg - png).abs().mean() < 0.05  # close: normalised units, about 1/3 of a level of 255
    assert label_main(["--checkpoint", str(twins / "model"), "--decode", "draft", "--workers", "0",
                       str(twins / "photo.jpg")]) == 0  # fmt: skip
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["label"], x["prob"]) for x in line["labels"]] == draft.label(twins / "photo.jpg")[0]


@pytest.mark.parametrize("decode", ["full", "draft"])
def test_training_and_evaluation_data_are_decoded_as_the_model_says(tmp_path, decode):
    model = tiny_nxtp(preprocessing=Preprocessing(decode=decode))
    jpeg = _encode(photo(*SIZE, seed=1), "JPEG", quality=90)
    with wds.TarWriter(str(tmp_path / "shard.tar")) as sink:
        sink.write({"__key__": "photo", "jpg": jpeg, "txt": b"a dog on the grass next to a house"})
    data = NXTPDataModule(val_shards=str(tmp_path / "shard.tar"), batch_size=1, num_workers=0, inputs=model.inputs)
    (batch,) = list(data.val_dataloader())
    draft_size = model.image_size if decode == "draft" else None
    assert torch.equal(batch.pixels[0], model.eval_transform(decode_image(jpeg, input_size=draft_size)))
    assert torch.equal(batch.pixels[0], model.eval_transform(decode_image(jpeg))) == (decode == "full")
