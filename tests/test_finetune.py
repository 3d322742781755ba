"""Fine-tuning: ``--model.optimization.init_from`` starts a fresh run from released or exported weights."""

import fnmatch
import json
import tarfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import LLAMA_TOKENIZER, OFFICIAL, fit_command, run, tiny_nxtp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules import NXTPDataModule
from lightning_modules.checkpoint import load_weights, read_weights
from lightning_modules.checkpoint_io import load_checkpoint
from lightning_modules.cli.export import export_main
from lightning_modules.cli.label import label_main
from lightning_modules.decoder import DecoderConfig
from lightning_modules.lit_nxtp import EvaluationConfig, LitNXTP
from lightning_modules.nxtp import NXTP, NXTPConfig
from lightning_modules.official import import_official
from lightning_modules.optimization import OptimizationConfig
from lightning_modules.vision import VisionConfig

# Fixture A's version of the reference's trainable set (configs/model/nxtp_paper.yaml): its last 2 of 4 CLIP blocks.
TRAINABLE = [
    "visual.transformer.resblocks.[23].*",
    "visual.ln_post.*",
    "projection.*",
    "decoder.model.layers.*",
    "decoder.model.norm.*",
    "decoder.lm_head.*",
]
EMBEDDINGS = "decoder.model.embed_tokens.weight"


def tiny_lit(**kwargs) -> LitNXTP:
    """A LitNXTP with ``tiny_nxtp``'s architecture (and a different random init)."""
    torch.manual_seed(1)
    decoder = DecoderConfig(
        config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
        )
    )
    return LitNXTP(
        NXTPConfig(VisionConfig(model_name="nxtp-tiny-vit"), decoder, str(LLAMA_TOKENIZER)),
        OptimizationConfig(**kwargs),
        EvaluationConfig(semantic_metric=False),
    )


