"""Greedy and beam search (the paper's baselines, ``sampling.generate_text``) against decoding by hand: the whole
sequence run again at every step with a hand-built mask (image rows see the whole image, text rows all before)."""

import json

import pytest
import torch
from conftest import tiny_nxtp

from lightning_modules.sampling import generate_labels, generate_text, label_images, recognize
from lightning_modules.sequence import collate_text


@pytest.fixture(scope="module")
def model():
    model = tiny_nxtp(seed=3)
    with torch.no_grad():  # labels of a few tokens, and an end, as a trained model writes them
        model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 3
        model.decoder.get_output_embeddings().weight[model.sequences.eos_id] *= 2
    return model


def next_probs(model, pixels: torch.Tensor, text: list[int]) -> torch.Tensor:
    """The next-token distribution after the image and ``text`` ids, from scratch."""
    image = model.embed_images(pixels[None])
    k, n = image.shape[1], len(text)
    pos = torch.arange(k + n)
    mask = (pos[None, :] <= pos[:, None]) | ((pos[:, None] < k) & (pos[None, :] < k))
    hidden = model.hidden_states(image, torch.tensor([text]), mask[None, None], pos[None])
    return model.logits(hidden[0, -1]).float().softmax(-1)


@torch.no_grad()
def test_greedy_search_picks_the_most_probable_token_at_every_step(model):
    pixels = torch.randn(2, 3, 64, 64)
    tokens, probs = generate_text(model, pixels, beams=1, max_new_tokens=8)
    seqs = model.sequences
    for image, got_tokens, got_probs in zip(pixels, tokens.tolist(), probs.tolist()):
        text = seqs.prompt_ids(model.prompt)
        for token, prob in zip(got_tokens, got_probs):
            if token == seqs.pad_id:  # after the end token
                break
            p = next_probs(model, image, text)
            assert token == int(p.argmax()) and prob == pytest.approx(float(p.max()), rel=1e-4)
            text.append(token)
            if token == seqs.eos_id:
                break


@torch.no_grad()
def test_beam_search_reports_the_probabilities_of_its_best_beam_and_beats_greedy(model):
    pixels = torch.randn(1, 3, 64, 64)
    greedy_tokens, greedy_probs = generate_text(model, pixels, beams=1, max_new_tokens=6)
    tokens, probs = generate_text(model, pixels, beams=4, max_new_tokens=6)
    seqs = model.sequences
    for image, got_tokens, got_probs, g in zip(pixels, tokens.tolist(), probs.tolist(), greedy_probs):
        text = seqs.prompt_ids(model.prompt)
        for token, prob in zip(got_tokens, got_probs):
            if token == seqs.pad_id:
                break
            assert prob == pytest.approx(float(next_probs(model, image, text)[token]), rel=1e-3)
            text.append(token)
        # the best of 4 beams is at least as probable a text as the greedy one (both ran to the same length here)
        assert torch.tensor(got_probs).log().sum() >= g.log().sum() - 1e-4


def test_labels_are_split_at_the_delimiter_with_their_probabilities(model):
    pixels = torch.randn(1, 3, 64, 64)
    tokens, probs = generate_text(model, pixels, beams=1, max_new_tokens=16)
    labels = generate_labels(model, pixels, beams=1, max_new_tokens=16)[0]
    seqs, expected, current, p = model.sequences, {}, [], 1.0
    for token, prob in zip(tokens[0].tolist(), probs[0].tolist()):
        if token == seqs.pad_id:
            break
        p *= prob
        if token in (seqs.delimiter_id, seqs.eos_id):
            expected.setdefault(model.tokenizer.decode(current).replace(",", "").strip(), p)
            current, p = [], 1.0
            if token == seqs.eos_id:
                break
        else:
            current.append(token)
    expected.pop("", None)
    assert labels and dict(labels) == pytest.approx(expected)
    assert [q for _, q in labels] == sorted((q for _, q in labels), reverse=True)


def test_the_sampler_is_chosen_by_name(model):
    pixels = torch.randn(1, 3, 64, 64)
    assert label_images(model, pixels, "one-shot", topk=3) == recognize(model, pixels, topk=3)
    greedy = label_images(model, pixels, "greedy", topk=2, max_new_tokens=8)
    assert greedy == [generate_labels(model, pixels, max_new_tokens=8)[0][:2]]
    beam = label_images(model, pixels, "beam", topk=5, beams=3, max_new_tokens=8)
    assert beam == [generate_labels(model, pixels, beams=3, max_new_tokens=8)[0][:5]]
    with pytest.raises(ValueError, match="sampler 'nucleus'"):
        label_images(model, pixels, "nucleus")
    with pytest.raises(ValueError, match="beams=0"):
        generate_text(model, pixels, beams=0)


def test_nxtp_label_with_the_baseline_samplers(tmp_path, model, capsys):
    from PIL import Image

    from lightning_modules.cli.label import label_main
    from lightning_modules.recognizer import Recognizer

    model.save_pretrained(tmp_path / "model")
    Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "red.png")
    for sampler, beams in (("greedy", 1), ("beam", 2)):
        args = ["--checkpoint", str(tmp_path / "model"), "--sampler", sampler, "--beams", str(beams), "--topk", "3"]
        args += ["--workers", "0"]
        assert label_main([*args, str(tmp_path / "red.png")]) == 0
        (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        expected = Recognizer(model).label([tmp_path / "red.png"], topk=3, sampler=sampler, beams=beams)[0]
        assert [(x["label"], x["prob"]) for x in line["labels"]] == [(label, pytest.approx(p)) for label, p in expected]
    for bad, words in ((["--beams", "0"], "--beams 0"), (["--sampler", "greedy", "--threshold", "auto"], "one-shot")):
        with pytest.raises(SystemExit):
            label_main(["--checkpoint", str(tmp_path / "model"), *bad, str(tmp_path / "red.png")])
        assert words in capsys.readouterr().err


def test_evaluation_scores_the_sampler_it_is_given(model):
    from lightning_modules.batch import Batch
    from lightning_modules.lit_nxtp import EvaluationConfig, LitNXTP

    module = LitNXTP(
        model.config, evaluation=EvaluationConfig(topk=[1, 2], semantic_metric=False, sampler="greedy", log_images=0)
    )
    module.model.load_state_dict(model.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    generated = generate_labels(module.model.eval(), pixels)
    references = [[labels[0][0]] if labels else ["nothing"] for labels in generated]  # each image's best label
    text = collate_text([module.model.sequences(model.prompt, r) for r in references], model.sequences.pad_id)
    with torch.no_grad():
        scored = module._evaluate(Batch(pixels, text, references, ["a", "b"]))
    assert scored == [labels[:2] for labels in generated]
    top1 = module.metrics["exact_top1"].compute()
    assert top1["recall"] == pytest.approx(1.0)  # the best generated label of each image is its reference
    with pytest.raises(ValueError, match="model.evaluation.beams=0"):
        EvaluationConfig(sampler="beam", beams=0)
