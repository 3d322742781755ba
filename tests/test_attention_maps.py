"""Attention maps per label: the metric on hand-made maps, the maps against a manual softmax(QK^T) of the decoder's
weights, and a trained model against the uniform baseline."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import (
    LLAMA_TOKENIZER,
    TEST_SHARD,
    TRAINED_DEFAULT,
    eval_attention_maps,
    experiment,
    needs_trained_default,
    tiny_nxtp,
)
from PIL import Image

from lightning_modules import attention_maps as am
from lightning_modules.decoder import LABEL_MASKED, DecoderConfig
from lightning_modules.masking import label_masked_attention
from lightning_modules.nxtp import NXTP, NXTPConfig
from lightning_modules.sampling import recognize
from lightning_modules.sequence import collate_text, segment_ids
from lightning_modules.vision import VisionConfig

# the metric on hand-made maps --------------------------------------------------------------------------------------


def one_hot(grid: tuple[int, int], cell: tuple[int, int]) -> np.ndarray:
    m = np.zeros(grid)
    m[cell] = 1.0
    return m


def test_box_coverage_counts_the_covered_share_of_each_patch():
    # 64 px in 4x4 patches of 16 px: a box over patch (1, 2) and the left half of patch (1, 3).
    cov = am.box_coverage([[32, 16, 56, 32]], (4, 4), (64, 64))
    expected = np.zeros((4, 4))
    expected[1, 2], expected[1, 3] = 1.0, 0.5
    np.testing.assert_allclose(cov, expected)
    # two boxes of one kind: their union
    assert am.box_coverage([[0, 0, 16, 16], [48, 48, 64, 64]], (4, 4), (64, 64)).sum() == 2


def test_pointing_game_on_hand_made_maps():
    cov = am.box_coverage([[0, 0, 16, 16], [48, 48, 64, 64]], (4, 4), (64, 64))  # two objects of the kind
    assert am.pointing_hit(one_hot((4, 4), (0, 0)), cov) == 1
    assert am.pointing_hit(one_hot((4, 4), (3, 3)), cov) == 1  # the other object of that kind counts too
    assert am.pointing_hit(one_hot((4, 4), (1, 2)), cov) == 0
    near_miss = np.full((4, 4), 0.05)
    near_miss[2, 1] = 0.2
    assert am.pointing_hit(near_miss, cov) == 0
    # ties at the peak are a random pick: a uniform map scores the share of patches that touch a box
    assert am.pointing_hit(am.uniform_map((4, 4)), cov) == pytest.approx(2 / 16)


def test_mass_in_box_on_hand_made_maps():
    cov = am.box_coverage([[32, 16, 56, 32]], (4, 4), (64, 64))
    assert am.mass_in_box(one_hot((4, 4), (1, 2)), cov) == 1
    assert am.mass_in_box(one_hot((4, 4), (1, 3)), cov) == 0.5
    assert am.mass_in_box(one_hot((4, 4), (3, 0)), cov) == 0
    # a uniform map puts the box's share of the image inside it; the scale of a map does not matter
    assert am.mass_in_box(am.uniform_map((4, 4)), cov) == pytest.approx(24 * 16 / 64**2)
    assert am.mass_in_box(7 * one_hot((4, 4), (1, 3)), cov) == 0.5


def test_centre_prior_peaks_at_the_centre():
    prior = am.centre_prior((5, 7))
    assert prior.sum() == pytest.approx(1) and np.unravel_index(prior.argmax(), prior.shape) == (2, 3)
    central = am.box_coverage([[24, 24, 40, 40]], (4, 4), (64, 64))  # the four central patches
    assert am.pointing_hit(am.centre_prior((4, 4)), central) == 1


@pytest.mark.parametrize("size", [(200, 100), (90, 160), (64, 64)])
def test_transform_box_follows_the_eval_transform(size):
    """A white box drawn on the original image lands where the model's own eval transform puts its pixels."""
    model = tiny_nxtp()
    box = [size[0] * 0.55, size[1] * 0.3, size[0] * 0.8, size[1] * 0.7]
    image = Image.new("RGB", size)
    image.paste((255, 255, 255), tuple(int(v) for v in box))
    view = np.asarray(am.pixels_to_image(model, model.eval_transform(image)).convert("L")) > 128
    ys, xs = np.nonzero(view)
    seen = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    np.testing.assert_allclose(am.transform_box([int(v) for v in box], size, (64, 64)), seen, atol=1.5)


# the maps ----------------------------------------------------------------------------------------------------------


