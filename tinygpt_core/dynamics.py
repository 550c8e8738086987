"""How a model changes while it trains: the numbers each evaluation logs, and views over kept checkpoints.

At every evaluation the training loop logs two numbers (``eval_dynamics``) into metrics.csv:

- ``induction_score``: the best head's induction score (``inspection.induction_scores``: on a random
  sequence shown twice, the weight the second copy puts on the token after the earlier copy of the
  current token). It jumps when induction heads form.
- ``icl_score``: in-context learning, after Olsson et al. (2022): the mean loss late in the context
  minus the mean loss early in it, on fixed validation windows. Negative means later tokens are
  predicted better because the model uses what it has already read; it falls when induction heads form.

Both use fixed inputs (seeded, or evenly spaced windows), so values at different steps compare.
Over a run's kept checkpoints (``checkpoints.history``) this module computes the head scores and the
loss per context position at every kept step, and ``induction_jump`` finds the step where the
induction score jumps (what the Train page marks on the loss chart).
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import checkpoints
from .data import load_visitor_corpus, split_ids
from .errors import DataError, RunError, TinyGPTError
from .inspection import attention_maps, head_stats, induction_scores
from .model import GPT
from .runs import read_config

ICL_EARLY = (0.05, 0.15)  # the "early" positions, as fractions of the context (Olsson et al.: token 50 of 512)
ICL_LATE = (0.9, 1.0)  # the "late" positions (their token 500 of 512)
ICL_WINDOWS = 32  # validation windows averaged per position
INDUCTION_SEQ_LEN = 32  # length of the random sequence shown twice (cut to half the context)
INDUCTION_BATCH = 8
JUMP_MIN_RISE = 0.2  # an induction score that rises less than this over a run marks no phase change
SCRUB_CACHE_BYTES = 512_000_000  # weights kept loaded per process (one model per run and step): scrubbing
# back to a step seen before is instant; baby models are 3 MB, so a whole history fits


def plain_vocab_range(tokenizer: Any) -> tuple[int, int]:
    """The token ids random probes draw from: every token but the special ones (which never occur in text)."""
    return 0, max(1, tokenizer.vocab_size - len(getattr(tokenizer, "special_tokens", ()) or ()))


def best_induction_score(model: torch.nn.Module, tokenizer: Any) -> float:
    """The highest induction score over all heads (the same probe as the Attention page)."""
    scores = induction_scores(
        model, seq_len=INDUCTION_SEQ_LEN, batch=INDUCTION_BATCH, seed=0, vocab_range=plain_vocab_range(tokenizer)
    )
    return float(np.max(scores))


def val_windows(val_ids: torch.Tensor, block_size: int, n: int = ICL_WINDOWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (n, block_size): windows evenly spaced over the validation split (no RNG)."""
    last = len(val_ids) - block_size - 1
    if last < 0:
        raise ValueError(f"The validation split ({len(val_ids)} tokens) is shorter than one context + 1.")
    starts = torch.linspace(0, last, steps=n).round().long().unique()
    x = torch.stack([val_ids[s : s + block_size] for s in starts])
    y = torch.stack([val_ids[s + 1 : s + block_size + 1] for s in starts])
    return x, y


def position_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """(T,) mean cross-entropy at each context position over the windows (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            logits = model(x.to(device)).logits.float()
            loss = F.cross_entropy(logits.transpose(1, 2), y.to(device), reduction="none")  # (B, T)
    finally:
        model.train(was_training)
    return loss.mean(0).cpu().numpy()


def _span(frac: tuple[float, float], T: int) -> slice:
    lo = min(int(frac[0] * T), T - 1)
    return slice(lo, max(int(frac[1] * T), lo + 1))


def icl_score(per_position: np.ndarray) -> float:
    """Mean loss at the late positions minus at the early ones (NaN for a context under 4 tokens)."""
    T = len(per_position)
    if T < 4:
        return math.nan
    return float(per_position[_span(ICL_LATE, T)].mean() - per_position[_span(ICL_EARLY, T)].mean())


def eval_dynamics(
    model: torch.nn.Module, tokenizer: Any, windows: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, float]:
    """The per-evaluation columns of metrics.csv: {"induction_score", "icl_score"}."""
    cfg = model.config
    # A bigram model (no blocks) has no heads to score; its ICL score is still defined (and about 0).
    induction = best_induction_score(model, tokenizer) if cfg.block_size >= 2 and cfg.n_layer > 0 else math.nan
    return {"induction_score": induction, "icl_score": icl_score(position_loss(model, *windows))}


def halfway_step(metrics: pd.DataFrame, column: str, *, rising: bool = True) -> int | None:
    """The first step where ``column`` (eval rows) is past halfway from its first value to its extreme
    (the highest when ``rising``, else the lowest): the middle of a jump or a fall, robust to wobbles."""
    if column not in metrics:
        return None
    ev = metrics.dropna(subset=[column]).sort_values("step")
    if len(ev) < 2:
        return None
    values = ev[column].to_numpy() * (1 if rising else -1)
    first, extreme = values[0], values.max()
    return int(ev["step"].iloc[int(np.argmax(values >= first + (extreme - first) / 2))])


def induction_jump(metrics: pd.DataFrame, min_rise: float = JUMP_MIN_RISE) -> int | None:
    """The step where the best head's induction score jumps: the middle of its rise (``halfway_step``).

    None when the run logged no induction scores (an older run) or the score never rose by ``min_rise``.
    """
    if "induction_score" not in metrics:
        return None
    scores = metrics["induction_score"].dropna()
    if len(scores) < 2 or scores.max() - scores.iloc[0] < min_rise:
        return None
    return halfway_step(metrics, "induction_score")


def induction_marks(metrics: pd.DataFrame) -> list[tuple[int, str]]:
    """The loss chart's marks (viz.loss_chart_data ``marks``): where induction heads form, if they did."""
    step = induction_jump(metrics)
    return [] if step is None else [(step, f"induction heads form (step {step})")]