def test_a_mismatch_names_every_key():
    model = tiny_nxtp()
    state = dict(model.state_dict())
    del state["decoder.model.norm.weight"]
    state["extra.weight"] = torch.zeros(2)
    state["projection.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as err:
        load_weights(tiny_nxtp(seed=1), state, source="SRC")
    message = str(err.value)
    assert "model.optimization.init_from=SRC" in message and "model.optimization.init_allow_missing" in message
    assert "decoder.model.norm.weight" in message and "extra.weight" in message
    assert f"projection.weight: source (3, 3), model {tuple(model.projection.weight.shape)}" in message


def test_a_missing_tensor_loads_only_when_allowed(tmp_path):
    source = tiny_nxtp().state_dict()
    partial = {k: v for k, v in source.items() if k != "projection.weight"}
    safetensors.torch.save_file(partial, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing from the source .*projection\.weight"):
        tiny_lit(init_from=str(tmp_path)).setup("fit")
    with pytest.raises(
        ValueError, match="model.optimization.init_allow_missing: pattern 'projektion.*' matches no tensor"
    ):
        tiny_lit(init_from=str(tmp_path), init_allow_missing=["projektion.*"])

    lit = tiny_lit(init_from=str(tmp_path), init_allow_missing=["projection.*"])
    fresh = lit.model.projection.weight.detach().clone()
    lit.setup("fit")
    loaded = lit.model.state_dict()
    assert torch.equal(loaded["projection.weight"], fresh)  # kept as built
    assert not torch.equal(fresh, source["projection.weight"])
    for key, value in partial.items():
        assert torch.equal(loaded[key], value), key


def test_a_ckpt_source_gives_its_model_tensors(tmp_path):
    weights = {"projection.weight": torch.randn(3, 2), "decoder.lm_head.weight": torch.randn(4, 3)}
    torch.save(
        {
            "state_dict": {**{f"model.{k}": v for k, v in weights.items()}, "metrics.x.weight": torch.ones(1)},
            "global_step": 7,
        },
        tmp_path / "run.ckpt",
    )
    read = read_weights(tmp_path / "run.ckpt")
    assert read.keys() == weights.keys() and all(torch.equal(read[k], weights[k]) for k in weights)
    with pytest.raises(FileNotFoundError, match="model.optimization.init_from=.*gone.ckpt: no such file"):
        tiny_lit(init_from=str(tmp_path / "gone.ckpt")).setup("fit")


# end to end: import fixture A, fine-tune it with `nxtp fit`, label and export the result --------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """Fixture A (the tiny official checkpoint) imported as tests/test_parity.py does, with the LLaMA-2 tokenizer."""
    out = tmp_path_factory.mktemp("fixture-a") / "nxtp-tiny"
    import_official(
        str(OFFICIAL / "official_ckpt.pth"),
        str(OFFICIAL / "clip_frozen.pt"),
        str(LLAMA_TOKENIZER),
        str(out),
        decoder_heads=4,
    )
    return out


@torch.no_grad()
def mean_loss(model: NXTP, shard: Path, batches: int = 4) -> float:
    """Token-weighted training loss of ``model`` on the first ``batches`` batches of ``shard`` (eval transform)."""
    data = NXTPDataModule(val_shards=str(shard), batch_size=16, num_workers=0)
    data.bind(model.eval().inputs)
    total = count = 0
    for _, batch in zip(range(batches), data.val_dataloader()):
        loss, n = model(batch.pixels, batch.text)
        total, count = total + loss.item() * n.item(), count + n.item()
    return total / count


@pytest.mark.slow
def test_finetune_an_imported_release(tmp_path, shapes, imported, capsys):
    shard = shapes / "train" / "shard-000000.tar"
    source = NXTP.from_pretrained(imported)
    start = mean_loss(source, shard)
    source_state = safetensors.torch.load_file(imported / "model.safetensors")
    new_rows = source.sequences.new_token_ids

    fit = run(
        fit_command(shapes, tmp_path / "logs", 20)
        + [  # later flags override earlier ones
            "--model.nxtp",
            str(imported / "config.yaml"),
            "--model.nxtp.tokenizer",
            str(imported / "tokenizer"),
            "--model.optimization.init_from",
            str(imported),
            "--model.optimization.trainable",
            json.dumps(TRAINABLE),
            "--model.optimization.train_new_token_embeddings",
            "true",
            "--model.optimization.lr",
            "1e-3",
            "--model.optimization.schedule",
            "cosine",
            "--model.optimization.warmup",
            "2",
            "--model.evaluation.min_prob",
            "0.0",
        ]
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    version = tmp_path / "logs" / "default" / "version_0"
    checkpoint = version / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(checkpoint)
    assert saved["global_step"] == 20  # a fresh run: its step count started at 0
    tuned = {k.removeprefix("model."): v for k, v in saved["state_dict"].items() if k.startswith("model.")}
    assert tuned.keys() == source_state.keys()

    changed = []
    for key, before in source_state.items():
        if any(fnmatch.fnmatch(key, p) for p in TRAINABLE):
            changed += [key] if not torch.equal(tuned[key], before) else []
        elif key == EMBEDDINGS:  # frozen but for the <|image|> and <|empty|> rows
            frozen = torch.ones(len(before), dtype=torch.bool)
            frozen[new_rows] = False
            assert torch.equal(tuned[key][frozen], before[frozen])
            assert not torch.equal(tuned[key][new_rows[0]], before[new_rows[0]])  # <|image|> is in every sample
        else:
            assert torch.equal(tuned[key], before), f"frozen {key} changed"
    assert len(changed) > len(TRAINABLE), changed

    losses = [e.value for e in EventAccumulator(str(version)).Reload().Scalars("train/loss")]
    assert sum(losses[-5:]) / 5 < start, (start, losses)
    finetuned = NXTP.from_pretrained(imported)
    finetuned.load_state_dict(tuned)
    after = mean_loss(finetuned, shard)
    print(f"fixture A on {shard.name}: loss {start:.4f} before, {after:.4f} after 20 fine-tuning steps")
    assert after < start

    # The result stands on its own: it loads (labels, exports) once its source is gone.
    imported.rename(tmp_path / "source-moved")
    images = tmp_path / "images"
    images.mkdir()
    with tarfile.open(shapes / "test" / "shard-000000.tar") as tar:
        for m in [m for m in tar.getmembers() if m.name.endswith(".jpg")][:2]:
            (images / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    capsys.readouterr()
    assert label_main(["--checkpoint", str(checkpoint), "--topk", "3", str(images)]) == 0  # in this process, as export
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(line["labels"] for line in lines)

    assert (
        export_main(["--checkpoint", str(checkpoint), "--format", "safetensors", "--out", str(tmp_path / "export")])
        == 0
    )
    exported = safetensors.torch.load_file(tmp_path / "export" / "model.safetensors")
    assert exported.keys() == tuned.keys() and all(torch.equal(exported[k], tuned[k]) for k in tuned)


def g70m_release(vocab: int = 32002, dim: int = 4096, ffn: int = 11008, blocks: int = 6) -> tuple[dict, dict]:
    """Meta tensors shaped as the G70M release's files: OpenAI's CLIP ViT-L/14 visual tower (as open_clip builds
    it) and the official checkpoint (trained CLIP blocks 18-23, ln_post, projection, LLaMA-2-7B's first blocks)."""
    import open_clip

    with torch.device("meta"):
        clip = open_clip.create_model("ViT-L-14-quickgelu", device="meta").visual.state_dict()
    ckpt = {
        f"module.vision_encoder.{k}": v
        for k, v in clip.items()
        if k.startswith(("transformer.resblocks.1", "transformer.resblocks.2", "ln_post"))
    }
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(blocks):
        shapes.update({f"layers.{i}.attention.w{x}.weight": (dim, dim) for x in "qkvo"})
        shapes.update(
            {
                f"layers.{i}.feed_forward.w1.weight": (ffn, dim),
                f"layers.{i}.feed_forward.w3.weight": (ffn, dim),
                f"layers.{i}.feed_forward.w2.weight": (dim, ffn),
                f"layers.{i}.attention_norm.weight": (dim,),
                f"layers.{i}.ffn_norm.weight": (dim,),
            }
        )
    ckpt.update({f"module.language_decoder.{k}": torch.empty(s, device="meta") for k, s in shapes.items()})
    ckpt["module.vision_encoder.proj.weight"] = torch.empty(dim, 1024, device="meta")
    return ckpt, clip


def test_the_g70m_recipe_fits_the_imported_release():
    import yaml

    from lightning_modules.official import convert

    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs/experiment/finetune_g70m.yaml").read_text())["model"]
    paper = yaml.safe_load((Path(__file__).parents[1] / "configs/model/nxtp_paper.yaml").read_text())
    optimization, architecture = recipe["optimization"], recipe["nxtp"]
    assert optimization["trainable"] == paper["optimization"]["trainable"]
    assert optimization["train_new_token_embeddings"]
    vision, decoder, state = convert(*g70m_release())
    assert VisionConfig(**architecture["vision"]) == vision and DecoderConfig(**architecture["decoder"]) == decoder
    with torch.device("meta"):  # the recipe's model takes every tensor of the release, names and shapes
        model = NXTP(NXTPConfig(vision, decoder, str(LLAMA_TOKENIZER)))
    assert load_weights(model, state) == []
