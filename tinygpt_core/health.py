"""Network health: per-layer gradient norm, update-to-weight ratio and activation RMS, and what they say.

Measured at each evaluation, per transformer block ("layer" i = every parameter of ``blocks[i]``):

    grad_norm     L2 norm of the layer's gradients in the step just before the evaluation, before
                  clipping (clipping is what would hide a spike)
    update_ratio  ||W_after - W_before|| / ||W_before|| over the layer's weights in that step: how far one
                  update moves the layer relative to its size (around 1e-3 is the usual healthy pace)
    act_rms       root-mean-square of the residual stream the layer hands on (hook point
                  ``blocks.{i}.hook_resid_post``), over the evaluation's batches

The training loop passes a ``StepProbe`` to ``TrainState.train_step`` on evaluation steps only and wraps
the evaluation in ``activation_rms``; between evaluations nothing is measured, so the cost is a copy of
the block weights and a few norms once per evaluation. The values land in the run's metrics as the
columns ``runs.LAYER_METRICS`` declares; ``diagnose`` turns a run's history into sentences (a gradient
spike, a collapsing layer, updates too large or too small to train).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from .hooks import run_with_hooks
from .runs import LAYER_METRICS, layer_column, parse_layer_column

LOG_HEALTH = True  # the loop measures health at each evaluation; bench/health.py turns it off to time its cost

# What diagnose calls unhealthy (rules of thumb for small transformers; each sentence says which one fired).
SPIKE_FACTOR = 10.0  # a gradient norm this many times the layer's median over earlier evaluations
COLLAPSE_FRACTION = 0.05  # activation RMS fallen below this fraction of the layer's largest so far
DEAD_UPDATE_RATIO = 1e-6  # updates this small leave a layer as it is
LARGE_UPDATE_RATIO = 0.1  # one step moving a layer by a tenth of its size
MIN_HISTORY = 2  # evaluations a layer needs before a spike or a collapse can be told from its start


class StepProbe:
    """Gradient norms and update sizes of one optimizer step, per block of ``model``."""

    def __init__(self, model: torch.nn.Module):
        self.layers = [[p for p in block.parameters() if p.requires_grad] for block in model.blocks]
        self.grad_norm: list[float] = [math.nan] * len(self.layers)
        self.update_ratio: list[float] = [math.nan] * len(self.layers)
        self._before: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def before_update(self) -> None:
        """Called with the step's final (unscaled, unclipped) gradients, before the optimizer moves anything."""
        for i, params in enumerate(self.layers):
            grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
            self.grad_norm[i] = torch.stack(grads).norm().item() if grads else math.nan
        self._before = [[p.detach().clone() for p in params] for params in self.layers]

    @torch.no_grad()
    def after_update(self) -> None:
        """Called once the optimizer has stepped: how far each layer moved, relative to its size."""
        for i, (params, before) in enumerate(zip(self.layers, self._before)):
            moved = torch.stack([(p.float() - b.float()).norm() for p, b in zip(params, before)]).norm()
            size = torch.stack([b.float().norm() for b in before]).norm()
            self.update_ratio[i] = (moved / size).item() if size > 0 else math.nan
        self._before = []


@contextlib.contextmanager
def activation_rms(model: torch.nn.Module) -> Iterator[list[float]]:
    """Inside the block, every forward pass adds to each block's output mean square; the yielded list holds
    the RMS per block once the block ends (NaN for a block that never ran)."""
    n = len(model.blocks)
    sums: list[torch.Tensor | float] = [0.0] * n  # tensors: no host sync per forward pass on a GPU
    counts = [0] * n
    out = [math.nan] * n

    def add(i: int):
        def fn(x: torch.Tensor) -> None:
            sums[i] = sums[i] + x.detach().float().pow(2).mean()
            counts[i] += 1

        return fn

    with run_with_hooks(model, {f"blocks.{i}.hook_resid_post": add(i) for i in range(n)}):
        yield out
    out[:] = [math.sqrt(float(s) / c) if c else math.nan for s, c in zip(sums, counts)]


