"""Checkpoints written once and atomically, corrupt checkpoints named, non-finite losses skipped and counted."""

import os
import stat
import tempfile

import lightning as L
import pytest
import torch
from conftest import LLAMA_TOKENIZER

from lightning_modules.batch import Batch
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from lightning_modules.decoder import DecoderConfig
from lightning_modules.lit_nxtp import EvaluationConfig, LitNXTP
from lightning_modules.nxtp import NXTPConfig
from lightning_modules.optimization import OptimizationConfig
from lightning_modules.sequence import collate_text
from lightning_modules.vision import VisionConfig, build_vision_tower


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(checkpoint, f):  # half a file, then the process dies
        f.write(b"PK\x03\x04 half")
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.parametrize("tmpdir_state", ["empty", "missing"])
def test_a_local_save_writes_once_in_the_target_folder(tmp_path, monkeypatch, tmpdir_state):
    # $TMPDIR empty or missing: a writer that staged the file there would leave it behind or fail.
    staging = tmp_path / "tmp"
    if tmpdir_state == "empty":
        staging.mkdir()
    monkeypatch.setenv("TMPDIR", str(staging))
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    checkpoint = {"step": 3, "state_dict": {"w": torch.randn(4, 3)}, "loops": {"epoch": [1, 2]}}
    path = tmp_path / "run" / "epoch=1.ckpt"  # the parent folder does not exist yet
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    assert [p.name for p in path.parent.iterdir()] == ["epoch=1.ckpt"]
    assert not staging.exists() or not any(staging.iterdir())
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded.keys() == checkpoint.keys() and loaded["loops"] == checkpoint["loops"] and loaded["step"] == 3
    assert torch.equal(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[tuple] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    monkeypatch.undo()
    written = os.stat(path).st_ino  # the renamed file is the one fsynced
    assert events == [("fsync", "file", written), ("replace", written), ("fsync", "dir", os.stat(tmp_path).st_ino)]


def test_a_corrupt_checkpoint_is_named(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(RuntimeError, match="broken.ckpt is corrupt or was only partly written"):
        AtomicCheckpointIO().load_checkpoint(path)


class Record(L.Callback):
    """The module's parameters and buffers at the start of every training step."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def fit_with_nan_at(steps: list[int], max_steps: int, max_nonfinite_steps: int = 10):
    decoder = DecoderConfig(
        config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4
        )
    )
    module = LitNXTP(
        # BatchNorm in the conv stem: a forward changes it
        NXTPConfig(VisionConfig(model_name="nxtp-tiny-vit", conv_stem=True), decoder, str(LLAMA_TOKENIZER)),
        OptimizationConfig(max_nonfinite_steps=max_nonfinite_steps, warmup=0),
        EvaluationConfig(semantic_metric=False),
    )
    model = module.model
    size = model.visual.image_size
    batches = [
        Batch(
            torch.randn(2, 3, *size),
            collate_text([model.sequences(model.prompt, ["dog"])] * 2, model.sequences.pad_id),
            [["dog"]] * 2,
            [f"s{i}a", f"s{i}b"],
        )
        for i in range(max_steps)
    ]
    for step in steps:
        batches[step].pixels.fill_(float("nan"))
    record = Record()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return module, record.states


@pytest.mark.e2e
def test_a_nonfinite_step_is_skipped_and_leaves_the_model_as_it_was():
    module, states = fit_with_nan_at([1], max_steps=4)
    before, after, later = states[1], states[2], states[3]
    assert any("running_mean" in k for k in before)  # the statistics a forward changes are checked too
    for key in before:
        assert torch.equal(before[key], after[key]), key  # step 1 changed nothing
    assert not all(torch.equal(after[k], later[k]) for k in after)  # step 2 trained
    assert all(torch.isfinite(v).all() for v in module.state_dict().values() if v.is_floating_point())
    assert module.guard.skipped == 1


@pytest.mark.e2e
def test_too_many_nonfinite_steps_stop_the_run_naming_the_samples():
    with pytest.raises(RuntimeError, match=r"max_nonfinite_steps=1\); batch samples \['s2a', 's2b'\]"):
        fit_with_nan_at([1, 2], max_steps=4, max_nonfinite_steps=1)


@pytest.mark.parametrize(
    "image_size, patch_size, conv_stem, message",
    [
        (70, 16, False, "image size 70x70 .* not a multiple of its patch size 16x16"),
        (72, 12, True, "vision.conv_stem needs a power-of-two patch size, got 12"),
    ],
)
def test_an_image_size_the_tower_cannot_take_is_named(image_size, patch_size, conv_stem, message):
    tower = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16, "patch_size": patch_size},
        "text_cfg": {"context_length": 4, "vocab_size": 8, "width": 16, "heads": 1, "layers": 1},
    }
    with pytest.raises(ValueError, match=message):
        build_vision_tower(VisionConfig(model_name="custom", config=tower, conv_stem=conv_stem))
