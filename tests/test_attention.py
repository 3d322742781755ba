"""The attention paths of the training forward (dense, compact, flex) against each other and the dense mask."""

import pytest
import torch
import transformers.integrations.flex_attention as hf_flex
from conftest import tiny_nxtp
from torch.nn.attention.flex_attention import create_mask, flex_attention

from lightning_modules.masking import compact_label_mask, label_mask_mod, label_masked_attention
from lightning_modules.nxtp import flex_available
from lightning_modules.sequence import TextSequence, collate_text, segment_ids

LABELS = [["dog", "frisbee", "grass"], ["a very long label with many words", "x"], ["cat"]]
CUDA = torch.cuda.is_available() and flex_available(torch.device("cuda"))


def batch(model, pad_to: int = 40):
    """Three samples of different lengths, padded past the longest one."""
    seqs = [model.sequences(model.prompt, labels) for labels in LABELS]
    return collate_text(seqs, model.sequences.pad_id, pad_to=pad_to)


def loss_and_grads(model, pixels, text, attention: str):
    model.attention = attention
    model.zero_grad()
    loss, n = model(pixels, text)
    loss.backward()
    return loss.detach(), n, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("compat", [False, True])
def test_mask_mod_and_compact_mask_equal_the_dense_mask(compat):
    seq = TextSequence(ids=[90, 1, 10, 11, 20, 21, 5, 30, 5, 40, 41, 5], anchor=3, label_ends=[6, 8, 11])
    short = TextSequence(ids=[90, 1, 10, 20, 5, 30], anchor=2, label_ends=[4])
    seg = segment_ids(collate_text([seq, short], pad_id=99, pad_to=15), 3, reference_compat=compat)
    batch_size, length = seg.shape
    dense = label_masked_attention(seg)
    assert set(seg.unique().tolist()) >= {-2, -1, 0, 1}  # image, prefix, labels and padding are all covered
    assert torch.equal(create_mask(label_mask_mod(seg), batch_size, 1, length, length, device="cpu"), dense)
    assert torch.equal(compact_label_mask(seg, 3), dense[:, :, 3:])
    assert dense[:, 0, :3, :3].all() and not dense[:, 0, :3, 3:].any()  # what the compact form leaves implicit


@pytest.mark.parametrize("compat", [False, True])
def test_compact_path_gives_the_dense_loss_and_gradients(compat):
    model = tiny_nxtp(reference_compat=compat).train()
    pixels, text = torch.randn(3, 3, 64, 64), batch(model)
    loss, n, grads = loss_and_grads(model, pixels, text, "dense")
    loss_c, n_c, grads_c = loss_and_grads(model, pixels, text, "compact")
    assert n == n_c and grads.keys() == grads_c.keys() and len(grads) > 10
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("compat, dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_flex_path_gives_the_dense_loss_on_cpu(compat, dtype, monkeypatch):
    # FlexAttention has no CPU backward, and compiling its CPU kernel takes a minute: check the block mask and
    # its plumbing through the decoder with the uncompiled kernel, forward only (bf16: under autocast, as
    # Lightning's bf16-mixed precision runs it).
    monkeypatch.setattr(
        hf_flex,
        "compile_friendly_flex_attention",
        lambda q, k, v, training=False, **kwargs: flex_attention(q, k, v, **kwargs),
    )
    model = tiny_nxtp(reference_compat=compat)
    pixels, text = torch.randn(3, 3, 64, 64), batch(model)
    losses = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for path in ("dense", "flex"):
            model.attention = path
            losses[path] = model(pixels, text)
    assert losses["dense"][1] == losses["flex"][1]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(losses["flex"][0], losses["dense"][0], rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "device, path",
    [
        ("cpu", "compact"),
        pytest.param("cuda", "flex", marks=pytest.mark.skipif(not CUDA, reason="FlexAttention trains on a GPU only")),
    ],
)
def test_fast_paths_train_under_bf16_autocast(device, path):
    model = tiny_nxtp().train().to(device)
    pixels, text = torch.randn(3, 3, 64, 64, device=device), batch(model).to(device)
    losses = {}
    for attention in ("dense", path):
        model.attention = attention
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, _ = model(pixels, text)
        loss.backward()
        losses[attention] = loss.item()
    assert losses[path] == pytest.approx(losses["dense"], rel=2e-2)


def test_flex_refuses_to_train_on_cpu_and_auto_falls_back():
    model = tiny_nxtp()
    model.attention = "flex"
    with pytest.raises(RuntimeError, match="no CPU backward"):
        model(torch.randn(3, 3, 64, 64), batch(model))
    model.attention = "auto"
    assert model.attention_path(torch.device("cpu")) == "dense"


@pytest.mark.skipif(not CUDA, reason="FlexAttention trains on a GPU only")
@pytest.mark.parametrize("compat", [False, True])
def test_flex_path_gives_the_dense_loss_and_gradients_on_gpu(compat):
    model = tiny_nxtp(reference_compat=compat).train().cuda()
    pixels, text = torch.randn(3, 3, 64, 64, device="cuda"), batch(model).to("cuda")
    loss, n, grads = loss_and_grads(model, pixels, text, "dense")
    for path in ("flex", "compact"):
        loss_p, n_p, grads_p = loss_and_grads(model, pixels, text, path)
        assert n == n_p and grads.keys() == grads_p.keys()
        torch.testing.assert_close(loss_p, loss, rtol=1e-4, atol=1e-5)
        for name in grads:
            torch.testing.assert_close(grads_p[name], grads[name], rtol=1e-3, atol=1e-5, msg=f"{path}: {name}")
    model.attention = "auto"
    assert model.attention_path(torch.device("cuda")) == "flex"