# ---------------------------------------------------------------------------------------------
# Models at kept steps


@dataclass(frozen=True)
class _Key:
    run: str
    step: int
    mtime: float  # the weights file's: a run resumed with a new schedule rewrites its later steps


_MODELS: OrderedDict[_Key, GPT] = OrderedDict()
_MODELS_LOCK = threading.Lock()  # the app's sessions scrub from several threads at once


def model_at(run_dir: str | os.PathLike[str], step: int) -> GPT:
    """The run's model as it was at kept ``step`` (eval mode, CPU), from a per-process LRU cache.

    The cache is what makes scrubbing fast: a step seen once comes back without touching the disk.
    RunError (naming the kept steps) for a step the run did not keep.
    """
    path = Path(run_dir)
    weights = checkpoints.find_checkpoint(path, step=step).weights
    try:
        mtime = weights.stat().st_mtime
    except OSError:
        mtime = 0.0
    key = _Key(str(path.resolve()), int(step), mtime)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is not None:
            _MODELS.move_to_end(key)
            return model
    cfg = read_config(path)
    model = GPT(cfg.model)
    checkpoints.load_model_state(model, checkpoints.read_weights(path, step=step))
    model.eval()
    with _MODELS_LOCK:
        _MODELS[key] = model
        size = sum(4 * m.num_params() for m in _MODELS.values())
        while size > SCRUB_CACHE_BYTES and len(_MODELS) > 1:
            size -= 4 * _MODELS.popitem(last=False)[1].num_params()
    return model


def head_scores_over_steps(
    run_dir: str | os.PathLike[str], tokenizer: Any, text: str, steps: list[int] | None = None
) -> pd.DataFrame:
    """One row per kept step, layer and head: previous-token score and entropy on ``text``, and the
    induction score on random repeated sequences (the Attention page's statistics, over training).

    Columns: step, layer, head, prev_token, induction, entropy. Steps whose weights cannot be read
    (a damaged file) are left out.
    """
    steps = checkpoints.checkpoint_steps(run_dir) if steps is None else steps
    rows = []
    for step in steps:
        try:
            model = model_at(run_dir, step)
        except RunError:
            continue  # a damaged kept step is left out (the slider says why when it is picked)
        stats = head_stats(attention_maps(model, tokenizer, text))
        ind = induction_scores(
            model, seq_len=INDUCTION_SEQ_LEN, batch=INDUCTION_BATCH, seed=0, vocab_range=plain_vocab_range(tokenizer)
        )
        for layer in range(ind.shape[0]):
            for head in range(ind.shape[1]):
                rows.append(
                    {
                        "step": step,
                        "layer": layer,
                        "head": head,
                        "prev_token": float(stats["prev_token"][layer, head]),
                        "induction": float(ind[layer, head]),
                        "entropy": float(stats["entropy"][layer, head]),
                    }
                )
    return pd.DataFrame(rows, columns=["step", "layer", "head", "prev_token", "induction", "entropy"])


def validation_ids(run_dir: str | os.PathLike[str], tokenizer: Any) -> torch.Tensor:
    """The run's validation split as token ids: its own corpus.txt, else its source if visitors may read it.

    The same rule as the app's prompts: a run made by the CLI from any file must not open that
    file to visitors (data.load_visitor_corpus). DataError says why the split is unavailable.
    """
    path = Path(run_dir)
    cfg = read_config(path)
    try:
        text = (path / "corpus.txt").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = load_visitor_corpus(str(cfg.corpus.get("source") or "")).text
    try:
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    except TinyGPTError as e:
        raise DataError(f"The run's corpus no longer matches its tokenizer: {e}") from None
    return split_ids(ids, cfg.train.val_fraction)[1]


def position_loss_over_steps(
    run_dir: str | os.PathLike[str], val_ids: torch.Tensor, steps: list[int] | None = None
) -> tuple[list[int], np.ndarray]:
    """(steps, loss) with loss (len(steps), block_size): the validation loss at each context position
    at each kept step (Olsson et al.'s picture: late positions improve when induction heads form)."""
    steps = checkpoints.checkpoint_steps(run_dir) if steps is None else steps
    cfg = read_config(run_dir)
    windows = val_windows(val_ids, cfg.model.block_size)
    used, rows = [], []
    for s in steps:
        try:
            rows.append(position_loss(model_at(run_dir, s), *windows))
        except RunError:
            continue  # a damaged kept step is left out, as in head_scores_over_steps
        used.append(s)
    return used, np.stack(rows) if rows else np.zeros((0, cfg.model.block_size))


__all__ = [
    "ICL_EARLY",
    "ICL_LATE",
    "best_induction_score",
    "eval_dynamics",
    "head_scores_over_steps",
    "halfway_step",
    "icl_score",
    "induction_jump",
    "induction_marks",
    "model_at",
    "plain_vocab_range",
    "position_loss",
    "position_loss_over_steps",
    "val_windows",
    "validation_ids",
]
