"""``nxtp import-official --clip PATH`` with OpenAI's file format: a TorchScript archive, as OpenAI ships ViT-*.pt;
the imported model records the reference's preprocessing."""

import json
from dataclasses import asdict

import pytest
import torch
import yaml
from conftest import LLAMA_TOKENIZER, OFFICIAL
from torch import nn

from lightning_modules.cli.import_official import import_main
from lightning_modules.nxtp import NXTP
from lightning_modules.official import REFERENCE_PREPROCESSING, is_torchscript


def torchscript_archive(state: dict[str, torch.Tensor], path) -> None:
    """Save ``state`` as a TorchScript archive whose state dict has exactly these names (as OpenAI's CLIP file)."""
    root = nn.Module()
    for name, value in state.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    torch.jit.script(root).save(str(path))


@pytest.fixture(scope="module")
def clip_state():
    return torch.load(OFFICIAL / "clip_frozen.pt", weights_only=True)  # OpenAI key names, fp16


def run_import(clip, out) -> int:
    return import_main(
        [
            "--checkpoint",
            str(OFFICIAL / "official_ckpt.pth"),
            "--clip",
            str(clip),
            "--tokenizer",
            str(LLAMA_TOKENIZER),
            "--out",
            str(out),
            "--decoder-heads",
            "4",
        ]
    )


def test_torchscript_clip_file_imports_with_its_weights(clip_state, tmp_path):
    archive = tmp_path / "ViT-tiny.pt"
    torchscript_archive(clip_state, archive)
    assert is_torchscript(archive) and not is_torchscript(OFFICIAL / "clip_frozen.pt")
    assert set(torch.jit.load(str(archive)).state_dict()) == set(clip_state)  # the names went in unchanged

    assert run_import(archive, tmp_path / "out") == 0
    model = NXTP.from_pretrained(tmp_path / "out")
    # Truth from the inputs: every vision tensor is the checkpoint's where it has one (the trained blocks and
    # ln_post), else the CLIP file's; the frozen blocks therefore come from the TorchScript archive.
    trained = {
        k.removeprefix("module.vision_encoder."): v
        for k, v in torch.load(OFFICIAL / "official_ckpt.pth", weights_only=True)["model"].items()
        if k.startswith("module.vision_encoder.") and k != "module.vision_encoder.proj.weight"
    }
    visual = model.visual.state_dict()
    from_clip = [k for k in visual if k not in trained]
    assert "transformer.resblocks.0.attn.in_proj_weight" in from_clip and "conv1.weight" in from_clip
    for name, value in visual.items():
        source = trained[name] if name in trained else clip_state[f"visual.{name}"]
        assert torch.equal(value, source.float()), name


def test_an_imported_release_records_the_reference_preprocessing(clip_state, tmp_path):
    assert run_import(OFFICIAL / "clip_frozen.pt", tmp_path / "out") == 0
    recorded = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["preprocessing"]
    assert recorded == asdict(REFERENCE_PREPROCESSING) and recorded["decode"] == "full"
    # the transform the reference ran (its torchvision repr, saved with the fixtures), step by step
    reference = json.loads((OFFICIAL / "preprocess_env.json").read_text())["transform"].splitlines()
    ours = str(NXTP.from_pretrained(tmp_path / "out").eval_transform).splitlines()
    assert [ours[i] for i in (1, 2, 5)] == [reference[i] for i in (1, 2, 5)]  # Resize, CenterCrop, Normalize


def test_clip_file_without_vision_weights_names_the_option(clip_state, tmp_path):
    archive = tmp_path / "text-only.pt"
    torchscript_archive({k: v for k, v in clip_state.items() if not k.startswith("visual.")}, archive)
    with pytest.raises(ValueError, match=r"--clip .*text-only.pt: no 'visual\.\*' keys"):
        run_import(archive, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"--clip .*missing.pt: no such file"):
        run_import(tmp_path / "missing.pt", tmp_path / "out")
