"""How a model trains: which parameters, from which weights, with which optimizer and learning-rate schedule."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class OptimizationConfig:
    """What trains, from where, and how (``model.optimization.*`` in a config).

    Args:
        init_from: start from these weights (fine-tuning): a model folder (``nxtp export --format safetensors``,
            ``nxtp import-official``) or a ``.ckpt`` written by ``nxtp fit`` (read safely, see ``checkpoint_io``).
            Only the weights are taken: the optimizer, lr schedule and step count start afresh, unlike
            ``--ckpt_path`` (which resumes a run, and wins over this when both are given). The architecture still
            comes from ``model.nxtp`` and must match the source's (for a folder: ``--model.nxtp FOLDER/config.yaml
            --model.nxtp.tokenizer FOLDER/tokenizer``); every name and shape must match. Loaded when a Trainer sets
            the module up.
        init_allow_missing: name patterns (fnmatch, on ``model.state_dict()``) of tensors that ``init_from`` may
            lack, e.g. ``["projection.*"]`` for a new projection; they keep their fresh initialisation.
        trainable: name patterns (fnmatch, on ``model.named_parameters()``) of the parameters to train;
            None trains everything. E.g. ``["visual.transformer.resblocks.1[89].*", "decoder.*"]``.
        train_new_token_embeddings: with a frozen embedding matrix, still train the rows of ``<|image|>`` and
            ``<|empty|>`` (the other rows get no gradient), as the paper does.
        optimizer: ``adamw``, or ``muon``: torch's Muon (orthogonalised momentum) for the weight matrices of the
            hidden layers, AdamW for the rest (embeddings, the output layer, convolutions, norms, biases), both at
            ``lr`` (Muon's step scaled to AdamW's size, ``adjust_lr_fn="match_rms_adamw"``).
        lr, betas, eps, weight_decay: AdamW (and Muon's lr and weight decay). Norms, biases and embeddings get no
            weight decay.
        schedule: ``cosine`` (the paper's) or ``wsd`` (warm-up, stable, linear decay).
        warmup: warm-up steps; a value below 1 is a fraction of the total steps.
        decay_fraction: for ``wsd``, the fraction of steps spent decaying.
        min_lr_ratio: the lr at the end, as a fraction of ``lr``.
        max_nonfinite_steps: a step whose loss is NaN or infinite (on any rank) is skipped by every rank and
            counted; after this many in a run the run stops with an error naming the batch's samples.
    """

    init_from: str | None = None
    init_allow_missing: list[str] | None = None
    trainable: list[str] | None = None
    train_new_token_embeddings: bool = False
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.1
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup: float = 2000
    decay_fraction: float = 0.25
    min_lr_ratio: float = 0.0
    max_nonfinite_steps: int = 10


def set_trainable(model: nn.Module, patterns: list[str] | None) -> None:
    """Train only the parameters whose names match one of ``patterns`` (None: all); a pattern matching nothing is
    an error naming it."""
    if patterns is None:
        return
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"model.optimization.trainable: pattern {pattern!r} matches no parameter")
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatch(name, p) for p in patterns))


def train_rows(weight: nn.Parameter, rows: list[int]) -> None:
    """Train only ``rows`` of a frozen matrix (the other rows' gradients are zeroed by a hook)."""
    if weight.requires_grad:
        return  # the whole matrix trains already
    weight.requires_grad_(True)
    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[rows] = 1
    weight.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))


def warmup_schedule(kind: str, total: int, warmup: int, decay_fraction: float, min_ratio: float):
    """The lr multiplier per step: linear warm-up, then ``cosine`` decay, or ``wsd`` (warm-up, stable,
    linear decay over the last ``decay_fraction`` of training)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = total * (1 - decay_fraction)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1.0, total - decay_start))
        return min_ratio + (1 - min_ratio) * (1 - progress)

    return factor


def adamw(groups: list[dict], config: OptimizationConfig) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the config's lr, betas and eps."""
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


class MuonAdamW(torch.optim.Optimizer):
    """Muon over ``matrices`` and AdamW over ``groups``, stepped together as one optimizer: Lightning's automatic
    optimization, gradient clipping and lr schedulers take one. ``param_groups`` are the two optimizers' own."""

    def __init__(self, matrices: list[nn.Parameter], groups: list[dict], config: OptimizationConfig) -> None:
        self.muon = torch.optim.Muon(
            matrices, lr=config.lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = adamw(groups, config)
        self.defaults: dict = {}
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    @property
    def state(self) -> dict:  # read-only view, for what looks at an optimizer's state (e.g. to count it)
        return {**self.muon.state, **self.adamw.state}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def build_optimizer(model: nn.Module, config: OptimizationConfig, total_steps: float) -> dict:
    """AdamW (or Muon and AdamW, ``config.optimizer``) over the trainable parameters (no weight decay on norms,
    biases and embeddings) and the per-step schedule, in the form ``LightningModule.configure_optimizers``
    returns."""
    output = {id(p) for p in model.decoder.get_output_embeddings().parameters()} if hasattr(model, "decoder") else set()
    decay, no_decay, matrices = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed" in name or "norm" in name:
            no_decay.append(p)
        elif config.optimizer == "muon" and p.ndim == 2 and id(p) not in output:
            matrices.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "muon":
        optimizer = MuonAdamW(matrices, groups, config)
    else:
        optimizer = adamw(groups, config)
    if not math.isfinite(total_steps):
        raise ValueError("trainer.max_steps must be set: the lr schedule needs the number of steps")
    warmup = int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    factor = warmup_schedule(
        config.schedule, int(total_steps), max(1, warmup), config.decay_fraction, config.min_lr_ratio
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
