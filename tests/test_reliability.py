"""Checkpoints written atomically, corrupt checkpoints named, non-finite losses skipped and counted."""

import pytest
import torch
from conftest import LLAMA_TOKENIZER

import lightning.fabric.plugins.io.torch_io as torch_io
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from lightning_modules.decoder import DecoderConfig
from lightning_modules.lit_nxtp import LitNXTP
from lightning_modules.sequence import collate_text
from lightning_modules.vision import VisionConfig, build_vision_tower


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(checkpoint, target):  # half a file, then the process dies
        with open(target, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch_io, "_atomic_save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_a_corrupt_checkpoint_is_named(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(RuntimeError, match="broken.ckpt is corrupt or was only partly written"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_nonfinite_losses_are_skipped_then_stop_the_run():
    module = LitNXTP(VisionConfig(model_name="nxtp-tiny-vit"),
                     DecoderConfig(config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=4)),
                     str(LLAMA_TOKENIZER), semantic_metric=False, max_nonfinite_steps=2)
    model = module.model
    batch = {"pixels": torch.randn(2, 3, 64, 64), "keys": ["k1", "k2"], "skipped": {},
             "text": collate_text([model.sequences(model.prompt, ["dog"])] * 2, model.sequences.pad_id)}
    assert torch.isfinite(module.training_step(batch, 0))
    with torch.no_grad():
        model.projection.weight[0, 0] = float("nan")
    assert module.training_step(batch, 1) is None and module.training_step(batch, 2) is None
    assert module.nonfinite_steps == 2
    with pytest.raises(RuntimeError, match=r"max_nonfinite_steps=2\); batch samples \['k1', 'k2'\]"):
        module.training_step(batch, 3)


@pytest.mark.parametrize("image_size, patch_size, conv_stem, message", [
    (70, 16, False, "image size 70x70 .* not a multiple of its patch size 16x16"),
    (72, 12, True, "vision.conv_stem needs a power-of-two patch size, got 12"),
])
def test_an_image_size_the_tower_cannot_take_is_named(image_size, patch_size, conv_stem, message):
    tower = {"embed_dim": 32, "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": patch_size},
             "text_cfg": {"context_length": 4, "vocab_size": 8, "width": 16, "heads": 1, "layers": 1}}
    with pytest.raises(ValueError, match=message):
        build_vision_tower(VisionConfig(model_name="custom", config=tower, conv_stem=conv_stem))