def values(probe: StepProbe | None, act_rms: list[float] | None) -> dict[str, float]:
    """The health columns of one evaluation row (``runs.layer_column`` names); absent measures are NaN."""
    row: dict[str, float] = {}
    n = len(probe.layers) if probe is not None else len(act_rms or [])
    for i in range(n):
        row[layer_column("grad_norm", i)] = probe.grad_norm[i] if probe is not None else math.nan
        row[layer_column("update_ratio", i)] = probe.update_ratio[i] if probe is not None else math.nan
        row[layer_column("act_rms", i)] = act_rms[i] if act_rms else math.nan
    return row


def health_frame(metrics: pd.DataFrame | None) -> pd.DataFrame:
    """The evaluation rows that carry health, long form: step, layer, metric, value (empty when there are none)."""
    cols = [] if metrics is None else [c for c in metrics.columns if parse_layer_column(str(c))]
    if not cols or metrics.empty:
        return pd.DataFrame(columns=["step", "layer", "metric", "value"])
    df = metrics[["step", *cols]].dropna(subset=cols, how="all")
    long = df.melt(id_vars="step", var_name="column", value_name="value")
    parsed = long["column"].map(parse_layer_column)
    long["metric"] = parsed.map(lambda p: p[0])
    long["layer"] = parsed.map(lambda p: p[1]).astype(int)
    return long[["step", "layer", "metric", "value"]].sort_values(["metric", "layer", "step"]).reset_index(drop=True)


def diagnose(metrics: pd.DataFrame | None) -> list[str]:
    """Sentences about the latest evaluation's health, worst first; empty when nothing looks wrong."""
    long = health_frame(metrics)
    if long.empty:
        return []
    notes: list[str] = []
    last_step = int(long["step"].max())
    for (metric, layer), g in long.groupby(["metric", "layer"], sort=True):
        s = g.dropna(subset=["value"]).sort_values("step")
        if s.empty or int(s["step"].iloc[-1]) != last_step:
            continue
        now, earlier = float(s["value"].iloc[-1]), s["value"].iloc[:-1].to_numpy(dtype=float)
        where = f"layer {layer} at step {last_step:,}"
        if metric == "grad_norm":
            if not np.isfinite(now):
                notes.append(f"Gradient of {where} is not finite: lower the learning rate.")
            elif len(earlier) >= MIN_HISTORY and now > SPIKE_FACTOR * float(np.median(earlier)) > 0:
                notes.append(
                    f"Gradient spike in {where}: {now:.3g}, {now / float(np.median(earlier)):.0f}× its usual size. "
                    "The loss may jump; lower the learning rate or clip gradients."
                )
            elif now == 0.0:
                notes.append(f"No gradient reaches {where}: it has stopped learning.")
        elif metric == "act_rms" and len(earlier) >= MIN_HISTORY and np.isfinite(now):
            peak = float(np.nanmax(earlier))
            if peak > 0 and now < COLLAPSE_FRACTION * peak:
                notes.append(
                    f"Activations of {where} are collapsing: RMS {now:.3g}, down from {peak:.3g} "
                    f"({now / peak:.0%}). The layer passes on almost nothing."
                )
        elif metric == "update_ratio" and np.isfinite(now) and last_step > 1:
            if now > LARGE_UPDATE_RATIO:
                notes.append(
                    f"Updates of {where} move it by {now:.0%} of its size in one step: far above the usual "
                    "~0.1%. Lower the learning rate."
                )
            elif 0 <= now < DEAD_UPDATE_RATIO:
                notes.append(f"Updates of {where} are {now:.1e} of its size: the layer is not changing.")
    return notes


__all__ = [
    "LAYER_METRICS",
    "LOG_HEALTH",
    "StepProbe",
    "activation_rms",
    "diagnose",
    "health_frame",
    "values",
]
