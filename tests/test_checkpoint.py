"""The checkpoint format (``lightning_modules.checkpoint``): every kind of saved model loads into the same model,
the config alone is read without the weights, and checkpoints of earlier versions still load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, OFFICIAL, tiny_nxtp

from lightning_modules.checkpoint import (
    CONFIG_KEY,
    TOKENIZER_KEY,
    TrainingState,
    load_model,
    read_config,
    restore_rng_state,
    rng_state,
    save_model_record,
    save_rng_states,
)
from lightning_modules.nxtp import NXTPConfig
from lightning_modules.recognizer import Recognizer

OLD_FIT = FIXTURES / "fit-checkpoint-v0"


def test_a_checkpoint_written_before_the_config_groups_labels_as_it_did():
    expected = json.loads((OLD_FIT / "labels.json").read_text())
    recognizer = Recognizer.from_checkpoint(OLD_FIT / "last.ckpt")
    got = recognizer.label([OFFICIAL / name for name in expected["images"]], topk=expected["topk"])
    for labels, want in zip(got, expected["labels"]):
        assert [label for label, _ in labels] == [label for label, _ in want]
        assert [p for _, p in labels] == pytest.approx([p for _, p in want], rel=1e-4)


def test_the_config_alone_of_an_old_checkpoint():
    config = read_config(OLD_FIT / "last.ckpt")
    assert config.vision.model_name == "nxtp-micro-vit" and config.vision.conv_stem
    assert config.decoder.config["hidden_size"] == 32 and config.decoder.num_blocks == 1
    assert config.reset_label_positions and not config.reference_compat
    assert TrainingState.load(torch.load(OLD_FIT / "last.ckpt", weights_only=True)).max_steps == 3


def test_a_folder_and_a_checkpoint_of_one_model_load_alike(tmp_path):
    model = tiny_nxtp(seed=4, reset_label_positions=True)
    model.save_pretrained(tmp_path / "folder")
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    save_model_record(checkpoint, model)
    checkpoint[CONFIG_KEY]["tokenizer"] = str(tmp_path / "moved")  # copied elsewhere: the stored tokenizer is used
    torch.save(checkpoint, tmp_path / "model.ckpt")
    from_folder, from_ckpt = load_model(tmp_path / "folder"), load_model(tmp_path / "model.ckpt")
    assert read_config(tmp_path / "folder").reset_label_positions and read_config(tmp_path / "model.ckpt").decoder
    for loaded in (from_folder, from_ckpt):
        assert loaded.config.reset_label_positions
        assert len(loaded.tokenizer) == len(model.tokenizer)
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name


def test_bad_sources_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_model(tmp_path / "nowhere.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_model(tmp_path / "empty")
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="bare.ckpt: no model config"):
        read_config(tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match=r"unknown model config keys \['colour'\]"):
        NXTPConfig.from_dict({"vision": {}, "decoder": {}, "tokenizer": "t", "colour": 1}, "my.yaml")
    assert TOKENIZER_KEY not in torch.load(tmp_path / "bare.ckpt")


def test_each_rank_continues_its_own_random_streams():
    states = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        states.append(rng_state())
    checkpoint: dict = {}
    save_rng_states(checkpoint, states)
    draws = []
    for rank in range(2):
        torch.manual_seed(0)
        assert restore_rng_state(checkpoint, rank)
        draws.append(torch.rand(3))
    torch.manual_seed(101)
    assert torch.equal(draws[1], torch.rand(3)) and not torch.equal(draws[0], draws[1])
    assert not restore_rng_state(checkpoint, 2)  # resumed on more ranks: that rank keeps its seeded stream
    old_format = {"nxtp_rng_states": states[0]}  # before per-rank states: rank 0's, for every rank
    assert restore_rng_state(old_format, 1)
    torch.manual_seed(100)
    expected = torch.rand(3)
    restore_rng_state(old_format, 1)
    assert torch.equal(torch.rand(3), expected)
