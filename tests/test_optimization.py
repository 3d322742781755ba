"""The optimizers: which parameter each one trains, and that a checkpointed optimizer continues exactly."""

import copy

import pytest
import torch
from conftest import tiny_nxtp as tiny_model

from lightning_modules.optimization import MuonAdamW, OptimizationConfig, build_optimizer


def _step(model, optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_every_trainable_parameter_is_stepped_once(name):
    model = tiny_model()
    model.decoder.get_input_embeddings().weight.requires_grad_(False)
    optimizer = build_optimizer(model, OptimizationConfig(optimizer=name, lr=1e-3), total_steps=10)["optimizer"]
    stepped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(stepped) == sorted(trainable)
    if name == "muon":
        muon = {id(p) for group in optimizer.muon.param_groups for p in group["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in muon}
        assert "projection.weight" in names and any(n.startswith("decoder.model.layers.0.mlp") for n in names)
        assert all(p.ndim == 2 for p in optimizer.muon.param_groups[0]["params"])
        # Embeddings, the output layer and the convolutions stay with AdamW.
        assert not any("embed" in n or "lm_head" in n or "conv" in n for n in names)


def test_muon_adamw_resumes_from_its_state_dict_exactly():
    config = OptimizationConfig(optimizer="muon", lr=1e-2, weight_decay=0.1)
    model = tiny_model()
    optimizer = build_optimizer(model, config, total_steps=10)["optimizer"]
    assert isinstance(optimizer, MuonAdamW)
    for seed in range(3):
        _step(model, optimizer, seed)
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(resumed_model, config, total_steps=10)["optimizer"]
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _step(model, optimizer, 3)
    _step(resumed_model, resumed, 3)
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name


def test_the_schedule_scales_both_optimizers():
    model = tiny_model()
    built = build_optimizer(model, OptimizationConfig(optimizer="muon", lr=1e-2, warmup=4), total_steps=10)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert {g["lr"] for g in optimizer.muon.param_groups + optimizer.adamw.param_groups} == {1e-2 / 4}
    _step(model, optimizer, 0)
    scheduler.step()
    assert {g["lr"] for g in optimizer.muon.param_groups + optimizer.adamw.param_groups} == {1e-2 * 2 / 4}
