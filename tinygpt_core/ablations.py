"""Ablation grids: which runs a grid makes from one baseline, and how they compare to it.

A grid is one baseline ``TrainSpec`` plus one run per ablation (a label of the ablation registry,
``REGISTRY.grid_options()``, with any window size: "window-12"), each differing from the baseline
in exactly one ``ModelConfig`` choice. Everything else (corpus, tokenizer, training settings,
seed, hence initialisation RNG stream and batch order) is copied, so a difference in loss is the
ablation's doing. Runs are named ``grid-<id>/<label>`` so the grid can be found again on disk.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from .ablation_registry import REGISTRY
from .config import ModelConfig
from .errors import ConfigError

if TYPE_CHECKING:  # training imports torch and the whole loop; only the type is needed here
    from .training import TrainSpec

GRID_PREFIX = "grid-"
BASELINE = "baseline"

_GRID_NAME_RE = re.compile(rf"^({GRID_PREFIX}[A-Za-z0-9_.-]+)/(.+)$")


def ablation_overrides(label: str) -> tuple[str, dict[str, Any]]:
    """(one-line description, ModelConfig overrides) of a grid label, any "window-<N>" included.

    The labels are the ablation registry's (tinygpt_core.ablation_registry); unknown ones are refused.
    """
    ablation, overrides = REGISTRY.parse(label)
    if not ablation.grid:
        raise ConfigError(f"Ablation {label!r} cannot be used in a grid.")
    return ablation.describe(overrides[ablation.field] if ablation.parametric else None), overrides


def new_grid_id() -> str:
    """A short id that sorts by creation time: yymmdd-hhmmss plus 4 random hex digits."""
    return time.strftime("%y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def grid_run_name(grid_id: str, label: str) -> str:
    return f"{GRID_PREFIX}{grid_id}/{label}" if not grid_id.startswith(GRID_PREFIX) else f"{grid_id}/{label}"


def parse_grid_name(name: str | None) -> tuple[str, str] | None:
    """("grid-<id>", label) for a grid run's name, None for any other name."""
    if not name:
        return None
    m = _GRID_NAME_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def grid_specs(base: TrainSpec, ablations: Sequence[str], grid_id: str | None = None) -> list[TrainSpec]:
    """The baseline followed by one spec per ablation, named ``grid-<id>/<label>``.

    Each ablated spec copies the baseline and changes only its ModelConfig, so seed, data order and
    training settings match. An ablation that would leave the baseline unchanged (e.g. pos-sinusoidal
    on a sinusoidal baseline, a window no shorter than the context) is refused: it would waste a run.
    """
    if not ablations:
        raise ConfigError("Pick at least one ablation to compare against the baseline.")
    labels = list(dict.fromkeys(ablations))  # drop duplicates, keep the user's order
    grid_id = grid_id or new_grid_id()
    base.model.validate()
    base_model = base.model.to_dict()

    specs = [_with(base, base.model, grid_run_name(grid_id, BASELINE))]
    for label in labels:
        _, overrides = ablation_overrides(label)
        if all(base_model.get(k) == v for k, v in overrides.items()):
            raise ConfigError(f"Ablation {label!r} is already how the baseline is built; remove it from the grid.")
        window = overrides.get("attn_window")
        if window is not None and window >= base.model.block_size:
            raise ConfigError(
                f"Ablation {label!r}: a window of {window} tokens sees the whole context "
                f"(block_size {base.model.block_size}); pick a window smaller than {base.model.block_size}."
            )
        model = ModelConfig.from_dict({**base_model, **overrides})  # validates (e.g. n_embd % n_head)
        specs.append(_with(base, model, grid_run_name(grid_id, label)))
    return specs


def _with(base: TrainSpec, model: ModelConfig, name: str) -> TrainSpec:
    # Fresh copies of both configs so no two specs share a mutable dataclass.
    train = dataclasses.replace(base.train)
    return dataclasses.replace(base, model=dataclasses.replace(model), train=train, name=name)


