"""The NXTP model: loss invariances and one-shot sampling against brute-force decoding."""

import pytest
import torch
from conftest import LLAMA_TOKENIZER, tiny_nxtp

from lightning_modules.decoder import DecoderConfig
from lightning_modules.lit_nxtp import EvaluationConfig, LitNXTP, SpeedConfig
from lightning_modules.nxtp import NXTP, NXTPConfig
from lightning_modules.sampling import Branch, decode_branches, decode_recompute, one_shot, rank_labels, recognize
from lightning_modules.sequence import collate_text
from lightning_modules.vision import VisionConfig, frozen_prefix


def batch_loss(model, pixels, label_lists):
    seqs = [model.sequences(model.prompt, labels) for labels in label_lists]
    return model(pixels, collate_text(seqs, model.sequences.pad_id))


def test_permuting_labels_does_not_change_the_loss():
    model = tiny_nxtp(reset_label_positions=True)
    pixels = torch.randn(2, 3, 64, 64)
    loss, n = batch_loss(model, pixels, [["dog", "frisbee", "grass"], ["traffic light", "bus"]])
    permuted, n2 = batch_loss(model, pixels, [["grass", "dog", "frisbee"], ["bus", "traffic light"]])
    torch.testing.assert_close(loss, permuted, rtol=1e-6, atol=1e-6)
    assert n == n2
    other, _ = batch_loss(model, pixels, [["cat", "frisbee", "grass"], ["traffic light", "bus"]])
    assert abs(other.item() - loss.item()) > 1e-4  # the loss does depend on the labels


@pytest.mark.parametrize("attention", ["dense", "compact"])
def test_causal_label_attention_is_a_plain_language_model_loss_over_the_labels(attention):
    # The paper's baseline: the labels are one causal text after the prompt. Against an independent computation:
    # the decoder run with a hand-built mask (image rows see the whole image, every other row all rows before it)
    # and each text token predicted from the row before it.
    model = tiny_nxtp(label_attention="causal", attention=attention)
    pixels = torch.randn(2, 3, 64, 64)
    label_lists = [["dog", "frisbee", "grass"], ["traffic light", "bus"]]
    loss, n = batch_loss(model, pixels, label_lists)
    seqs = [model.sequences(model.prompt, labels) for labels in label_lists]
    text = collate_text(seqs, model.sequences.pad_id)
    k = model.n_image_tokens
    size = k + text.ids.shape[1]
    pos = torch.arange(size)
    mask = (pos[None, :] <= pos[:, None]) | ((pos[:, None] < k) & (pos[None, :] < k))
    with torch.no_grad():
        hidden = model.hidden_states(
            model.embed_images(pixels), text.ids, mask[None, None].expand(2, 1, size, size), pos.expand(2, size)
        )
        logits = model.logits(hidden[:, k:-1]).float()
    targets = text.ids[:, 1:].clone()
    targets[torch.arange(1, text.ids.shape[1])[None] >= text.lengths[:, None]] = -100  # padding
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert n == (targets >= 0).sum()
    masked = tiny_nxtp(attention=attention)  # the same weights (same seed), labels trained apart
    assert abs(batch_loss(masked, pixels, label_lists)[0].item() - loss.item()) > 1e-4


def test_an_unknown_label_attention_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="model.nxtp.label_attention='bidirectional'"):
        tiny_nxtp(label_attention="bidirectional")


def test_padding_and_batch_neighbours_do_not_change_a_sample():
    model = tiny_nxtp()
    pixels = torch.randn(2, 3, 64, 64)
    alone, n_alone = batch_loss(model, pixels[:1], [["dog", "frisbee"]])
    both, n_both = batch_loss(model, pixels, [["dog", "frisbee"], ["a very long label with many words", "x"]])
    second, n_second = batch_loss(model, pixels[1:], [["a very long label with many words", "x"]])
    mean = (alone * n_alone + second * n_second) / (n_alone + n_second)
    torch.testing.assert_close(both, mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_sampling_matches_brute_force(seed):
    model = tiny_nxtp(seed=seed)
    # Make the delimiter likely after a few tokens so that branches end at different steps.
    with torch.no_grad():
        model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 4
    pixels = torch.randn(3, 3, 64, 64)
    rows = []  # batch rows of every decoder call: the prefix, then one call per step
    hook = model.decoder.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(kwargs["inputs_embeds"])), with_kwargs=True
    )
    cached = decode_branches(model, pixels, topk=6, max_label_tokens=5)
    hook.remove()
    brute = decode_recompute(model, pixels, topk=6, max_label_tokens=5)  # every step recomputed, no cache
    # A step decodes only the branches that have not ended (18 = 3 images x 6 branches).
    lengths = [len(b.tokens) + (b.stop_prob is not None) for image in cached for b in image]
    assert rows[0] == 3 and rows[1:] == [sum(n > step for n in lengths) for step in range(1, len(rows))]
    assert rows[-1] < 18
    ended = 0
    for got_image, want_image in zip(cached, brute):
        for got, (tokens, probs, stop) in zip(got_image, [(b.tokens, b.probs, b.stop_prob) for b in want_image]):
            assert got.tokens == tokens
            torch.testing.assert_close(torch.tensor(got.probs), torch.tensor(probs), rtol=1e-4, atol=1e-6)
            assert (got.stop_prob is None) == (stop is None)
            if stop is not None:
                ended += 1
                assert got.stop_prob == pytest.approx(stop, rel=1e-4)
    assert ended > 0  # the comparison covered branches that stopped at the delimiter