def gqa_nxtp(kv_heads: int, image_size=(64, 64)) -> NXTP:
    """A tiny random NXTP with 2 blocks of 4 query heads over ``kv_heads`` key/value heads, any image grid."""
    torch.manual_seed(1)
    vision = VisionConfig(
        model_name="nxtp-test-vit",
        config={
            "embed_dim": 32,
            "vision_cfg": {
                "image_size": list(image_size),
                "patch_size": 16,
                "width": 64,
                "layers": 1,
                "head_width": 32,
            },
            "text_cfg": {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1},
        },
    )
    decoder = DecoderConfig(
        config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            max_position_embeddings=256,
        )
    )
    return NXTP(NXTPConfig(vision, decoder, str(LLAMA_TOKENIZER))).eval()


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout, written out: [B, heads, L, d] at ``positions`` [L]."""
    d = x.shape[-1]
    freqs = positions[:, None].double() / theta ** (torch.arange(0, d, 2).double() / d)
    cos, sin = torch.cat([freqs, freqs], -1).cos().float(), torch.cat([freqs, freqs], -1).sin().float()
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + half * sin


def manual_attention(model: NXTP, pixels: torch.Tensor, label: str) -> tuple[list[torch.Tensor], dict]:
    """Every layer's attention [heads, L, L] of ``image <|image|> <s> PROMPT label ,`` in one full pass, as
    softmax(QK^T) of the decoder's own weights, with the training mask (no cache, no explain code)."""
    seqs = model.sequences
    seq = seqs(model.prompt, [label])
    text = collate_text([seq], seqs.pad_id)
    image = model.embed_images(pixels[None])
    n_image = image.shape[1]
    mask = label_masked_attention(segment_ids(text, n_image))[0, 0]  # [L, L]
    embeds = torch.cat([image, model.embed_text(text.ids)], 1)
    length = embeds.shape[1]
    base = model.decoder.get_decoder()
    inputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for layer in base.layers]
    with torch.no_grad():
        out = base(inputs_embeds=embeds, attention_mask=mask[None, None], position_ids=torch.arange(length)[None])
    for h in hooks:
        h.remove()
    cfg = model.decoder.config
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    weights = []
    for layer, x in zip(base.layers, inputs):
        attn = layer.self_attn
        x = layer.input_layernorm(x)
        d = attn.head_dim
        q = attn.q_proj(x).view(1, length, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(1, length, -1, d).transpose(1, 2)
        q, k = rotate(q, torch.arange(length), theta), rotate(k, torch.arange(length), theta)
        k = k[:, torch.arange(q.shape[1]) // (q.shape[1] // k.shape[1])]  # query head h reads kv head h // groups
        scores = (q @ k.transpose(-1, -2) / d**0.5).masked_fill(~mask, float("-inf"))
        weights.append(scores.softmax(-1)[0].detach())
    logits = model.logits(out.last_hidden_state)[0].softmax(-1)
    start, end = n_image + seq.anchor + 1, n_image + len(seq.ids) - 1  # first label token, delimiter
    ids = text.ids[0, seq.anchor + 1 :]
    score = logits[start - 1 : end].gather(1, ids[:, None]).prod().item()
    return weights, dict(n_image=n_image, rows=list(range(start, end + 1)), score=score)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_head_map_is_that_heads_softmax_qk(kv_heads):
    model = gqa_nxtp(kv_heads)
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 64, 64)
    labels = [["red star", "cat"], ["umbrella"]]
    record = am.label_attention(model, pixels, labels)
    n = 0
    for b, image_labels in enumerate(labels):
        for label in image_labels:
            weights, info = manual_attention(model, pixels[b], label)
            image = slice(0, info["n_image"])
            for layer in range(2):
                for head in range(4):
                    truth = weights[layer][head][info["rows"], image].mean(0)
                    got = am.maps(record, "head", layer, head)[n].flatten()
                    torch.testing.assert_close(got, truth / truth.sum(), atol=1e-5, rtol=1e-4)
            truth = torch.stack([w.mean(0)[info["rows"], image].mean(0) for w in weights]).mean(0)
            torch.testing.assert_close(am.maps(record, "mean")[n].flatten(), truth / truth.sum(), atol=1e-5, rtol=1e-4)
            # rollout as the product of (A + I) / 2 over the whole sequence, top layer first
            eye = torch.eye(weights[0].shape[-1])
            r = torch.linalg.multi_dot([(w.mean(0) + eye) / 2 for w in reversed(weights)])[info["rows"]].mean(0)[image]
            torch.testing.assert_close(am.maps(record, "rollout")[n].flatten(), r / r.sum(), atol=1e-5, rtol=1e-4)
            assert record.scores[b][labels[b].index(label)] == pytest.approx(info["score"], rel=1e-4)
            n += 1


@pytest.mark.parametrize("image_size", [(64, 64), (48, 80)])
def test_maps_are_distributions_over_the_patch_grid(image_size):
    model = gqa_nxtp(4, image_size)
    pixels = torch.randn(3, 3, *image_size)
    grid = (image_size[0] // 16, image_size[1] // 16)
    per_image = am.explain(model, pixels, topk=3)
    assert [len(x) for x in per_image] == [3, 3, 3]
    for method in am.METHODS:
        record = am.label_attention(model, pixels, [["dog"], [], ["cat", "a red star"]], gradient=True)
        grids = am.maps(record, method, layer=-1, head=3)
        assert grids.shape == (3, *grid)
        assert (grids >= 0).all()
        torch.testing.assert_close(grids.sum((1, 2)), torch.ones(3))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_the_gradient_map_is_a_whole_sequence_backward_by_hand(kv_heads):
    """Chefer's relu(dA * A), computed independently: for each (image, label) pair the whole sequence (image,
    prompt, label, delimiter) through transformers' eager attention, whose weights are on the autograd graph, with
    the label-masked rule for one label (image bidirectional, text causal) as an additive mask; backward of the
    label's log-probability; the rows from the anchor on, image columns, mean over heads and layers."""
    model = gqa_nxtp(kv_heads)
    pixels = torch.randn(2, 3, 64, 64)
    labels = [["dog", "a red star"], ["cat"]]
    record = am.label_attention(model, pixels, labels, gradient=True)
    seq, decoder = model.sequences, model.decoder.get_decoder()
    prompt = seq.prompt_ids(model.prompt)
    configs = {
        id(m.config): m.config
        for m in model.decoder.modules()
        if hasattr(getattr(m, "config", None), "_attn_implementation")
    }
    before = {k: c._attn_implementation for k, c in configs.items()}
    expected = []
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        for b, names in enumerate(labels):
            for name in names:
                ids = am._label_ids(model, name) + [seq.delimiter_id]
                with torch.no_grad():
                    image = model.embed_images(pixels[b : b + 1])
                n_image, anchor = image.shape[1], image.shape[1] + len(prompt) - 1
                length = n_image + len(prompt) + len(ids)
                allowed = torch.ones(length, length).tril().bool()
                allowed[:n_image, :n_image] = True
                mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, float("-inf"))
                with torch.enable_grad():
                    embeds = torch.cat([image, model.embed_text(torch.tensor([prompt + ids]))], 1).detach()
                    out = decoder(
                        inputs_embeds=embeds,
                        attention_mask=mask,
                        position_ids=torch.arange(length)[None],
                        output_attentions=True,
                    )
                    rows = out.last_hidden_state[0, anchor : anchor + len(ids)]  # row i predicts ids[i]
                    logp = model.logits(rows).float().log_softmax(-1)[torch.arange(len(ids)), ids].sum()
                    grads = torch.autograd.grad(logp, out.attentions)
                cam = torch.stack([(g * a).clamp(min=0).mean(1) for g, a in zip(grads, out.attentions)]).mean(0)
                expected.append(cam[0, anchor:, :n_image].sum(0))
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]
    expected = torch.stack(expected)
    assert (expected.sum(1) > 1e-4).all()  # a real map, not the floor
    torch.testing.assert_close(record.gradient, expected + 1e-12, rtol=1e-4, atol=1e-9)


