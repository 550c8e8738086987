"""Attention maps and per-head statistics: what each head of a model looks at.

Everything here reads the weights the model itself returns with ``return_attention=True`` (the
explicit attention path, numerically the same as the fast one), so every ablation (local windows,
no positions, swapped q/k, post-norm, ...) is inspected exactly as it runs; nothing is recomputed
on the side.

Conventions: weights are (n_layer, n_head, T, T) with rows = queries and columns = keys; row i is
the distribution of query position i over key positions 0..i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import TokenizerError


@dataclass
class AttentionMaps:
    tokens: list[str]  # a readable label per position (tokenizer.token_strings)
    token_ids: list[int]
    weights: np.ndarray  # (n_layer, n_head, T, T) float32; rows are queries and sum to 1
    cropped: bool = False  # True when the text was longer than block_size and only its end is shown

    @property
    def n_layer(self) -> int:
        return self.weights.shape[0]

    @property
    def n_head(self) -> int:
        return self.weights.shape[1]


def no_attention_reason(cfg: Any) -> str | None:
    """Why a model of ``cfg`` (a ModelConfig) has no attention to show, or None when it has some."""
    if cfg.n_layer == 0:
        return (
            "This is a bigram model (0 layers): the token embedding goes straight to the output head, so "
            "there is no attention and nothing to show here. Each prediction depends on the current token only."
        )
    return None


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _attention(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """All layers' attention for a batch: (B, n_layer, n_head, T, T) float32, eval mode, no grad."""
    was_training = model.training
    model.eval()  # dropout on attention would make the maps random
    try:
        with torch.inference_mode():
            out = model(idx, return_attention=True)
    finally:
        model.train(was_training)
    return torch.stack(out.attentions, dim=1).float()


def attention_of_ids(model: torch.nn.Module, ids: torch.Tensor) -> np.ndarray | None:
    """Every layer's attention over one sequence of token ids: (n_layer, n_head, T, T) float32 numpy;
    None for a model without attention (the bigram model)."""
    if len(getattr(model, "blocks", ())) == 0:
        return None
    return _attention(model, ids.reshape(1, -1))[0].cpu().numpy()


def attention_maps(model: torch.nn.Module, tokenizer: Any, text: str, device: Any = None) -> AttentionMaps:
    """Every layer's and head's attention over ``text``.

    Unknown symbols raise the tokenizer's TokenizerError. A text longer than the model's context
    keeps its last block_size tokens (``cropped`` is then True), which is what the model would see
    when predicting what comes next.
    """
    ids = tokenizer.encode(text)
    if not ids:
        raise TokenizerError("The text is empty: type some text to see what each head attends to.")
    block = model.config.block_size
    cropped = len(ids) > block
    ids = ids[-block:]
    if device is not None:
        model.to(device)
    idx = torch.tensor([ids], dtype=torch.long, device=_model_device(model))  # (1, T)
    weights = _attention(model, idx)[0].cpu().numpy()  # (L, H, T, T)
    return AttentionMaps(tokens=tokenizer.token_strings(ids), token_ids=ids, weights=weights, cropped=cropped)


def _as_weights(maps_or_weights: Any) -> np.ndarray:
    w = maps_or_weights.weights if isinstance(maps_or_weights, AttentionMaps) else maps_or_weights
    if isinstance(w, torch.Tensor):
        w = w.detach().float().cpu().numpy()
    w = np.asarray(w, dtype=np.float64)  # float64: stats over long rows stay exact enough
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"Expected attention weights of shape (n_layer, n_head, T, T), got {w.shape}.")
    return w


