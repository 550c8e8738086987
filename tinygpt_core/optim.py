"""Optimizer set-up and the learning-rate schedule of a training run.

``build_optimizer`` gives AdamW (weight decay on matrices only; fused kernels on CUDA and CPU) or, with
``optimizer="muon"``, Muon (``muon.py``) on the blocks' 2-D hidden matrices plus AdamW on everything else, behind
one ``OptimizerSet`` that steps, zeroes and (de)serialises them together. ``lr_at`` is the schedule:
linear warm-up, then cosine decay to ``min_lr`` at ``max_iters`` (or constant).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import TrainConfig
from .errors import RunError
from .muon import Muon


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up, then cosine to min_lr at max_iters."""
    if cfg.warmup_iters > 0 and step <= cfg.warmup_iters:
        return cfg.lr * step / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    ratio = min(1.0, max(0.0, (step - cfg.warmup_iters) / span))
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.resolved_min_lr + coeff * (cfg.lr - cfg.resolved_min_lr)


class OptimizerSet:
    """Several torch optimizers behind one object (Muon for hidden matrices + AdamW for the rest)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def set_lr(self, lr: float) -> None:
        for g in self.param_groups:
            g["lr"] = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise RunError("the checkpoint's optimizer state does not match this run's optimizer")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)


def build_optimizer(model: Any, cfg: TrainConfig, device: torch.device) -> OptimizerSet:
    """AdamW (decay on matrices only; fused on CUDA and CPU), or Muon on 2-D hidden matrices + AdamW on the rest."""
    adam_kw: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if device.type in ("cuda", "cpu"):
        # One kernel for all parameters instead of a loop of small ops: ~10% of a baby step on a CPU.
        adam_kw["fused"] = True
    has_blocks = len(model.blocks) > 0  # a bigram model (n_layer 0) has no hidden matrices for Muon
    if cfg.optimizer == "adamw" or not has_blocks:
        return OptimizerSet([torch.optim.AdamW(model.optimizer_groups(cfg.weight_decay), **adam_kw)])
    # Muon orthogonalises whole-matrix updates, which suits the blocks' Linear weights; embeddings
    # and the output head (tied to wte) are lookups rather than linear maps and stay with AdamW.
    hidden = [p for n, p in model.blocks.named_parameters() if p.dim() == 2]
    hidden_ids = {id(p) for p in hidden}
    groups = [
        {"params": [p for p in g["params"] if id(p) not in hidden_ids], "weight_decay": g["weight_decay"]}
        for g in model.optimizer_groups(cfg.weight_decay)
    ]
    # Our Muon: torch's maths (RMS matched to AdamW, so the same lr and decay carry over), with its
    # Newton–Schulz in the precision this hardware runs natively and same-shape matrices batched.
    muon = Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return OptimizerSet([muon, torch.optim.AdamW([g for g in groups if g["params"]], **adam_kw)])


__all__ = ["OptimizerSet", "build_optimizer", "lr_at"]