def test_a_cls_token_among_the_image_tokens_is_left_out():
    model = tiny_nxtp()
    pixels = torch.randn(1, 3, 64, 64)
    plain = am.label_attention(model, pixels, [["dog"]], gradient=True)
    patches = model.embed_images
    model.embed_images = lambda x: torch.cat([torch.zeros_like(patches(x)[:, :1]), patches(x)], 1)  # a CLS first
    with_cls = am.label_attention(model, pixels, [["dog"]], gradient=True)
    assert with_cls.heads[0].shape[-1] == plain.heads[0].shape[-1] + 1
    for method in am.METHODS:
        grids = am.maps(with_cls, method)
        assert grids.shape == (1, 4, 4)
        torch.testing.assert_close(grids.sum(), torch.tensor(1.0))


def test_predicted_labels_are_those_of_the_sampler_and_the_model_is_restored():
    model = tiny_nxtp(blocks=2)
    pixels = torch.randn(2, 3, 64, 64)
    record = am.label_attention(model, pixels, topk=4, gradient=True)
    ranked = recognize(model, pixels, topk=4)
    assert record.labels == [[label for label, _ in r] for r in ranked]
    assert record.scores == [[p for _, p in r] for r in ranked]
    # the same labels given: the same maps (the sampler's prefix pass was reused, not run differently)
    again = am.label_attention(model, pixels, record.labels, gradient=True)
    for method in am.METHODS:
        torch.testing.assert_close(am.maps(record, method), am.maps(again, method))
    assert model.decoder.config._attn_implementation == LABEL_MASKED
    assert all(p.grad is None for p in model.parameters())  # the gradient map leaves the model's .grad alone
    with pytest.raises(ValueError, match="label lists"):
        am.label_attention(model, pixels, [["dog"]])
    assert model.decoder.config._attn_implementation == LABEL_MASKED


