"""Head knockout: switch attention heads off at inference and measure what the model loses.

A head's output (hook point ``blocks.{i}.attn.hook_z``, before the output projection mixes the heads)
is replaced by zeros ("zero": exactly the model with that head's columns of ``c_proj`` zeroed) or by its
mean over the evaluation tokens ("mean": the head keeps its average contribution but stops reading the
context, which separates "this head carries information" from "this head adds a constant offset").
Nothing in the model changes: the replacement lives in ``hooks.run_with_hooks`` for one ``with`` block
of the calling thread, so the same loaded model keeps serving everyone else unchanged.

Validation loss is the mean cross-entropy over non-overlapping context windows of the given tokens,
the way training evaluates. ``knockout_grid`` knocks out one head at a time (one forward pass each);
``knockout_loss`` any set at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import limits
from .errors import ConfigError
from .hooks import run_with_hooks

METHODS = ("zero", "mean")
Head = tuple[int, int]  # (layer, head), both from 0
_BATCH_WINDOWS = 64  # windows per forward pass: bounds memory for large vocabularies
_BATCH_FLOATS = 64_000_000  # head sets run together in one pass up to about this many floats (256 MB) of activations


def _z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def check_heads(model: torch.nn.Module, heads: Iterable[Head]) -> list[Head]:
    """The heads as a sorted list; ConfigError naming one that the model does not have."""
    cfg = model.config
    out = sorted({(int(layer), int(h)) for layer, h in heads})
    for layer, h in out:
        if not (0 <= layer < cfg.n_layer and 0 <= h < cfg.n_head):
            raise ConfigError(
                f"Layer {layer}, head {h} does not exist: this model has {cfg.n_layer} layers of {cfg.n_head} heads."
            )
    return out


def windows(ids: list[int] | torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (x, y) windows over ``ids``: x (W, T) and y, x shifted by one token; T = min(block, n - 1)."""
    data = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = len(data)
    if n < 2:
        raise ConfigError("Knockout needs at least 2 tokens to score.")
    limits.check_inspect_tokens(n)
    T = min(block, n - 1)
    w = (n - 1) // T
    x = data[: w * T].view(w, T)
    y = data[1 : w * T + 1].view(w, T)
    return x, y


def _mean_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    total, count = 0.0, 0
    for c in range(0, len(x), _BATCH_WINDOWS):
        logits = model(x[c : c + _BATCH_WINDOWS]).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), y[c : c + _BATCH_WINDOWS].flatten(), reduction="sum").item()
        count += y[c : c + _BATCH_WINDOWS].numel()
    return total / count


