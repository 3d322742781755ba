"""The paper-scale model, built on the meta device (no weights, no memory): its size and what trains."""

import pytest
import torch
import yaml
from conftest import LLAMA_TOKENIZER

from lightning_modules.decoder import DecoderConfig
from lightning_modules.lit_nxtp import EvaluationConfig, LitNXTP
from lightning_modules.nxtp import NXTPConfig
from lightning_modules.optimization import OptimizationConfig
from lightning_modules.sequence import collate_text
from lightning_modules.vision import VisionConfig

# LLaMA-2-7B's config (what meta-llama/Llama-2-7b-hf's config.json says).
LLAMA2_7B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    rms_norm_eps=1e-5,
    vocab_size=32000,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)

VIT_BLOCK = 3 * 1024 * 1024 + 3 * 1024 + 1024 * 1024 + 1024 + 4096 * 1024 + 4096 + 1024 * 4096 + 1024 + 4 * 1024
VIT_L14 = 3 * 14 * 14 * 1024 + 1024 + 257 * 1024 + 2 * 1024 + 24 * VIT_BLOCK + 2 * 1024
LLAMA_BLOCK = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
VOCAB = 32000 + 2  # <|image|>, <|empty|>


@pytest.fixture(scope="module")
def paper_model():
    with open("configs/model/nxtp_paper.yaml") as f:
        cfg = yaml.safe_load(f)
    nxtp = cfg["nxtp"]
    nxtp["vision"] = VisionConfig(model_name=nxtp["vision"]["model_name"])  # same architecture, no download
    nxtp["decoder"] = DecoderConfig(config=LLAMA2_7B, num_blocks=nxtp["decoder"]["num_blocks"])
    nxtp["tokenizer"] = str(LLAMA_TOKENIZER)
    cfg["evaluation"]["semantic_metric"] = False
    with torch.device("meta"):
        return LitNXTP.from_config(cfg)


def test_paper_model_has_1_78b_parameters(paper_model):
    model = paper_model.model
    expected = VIT_L14 + 1024 * 4096 + 2 * VOCAB * 4096 + 6 * LLAMA_BLOCK + 4096
    total = sum(p.numel() for p in model.parameters())
    assert total == expected
    assert round(total / 1e9, 2) == 1.78
    assert model.n_image_tokens == 256
    assert len(model.decoder.model.layers) == 6  # the other 26 blocks are never built


def test_reference_trainable_parameters(paper_model):
    model = paper_model.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("visual.transformer")} == {
        n for n, _ in model.named_parameters() if any(f"resblocks.{i}." in n for i in range(18, 24))
    }
    assert "visual.conv1.weight" not in trainable and "visual.ln_post.weight" in trainable
    # the embedding matrix trains, but only its two new rows get a gradient
    embed = model.decoder.get_input_embeddings().weight
    assert embed.requires_grad
    effective = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and p is not embed) + 2 * 4096
    expected = 6 * VIT_BLOCK + 2 * 1024 + 1024 * 4096 + 6 * LLAMA_BLOCK + 4096 + VOCAB * 4096 + 2 * 4096
    assert effective == expected


def test_new_token_rows_are_the_only_embedding_rows_that_learn():
    decoder = DecoderConfig(
        config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4
        )
    )
    module = LitNXTP(
        NXTPConfig(VisionConfig(model_name="nxtp-tiny-vit"), decoder, str(LLAMA_TOKENIZER)),
        OptimizationConfig(trainable=["decoder.model.layers.*"], train_new_token_embeddings=True),
        EvaluationConfig(semantic_metric=False),
    )
    model = module.model
    seqs = [model.sequences(model.prompt, ["dog", "cat"])]
    loss, _ = model(torch.randn(1, 3, 64, 64), collate_text(seqs, model.sequences.pad_id))
    loss.backward()
    grad = model.decoder.get_input_embeddings().weight.grad
    rows = grad.abs().sum(1).nonzero().flatten().tolist()
    assert rows == [model.sequences.image_id]  # <|empty|> is padding here, so only <|image|> gets a gradient
    assert model.visual.conv1.weight.grad is None
