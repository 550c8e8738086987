"""The trainable state of a run and the one optimizer step that advances it.

``TrainState`` holds the model, its optimizer (``optim.build_optimizer``), the fp16 grad scaler and
the seeded batch generator, on one device and precision resolved beforehand (``training.prepare``).
``train_step(lr)`` is exactly what the training loop runs per step, so a benchmark that times it
times a user's run: forward/backward over ``grad_accum`` micro-batches under autocast, NaN check
(the update is skipped, the weights stay those of the last good step), gradient clipping (on the
true, unscaled gradients), optimizer update. ``estimate_losses`` is the loop's eval, and
``random_state``/``restore`` are what a checkpoint keeps so that a resumed run continues exactly.

Every random draw comes from a seeded source: torch's global RNG (init, dropout; seeded here) and
the batch generator; an eval draws from a fresh generator of its own, so it never moves either.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .checkpoints import load_model_state
from .config import ModelConfig, TrainConfig
from .data import get_batch
from .device import autocast, is_out_of_memory, resolve_device, resolve_precision
from .errors import RunError
from .model import GPT
from .optim import build_optimizer


class TrainState:
    """Model, optimizer, grad scaler and batch stream of one run, seeded from ``train_cfg.seed``."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        train_ids: torch.Tensor,
        device: torch.device,
        precision: str,
        resume_state: tuple[dict, dict, dict] | None = None,
        init_weights: dict | None = None,
    ):
        self.model_cfg, self.train_cfg, self.train_ids = model_cfg, train_cfg, train_ids
        self.device, self.precision = device, precision
        self.grad_norm: torch.Tensor | None = None  # the last step's gradient norm (set when clipping)
        self.notes: list[str] = []  # what the user should know at the end (e.g. torch.compile skipped)
        # Seed everything that draws: torch's global RNG (init, dropout) and the batch generator.
        torch.manual_seed(train_cfg.seed)
        self.model = GPT(model_cfg)
        if init_weights is not None:  # a fine-tune starts from its parent's weights
            load_model_state(self.model, init_weights)
        self.model.to(device)
        self.optimizer = build_optimizer(self.model, train_cfg, device)
        self.data_gen = torch.Generator().manual_seed(train_cfg.seed)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.extra: dict = {}
        if resume_state is not None:
            self.extra = self.restore(*resume_state)
        self.fwd_model: torch.nn.Module = self.model
        if train_cfg.compile:
            try:
                self.fwd_model = torch.compile(self.model)
            except Exception as e:  # noqa: BLE001 - compile is an optimisation, never a requirement
                self.notes.append(f"torch.compile was skipped ({type(e).__name__}: {e})")
        self.model.train()

    @property
    def tokens_per_step(self) -> int:
        # A chat run's batches are conversations, shorter than the context: count their mean length.
        per_row = getattr(self.train_ids, "mean_tokens", self.model_cfg.block_size)
        return round(self.train_cfg.batch_size * self.train_cfg.grad_accum * per_row)

    # --- one optimizer step ----------------------------------------------------------------------

    def train_step(self, lr: float, probe: Any = None) -> float:
        """One optimizer update at learning rate ``lr``; returns the mean loss (not finite: no update).

        ``probe`` (a ``health.StepProbe``, on evaluation steps) sees the true gradients before clipping
        (``before_update``) and the weights once the optimizer has moved them (``after_update``)."""
        self.optimizer.set_lr(lr)
        tcfg = self.train_cfg
        compiled = self.fwd_model is not self.model
        data_state = self.data_gen.get_state() if compiled else None
        try:
            loss_sum = self._forward_backward(self.fwd_model)
        except Exception as e:  # noqa: BLE001
            if not compiled or is_out_of_memory(e):
                raise
            # torch.compile fails lazily at the first call: fall back to eager and redo the step.
            self.notes.append(f"torch.compile was skipped ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            self.fwd_model = self.model
            self.optimizer.zero_grad(set_to_none=True)
            self.data_gen.set_state(data_state)
            loss_sum = self._forward_backward(self.model)
        loss = loss_sum.item()  # the one host sync per step: needed for the NaN check and the log
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return loss
        if tcfg.grad_clip > 0 or (probe is not None and self.scaler.is_enabled()):
            for o in self.optimizer.optimizers:
                self.scaler.unscale_(o)  # clip (and probe) the true gradients, not the fp16-scaled ones
        if probe is not None:
            probe.before_update()
        if tcfg.grad_clip > 0:
            # Kept as a tensor (no host sync here); the loop reads it only at an eval (TensorBoard's grad norm).
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
        for o in self.optimizer.optimizers:
            self.scaler.step(o)
        self.scaler.update()
        if probe is not None:
            probe.after_update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _forward_backward(self, model: torch.nn.Module) -> torch.Tensor:
        tcfg = self.train_cfg
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(tcfg.grad_accum):
            x, y = _batch(self.train_ids, self.model_cfg.block_size, tcfg.batch_size, self.data_gen, self.device)
            with autocast(self.device, self.precision):
                loss = model(x, y).loss / tcfg.grad_accum  # mean over the whole accumulated batch
            loss_sum += loss.detach().float()
            self.scaler.scale(loss).backward()
        return loss_sum

    # --- eval --------------------------------------------------------------------------------------

    @torch.no_grad()
    def estimate_losses(
        self, datasets: Sequence[torch.Tensor], before_batch: Callable[[], bool] = lambda: False
    ) -> list[float] | None:
        """Mean loss over ``eval_iters`` batches of each dataset; None when ``before_batch()`` says stop.

        The batches come from a generator seeded the same at every eval: the estimate never moves
        the training data stream, and successive evals are measured on the same windows.
        """
        tcfg, block = self.train_cfg, self.model_cfg.block_size
        gen = torch.Generator().manual_seed(tcfg.seed + 1)
        self.model.eval()
        try:
            out = []
            for data in datasets:
                total = torch.zeros((), device=self.device)
                for _ in range(tcfg.eval_iters):
                    if before_batch():
                        return None
                    x, y = _batch(data, block, tcfg.batch_size, gen, self.device)
                    with autocast(self.device, self.precision):
                        total += self.model(x, y).loss.float()
                out.append((total / tcfg.eval_iters).item())
            return out
        finally:
            self.model.train()

    # --- what a checkpoint keeps ---------------------------------------------------------------------

    def random_state(self) -> dict[str, Any]:
        """RNG and grad-scaler states (tensors allowed): with the weights and optimizer, an exact resume point."""
        extra: dict[str, Any] = {"data_rng": self.data_gen.get_state(), "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            extra["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.scaler.is_enabled():
            extra["scaler"] = self.scaler.state_dict()
        return extra

    def restore(self, model_state: dict, optim_state: dict, extra: dict) -> dict:
        """Load a checkpoint's weights, optimizer, RNG and scaler states; returns ``extra`` for the loop's counters."""
        load_model_state(self.model, model_state)
        self.model.to(self.device)
        try:
            self.optimizer.load_state_dict(optim_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise RunError(f"the checkpoint's optimizer state does not match this run: {e}") from None
        if isinstance(extra.get("data_rng"), torch.Tensor):
            self.data_gen.set_state(extra["data_rng"])
        if isinstance(extra.get("torch_rng"), torch.Tensor):
            torch.set_rng_state(extra["torch_rng"])
        if self.device.type == "cuda" and isinstance(extra.get("cuda_rng"), torch.Tensor):
            torch.cuda.set_rng_state(extra["cuda_rng"], self.device)
        if self.scaler.is_enabled() and isinstance(extra.get("scaler"), dict):
            self.scaler.load_state_dict(extra["scaler"])
        return extra


def _batch(data: Any, block: int, batch_size: int, gen: torch.Generator, device: torch.device) -> tuple:
    """Random windows of a token stream, or a chat run's conversations (chatdata.ChatBatches)."""
    own = getattr(data, "get_batch", None)
    if own is not None:
        return own(block, batch_size, gen, device)
    return get_batch(data, block, batch_size, gen, device)


def estimate_step_time(spec: Any, device: str = "auto", steps: int = 3) -> float:
    """Seconds per optimizer step of ``spec``'s model and batch, measured on random tokens.

    Times the loop's own step (``TrainState.train_step``) after one unmeasured warm-up step
    (allocation, kernel selection). The global RNG is left as it was, so calling this does not
    change a later seeded run. Reads no corpus: the vocabulary is the spec's (or the BPE size asked for).
    """
    dev = resolve_device(device)
    tcfg = dataclasses.replace(spec.train, compile=False, seed=0)
    precision = resolve_precision(tcfg.precision, dev)
    vocab = spec.model.vocab_size
    if spec.tokenizer == "bpe" and spec.tokenizer_vocab_size:
        vocab = spec.tokenizer_vocab_size
    cfg = dataclasses.replace(spec.model, vocab_size=vocab)
    with torch.random.fork_rng(devices=[]):
        gen = torch.Generator().manual_seed(0)
        data = torch.randint(vocab, (cfg.block_size * tcfg.batch_size + cfg.block_size + 1,), generator=gen)
        state = TrainState(cfg, tcfg, data, dev, precision)
        state.train_step(tcfg.lr)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(max(1, steps)):
            state.train_step(tcfg.lr)
        _sync(dev)
        return (time.perf_counter() - t0) / max(1, steps)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


__all__ = ["TrainState", "estimate_step_time"]
