"""Exports: safetensors reloads the same model; the ONNX graphs with the numpy sampler match ``recognize``."""

import pytest
import torch
from conftest import tiny_nxtp

from lightning_modules.cli.export import export_main
from lightning_modules.export import export
from lightning_modules.nxtp import NXTP
from lightning_modules.sampling import recognize


def boosted_model(seed: int = 0) -> NXTP:
    model = tiny_nxtp(seed=seed)
    # Make the delimiter likely after a few tokens so that branches end at different steps.
    with torch.no_grad():
        model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 4
    return model


def test_safetensors_export_reloads_the_same_model(tmp_path):
    model = boosted_model()
    out = export(model, tmp_path / "st", format="safetensors")
    assert (out / "model.safetensors").exists()
    reloaded = NXTP.from_pretrained(out)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.embed_images(pixels), model.embed_images(pixels), rtol=0, atol=0)


def test_export_main_writes_a_folder(tmp_path):
    export(boosted_model(), tmp_path / "src", format="safetensors")
    assert (
        export_main(["--checkpoint", str(tmp_path / "src"), "--format", "safetensors", "--out", str(tmp_path / "dst")])
        == 0
    )
    assert (tmp_path / "dst" / "model.safetensors").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_onnx_sampler_matches_recognize(tmp_path, seed):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from lightning_modules.export import onnx_recognize

    model = boosted_model(seed)
    out = export(model, tmp_path / "onnx", format="onnx")
    assert (out / "prefix.onnx").exists() and (out / "step.onnx").exists()
    torch.manual_seed(seed)
    pixels = torch.randn(2, 3, 64, 64)
    want = recognize(model, pixels, topk=5)
    got = onnx_recognize(out, pixels.numpy(), topk=5)
    assert len(got) == len(want) == 2
    assert all(len(labels) > 1 for labels in want)
    # The graphs were traced with another batch size: batch and cache length must stay dynamic.
    assert onnx_recognize(out, pixels[:1].numpy(), topk=5) == got[:1]
    for got_image, want_image in zip(got, want):
        assert [label for label, _ in got_image] == [label for label, _ in want_image]
        torch.testing.assert_close(
            torch.tensor([p for _, p in got_image], dtype=torch.float64),
            torch.tensor([p for _, p in want_image], dtype=torch.float64),
            rtol=1e-4,
            atol=1e-7,
        )


def test_large_models_keep_onnx_weights_in_a_side_file(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from lightning_modules import export as export_module

    model = boosted_model()
    pixels = torch.randn(2, 3, 64, 64)
    inline = export(model, tmp_path / "inline", format="onnx")
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 0)
    external = export(model, tmp_path / "external", format="onnx")
    assert (external / "prefix.onnx.data").exists() and (external / "step.onnx.data").exists()
    assert (external / "step.onnx").stat().st_size < (inline / "step.onnx").stat().st_size
    want = export_module.onnx_recognize(inline, pixels.numpy(), topk=3)
    assert export_module.onnx_recognize(external, pixels.numpy(), topk=3) == want