@contextlib.contextmanager
def _eval(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def head_means(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n_layer, n_head, head_size) float32: each head's output averaged over every position of ``x``."""
    sums: dict[int, torch.Tensor] = {}
    count = 0

    def add(layer: int):
        def fn(z: torch.Tensor) -> None:  # (B, nh, T, hs)
            sums[layer] = sums.get(layer, 0) + z.float().sum(dim=(0, 2))

        return fn

    n_layer = model.config.n_layer
    with _eval(model, _device(model)), run_with_hooks(model, {_z_name(i): add(i) for i in range(n_layer)}):
        for c in range(0, len(x), _BATCH_WINDOWS):
            part = x[c : c + _BATCH_WINDOWS].to(_device(model))
            model(part)
            count += part.numel()
    return torch.stack([sums[i] for i in range(n_layer)]) / count


@contextlib.contextmanager
def heads_removed(
    model: torch.nn.Module, heads: Iterable[Head], method: str = "zero", means: torch.Tensor | None = None
) -> Iterator[None]:
    """Inside the block (this thread only), ``model`` runs with ``heads`` knocked out by ``method``.

    "mean" needs ``means`` from ``head_means`` (computed on the tokens the caller evaluates)."""
    if method not in METHODS:
        raise ConfigError(f"Unknown knockout method {method!r}: use one of {', '.join(METHODS)}.")
    if method == "mean" and means is None:
        raise ConfigError("Mean ablation needs the heads' mean outputs (knockout.head_means) first.")
    by_layer: dict[int, list[int]] = {}
    for layer, h in check_heads(model, heads):
        by_layer.setdefault(layer, []).append(h)

    def replace(layer: int, hs: list[int]):
        def fn(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()  # never write into a tensor the caller may still hold
            if method == "zero":
                z[:, hs] = 0
            else:
                z[:, hs] = means[layer, hs].to(z.dtype).to(z.device)[None, :, None, :]
            return z

        return fn

    with run_with_hooks(model, {_z_name(layer): replace(layer, hs) for layer, hs in by_layer.items()}):
        yield


@dataclass
class KnockoutGrid:
    base_loss: float  # validation loss with every head
    loss: np.ndarray  # (n_layer, n_head): the loss with that one head knocked out
    method: str
    n_tokens: int  # tokens scored

    @property
    def delta(self) -> np.ndarray:
        """(n_layer, n_head) loss change when the head is knocked out: > 0 means the model needs it."""
        return self.loss - self.base_loss


def _set_losses(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, off: torch.Tensor, method: str, means: torch.Tensor | None
) -> np.ndarray:
    """Validation loss for each head set at once: ``off`` (S, n_layer, n_head) bool, True = knocked out.

    The S sets run as one batch (the windows repeated S times, each copy with its own heads replaced), so a
    whole grid is a few large forward passes instead of one small pass per head: far fewer synchronisation
    points for the CPU's threads, which is what a small model's passes mostly wait on."""
    cfg = model.config
    W, T = x.shape
    per_set = W * T * max(cfg.vocab_size, 4 * cfg.n_embd)  # floats of the largest activation per set
    chunk = max(1, _BATCH_FLOATS // per_set)
    losses = np.zeros(len(off))
    for c in range(0, len(off), chunk):
        part = off[c : c + chunk].to(x.device)  # (S', L, H)
        n = len(part)

        def replace(layer: int, part=part, n=n):
            def fn(z: torch.Tensor) -> torch.Tensor:  # (n * W, nh, T, hs)
                z = z.view(n, -1, *z.shape[1:])
                mask = part[:, layer][:, None, :, None, None]  # (n, 1, nh, 1, 1)
                fill = torch.zeros((), dtype=z.dtype, device=z.device)
                if method == "mean":
                    fill = means[layer].to(z.dtype).to(z.device)[None, None, :, None, :]
                return torch.where(mask, fill, z).flatten(0, 1)

            return fn

        hooked = {_z_name(layer): replace(layer) for layer in range(cfg.n_layer) if part[:, layer].any()}
        with run_with_hooks(model, hooked):
            logits = model(x.repeat(n, 1)).logits.float()  # (n * W, T, vocab)
        nll = F.cross_entropy(logits.flatten(0, 1), y.repeat(n, 1).flatten(), reduction="none")
        losses[c : c + n] = nll.view(n, -1).mean(dim=1).cpu().numpy()
    return losses


def knockout_grid(model: torch.nn.Module, ids: list[int] | torch.Tensor, method: str = "zero") -> KnockoutGrid:
    """Validation loss of ``model`` on ``ids`` with each head knocked out in turn (and with none, the base)."""
    if method not in METHODS:
        raise ConfigError(f"Unknown knockout method {method!r}: use one of {', '.join(METHODS)}.")
    cfg = model.config
    x, y = windows(ids, cfg.block_size)
    device = _device(model)
    x, y = x.to(device), y.to(device)
    means = head_means(model, x) if method == "mean" else None
    L, H = cfg.n_layer, cfg.n_head
    off = torch.zeros(1 + L * H, L, H, dtype=torch.bool)  # set 0: every head; set 1 + l*H + h: without (l, h)
    off[1:].view(L * H, L * H)[torch.arange(L * H), torch.arange(L * H)] = True
    with _eval(model, device):
        losses = _set_losses(model, x, y, off, method, means)
    base, loss = float(losses[0]), losses[1:].reshape(L, H)
    return KnockoutGrid(base_loss=base, loss=loss, method=method, n_tokens=int(y.numel()))


def knockout_loss(
    model: torch.nn.Module, ids: list[int] | torch.Tensor, heads: Iterable[Head], method: str = "zero"
) -> tuple[float, float]:
    """(loss with every head, loss with ``heads`` knocked out together) on ``ids``."""
    x, y = windows(ids, model.config.block_size)
    device = _device(model)
    x, y = x.to(device), y.to(device)
    means = head_means(model, x) if method == "mean" else None
    with _eval(model, device):
        base = _mean_loss(model, x, y)
        with heads_removed(model, heads, method, means):
            return base, _mean_loss(model, x, y)


@dataclass
class Continuations:
    prompt: str
    with_all: str  # what the model writes with every head
    without: str  # ... and with the heads knocked out
    heads: list[Head]
    method: str


def continuations(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    heads: Iterable[Head],
    method: str = "zero",
    *,
    ids: list[int] | torch.Tensor | None = None,
    max_new_tokens: int = 80,
) -> Continuations:
    """Greedy continuations of ``prompt`` with every head and with ``heads`` knocked out.

    Greedy, so the two texts differ only because of the missing heads. Mean ablation takes the heads'
    means over ``ids`` (the tokens the grid is scored on). The decoding bounds of the server apply
    (``limits.check_decode``: TINYGPT_MAX_NEW_TOKENS)."""
    from .sampling import SamplingSettings, generate

    heads = check_heads(model, heads)
    settings = SamplingSettings(strategy="greedy", max_new_tokens=max_new_tokens).validate(model.config.vocab_size)
    limits.check_decode([settings, settings])
    means = None
    if method == "mean" and heads:
        if ids is None:
            raise ConfigError("Mean ablation needs tokens to average the heads' outputs over.")
        means = head_means(model, windows(ids, model.config.block_size)[0].to(_device(model)))
    with_all = generate(model, tokenizer, prompt, settings).text
    with heads_removed(model, heads, method, means):
        without = generate(model, tokenizer, prompt, settings).text
    return Continuations(prompt=prompt, with_all=with_all, without=without, heads=heads, method=method)


def head_label(head: Head) -> str:
    return f"L{head[0]}H{head[1]}"


__all__ = [
    "METHODS",
    "Continuations",
    "Head",
    "KnockoutGrid",
    "check_heads",
    "continuations",
    "head_label",
    "head_means",
    "heads_removed",
    "knockout_grid",
    "knockout_loss",
    "windows",
]
