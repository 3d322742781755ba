"""Bad data in the shards: every bad sample or shard skipped and counted by reason, every good sample kept once."""

import dataclasses
import io
import json
import signal
import struct
import tarfile
import zlib
from collections import Counter
from contextlib import contextmanager

import lightning as L
import numpy as np
import pytest
import webdataset as wds
from conftest import LLAMA_TOKENIZER, tiny_nxtp
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import datamodules.webdataset as pipeline
from datamodules import NXTPDataModule
from datamodules.images import decode_image, to_rgb
from datamodules.labels import NLTKDataError
from datamodules.webdataset import Rejects, SampleDecoder, SystematicFailure, read_shards
from lightning_modules.decoder import DecoderConfig
from lightning_modules.lit_nxtp import EvaluationConfig, LitNXTP
from lightning_modules.nxtp import NXTPConfig
from lightning_modules.vision import VisionConfig

RETRIES = 2


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 20000) -> bytes:
    """A valid PNG header that claims side x side pixels, with far too little data: decoding it would fail."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def odd_modes() -> dict[str, tuple[str, bytes]]:
    """Valid images of modes other than RGB, which are converted rather than rejected."""
    palette = Image.new("P", (40, 30))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    sixteen = Image.fromarray(np.full((30, 40), 60000, dtype=np.uint16))
    return {
        "gray": ("jpg", encode(Image.new("L", (40, 30), 128), "JPEG")),
        "cmyk": ("jpg", encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")),
        "palette_alpha": ("png", encode(palette, "PNG")),
        "rgba": ("png", encode(Image.new("RGBA", (40, 30), (255, 0, 0, 128)), "PNG")),
        "gray_alpha": ("png", encode(Image.new("LA", (40, 30), (0, 0)), "PNG")),
        "sixteen_bit": ("png", encode(sixteen, "PNG")),
    }


def write_bad_shards(folder, counter) -> tuple[list[str], list[str], Counter]:
    """Shards with every kind of bad sample between good ones, a truncated shard and one whose URL fails.

    Returns the shard URLs, the keys of the good samples and the expected skip counts by reason.
    """
    jpeg = encode(Image.new("RGB", (40, 30), "blue"), "JPEG")
    png = encode(Image.new("RGB", (40, 30), "green"), "PNG")
    caption = b"a dog on the grass"
    bad = {  # key: (reason, sample)
        "corrupt_jpeg": ("corrupt image", {"jpg": b"\xff\xd8 not really a jpeg", "txt": caption}),
        "truncated_jpeg": ("corrupt image", {"jpg": jpeg[: len(jpeg) // 2], "txt": caption}),
        "truncated_png": ("corrupt image", {"png": png[: len(png) - 40], "txt": caption}),
        "zero_bytes": ("empty image", {"jpg": b"", "txt": caption}),
        "bomb": ("image too large", {"png": bomb_png(), "txt": caption}),
        "no_image": ("no image", {"txt": caption}),
        "no_caption": ("no caption", {"jpg": jpeg}),
        "empty_caption": ("empty caption", {"jpg": jpeg, "txt": b" \n "}),
        "no_nouns": ("no labels", {"jpg": jpeg, "txt": b"it is very big and quickly running"}),
        "latin1_caption": ("caption not utf-8", {"jpg": jpeg, "txt": "a caf\xe9 with a dog".encode("latin-1")}),
    }
    good = []
    with wds.TarWriter(str(folder / "mixed.tar")) as sink:
        samples = [(k, {"jpg": jpeg, "txt": caption}) for k in ("good_0", "good_1")]
        samples += [(k, {ext: data, "txt": caption}) for k, (ext, data) in odd_modes().items()]
        for i, (key, sample) in enumerate(bad.items()):  # each bad sample between good ones
            samples += [(key, sample[1]), (f"good_{i + 2}", {"jpg": jpeg, "txt": caption})]
        for key, sample in samples:
            sink.write({"__key__": key, **sample})
            good += [key] if key not in bad else []
    with wds.TarWriter(str(folder / "whole.tar")) as sink:
        for i in range(6):
            sink.write({"__key__": f"whole_{i}", "jpg": jpeg, "txt": caption})
            good.append(f"whole_{i}")
    with wds.TarWriter(str(folder / "full.tar")) as sink:
        for i in range(6):
            sink.write({"__key__": f"cut_{i}", "jpg": jpeg, "txt": caption})
    tar = (folder / "full.tar").read_bytes()
    cut = tar.index(b"cut_4.jpg") + 512 + len(jpeg) // 2  # in the middle of cut_4's image
    (folder / "truncated.tar").write_bytes(tar[:cut])
    good += [f"cut_{i}" for i in range(4)]
    failing = f"pipe:echo attempt >> {counter}; exit 1"  # a download that fails, counting its attempts
    expected = Counter(reason for reason, _ in bad.values())
    expected.update({"truncated shard": 1, "unreachable shard": 1})
    # With 2 workers, worker 0 reads mixed + failing and worker 1 truncated + whole: each has good samples.
    urls = [str(folder / "mixed.tar"), str(folder / "truncated.tar"), failing, str(folder / "whole.tar")]
    return urls, good, expected


@pytest.fixture(scope="module")
def model():
    return tiny_nxtp()


@pytest.mark.e2e  # its shards include a `pipe:` command
@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_and_shards_are_counted_and_good_ones_arrive_once(tmp_path, model, num_workers):
    counter = tmp_path / "attempts"
    urls, good, expected = write_bad_shards(tmp_path, counter)
    dm = NXTPDataModule(
        val_shards=urls, batch_size=4, num_workers=num_workers, shard_retries=RETRIES, shard_retry_wait=0
    )
    dm.bind(model.inputs)
    seen, skipped, rejects = [], Counter(), []
    for batch in dm.val_dataloader():
        seen += batch.keys
        skipped.update(batch.skipped)
        rejects += batch.rejects
    assert sorted(seen) == sorted(good)
    assert skipped == expected
    assert Counter(r["reason"] for r in rejects) == expected
    assert counter.read_text().count("attempt") == RETRIES + 1
    by_key = {r["key"]: r for r in rejects}
    assert by_key["bomb"]["shard"] == urls[0] and by_key["bomb"]["split"] == "val"
    shards = {r["reason"]: r["shard"] for r in rejects if r["key"] is None}
    assert shards == {"truncated shard": urls[1], "unreachable shard": urls[2]}


@pytest.mark.e2e
def test_a_download_that_breaks_off_is_read_again_without_repeating_samples(tmp_path, model):
    jpeg = encode(Image.new("RGB", (40, 30), "blue"), "JPEG")
    keys = [f"k{i}" for i in range(6)]
    with wds.TarWriter(str(tmp_path / "shard.tar")) as sink:
        for key in keys:
            sink.write({"__key__": key, "jpg": jpeg, "txt": b"a dog on the grass"})
    tar, attempts = tmp_path / "shard.tar", tmp_path / "attempts"
    broken_off = tar.read_bytes().index(b"k3.txt")  # the first attempt passes on k0..k2 and k3's image
    url = (
        f"pipe:echo attempt >> {attempts}; if [ $(wc -l < {attempts}) -ge 3 ]; then cat {tar}; "
        f"else head -c {broken_off} {tar}; exit 1; fi"
    )
    dm = NXTPDataModule(val_shards=url, batch_size=4, num_workers=0, shard_retries=RETRIES, shard_retry_wait=0)
    dm.bind(model.inputs)
    batches = list(dm.val_dataloader())
    assert sorted(key for batch in batches for key in batch.keys) == keys
    assert sum((Counter(batch.skipped) for batch in batches), Counter()) == {}
    assert attempts.read_text().count("attempt") == 3


@pytest.mark.e2e
def test_a_shard_drawn_again_after_it_failed_is_not_retried_again(tmp_path):
    attempts = tmp_path / "attempts"
    failing = {"url": f"pipe:echo attempt >> {attempts}; exit 1"}
    rejects = Rejects("train")
    assert list(read_shards([failing] * 3, rejects, retries=RETRIES, retry_wait=0)) == [{}] * 3  # end-of-shard marks
    assert rejects.counts == {"unreachable shard": 3}
    assert attempts.read_text().count("attempt") == RETRIES + 1 + 2  # resampling draws it again: once each


@pytest.mark.e2e
def test_a_worker_with_nothing_but_rejects_still_reports_them(tmp_path, model):
    urls, _, _ = write_bad_shards(tmp_path, tmp_path / "attempts")
    # Worker 1's only shard is unreachable: it has no batch to carry that count, so it yields one of no samples.
    dm = NXTPDataModule(val_shards=[urls[3], urls[2]], batch_size=4, num_workers=2, shard_retries=0)
    dm.bind(model.inputs)
    batches = list(dm.val_dataloader())
    assert sorted(key for batch in batches for key in batch.keys) == [f"whole_{i}" for i in range(6)]
    assert sum((Counter(batch.skipped) for batch in batches), Counter()) == {"unreachable shard": 1}


def test_a_malformed_sample_is_recorded_with_its_shard(tmp_path, model):
    jpeg, path = encode(Image.new("RGB", (40, 30), "blue"), "JPEG"), tmp_path / "twice.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("k0.jpg", jpeg),
            ("k0.txt", b"a dog"),
            ("k0.jpg", jpeg),
            ("k1.jpg", jpeg),
            ("k1.txt", b"a dog"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dm = NXTPDataModule(val_shards=str(path), batch_size=4, num_workers=0)
    dm.bind(model.inputs)
    (batch,) = list(dm.val_dataloader())
    assert batch.skipped == {"malformed sample": 1}
    assert [(r["shard"], r["reason"]) for r in batch.rejects] == [(str(path), "malformed sample")]
    assert "k0.jpg" in batch.rejects[0]["error"]


@contextmanager
def deadline(seconds: int):
    """Fail with TimeoutError instead of running for ever."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.e2e
