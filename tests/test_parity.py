"""Parity with the official NXTP implementation on its tiny-checkpoint fixtures (float32, CPU).

`reference_compat` must reproduce the fixtures everywhere; the default must agree wherever the reference's
quirks do not apply, and each quirk shows up as a difference.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LLAMA_TOKENIZER, OFFICIAL
from PIL import Image

from lightning_modules.masking import prefix_attention
from lightning_modules.official import import_official, meta_to_hf_rotary
from lightning_modules.sampling import recognize
from lightning_modules.sequence import collate_text, loss_targets
from lightning_modules.vision import encode_patches

IMAGES = ["image_0_300x200.png", "image_1_224x224.png", "image_2_180x320.png"]


def load(name):
    return np.load(OFFICIAL / name)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("imported")
    model = import_official(
        str(OFFICIAL / "official_ckpt.pth"),
        str(OFFICIAL / "clip_frozen.pt"),
        str(LLAMA_TOKENIZER),
        str(out),
        decoder_heads=4,
    )
    return model, out


@pytest.fixture
def model(imported):
    model, _ = imported
    model.reference_compat = False
    yield model
    model.reference_compat = False


def set_compat(model, on: bool):
    model.reference_compat = on  # one switch: the layout, the loss rows and the sampler all follow it
    assert model.sequences.reference_compat is on


def test_preprocessing_matches(model):
    pixels = torch.stack([model.eval_transform(Image.open(OFFICIAL / f).convert("RGB")) for f in IMAGES])
    assert (pixels - torch.from_numpy(load("pixels.npy"))).abs().max() <= 1e-5


def test_forward_pass_matches(model):
    pixels = torch.from_numpy(load("pixels.npy"))
    with torch.no_grad():
        patches = encode_patches(model.visual, pixels)
        np.testing.assert_allclose(patches, load("vision_tokens.npy")[:, 1:], atol=1e-4, rtol=1e-4)
        image = model.embed_images(pixels)
        np.testing.assert_allclose(image, load("image_embeds.npy"), atol=1e-4, rtol=1e-4)
        ids = torch.tensor(model.sequences.prompt_ids(model.prompt)).expand(3, -1)
        assert ids.tolist() == load("prompt_input_ids.npy")[:, 49:].tolist()
        mask = prefix_attention(49, ids.shape[1])
        assert np.array_equal(mask[0, 0].numpy(), load("prompt_attn_mask.npy"))
        hidden = model.hidden_states(image, ids, mask.expand(3, -1, -1, -1), torch.arange(57).expand(3, -1))
        np.testing.assert_allclose(hidden, load("prompt_hidden.npy"), atol=1e-4, rtol=1e-4)
        logits = model.logits(hidden)
        vocab_ids = torch.from_numpy(load("prompt_logits_vocab_ids.npy"))
        np.testing.assert_allclose(logits[..., vocab_ids], load("prompt_logits.npy"), atol=5e-4, rtol=1e-4)
        np.testing.assert_allclose(logits[:, -1], load("prompt_logits_last.npy"), atol=5e-4, rtol=1e-4)


def token_losses(model, pixels, label_lists):
    seqs = [model.sequences(model.prompt, labels) for labels in label_lists]
    text = collate_text(seqs, model.sequences.pad_id, pad_to=512 - 49)
    seg, mask, positions = model.layout(text)
    with torch.no_grad():
        hidden = model.hidden_states(model.embed_images(pixels), text.ids, mask, positions)
    rows, targets = loss_targets(text, seg, 49, model.reference_compat)
    per_token = torch.zeros(len(seqs), 511)
    for b in range(len(seqs)):
        keep = targets[b] >= 0
        losses = F.cross_entropy(model.logits(hidden[b, rows[b][keep]]), targets[b][keep], reduction="none")
        per_token[b, rows[b][keep] - 0] = losses  # row r predicts position r + 1: shifted index r
    loss, n = model(pixels, text)
    return per_token, loss, n


@pytest.mark.parametrize("case", ["train1", "train3"])
def test_training_loss_matches_in_compat_mode(model, case):
    info = json.loads((OFFICIAL / "train.json").read_text())[case]
    set_compat(model, True)
    pixels = torch.from_numpy(load("pixels.npy"))[info["image_indices"]]
    per_token, loss, n = token_losses(model, pixels, info["labels"])
    with torch.no_grad():
        assert n.item() == info["n_loss_targets"]
        np.testing.assert_allclose(per_token, load(f"{case}_token_loss.npy"), atol=1e-4, rtol=1e-5)
        assert loss.item() == pytest.approx(info["loss"], rel=1e-5, abs=1e-4)


def test_default_loss_differs_from_the_reference_layout(model):
    info = json.loads((OFFICIAL / "train.json").read_text())["train3"]
    pixels = torch.from_numpy(load("pixels.npy"))[info["image_indices"]]
    _, loss, n = token_losses(model, pixels, info["labels"])
    # Every label now ends with the delimiter (3 more targets), and no label depends on another.
    assert n.item() == info["n_loss_targets"] + 3
    assert abs(loss.item() - info["loss"]) > 1e-3


SAMPLING = json.loads((OFFICIAL / "sampling.json").read_text())


@pytest.mark.parametrize("k", [5, 10, 20])
def test_one_shot_sampling_matches_in_compat_mode(model, k):
    set_compat(model, True)
    results = recognize(model, torch.from_numpy(load("pixels.npy")), topk=k)
    ref = SAMPLING[f"top{k}"]
    for i, labels in enumerate(results):
        assert [label for label, _ in labels] == ref["labels"][i]
        np.testing.assert_allclose([p for _, p in labels], ref["scores_rounded5"][i], atol=1.01e-5)


@pytest.mark.parametrize("k", [5, 10, 20])
def test_one_shot_sampling_default_matches_where_no_quirk_applies(model, k):
    results = recognize(model, torch.from_numpy(load("pixels.npy")), topk=k)
    ref = SAMPLING[f"top{k}"]
    for i, labels in enumerate(results):
        if k == 20 and i == 2:
            continue  # the step-limit quirk, checked below
        assert [label for label, _ in labels] == ref["labels"][i]
        np.testing.assert_allclose([p for _, p in labels], ref["scores_unrounded"][i], rtol=1e-4)


def test_step_limit_quirk_is_fixed_by_default(model):
    """top-20, image 2: branch 12 never ends. The reference shifts every later probability by one and loses its
    last label; by default the unended branch keeps its own probabilities and no label is lost."""
    ref = SAMPLING["top20"]
    strings = [s.replace(",", "") for s in ref["branches"][2]["strings"]]
    unended = next(i for i, t in enumerate(ref["branches"][2]["tokens"]) if len(t) >= 19)
    labels = dict(recognize(model, torch.from_numpy(load("pixels.npy")), topk=20)[2])
    ref_scores = dict(zip(ref["labels"][2], ref["scores_unrounded"][2]))
    before, after = strings[:unended], strings[unended + 1 :]
    for label in before:  # branches before the unended one agree (unless merged with a later, shifted one)
        if label not in after:
            assert labels[label] == pytest.approx(ref_scores[label], rel=1e-4)
    shifted = [label for label in after if label in ref_scores and label not in before]
    assert shifted and all(abs(labels[label] / ref_scores[label] - 1) > 1e-3 for label in shifted)
    lost = set(labels) - set(ref_scores)
    assert len(lost) == 1 and len(labels) == len(ref_scores) + 1
    assert sum(labels.values()) <= sum(ref["first_step_topk_probs"][2]) + 1e-6


@pytest.mark.e2e
def test_label_command_on_imported_checkpoint(imported):
    _, folder = imported
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_modules.cli",
            "label",
            "--checkpoint",
            str(folder),
            "--topk",
            "5",
            *[str(OFFICIAL / f) for f in IMAGES],
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    for i, line in enumerate(lines):
        assert [x["label"] for x in line["labels"]] == SAMPLING["top5"]["labels"][i]
        np.testing.assert_allclose(
            [x["prob"] for x in line["labels"]], SAMPLING["top5"]["scores_unrounded"][i], rtol=1e-4
        )


def test_rotary_permutation_is_a_row_permutation():
    w = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    p = meta_to_hf_rotary(w, n_heads=2)
    # head 0 rows (0, 1, 2, 3) interleaved pairs (0,1), (2,3) -> rotate-half order 0, 2, 1, 3
    assert p[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


def test_import_errors_name_the_keys(tmp_path):
    ckpt = torch.load(OFFICIAL / "official_ckpt.pth", weights_only=True)
    state = dict(ckpt["model"])
    del state["module.language_decoder.norm.weight"]
    state["module.language_decoder.layers.0.attention.wq.weight"] = torch.zeros(64, 32)
    state["module.extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        import_official(
            str(tmp_path / "bad.pth"),
            str(OFFICIAL / "clip_frozen.pt"),
            str(LLAMA_TOKENIZER),
            str(tmp_path / "out"),
            decoder_heads=4,
        )
    assert "extra.weight" in str(err.value)
    del state["module.extra.weight"]
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        import_official(
            str(tmp_path / "bad.pth"),
            str(OFFICIAL / "clip_frozen.pt"),
            str(LLAMA_TOKENIZER),
            str(tmp_path / "out"),
            decoder_heads=4,
        )
    assert "decoder.model.norm.weight" in str(err.value) and "q_proj" in str(err.value)
