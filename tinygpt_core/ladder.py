"""The ladder: from a bigram model to the full transformer, one addition per run.

One of the lab's seed projects is built as exactly this progression (bigram → one attention head →
multi-head → + MLP → + residual → + LayerNorm → + dropout), and each step's gain in validation loss
is the lesson. Here it is a grid (``grid-<id>/<rung>``) made from one baseline spec, the top rung.

Each rung is declared once, as the ablation of the registry (``ablation_registry.REGISTRY``) it
lifts: a rung's model is the baseline with every higher rung's ablation applied. The bottom rung
(the bigram model) therefore carries them all. Two settings are the ladder's own: the dropout rung
(dropout is a setting, not a departure from GPT-2) and the depth, which arrives with the residual
rung (below it the model is one block, as in the seed).
Every rung copies the baseline's corpus, tokenizer, training settings and seed, so batch order and
initialisation stream match and a difference in loss is the rung's doing.

The whole ladder uses an untied output head: a tied bigram model scores a pair (a, b) as e_a · e_b,
so it could only learn symmetric bigram statistics (P(b | a) and P(a | b) alike), and the seed's
models have their own head too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from .ablation_registry import REGISTRY
from .ablations import grid_run_name, new_grid_id, parse_grid_name
from .config import ModelConfig
from .errors import ConfigError

if TYPE_CHECKING:  # training imports torch; only the type is needed here
    from .training import TrainSpec

LADDER_DROPOUT = 0.2  # the dropout rung's value when the baseline has none (the seed's value)
LADDER_MODEL = {"tie_weights": False}  # every rung (see the module docstring)


@dataclass(frozen=True)
class Rung:
    name: str  # its label in the grid: grid-<id>/<name>
    adds: str  # one line: what this rung adds to the one below
    lifts: str | None = None  # the registry ablation that stands for "without this rung"
    absent: tuple[tuple[str, Any], ...] = ()  # any other setting that goes with "without this rung"

    def without(self) -> dict[str, Any]:
        """The ModelConfig change that takes this rung's addition away ({} for the bottom rung)."""
        lifted = REGISTRY.parse(self.lifts)[1] if self.lifts is not None else {}
        return {**lifted, **dict(self.absent)}


LADDER: tuple[Rung, ...] = (
    Rung("bigram", "Token embedding → output head: each prediction sees only the current token."),
    Rung("one-head", "Blocks of a single attention head: a token reads the tokens before it.", lifts="bigram"),
    Rung("multi-head", "Several smaller heads side by side, each free to look for something else.", lifts="one-head"),
    Rung("mlp", "An MLP after attention in each block: each token's vector is transformed on its own.", lifts="no-mlp"),
    # Below this rung the model is one block: a stack without skip connections loses each token's own
    # vector layer after layer (measured: 4 attention-only layers fall back to the unigram loss), so the
    # preset's depth comes with the residual connections, as in the seed's progression.
    Rung(
        "residual",
        "Skip connections around attention and MLP, and the preset's depth: stacked blocks now train.",
        lifts="no-residual",
        absent=(("n_layer", 1),),
    ),
    Rung(
        "layernorm",
        "LayerNorm before each sub-layer and before the head: activations stay in range.",
        lifts="no-layernorm",
    ),
    Rung(
        "dropout",
        "Dropout on attention weights, residual branches and embeddings: less memorising.",
        absent=(("dropout", 0.0),),
    ),
)
RUNG_NAMES = tuple(r.name for r in LADDER)


def ladder_specs(base: TrainSpec, grid_id: str | None = None) -> list[TrainSpec]:
    """One spec per rung, bottom first, named ``grid-<id>/<rung>``; the top rung is ``base`` itself
    (untied head; dropout ``LADDER_DROPOUT`` unless the baseline has its own)."""
    m = base.model.validate()
    missing = [
        what
        for what, ok in (
            ("transformer blocks (n_layer >= 1)", m.n_layer >= 1),
            ("several heads (n_head >= 2)", m.n_head >= 2),
            ("an MLP", m.use_mlp),
            ("residual connections", m.use_residual),
            ("LayerNorm", m.use_layernorm),
        )
        if not ok
    ]
    if missing:
        raise ConfigError(
            "The ladder climbs to a full transformer, so its baseline needs " + ", ".join(missing) + "; "
            "start from a preset such as baby and leave those parts on."
        )
    grid_id = grid_id or new_grid_id()
    top = {**m.to_dict(), **LADDER_MODEL, "dropout": m.dropout or LADDER_DROPOUT}
    specs = []
    for k, rung in enumerate(LADDER):
        model = dict(top)
        for higher in reversed(LADDER[k + 1 :]):  # top down, so a lower rung's absence wins (n_layer 0 over 1)
            model.update(higher.without())
        specs.append(
            dataclasses.replace(
                base,
                model=ModelConfig.from_dict(model),
                train=dataclasses.replace(base.train),
                name=grid_run_name(grid_id, rung.name),
            )
        )
    return specs


def is_ladder(labels: Iterable[str]) -> bool:
    """Whether a grid's member labels are ladder rungs (a ladder grid, not an ablation grid)."""
    labels = set(labels)
    return bool(labels) and labels <= set(RUNG_NAMES) and "bigram" in labels


LADDER_COLUMNS = ["rung", "adds", "name", "status", "steps", "val_loss", "gain", "best_val_loss"]


def ladder_table(summaries: Iterable[Any]) -> pd.DataFrame:
    """Each rung's final val loss and its gain over the rung below (below's val − this val: > 0 helps).

    ``summaries``: objects or dicts with ``name``, ``status``, ``steps``, ``final_val_loss`` and
    ``best_val_loss`` (RunState, RunSummary); rungs come out bottom first, missing ones left out.
    NaN where a value is not known yet (a rung still queued).
    """
    by_rung: dict[str, dict[str, Any]] = {}
    for s in summaries:
        get = s.get if isinstance(s, dict) else (lambda k, _s=s: getattr(_s, k, None))
        parsed = parse_grid_name(get("name"))
        if parsed and parsed[1] in RUNG_NAMES:
            by_rung[parsed[1]] = {
                "name": get("name"),
                "status": get("status") or "",
                "steps": get("steps") or 0,
                "val_loss": _num(get("final_val_loss")),
                "best_val_loss": _num(get("best_val_loss")),
            }
    rows, below = [], math.nan
    for rung in LADDER:
        if rung.name not in by_rung:
            continue
        row = by_rung[rung.name]
        rows.append({"rung": rung.name, "adds": rung.adds, **row, "gain": below - row["val_loss"]})
        below = row["val_loss"]
    return pd.DataFrame(rows, columns=LADDER_COLUMNS)


def _num(x: Any) -> float:
    try:
        return math.nan if x is None else float(x)
    except (TypeError, ValueError):
        return math.nan
