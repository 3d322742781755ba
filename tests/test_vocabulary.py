"""Closed vocabularies: exact scores against brute force and open-set sampling, mapping, bad files, the metric."""

import json
import warnings

import pytest
import torch
from conftest import OFFICIAL, tiny_nxtp

from lightning_modules.batch import Batch
from lightning_modules.cli.label import label_main
from lightning_modules.masking import prefix_attention
from lightning_modules.recognizer import Recognizer
from lightning_modules.sampling import decode_branches, recognize
from lightning_modules.vocabulary import (
    LabelMapper,
    Vocabulary,
    VocabularyError,
    VocabularyScore,
    score_vocabulary,
    tokenize,
    vocabulary_targets,
)

NAMES = ["dog", "cat", "traffic light", "a.", "hot-dog stand", "b", "sofa", "couch", "zebra crossing", "x y z"]


def ending_model(seed: int = 5, **kwargs):
    """A random model whose labels end after a few tokens, as a trained model's do."""
    model = tiny_nxtp(seed=seed, **kwargs)
    with torch.no_grad():
        model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 4
    return model


def peaked_model(seed: int = 5, **kwargs):
    """A random model whose output favours the tokens of ``NAMES`` and the delimiter, as a trained model favours
    the tokens of its labels: probabilities far from 0 (a 32k-token uniform guess gives 1e-5 per token)."""
    model = tiny_nxtp(seed=seed, **kwargs)
    seqs = model.sequences
    tokens = sorted({t for n in NAMES for t in seqs(model.prompt, [n]).ids[len(seqs.prompt_ids(model.prompt)) :]})
    head = model.decoder.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.fill_(-20.0)
        biased.bias[tokens] = 0.0
        biased.bias[seqs.delimiter_id] = 1.0  # labels that end after a few tokens
    model.decoder.set_output_embeddings(biased)
    return model.eval()