def head_stats(maps_or_weights: AttentionMaps | np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """Per-head summary numbers, each an (n_layer, n_head) float array.

    entropy        nats, mean over all queries of -Σ w log w (0 = one key, log(i+1) = uniform)
    mean_distance  mean over all queries of Σ_j w_ij |i - j| (how far back a head looks)
    prev_token     mean over queries i >= 1 of w[i, i-1] (1 = a perfect previous-token head)
    first_token    mean over queries i >= 1 of w[i, 0] (attention parked on the first token;
                   query 0 is left out, it can only attend to itself)
    With a single token, prev_token and first_token are NaN.
    """
    w = _as_weights(maps_or_weights)  # (L, H, T, T)
    T = w.shape[-1]
    pos = np.arange(T)
    plogp = np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0)  # 0·log 0 = 0
    entropy = -plogp.sum(-1).mean(-1)
    dist = np.abs(pos[:, None] - pos[None, :])  # (T, T) |i - j|
    mean_distance = (w * dist).sum(-1).mean(-1)
    if T > 1:
        prev_token = w[..., pos[1:], pos[:-1]].mean(-1)
        first_token = w[..., 1:, 0].mean(-1)
    else:
        prev_token = first_token = np.full(w.shape[:2], np.nan)
    return {
        "entropy": entropy.astype(np.float32),
        "mean_distance": mean_distance.astype(np.float32),
        "prev_token": prev_token.astype(np.float32),
        "first_token": first_token.astype(np.float32),
    }


def repeated_random_tokens(vocab_size: int, seq_len: int, batch: int, seed: int, low: int = 0) -> torch.Tensor:
    """(batch, 2 * seq_len) long: each row is a random sequence followed by an exact copy of it.

    Tokens are drawn from [low, vocab_size). When that range holds at least seq_len tokens, a
    sequence never repeats a token, so "the earlier copy of the current token" is unambiguous.
    """
    n = vocab_size - low
    if n < 1 or seq_len < 1 or batch < 1:
        raise ValueError(
            f"Need a non-empty token range and seq_len, batch >= 1 (got [{low}, {vocab_size}), {seq_len}, {batch})."
        )
    g = torch.Generator().manual_seed(seed)
    if n >= seq_len:
        first = torch.stack([torch.randperm(n, generator=g)[:seq_len] for _ in range(batch)]) + low
    else:
        first = torch.randint(low, vocab_size, (batch, seq_len), generator=g)
    return torch.cat([first, first], dim=1)


def induction_from_weights(weights: Any, seq_len: int) -> np.ndarray:
    """Induction score from the attention over repeated sequences of length seq_len.

    ``weights``: (n_layer, n_head, 2S, 2S), or (B, n_layer, n_head, 2S, 2S) averaged over B.
    For each query i in the second copy (S <= i < 2S) read the weight on key i - S + 1, the token
    right after the earlier occurrence of the current token, which is what an induction head
    copies from; the score is the mean over those queries (and the batch): (n_layer, n_head).
    """
    w = weights.detach().float().cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
    if w.ndim == 4:
        w = w[None]
    T = w.shape[-1]
    if T < 2 * seq_len:
        raise ValueError(f"Weights cover {T} positions; repeated sequences of {seq_len} need {2 * seq_len}.")
    q = np.arange(seq_len, 2 * seq_len)
    return w[..., q, q - seq_len + 1].mean(axis=(0, -1)).astype(np.float32)


def induction_scores(
    model: torch.nn.Module,
    seq_len: int = 32,
    batch: int = 8,
    seed: int = 0,
    vocab_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """(n_layer, n_head) mean attention from the second copy of a repeated random sequence to the
    token after the earlier copy of the current token (see ``induction_from_weights``).

    seq_len is reduced to block_size // 2 when two copies would not fit in the context.
    ``vocab_range`` = (low, high) restricts the random tokens, e.g. to skip special tokens.
    """
    cfg = model.config
    if cfg.block_size < 2:
        raise ValueError("Induction scores need a context of at least 2 tokens.")
    seq_len = max(1, min(seq_len, cfg.block_size // 2))
    low, high = vocab_range if vocab_range is not None else (0, cfg.vocab_size)
    if not 0 <= low < high <= cfg.vocab_size:
        raise ValueError(f"vocab_range must satisfy 0 <= low < high <= {cfg.vocab_size}, got {vocab_range}.")
    idx = repeated_random_tokens(high, seq_len, batch, seed, low=low).to(_model_device(model))
    return induction_from_weights(_attention(model, idx), seq_len)