COMPARE_COLUMNS = [
    "ablation",
    "name",
    "status",
    "steps",
    "final_train_loss",
    "final_val_loss",
    "gap",
    "best_val_loss",
    "delta",
    "ratio",
]


def compare_to_baseline(summaries: Iterable[Any]) -> pd.DataFrame:
    """A table of each run's final val loss against its grid's baseline.

    ``summaries``: objects with ``name``, ``status``, ``steps``, ``final_train_loss``,
    ``final_val_loss`` and ``best_val_loss`` attributes (RunSummary, or dicts with those keys).
    The baseline is the run whose name ends in "/baseline" (or is "baseline"). Columns:
    ablation, name, status, steps, final_train_loss, final_val_loss, gap (final val - final train:
    how much the model overfits), best_val_loss, delta (final val - baseline's final val; > 0 means
    the ablation hurts) and ratio (final val / baseline's final val). NaN where a value is unknown
    (a run still queued, or no baseline yet). Baseline first, then the rest in the order given.
    """
    rows = []
    for s in summaries:
        get = s.get if isinstance(s, dict) else (lambda k, _s=s: getattr(_s, k, None))
        name = get("name") or ""
        parsed = parse_grid_name(name)
        label = parsed[1] if parsed else name
        train_loss, val_loss = _num(get("final_train_loss")), _num(get("final_val_loss"))
        rows.append(
            {
                "ablation": label,
                "name": name,
                "status": get("status") or "",
                "steps": get("steps") if get("steps") is not None else 0,
                "final_train_loss": train_loss,
                "final_val_loss": val_loss,
                "gap": val_loss - train_loss,  # NaN propagates when either is unknown
                "best_val_loss": _num(get("best_val_loss")),
            }
        )
    df = pd.DataFrame(rows, columns=COMPARE_COLUMNS[:-2])
    is_base = df["ablation"] == BASELINE
    base_val = df.loc[is_base, "final_val_loss"].iloc[0] if is_base.any() else math.nan
    df["delta"] = df["final_val_loss"] - base_val
    df["ratio"] = df["final_val_loss"] / base_val if base_val and not math.isnan(base_val) else math.nan
    # Baseline on top; a stable sort keeps everything else in the caller's order.
    df = df.assign(_order=(~is_base).astype(int)).sort_values("_order", kind="stable").drop(columns="_order")
    return df.reset_index(drop=True)


def metrics_summary(metrics: pd.DataFrame) -> dict[str, float | int | None]:
    """steps, final_train_loss, final_val_loss, best_val_loss and best_step of a metrics table.

    Works on a partial table (a run still training): "final" means the latest eval so far.
    """
    out: dict[str, float | int | None] = dict(
        steps=0, final_train_loss=None, final_val_loss=None, best_val_loss=None, best_step=None
    )
    if metrics is None or metrics.empty:
        return out
    out["steps"] = int(metrics["step"].iloc[-1])
    tr = metrics["train_loss"].dropna()
    out["final_train_loss"] = float(tr.iloc[-1]) if len(tr) else None
    val = metrics.dropna(subset=["val_loss"])
    if len(val):
        out["final_val_loss"] = float(val["val_loss"].iloc[-1])
        best = val.loc[val["val_loss"].idxmin()]
        out["best_val_loss"], out["best_step"] = float(best["val_loss"]), int(best["step"])
    return out


def with_gap(metrics: pd.DataFrame) -> pd.DataFrame:
    """A copy of a metrics table with a "gap" column: val_loss - train_loss at each eval (NaN elsewhere).

    A gap growing above zero is the model memorising its training text rather than generalising.
    """
    out = metrics.copy()
    out["gap"] = out["val_loss"] - out["train_loss"]
    return out


def _num(x: Any) -> float:
    try:
        return math.nan if x is None else float(x)
    except (TypeError, ValueError):
        return math.nan