def test_resampled_shards_that_give_nothing_stop_the_run_instead_of_reading_for_ever(tmp_path, model):
    with wds.TarWriter(str(tmp_path / "captionless.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "jpg": encode(Image.new("RGB", (40, 30), "blue"), "JPEG")})
    for shards, message in [
        (
            str(tmp_path / "captionless.tar"),
            "the last 50 train samples or shards were all "
            r"rejected, the last one \(sample k\d in shard .*captionless.tar\) as no caption",
        ),
        ("pipe:exit 1", "3 train shards in a row could not be read, the last one pipe:exit 1"),
    ]:
        dm = NXTPDataModule(
            train_shards=shards,
            resampled=True,
            num_workers=0,
            shard_retries=0,
            max_failures_in_a_row=3,
            max_rejects_in_a_row=50,
        )
        dm.bind(model.inputs)
        with deadline(60), pytest.raises(SystematicFailure, match=message):
            next(iter(dm.train_dataloader()))


def test_odd_modes_are_converted_not_rejected():
    modes = {name: to_rgb(Image.open(io.BytesIO(data))) for name, (_, data) in odd_modes().items()}
    assert all(image.mode == "RGB" and image.size == (40, 30) for image in modes.values())
    assert modes["gray"].getpixel((0, 0))[0] in range(120, 137)
    assert modes["cmyk"].getpixel((5, 5)) == (255, 0, 0)
    assert modes["palette_alpha"].getpixel((0, 0)) == (255, 255, 255)  # transparent: white, not black
    assert modes["gray_alpha"].getpixel((0, 0)) == (255, 255, 255)
    assert modes["rgba"].getpixel((0, 0)) in [(255, 127, 127), (255, 128, 128)]  # half red over white
    assert modes["sixteen_bit"].getpixel((0, 0)) == (234, 234, 234)  # 60000 / 256, not clipped to 255


def test_large_images_are_rejected_from_their_header():
    with pytest.raises(ValueError, match="image too large"):
        decode_image(bomb_png(), max_pixels=89_478_485)
    with pytest.raises(ValueError, match="image too large"):  # a limit below PIL's own
        decode_image(bomb_png(side=200), max_pixels=200 * 199)
    with pytest.raises(ValueError, match="corrupt image"):  # within the limit, so it was decoded, and failed
        decode_image(bomb_png(side=200), max_pixels=200 * 200)


@pytest.mark.parametrize("shards", [[], "", ["", ""]])
def test_shards_that_match_nothing_name_the_key(model, shards):
    dm = NXTPDataModule(train_shards=shards)
    dm.bind(model.inputs)
    with pytest.raises(ValueError, match="data.train_shards matches no shards"):
        dm.train_dataloader()


def tiny_module() -> LitNXTP:
    decoder = DecoderConfig(
        config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        }
    )
    return LitNXTP(
        NXTPConfig(VisionConfig(model_name="nxtp-tiny-vit"), decoder, str(LLAMA_TOKENIZER)),
        evaluation=EvaluationConfig(semantic_metric=False, log_images=0, topk=[1]),
    )


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path / "logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


@pytest.mark.e2e
def test_a_run_writes_every_reject_to_its_log_dir(tmp_path):
    urls, _, expected = write_bad_shards(tmp_path, tmp_path / "attempts")
    module = tiny_module()
    # Training reads every shard; validation and testing (kept short) one each.
    dm = NXTPDataModule(
        train_shards=urls,
        val_shards=urls[0],
        test_shards=urls[1],
        batch_size=8,
        num_workers=0,
        shuffle_buffer=8,
        shard_retries=0,
        shard_retry_wait=0,
        inputs=module.inputs,
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1, max_steps=50, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    trainer.validate(module, datamodule=dm)  # a second pass over the same val shard: its rejects are not repeated
    trainer.test(module, datamodule=dm)
    records = [json.loads(line) for line in (tmp_path / "logs/lightning_logs/version_0/rejects.jsonl").open()]
    reasons = {
        split: Counter(r["reason"] for r in records if r["split"] == split) for split in ("train", "val", "test")
    }
    assert reasons["train"] == expected
    assert reasons["val"] == expected - Counter({"truncated shard": 1, "unreachable shard": 1})
    assert reasons["test"] == {"truncated shard": 1}
    assert all({"shard", "key", "reason", "error", "step"} <= set(r) for r in records)
    no_labels = next(r for r in records if r["reason"] == "no labels")
    assert no_labels["key"] == "no_nouns" and no_labels["shard"] == urls[0]
    events = EventAccumulator(str(tmp_path / "logs/lightning_logs/version_0")).Reload()
    assert "val/skipped/image too large" in events.Tags()["scalars"]
    # train/skipped/<reason> is the run's total so far: at the last step, every reject of the epoch.
    totals = {
        tag.split("/")[-1]: events.Scalars(tag)[-1].value
        for tag in events.Tags()["scalars"]
        if tag.startswith("train/skipped/")
    }
    assert totals == expected


@pytest.mark.e2e
def test_an_evaluation_of_no_sample_is_an_error_not_a_score(tmp_path):
    module = tiny_module()
    dm = NXTPDataModule(test_shards="pipe:exit 1", num_workers=0, shard_retries=0, inputs=module.inputs)
    with pytest.raises(RuntimeError, match="test: no sample of data.test_shards could be evaluated"):
        quiet_trainer(tmp_path).test(module, datamodule=dm)
    assert not (tmp_path / "logs/lightning_logs/version_0/metrics.json").exists()


# --- Errors while turning a sample into an example: one sample's fault, or the set-up's -------------------------


def sample(key: str, caption: str = "a dog on the grass", color: str = "blue") -> dict:
    return {
        "__key__": key,
        "__url__": "shard.tar",
        "txt": caption.encode(),
        "jpg": encode(Image.new("RGB", (40, 30), color), "JPEG"),
    }


def sample_decoder(model, rejects: Rejects, transform=None, sequences=None) -> SampleDecoder:
    return SampleDecoder(
        transform or model.eval_transform,
        sequences or model.sequences,
        model.prompt,
        shuffle_labels=False,
        hflip=False,
        max_labels=16,
        seed=0,
        rejects=rejects,
    )


def test_an_error_in_one_sample_is_a_counted_reject(model, monkeypatch):
    real_extract = pipeline.extract_labels

    def extract(caption, *args):
        if "boom" in caption:
            raise IndexError("tagger blew up")
        return real_extract(caption, *args)

    def sequences(prompt, labels):
        if "cat" in labels:
            raise ValueError("cannot tokenize cat")
        return model.sequences(prompt, labels)

    def transform(image):
        if image.getpixel((0, 0))[0] > 200:  # the red image
            raise OSError("transform failed")
        return model.eval_transform(image)

    monkeypatch.setattr(pipeline, "extract_labels", extract)
    rejects = Rejects("train", max_failures_in_a_row=2)  # never reached: good samples come in between
    decode = sample_decoder(model, rejects, transform, sequences)
    samples = [
        sample("good_0"),
        sample("bad_labels", "a boom box"),
        sample("good_1"),
        sample("bad_tokens", "a cat on a mat"),
        sample("good_2"),
        sample("bad_image", color="red"),
        sample("good_3"),
    ]
    out = [decode(s) for s in samples]
    assert [o[3] for o in out if o is not None] == ["good_0", "good_1", "good_2", "good_3"]
    assert rejects.counts == {"label extraction failed": 1, "tokenization failed": 1, "image transform failed": 1}
    errors = {r["key"]: r["error"] for r in rejects.records}
    assert errors == {
        "bad_labels": "IndexError: tagger blew up",
        "bad_tokens": "ValueError: cannot tokenize cat",
        "bad_image": "OSError: transform failed",
    }


def test_samples_failing_one_after_the_other_stop_the_run(model):
    def transform(image):
        raise OSError("no such kernel")

    rejects = Rejects("train", max_failures_in_a_row=3)
    decode = sample_decoder(model, rejects, transform)
    assert decode(sample("a")) is None and decode(sample("b")) is None
    with pytest.raises(
        SystematicFailure,
        match=r"3 train samples in a row failed.*image transform failed: "
        r"OSError: no such kernel",
    ):
        decode(sample("c"))


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.e2e)])
def test_a_worker_whose_every_sample_failed_stops_the_run(tmp_path, model, num_workers):
    # Fewer samples than max_failures_in_a_row, all failing: the end of the stream says so.
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"{s}.tar")) as sink:
            for i in range(3):
                sink.write(sample(f"s{s}_{i}"))
    broken = dataclasses.replace(model.inputs, eval_transform=lambda image: 1 / 0)
    dm = NXTPDataModule(val_shards=[str(tmp_path / "0.tar"), str(tmp_path / "1.tar")], num_workers=num_workers)
    dm.bind(broken)
    per_worker = 6 // max(num_workers, 1)  # both shards in one stream, or one shard per worker
    with pytest.raises(SystematicFailure, match=f"no val sample of this data worker became an example: {per_worker} "):
        list(dm.val_dataloader())


def test_missing_nltk_data_stops_the_run_before_reading_anything(tmp_path, model, monkeypatch):
    urls, _, _ = write_bad_shards(tmp_path, tmp_path / "attempts")
    dm = NXTPDataModule(val_shards=urls[0], nltk_data=str(tmp_path / "no_nltk_data"))
    dm.bind(model.inputs)
    with pytest.raises(NLTKDataError, match="no_nltk_data"):
        dm.val_dataloader()

    # Lost while running (e.g. a deleted folder), it is not taken for one sample's fault either.
    def missing(*args):
        raise NLTKDataError("NLTK resource 'corpora/wordnet' was not found")

    monkeypatch.setattr(pipeline, "extract_labels", missing)
    with pytest.raises(NLTKDataError, match="wordnet"):
        sample_decoder(model, Rejects("train"))(sample("a"))