def test_the_decoding_loop_on_a_hand_computed_case():
    # Vocabulary of 5, delimiter 3, end 4. The next token depends on the last one only (a table), so every
    # branch can be followed by hand: 1 -> 2 (0.6) -> 3 (0.7, stop); 2 -> 3 (0.7, stop); 3 drawn first ends at once.
    table = torch.tensor(
        [[0.9, 0.1, 0, 0, 0], [0.1, 0, 0.6, 0.2, 0.1], [0.1, 0, 0.2, 0.7, 0], [0.5, 0.5, 0, 0, 0], [1.0, 0, 0, 0, 0]]
    )
    calls = []

    def step(tokens, keep, offset):
        calls.append((tokens.tolist(), None if keep is None else keep.tolist(), offset))
        return table[tokens]

    first = torch.tensor([[0.1, 0.4, 0.3, 0.15, 0.05]])
    (branches,) = one_shot(first, step, topk=3, stop_ids=[3, 4], max_label_tokens=5)
    assert [b.tokens for b in branches] == [[1, 2], [2], []]
    assert [b.stop_prob for b in branches] == pytest.approx([0.7, 0.7, 0.15])
    assert branches[0].probs == pytest.approx([0.4, 0.6]) and branches[1].probs == pytest.approx([0.3])
    # Finished branches leave the batch: step 1 runs branches 0 and 1, step 2 branch 0 only.
    assert calls == [([1, 2], [True, True, False], 1), ([2], [True, False], 2)]
    # Without a stop, a branch ends at the step limit with no stop probability.
    (capped,) = one_shot(
        torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]),
        lambda t, k, o: torch.eye(6)[t],
        topk=1,
        stop_ids=[3, 4],
        max_label_tokens=3,
    )
    assert capped[0].tokens == [5, 5, 5] and capped[0].stop_prob is None


def test_rank_labels_merges_scores_and_sorts():
    words = {1: "dog", 2: " dog", 3: "cat", 4: ""}
    decode = lambda ids: "".join(words[i] for i in ids)  # noqa: E731
    branches = [
        Branch([3], [0.30], 0.9),  # cat: 0.27
        Branch([1], [0.20], 0.8),  # dog: 0.16
        Branch([2], [0.15], 1.0),  # " dog" -> dog: +0.15 = 0.31
        Branch([3, 3], [0.1, 0.5], None),  # step limit: "catcat" keeps 0.05
        Branch([4], [0.05], 1.0),  # empty label: dropped
    ]
    ranked = rank_labels(branches, decode)
    assert [label for label, _ in ranked] == ["dog", "cat", "catcat"]
    assert [p for _, p in ranked] == pytest.approx([0.31, 0.27, 0.05])
    assert [label for label, _ in rank_labels(branches, decode, min_prob=0.1)] == ["dog", "cat"]


def test_recognize_returns_sorted_probabilities_per_image():
    model = tiny_nxtp()
    results = recognize(model, torch.randn(2, 3, 64, 64), topk=4, max_label_tokens=3)
    assert len(results) == 2
    for labels in results:
        probs = [p for _, p in labels]
        assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)
        assert 1 <= len(labels) <= 4


