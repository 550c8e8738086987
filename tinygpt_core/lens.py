"""The logit lens: what the model would predict if it stopped after each layer.

The residual stream after the embeddings and after every block (hook points ``hook_embed`` and
``blocks.{i}.hook_resid_post``) is decoded the way the last one is: through the final norm ``ln_f``
and the unembedding ``lm_head``. The last layer's decoding is therefore exactly the model's logits;
earlier layers show how the prediction forms with depth (nostalgebraist, 2020).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import TokenizerError
from .hooks import run_with_hooks


@dataclass
class LogitLens:
    tokens: list[str]  # a readable label per position
    ids: list[int]
    layers: list[str]  # "embeddings", "layer 0", ... (rows of the arrays below)
    top_ids: np.ndarray  # (n_rows, T) the most likely next token at each layer and position
    top_probs: np.ndarray  # (n_rows, T) its probability
    next_probs: np.ndarray  # (n_rows, T) probability of the actual next token ids[t + 1] (NaN at the last position)
    cropped: bool = False  # the text was longer than the context: only its last block_size tokens are read


def residual_names(model: torch.nn.Module) -> list[str]:
    """The hook points the lens reads, in depth order: the embeddings, then each block's output."""
    return ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(len(model.blocks))]


@torch.inference_mode()
def lens_logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """(n_layer + 1, B, T, vocab) float32: each residual stream of ``idx`` decoded through ln_f and lm_head."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def fn(x: torch.Tensor) -> None:
            captured[name] = x

        return fn

    names = residual_names(model)
    was_training = model.training
    model.eval()
    try:
        with run_with_hooks(model, {name: keep(name) for name in names}):
            model(idx)
        return torch.stack([model.lm_head(model.ln_f(captured[name])).float() for name in names])
    finally:
        model.train(was_training)


def logit_lens(model: torch.nn.Module, tokenizer: Any, text: str) -> LogitLens:
    """Top token and probability of the actual next token, per layer and position, for ``text``."""
    ids = tokenizer.encode(text)
    if not ids:
        raise TokenizerError("The text is empty: type a prompt to see how each layer's prediction forms.")
    block = model.config.block_size
    cropped = len(ids) > block
    ids = ids[-block:]
    device = next(model.parameters()).device
    logits = lens_logits(model, torch.tensor([ids], dtype=torch.long, device=device))[:, 0]  # (rows, T, V)
    probs = F.softmax(logits, dim=-1)
    top_p, top_i = probs.max(dim=-1)  # (rows, T)
    next_p = torch.full(top_p.shape, float("nan"))
    if len(ids) > 1:
        nxt = torch.tensor(ids[1:], device=probs.device)
        next_p[:, :-1] = probs[:, :-1].gather(-1, nxt[None, :, None].expand(probs.size(0), -1, 1))[..., 0].cpu()
    layers = ["embeddings"] + [f"layer {i}" for i in range(len(model.blocks))]
    return LogitLens(
        tokens=tokenizer.token_strings(ids),
        ids=ids,
        layers=layers,
        top_ids=top_i.cpu().numpy(),
        top_probs=top_p.cpu().numpy().astype(np.float64),
        next_probs=next_p.numpy().astype(np.float64),
        cropped=cropped,
    )


__all__ = ["LogitLens", "lens_logits", "logit_lens", "residual_names"]