def pixels(model, n: int = 3, seed: int = 0):
    return torch.randn(n, 3, *model.visual.image_size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def brute_force(model, pixels, name: str) -> torch.Tensor:
    """P(name) per image: the whole sequence image, prompt, name, delimiter run from scratch (no cache), the
    product of the softmax probabilities of every name token and of the delimiter."""
    seqs = model.sequences
    head = seqs.prompt_ids(model.prompt)
    label = seqs(model.prompt, [name]).ids[len(head) : -1] + [seqs.delimiter_id]  # training's ids, any layout
    text = torch.tensor(head + label[:-1]).expand(len(pixels), -1)
    image = model.embed_images(pixels)
    length = image.shape[1] + text.shape[1]
    mask = prefix_attention(image.shape[1], text.shape[1]).expand(len(pixels), -1, -1, -1)
    hidden = model.hidden_states(image, text, mask, torch.arange(length).expand(len(pixels), -1))
    probs = model.logits(hidden[:, length - len(label) :]).double().softmax(-1)
    return probs[:, torch.arange(len(label)), torch.tensor(label)].prod(1)


@pytest.fixture(scope="module")
def model():
    return peaked_model()


@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_score_equals_brute_force(model, chunk_tokens):
    x = pixels(model)
    got = score_vocabulary(model, x, Vocabulary.coerce(NAMES), chunk_tokens=chunk_tokens)
    want = torch.stack([brute_force(model, x, n) for n in NAMES], 1)
    assert got.shape == (3, len(NAMES))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert want.max() > 1e-3  # far from 0, so that the comparison means something


def test_synonyms_sum_and_duplicates_count_once(model):
    x = pixels(model, 2)
    vocab = Vocabulary.coerce([["sofa", "couch", "couch"], "dog"])
    got = score_vocabulary(model, x, vocab)
    want = brute_force(model, x, "sofa") + brute_force(model, x, "couch")
    assert torch.allclose(got[:, 0], want, rtol=1e-4, atol=1e-6)
    assert len(tokenize(model, vocab).ids) == 3


def single_branch_labels(model, x, topk: int):
    """(image, label, open-set score) for labels that one-shot sampling found through exactly one branch whose
    tokens are the label's training tokens (a label reached through other tokens too is their sum)."""
    seqs = model.sequences
    branches = decode_branches(model, x, topk)
    found = []
    for i, (image_branches, image_labels) in enumerate(zip(branches, recognize(model, x, topk=topk))):
        texts = [model.tokenizer.decode(b.tokens).replace(",", "").strip() for b in image_branches]
        for label, p in image_labels:
            label = label.strip()
            if not label:  # the reference's ranking keeps empty labels
                continue
            same = [b for b, t in zip(image_branches, texts) if t == label]
            ids = seqs(model.prompt, [label]).ids[len(seqs.prompt_ids(model.prompt)) : -1]
            if len(same) == 1 and same[0].tokens == ids and same[0].stop_prob is not None:
                found.append((i, label, p))
    return found


@pytest.mark.parametrize("reference_compat", [False, True])
def test_score_equals_open_set(reference_compat, monkeypatch):
    model = peaked_model(seed=7, reference_compat=reference_compat)
    # Only the delimiter closes a label here (not </s>), as scoring closes every name.
    monkeypatch.setattr(model.sequences, "eos_id", model.sequences.delimiter_id)
    x = pixels(model, 4)
    found = single_branch_labels(model, x, topk=24)
    assert len(found) >= 10 and max(p for *_, p in found) > 1e-3
    vocab = Vocabulary.coerce(list(dict.fromkeys(label for _, label, _ in found)))
    scores = score_vocabulary(model, x, vocab)
    # The reference's ranking rounds to 5 decimals.
    tol = 5e-6 + 1e-6 if reference_compat else 1e-6
    for i, label, p in found:
        assert scores[i, vocab.names.index(label)].item() == pytest.approx(p, rel=1e-4, abs=tol)


def test_recognizer_score_topk_min_prob(model):
    recognizer = Recognizer(model)
    image = OFFICIAL / "image_0_300x200.png"
    (full,) = recognizer.score([image], NAMES)
    assert sorted(l for l, _ in full) == sorted(NAMES) and [p for _, p in full] == sorted(
        (p for _, p in full), reverse=True
    )
    want = brute_force(model, recognizer.preprocess(image)[None], full[0][0]).item()
    assert full[0][1] == pytest.approx(want, rel=1e-4)
    (top,) = recognizer.score(image, NAMES, topk=3, min_prob=full[1][1])
    assert top == full[:2]


# ---------------------------------------------------------------- bad input


def test_vocabulary_files(tmp_path):
    text = tmp_path / "v.txt"
    text.write_text("dog\n\n  traffic   light \ncat\ndog\n")
    with pytest.warns(UserWarning, match=r"v.txt line 5: 'dog' is already an entry \(.*v.txt line 1\)"):
        vocab = Vocabulary.from_file(text)
    assert vocab.names == ["dog", "traffic light", "cat"]
    js = tmp_path / "v.json"
    js.write_text(json.dumps([{"name": "sofa", "synonyms": ["couch"]}, "cat"]))
    assert [e.names for e in Vocabulary.from_file(js).entries] == [("sofa", "couch"), ("cat",)]
    js.write_text(json.dumps({"sofa": ["couch"], "cat": []}))
    assert [e.names for e in Vocabulary.from_file(js).entries] == [("sofa", "couch"), ("cat",)]
    jsl = tmp_path / "v.jsonl"
    jsl.write_text('"dog"\n\n{"name": "sofa", "synonyms": "couch"}\n')
    assert [e.names for e in Vocabulary.from_file(jsl).entries] == [("dog",), ("sofa", "couch")]


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.txt", "", "empty.txt: the vocabulary has no entries"),
        ("blank.txt", "\n  \n\t\n", "blank.txt: the vocabulary has no entries"),
        ("bad.json", '[\n"dog",\n', r"bad.json line \d+: not valid JSON"),
        ("noname.json", '[{"synonyms": ["x"]}]', "noname.json entry 1: an entry object needs a 'name'"),
        ("blankname.json", '["dog", ["cat", " "]]', "blankname.json entry 2: the entry has a blank name"),
        ("number.jsonl", '"dog"\n7\n', "number.jsonl line 2: a name must be a string"),
    ],
)
def test_bad_vocabulary_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(VocabularyError, match=match):
        Vocabulary.from_file(tmp_path / name)


@pytest.mark.parametrize(
    "line,match",
    [
        ("hot dog, frankfurter", "contains the delimiter token"),
        ("</s>", r"tokenizes to special tokens \['</s>'\]"),
        ("<|image|>", "tokenizes to special tokens"),
    ],
)
def test_untokenizable_names_name_their_line(model, tmp_path, line, match):
    path = tmp_path / "v.txt"
    path.write_text(f"dog\ncat\n{line}\n")
    with pytest.raises(VocabularyError, match=f"v.txt line 3: .*{match}"):
        tokenize(model, Vocabulary.from_file(path))