def test_padding_to_a_multiple_leaves_loss_and_gradients_unchanged():
    model = tiny_nxtp().train()
    pixels = torch.randn(2, 3, 64, 64)
    seqs = [model.sequences(model.prompt, labels) for labels in [["dog", "frisbee"], ["a long label", "x"]]]
    text = collate_text(seqs, model.sequences.pad_id)
    results = []
    for multiple in (None, 64):
        model.pad_to_multiple = multiple
        model.zero_grad()
        loss, n = model(pixels, text)
        loss.backward()
        results.append(
            (loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        )
    (loss, n, grads), (padded, n_padded, grads_padded) = results
    assert (model.n_image_tokens + text.ids.shape[1]) % 64 != 0  # the padding did add positions
    assert model.pad(text).ids.shape[1] + model.n_image_tokens == 64
    assert n == n_padded
    torch.testing.assert_close(padded, loss, rtol=1e-6, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_padded[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("trainable_from", [0, 2, 3, 4])  # first trainable block; 3: only ln_post; 4: none
def test_frozen_vision_blocks_run_without_autograd_and_keep_the_gradients(trainable_from, checkpointing):
    vit = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 4, "vocab_size": 8, "width": 16, "heads": 1, "layers": 1},
    }
    torch.manual_seed(0)
    decoder = DecoderConfig(
        config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4
        )
    )
    model = NXTP(
        NXTPConfig(VisionConfig(model_name="three-block-vit", config=vit), decoder, str(LLAMA_TOKENIZER))
    ).train()
    model.visual.set_grad_checkpointing(checkpointing)
    pixels = torch.randn(2, 3, 32, 32)
    text = collate_text([model.sequences(model.prompt, ["dog", "cat"])] * 2, model.sequences.pad_id)

    def trainable(name: str) -> bool:
        if not name.startswith("visual."):
            return True
        if name.startswith("visual.transformer.resblocks."):
            return int(name.split(".")[3]) >= trainable_from
        return name.startswith("visual.ln_post.") and trainable_from <= 3

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(pixels, text)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if trainable(n)}

    full = grads()  # everything trains: the whole tower runs with autograd
    outputs = []
    hook = model.visual.transformer.resblocks[0].register_forward_hook(lambda m, i, out: outputs.append(out))
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))
    assert frozen_prefix(model.visual) == trainable_from
    frozen = grads()
    hook.remove()
    assert outputs[-1].requires_grad == (trainable_from == 0)  # no graph through the frozen blocks
    assert frozen.keys() == full.keys()
    for name in full:
        torch.testing.assert_close(frozen[name], full[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.e2e
def test_compiled_decoder_keeps_parameter_names_loss_and_gradients():
    def module(compile: bool) -> LitNXTP:
        torch.manual_seed(0)
        decoder = DecoderConfig(
            config=dict(
                hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
            )
        )
        return LitNXTP(
            NXTPConfig(VisionConfig(model_name="nxtp-tiny-vit"), decoder, str(LLAMA_TOKENIZER)),
            evaluation=EvaluationConfig(semantic_metric=False),
            speed=SpeedConfig(compile=compile, pad_to_multiple=32),
        )

    eager, compiled = module(False), module(True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints stay interchangeable
    model = eager.model
    text = collate_text([model.sequences(model.prompt, ["dog", "cat"])] * 2, model.sequences.pad_id)
    pixels = torch.randn(2, 3, 64, 64)
    losses = []
    for m in (eager, compiled):
        loss, _ = m.model(pixels, text)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_random_init_tower_builds_quietly_but_other_warnings_stay(caplog):
    import logging

    from lightning_modules.vision import VisionConfig, _quiet_random_init, build_vision_tower

    with caplog.at_level(logging.WARNING):
        build_vision_tower(VisionConfig(model_name="nxtp-tiny-vit"))
        with _quiet_random_init(True):
            logging.warning("something else")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("No pretrained weights loaded" in m for m in messages) and "something else" in messages


def test_the_pool_first_stem_is_the_same_function_in_eval_mode_and_differs_only_in_batch_statistics():
    """Max-pool commutes with a per-channel increasing map, and BatchNorm in eval mode with positive scales followed
    by ReLU is one: the two stems compute the same function from the same weights. In training BatchNorm normalises
    with the statistics of what it sees, the pooled maps in one order and the full maps in the other."""
    from lightning_modules.vision import ConvStem

    torch.manual_seed(0)
    after, first = ConvStem(32, 8), ConvStem(32, 8, pool_first=True)
    assert [type(m).__name__ for m in first][:4] == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    assert [type(m).__name__ for m in after][:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    for norm in (m for m in after if isinstance(m, torch.nn.BatchNorm2d)):
        norm.weight.data.uniform_(0.5, 2.0)
        norm.bias.data.normal_()
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    new_place = {0: 0, 1: 2, 2: 3, 3: 1}  # a stage's conv, BN, ReLU, pool -> conv, pool, BN, ReLU
    moved = {}
    for key, value in after.state_dict().items():
        index, name = key.split(".", 1)
        moved[f"{4 * (int(index) // 4) + new_place[int(index) % 4]}.{name}"] = value
    first.load_state_dict(moved)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(first.eval()(x), after.eval()(x))
    assert not torch.allclose(first.train()(x), after.train()(x))