def test_writers(tmp_path):
    grid = np.full((4, 4), 0.2 / 15, dtype=np.float32)
    grid[0, 3] = 0.8
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    path = am.write_maps(tmp_path, "scene", image, [am.LabelMap("red star", 0.5, grid)])
    entry = json.loads(path.read_text())["labels"][0]
    assert entry["label"] == "red star" and np.allclose(entry["grid"], grid, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / entry["npy"]), grid)
    png = np.asarray(Image.open(tmp_path / entry["png"]), dtype=float)
    assert png.shape[1] == 256 and png.shape[0] > 256  # enlarged 4x, the scale strip below
    # the heat alone (no box drawn): brightest at the peak (top right), not in the far corner
    heat = np.asarray(am.overlay(image, grid, scale_bar=False), dtype=float)
    assert heat[24:40, 216:232].mean() > heat[216:232, 24:40].mean() + 30
    # the box is drawn around the peak cell, in the location colour
    cyan = np.all(np.abs(png[..., :3] - np.array(am.LOCATION_COLOURS[0])) < 1, axis=-1)
    ys, xs = np.nonzero(cyan[:256])
    assert xs.min() >= 180 and ys.max() <= 70
    # the scale strip runs from the map's minimum (dark) to its peak (bright)
    strip = png[-2].sum(-1)
    assert strip[-1] > strip[0] + 300
    values = np.linspace(0, 1, 11)
    assert np.all(np.diff(am.colormap(values).astype(int).sum(-1)) > 0)  # darker to brighter


# a trained model against the baselines ------------------------------------------------------------------------------


@pytest.mark.slow
@needs_trained_default
def test_the_trained_default_model_points_at_the_objects():
    """On the test scenes, the default map of the trained default model finds the labelled object more often than
    a uniform map does, by more than the noise of 200 images (the measurement of experiments/eval_attention_maps.py)."""
    evaluation = eval_attention_maps()
    scenes = list(itertools.islice(evaluation.read_scenes([str(TEST_SHARD)]), 200))
    results = evaluation.evaluate(evaluation.load_model(str(TRAINED_DEFAULT)), scenes, 50, torch.device("cpu"))
    hits, mass = (np.asarray(v) for v in results[am.DEFAULT_METHOD])
    uniform_hits, uniform_mass = (np.asarray(v) for v in results["uniform"])
    margin = 2 * np.sqrt(hits.var() / len(hits))
    assert hits.mean() > uniform_hits.mean() + margin, (hits.mean(), uniform_hits.mean())
    assert mass.mean() > uniform_mass.mean(), (mass.mean(), uniform_mass.mean())


def test_fine_maps_of_a_batch_of_pairs_are_those_of_each_pair_alone():
    """experiments/eval_fine_maps.py runs every (image, label) pair in one batch: in eval mode (BatchNorm's running
    statistics) each pair's gradient maps must be those of the pair run alone, up to the positive factor of the
    loss's mean over the batch's tokens (pointing takes the maximum, which no factor moves)."""
    fine = experiment("eval_fine_maps")
    model = tiny_nxtp(vision=VisionConfig(model_name="nxtp-tiny-vit", conv_stem=True, stem_pool_first=True))
    kept = fine.stem_activations(model)
    pixels = torch.randn(2, 3, *model.image_size)
    labels = [["cat", "red dress"], ["car"]]
    together = fine.fine_maps(model, pixels, labels, kept)
    pairs = [(b, label) for b, ls in enumerate(labels) for label in ls]
    assert together["|grad|"].shape == (3, *model.image_size)
    assert any("stage1" in k for k in together) and any("stage4" in k for k in together)
    for n, (image, label) in enumerate(pairs):
        alone = fine.fine_maps(model, pixels[image : image + 1], [[label]], kept)
        for name, maps in together.items():
            # a map clamped at 0 may be 0 everywhere (Grad-CAM of a random model)
            batched, single = maps[n], alone[name][0]
            np.testing.assert_allclose(
                batched / max(batched.max(), 1e-30), single / max(single.max(), 1e-30), atol=1e-4, err_msg=name
            )