def test_cli_vocabulary(tmp_path, capsys):
    model = ending_model()  # save_pretrained: no output bias
    model.save_pretrained(tmp_path / "model")
    vocab = tmp_path / "v.txt"
    vocab.write_text("\n".join(NAMES[:6]) + "\n")
    image = OFFICIAL / "image_0_300x200.png"
    args = ["--checkpoint", str(tmp_path / "model"), "--workers", "0", str(image)]
    assert label_main(args + ["--vocabulary", str(vocab), "--topk", "4"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    want = Recognizer(model).score([image], NAMES[:6], topk=4)[0]
    assert [x["label"] for x in line["labels"]] == [l for l, _ in want]
    assert [x["prob"] for x in line["labels"]] == pytest.approx([p for _, p in want], rel=1e-5)
    vocab.write_text("dog\n</s>\n")
    assert label_main(args + ["--vocabulary", str(vocab)]) == 2
    assert "v.txt line 2" in capsys.readouterr().err
    assert label_main(args + ["--map-to", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: cannot read the vocabulary" in capsys.readouterr().err
    # --map-to: the free labels, each mapped onto the vocabulary, or kept as they are.
    (free,) = Recognizer(model).label(image, topk=5)
    vocab.write_text(f"{free[0][0]}\n{free[1][0]}\n")
    map_args = args + ["--map-to", str(vocab), "--topk", "5", "--map-by", "embedding", "--map-threshold", "2"]
    for extra, want in (["--keep-unmapped"], free), ([], free[:2]):
        assert label_main(map_args + extra) == 0
        (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [x["label"] for x in line["labels"]] == [l for l, _ in want]
        assert [x["prob"] for x in line["labels"]] == pytest.approx([p for _, p in want], rel=1e-5)


# ---------------------------------------------------------------- mapping


@pytest.fixture(scope="module")
def mapper():
    return LabelMapper(Vocabulary.coerce(["dog", ["car", "auto"], "person", "tree"]), threshold=0.6)


def test_mapping_by_name_wordnet_and_embedding(mapper):
    got = mapper.map_labels(["Dog", "puppy", "hound", "automobile", "doggy", "pine", "xqzv"])
    assert got == [
        (0, "name"),
        (0, "wordnet"),
        (0, "wordnet"),
        (1, "wordnet"),
        (0, "wordnet"),
        (3, "wordnet"),
        (None, "none"),
    ]
    embedding_only = LabelMapper(mapper.vocabulary, threshold=0.7, by=["embedding"])
    assert embedding_only.map_labels(["puppy", "xqzv"]) == [(0, "embedding"), (None, "none")]
    # The similarity the threshold is compared with, computed here by hand: puppy/dog is about 0.80.
    sim = (embedding_only._embed(["puppy"]) @ embedding_only._embed(["dog"]).T).item()
    assert embedding_only.map_labels(["puppy"]) == [(0, "embedding")]
    assert LabelMapper(mapper.vocabulary, threshold=sim + 1e-3, by=["embedding"]).map_labels(["puppy"])[0][0] != 0


def test_mapping_sums_and_unmapped(mapper):
    labels = [("puppy", 0.2), ("dog", 0.3), ("xqzv", 0.25), ("auto", 0.1)]
    assert [(l, round(p, 9)) for l, p in mapper.map(labels)] == [("dog", 0.5), ("car", 0.1)]
    assert [(l, round(p, 9)) for l, p in mapper.map(labels, True, 0.2)] == [("dog", 0.5), ("xqzv", 0.25)]


def test_recognizer_map_labels(model, mapper):
    recognizer = Recognizer(model)
    image = OFFICIAL / "image_0_300x200.png"
    (free,) = recognizer.label(image, topk=5)
    (mapped,) = recognizer.map_labels(image, mapper, topk=5, keep_unmapped=True)
    assert sum(p for _, p in mapped) == pytest.approx(sum(p for _, p in free))


# ---------------------------------------------------------------- metric


def brute_ap(scores: list[float], targets: list[bool]) -> float:
    """Average precision as the sum over distinct thresholds t (descending) of (R(t) - R(previous t)) * P(t)."""
    positives = sum(targets)
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        chosen = [y for s, y in zip(scores, targets) if s >= t]
        recall = sum(chosen) / positives
        ap += (recall - prev_recall) * sum(chosen) / len(chosen)
        prev_recall = recall
    return ap


def brute_metric(scores: torch.Tensor, targets: torch.Tensor, threshold: float) -> dict[str, float]:
    s, y = scores.tolist(), targets.bool().tolist()
    columns = [c for c in range(len(s[0])) if any(row[c] for row in y)]
    aps = [brute_ap([row[c] for row in s], [row[c] for row in y]) for c in columns]
    per_image = []
    for row_s, row_y in zip(s, y):
        truth = {c for c, v in enumerate(row_y) if v}
        if not truth:
            continue
        pred = {c for c, v in enumerate(row_s) if v >= threshold}
        r, p = len(pred & truth) / len(truth), len(pred & truth) / len(pred) if pred else 0.0
        per_image.append((r, p, 2 * r * p / (r + p) if r + p else 0.0))
    mean = [sum(v) / len(per_image) for v in zip(*per_image)]
    return {"map": sum(aps) / len(aps), "recall": mean[0], "precision": mean[1], "f1": mean[2]}


def metric_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Scores rounded to 1 decimal, so that ties occur; one entry without positives, one image without targets.
    scores = (torch.rand(40, 6, generator=g) * 10).round() / 10
    targets = torch.rand(40, 6, generator=g) < 0.3
    targets[:, 5] = False
    targets[3] = False
    return scores, targets


def test_metric_against_brute_force():
    scores, targets = metric_data()
    metric = VocabularyScore(6, threshold=0.5)
    for start in range(0, 40, 16):
        metric.update(scores[start : start + 16], targets[start : start + 16])
    got = {k: v.item() for k, v in metric.compute().items()}
    assert got == pytest.approx(brute_metric(scores, targets, 0.5), abs=1e-6)
    assert brute_ap([0.9, 0.5, 0.5, 0.1], [True, False, True, False]) == pytest.approx(1 * 0.5 + 0.5 * 2 / 3)


def test_metric_ties_and_scores_outside_0_1():
    # Summed log-probabilities and logits: a sigmoid in float32 would make 40 and 50 (and -200 and -300) ties.
    scores = torch.tensor([[0.9, 50.0, -1.0], [0.5, 40.0, -1.0], [0.5, -200.0, -1.0], [0.1, -300.0, -1.0]])
    targets = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    metric = VocabularyScore(3)
    metric.update(scores, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entry without a positive is left out, not scored nan and warned about
        got = metric.compute()["map"].item()
    # entry 0: ties at 0.5 form one threshold; entry 1: order 50 (pos), 40, -200, -300 (pos): AP (1 + 2/4) / 2.
    assert got == pytest.approx((brute_ap([0.9, 0.5, 0.5, 0.1], [1, 0, 1, 0]) + 0.75) / 2)
    assert got == pytest.approx(brute_metric(scores, targets, 0.5)["map"])
    one = VocabularyScore(1)  # a single entry with positives
    one.update(scores[:, :1], targets[:, :1])
    assert one.compute()["map"].item() == pytest.approx(brute_ap([0.9, 0.5, 0.5, 0.1], [1, 0, 1, 0]))


def test_metric_targets_and_empty():
    vocab = Vocabulary.coerce(["dog", ["car", "auto"]])
    assert vocabulary_targets(vocab, [["Auto", "tree"], []]).tolist() == [[False, True], [False, False]]
    assert VocabularyScore(2).compute() == {"recall": 0.0, "precision": 0.0, "f1": 0.0, "map": 0.0}
    with pytest.raises(ValueError, match=r"must both be \[images, 2\]"):
        VocabularyScore(2).update(torch.zeros(3, 3), torch.zeros(3, 3))


def test_validation_reports_closed_set_scores_over_the_eval_vocabulary(tmp_path, llama_tokenizer_dir):
    # model.evaluation.vocabulary: the mapped open-set labels scored by hand (mAP and F1 at the threshold), and the
    # exactly scored entries equal to score_vocabulary's.
    from lightning_modules.decoder import DecoderConfig
    from lightning_modules.lit_nxtp import EvaluationConfig, LitNXTP
    from lightning_modules.nxtp import NXTPConfig
    from lightning_modules.vision import VisionConfig
    from lightning_modules.vocabulary import VocabularyScore, score_vocabulary

    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    torch.manual_seed(0)
    decoder = DecoderConfig(
        config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
        )
    )
    module = LitNXTP(
        NXTPConfig(VisionConfig(model_name="nxtp-tiny-vit"), decoder, str(llama_tokenizer_dir)),
        evaluation=EvaluationConfig(
            semantic_metric=False, vocabulary=str(tmp_path / "classes.txt"), vocabulary_threshold=0.1
        ),
    ).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        module._evaluate_vocabulary(
            Batch(pixels, None, [["dog"], ["cat"]], ["a", "b"]), [[("dog", 0.5), ("cat", 0.05)], [("dog", 0.3)]]
        )
    mapped = module.metrics["vocab_mapped"].compute()
    # dog: scores 0.5 / 0.3, only image 0 has it: AP 1; cat: scores 0.05 / 0 and image 1 has it: AP 1/2.
    assert float(mapped["map"]) == pytest.approx(0.75)
    assert float(mapped["f1"]) == pytest.approx(0.5)  # image 0: {dog} right; image 1: {dog}, wrong
    expected = VocabularyScore(2, 0.1)
    with torch.no_grad():
        expected.update(
            score_vocabulary(module.model, pixels, module.vocabulary).float(), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        )
    for key, value in expected.compute().items():
        assert float(module.metrics["vocab_scored"].compute()[key]) == pytest.approx(float(value)), key
