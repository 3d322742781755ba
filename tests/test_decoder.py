"""Truncating a pretrained decoder: the first blocks come from the checkpoint, the rest is never built."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_modules.decoder import DecoderConfig, build_decoder


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
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
