"""Token-level loss: how surprised a model is by each token of a text, and what it expected instead.

Token p (p >= 1) is scored from the tokens before it: loss = -log P(ids[p] | ids[:p]), in nats, the
same cross-entropy training minimises, per token instead of averaged. A text longer than the model's
context is read in overlapping windows (stride half a context), and every token is scored in the
window that gives it the most context, so after the first half-context each token sees at least
block_size / 2 tokens before it. The first token has nothing to be predicted from: its loss is NaN.

``compare`` lines up two runs' losses on the same tokens: where does one model lose more than the other?
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import limits
from .errors import ConfigError

TOP_K = 5
_LOGIT_FLOATS = 16_000_000  # (windows, T, vocab) logits held at once (64 MB): few windows for a large vocabulary


@dataclass
class TokenLoss:
    ids: list[int]
    tokens: list[str]  # a readable label per token (tokenizer.token_strings)
    loss: np.ndarray  # (n,) nats; loss[0] is NaN
    top_ids: np.ndarray  # (n, k) the model's k most likely tokens at each position (row 0: -1)
    top_probs: np.ndarray  # (n, k) their probabilities (row 0: NaN)
    vocab_size: int

    @property
    def mean_loss(self) -> float:
        return float(np.nanmean(self.loss)) if len(self.loss) > 1 else math.nan

    @property
    def uniform_loss(self) -> float:
        """The loss of a model that guesses uniformly over the vocabulary: ln(vocab) nats."""
        return math.log(self.vocab_size)


def _windows(n: int, block: int) -> tuple[list[int], np.ndarray]:
    """Window starts over n tokens, and for each target position p (1..n-1) the start that scores it."""
    if n - 1 <= block:
        return [0], np.zeros(n, dtype=np.int64)
    stride = max(1, block // 2)
    starts = list(range(0, n - 1 - block, stride)) + [n - 1 - block]
    pick = np.zeros(n, dtype=np.int64)
    arr = np.asarray(starts)
    for p in range(1, n):
        pick[p] = int(np.searchsorted(arr, max(0, p - block)))  # the first start that still sees p: most context
    return starts, pick


@torch.inference_mode()
def token_losses(model: torch.nn.Module, tokenizer: Any, ids: list[int], top_k: int = TOP_K) -> TokenLoss:
    """Per-token loss and top-k next-token predictions of ``model`` over ``ids`` (eval mode, no grad)."""
    n = len(ids)
    if n < 2:
        raise ConfigError("Token loss needs at least 2 tokens: one to read and one to predict.")
    limits.check_inspect_tokens(n)
    block = model.config.block_size
    vocab = model.config.vocab_size
    k = min(top_k, vocab)
    device = next(model.parameters()).device
    data = torch.tensor(ids, dtype=torch.long, device=device)
    starts, pick = _windows(n, block)
    span = min(block, n - 1)
    loss = np.full(n, np.nan, dtype=np.float64)
    top_ids = np.full((n, k), -1, dtype=np.int64)
    top_probs = np.full((n, k), np.nan, dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        per_batch = max(1, _LOGIT_FLOATS // (span * vocab))
        for c in range(0, len(starts), per_batch):
            chunk = starts[c : c + per_batch]
            offs = torch.tensor(chunk, device=device)[:, None] + torch.arange(span + 1, device=device)
            windows = data[offs]  # (W, span + 1)
            logits = model(windows[:, :-1]).logits.float()  # (W, span, vocab)
            logp = F.log_softmax(logits, dim=-1)
            nll = -logp.gather(-1, windows[:, 1:, None])[..., 0]  # (W, span)
            tp, ti = logp.topk(k, dim=-1)
            nll, tp, ti = nll.cpu().numpy(), tp.exp().cpu().numpy(), ti.cpu().numpy()
            for w, s in enumerate(chunk):
                w_index = c + w
                targets = np.arange(s + 1, s + span + 1)
                mine = targets[pick[targets] == w_index]  # the targets this window scores
                loss[mine] = nll[w, mine - s - 1]
                top_ids[mine] = ti[w, mine - s - 1]
                top_probs[mine] = tp[w, mine - s - 1]
    finally:
        model.train(was_training)
    return TokenLoss(
        ids=list(ids),
        tokens=tokenizer.token_strings(list(ids)),
        loss=loss,
        top_ids=top_ids,
        top_probs=top_probs,
        vocab_size=vocab,
    )


def hover_titles(tl: TokenLoss, tokenizer: Any) -> list[str]:
    """One hover line per token: its loss and the model's top-k guesses for that slot, most likely first."""
    labels = tokenizer.token_strings(sorted({int(i) for i in tl.top_ids.reshape(-1) if i >= 0}))
    names = dict(zip(sorted({int(i) for i in tl.top_ids.reshape(-1) if i >= 0}), labels))
    out = []
    for p in range(len(tl.ids)):
        if not np.isfinite(tl.loss[p]):
            out.append("first token: nothing before it to predict it from")
            continue
        guesses = ", ".join(
            f"{names[int(i)]!r} {pr:.2f}" for i, pr in zip(tl.top_ids[p], tl.top_probs[p]) if int(i) >= 0
        )
        out.append(f"loss {tl.loss[p]:.2f} nats (p = {math.exp(-tl.loss[p]):.3f}) · expected: {guesses}")
    return out


def loss_colours(tl: TokenLoss) -> list[float | None]:
    """Colour values for viz.token_html (1 green .. 0 red): loss 0 is green, a uniform guess's loss or more is red."""
    return [None if not np.isfinite(v) else 1.0 - min(1.0, float(v) / tl.uniform_loss) for v in tl.loss]


@dataclass
class LossDifference:
    diff: np.ndarray  # (n,) loss under B minus loss under A, nats (NaN at the first token)
    mean_a: float
    mean_b: float

    def colours(self, scale: float = 2.0) -> list[float | None]:
        """token_html values: green where B does better, yellow equal, red where B loses (±``scale`` nats saturate)."""
        return [None if not np.isfinite(d) else 0.5 - max(-1.0, min(1.0, float(d) / scale)) / 2 for d in self.diff]

    def worst(self, n: int = 10) -> list[int]:
        """Positions where B loses the most against A, worst first."""
        d = np.where(np.isfinite(self.diff), self.diff, -np.inf)
        order = np.argsort(-d, kind="stable")
        return [int(p) for p in order[:n] if np.isfinite(self.diff[p]) and self.diff[p] > 0]


def compare(a: TokenLoss, b: TokenLoss) -> LossDifference:
    """Per-token loss of B minus A on the same tokens; ConfigError when the two runs read the text differently."""
    if a.ids != b.ids:
        raise ConfigError(
            "The two runs split this text into different tokens, so their losses cannot be lined up token by "
            "token. Compare runs trained with the same tokenizer on the same corpus."
        )
    return LossDifference(diff=b.loss - a.loss, mean_a=a.mean_loss, mean_b=b.mean_loss)


__all__ = ["LossDifference", "TOP_K", "TokenLoss", "compare", "hover_titles", "loss_colours", "token_losses"]
