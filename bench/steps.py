"""Training steps to time: ours exactly as the training loop runs it, and transformers' GPT-2 as a peer.

``our_step`` drives the loop's own per-step code (``TrainState.train_step``: forward and
backward under the run's precision, NaN check, clipping, optimizer update), so what is timed is
what a user's run does, not a re-implementation. ``hf_step`` builds ``GPT2LMHeadModel`` from the
same sizes (``export.hf_config``) and trains it the standard way on the same batches, with the
same optimizer settings (decay on matrices, fused AdamW), so the two differ only in the model code
and the precision handling.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tinygpt_core.config import ModelConfig, TrainConfig
from tinygpt_core.data import get_batch
from tinygpt_core.device import autocast, resolve_device, resolve_precision
from tinygpt_core.optim import lr_at
from tinygpt_core.trainstate import TrainState


@dataclass
class Stepper:
    """One training step per call (returns the loss as a float: the host sync every real loop has)."""

    name: str
    step: Callable[[], float]
    precision: str  # what was resolved: fp32 | bf16 | fp16
    tokens_per_step: int
    flops_per_token: float
    model: torch.nn.Module
    notes: list[str] = field(default_factory=list)  # what the step fell back from (a skipped compile)


def _seeded(train_cfg: TrainConfig, seed: int) -> TrainConfig:
    return dataclasses.replace(train_cfg, seed=seed, sample_tokens=0)


def our_step(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_ids: torch.Tensor,
    *,
    precision: str = "auto",
    seed: int = 1337,
    name: str | None = None,
    compile_mode: str | None = None,
) -> Stepper:
    """Our training step, through the training loop's own TrainState (nothing is written to disk).

    ``compile_mode`` compiles the model as ``torch.compile(mode=...)`` does ("default"; "reduce-overhead"
    captures CUDA graphs); a compile that fails falls back to eager, as a run does, and says so in ``notes``."""
    tcfg = dataclasses.replace(_seeded(train_cfg, seed), precision=precision)
    device = resolve_device(tcfg.device)
    state = TrainState(model_cfg, tcfg, train_ids, device, resolve_precision(tcfg.precision, device))
    if compile_mode:
        state.fwd_model = torch.compile(state.model, mode=compile_mode)
    counter = {"step": 0}

    def step() -> float:
        counter["step"] += 1
        return state.train_step(lr_at(counter["step"], tcfg))

    return Stepper(
        name or f"ours {state.precision}",
        step,
        state.precision,
        state.tokens_per_step,
        state.model.flops_per_token(),
        state.model,
        state.notes,
    )


def hf_step(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_ids: torch.Tensor,
    *,
    precision: str = "fp32",
    seed: int = 1337,
    name: str | None = None,
) -> Stepper:
    """transformers' GPT2LMHeadModel with the same sizes, trained on the same batch sequence as ours."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tinygpt_core.export import hf_config

    config = {k: v for k, v in hf_config(model_cfg).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config))

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))

    return _peer_step(model, loss_of, model_cfg, train_cfg, train_ids, precision, seed, name, "transformers")


def nanogpt_step(
    checkout: str | Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_ids: torch.Tensor,
    *,
    precision: str = "fp32",
    seed: int = 1337,
    name: str | None = None,
) -> Stepper:
    """nanoGPT's own ``model.py`` (from a checkout of it, read where it lies) with the same sizes and batches.

    Its ``configure_optimizers`` fuses AdamW only on CUDA; here it gets the same fused AdamW as the
    other contenders, so the model code is the only difference."""
    path = Path(checkout) / "model.py"
    if not path.is_file():
        raise FileNotFoundError(f"No model.py in {checkout}: give the root of a nanoGPT checkout.")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = model_cfg
    torch.manual_seed(seed)
    model = mod.GPT(
        mod.GPTConfig(
            block_size=c.block_size,
            vocab_size=c.vocab_size,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_embd=c.n_embd,
            dropout=c.dropout,
            bias=c.bias,
        )
    )
    # with targets its forward returns (logits, mean cross-entropy): the loss its own train.py uses
    loss_of = lambda x, y: model(x, y)[1]  # noqa: E731
    return _peer_step(model, loss_of, model_cfg, train_cfg, train_ids, precision, seed, name, "nanoGPT")


def _peer_step(model, loss_of, model_cfg, train_cfg, train_ids, precision, seed, name, label) -> Stepper:
    """A peer model's standard training step: the same batches, loss, clipping and fused AdamW as ours."""
    tcfg = _seeded(train_cfg, seed)
    device = resolve_device(tcfg.device)
    precision = resolve_precision(precision, device)
    model = model.to(device).train()
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), fused=device.type in ("cuda", "cpu"))
    gen = torch.Generator().manual_seed(seed)  # the batch stream our session draws (same seed, same calls)
    state = {"step": 0}
    T, B = model_cfg.block_size, tcfg.batch_size

    def step() -> float:
        state["step"] += 1
        lr = lr_at(state["step"], tcfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for _ in range(tcfg.grad_accum):
            x, y = get_batch(train_ids, T, B, gen, device)
            with autocast(device, precision):
                loss = loss_of(x, y) / tcfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum

    n = sum(p.numel() for p in params) - model_cfg.block_size * model_cfg.n_embd  # nanoGPT: no position table
    flops = 6 * n + 12 * model_cfg.n_layer * model_cfg.n_embd * T  # same estimate as GPT.flops_per_token
    return Stepper(name or f"{label} {precision}", step, precision, B * tcfg.grad_accum * T, flops, model)
