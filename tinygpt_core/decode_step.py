"""One decoded token without nn.Module calls: the fast path of the KV-cache decoding loop.

Decoding one token is a forward pass over one position per sequence. At the lab's sizes that is
about a hundred operator calls of a few microseconds each, so its cost is dispatch, not arithmetic.
``DecodeStep`` computes what ``GPT.forward(idx[:, -1:], past_kv=cache)`` computes, for every
ablation, on the same cache, with two differences that change only the speed:

- every weight matrix is kept transposed, (in, out) and contiguous. On CPU a one-row product
  against PyTorch's (out, in) Linear layout takes a slower path: 8.1 against 5.1 µs at 128 → 384,
  44 against 34 µs at 384 → 1152 (one thread, measured). The copies are made for each generation
  (one ``DecodeStep`` per call of the sampling loop, at its first cached token) and never kept:
  fused AdamW writes the weights without bumping their version counters, so a kept copy could not
  tell it had gone stale;
- no module calls, hook points or dropout: ``GPT.forward`` makes about 70 module calls per token
  at ``baby`` size.

The model's own code still runs where it is cheap to call: the position embedding, the cache
write (``LayerKV.append``) and the attention kernel with its window (``CausalSelfAttention.fused_attention``).
The step serves only where it is the same computation (``usable``): a ``GPT`` in eval mode with
float32 weights, no autocast, and no ``run_with_hooks`` active in this thread (knockout decodes
through its hooks). Everywhere else the sampling loop calls the model itself.
tests/test_decode_step.py checks that both give the same logits for every registered ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hooks import hooks_active
from .model import GPT, KVCache


@dataclass(frozen=True)
class _Norm:
    """A LayerNorm's parameters (``weight`` None: the no-layernorm ablation's identity)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return x
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class _Linear:
    """A Linear layer as ``x @ weight_t + bias`` with the weight stored (in, out)."""

    weight_t: torch.Tensor  # (in, out), contiguous
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, in) -> (B, out)
        return x @ self.weight_t if self.bias is None else torch.addmm(self.bias, x, self.weight_t)


@dataclass(frozen=True)
class _Layer:
    """One block's weights and switches, read once from the model."""

    attn: nn.Module  # the block's CausalSelfAttention: its fused_attention applies the window
    ln_1: _Norm
    qkv: _Linear
    q_norm: torch.Tensor | None  # QK-norm gains (hs,), None without it
    k_norm: torch.Tensor | None
    qk_eps: float | None
    proj: _Linear
    ln_2: _Norm | None  # None: the no-mlp ablation
    fc: _Linear | None
    out: _Linear | None


def _norm(module: nn.Module) -> _Norm:
    if isinstance(module, nn.LayerNorm):
        return _Norm(module.weight, module.bias, module.eps)
    return _Norm(None, None, 0.0)  # nn.Identity


def _linear(module: nn.Linear) -> _Linear:
    return _Linear(module.weight.detach().t().contiguous(), None if module.bias is None else module.bias.detach())


def _layer(block: nn.Module) -> _Layer:
    attn = block.attn
    qn, kn = attn.q_norm, attn.k_norm
    return _Layer(
        attn=attn,
        ln_1=_norm(block.ln_1),
        qkv=_linear(attn.c_attn),
        q_norm=None if qn is None else qn.weight,
        k_norm=None if kn is None else kn.weight,
        qk_eps=None if qn is None else qn.eps,
        proj=_linear(attn.c_proj),
        ln_2=None if block.mlp is None else _norm(block.ln_2),
        fc=None if block.mlp is None else _linear(block.mlp.c_fc),
        out=None if block.mlp is None else _linear(block.mlp.c_proj),
    )


class DecodeStep:
    """``step(tokens, cache)``: logits (B, V) in float32 for one new token per sequence, through the cache.

    ``tokens`` is (B,): each sequence's newest token; ``cache`` holds their earlier tokens and is
    extended in place, exactly as ``model(tokens[:, None], past_kv=cache)`` would extend it.
    Build it with ``DecodeStep.for_model`` for one generation (the weights must not change while
    it lives) and ask ``usable()`` before each call.
    """

    def __init__(self, model: GPT):
        cfg = model.config
        self.model = model
        self.pre_norm, self.residual = cfg.norm_position == "pre", cfg.use_residual
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        self.relu = cfg.activation == "relu"
        self.wte = model.wte.weight.detach()
        self.layers = [_layer(b) for b in model.blocks]
        self.ln_f = _norm(model.ln_f)
        self.head = _linear(model.lm_head)  # (C, V): the embedding, transposed, when the weights are tied

    @classmethod
    def for_model(cls, model: nn.Module) -> DecodeStep | None:
        """A step for ``model``, or None when it cannot serve it (not a GPT, or weights not float32)."""
        if not isinstance(model, GPT) or any(p.dtype != torch.float32 for p in model.parameters()):
            return None
        return cls(model)

    def usable(self) -> bool:
        """Whether this call computes what the model would: eval mode, no autocast, no active hooks."""
        if self.model.training or torch.is_autocast_enabled(self.wte.device.type):
            return False
        return not hooks_active()

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, start = tokens.size(0), cache.length
        nh, hs = self.n_head, self.head_size
        x = F.embedding(tokens, self.wte) + self.model.position_embedding(start, 1, tokens.device)  # (B, C)
        for i, layer in enumerate(self.layers):
            h = layer.ln_1(x) if self.pre_norm else x
            q, k, v = layer.qkv(h).view(B, 3, nh, 1, hs).unbind(1)  # each (B, nh, 1, hs)
            if layer.attn.swap_qk:
                q, k = k, q
            if layer.q_norm is not None:
                q = F.rms_norm(q, (hs,), layer.q_norm, layer.qk_eps)
                k = F.rms_norm(k, (hs,), layer.k_norm, layer.qk_eps)
            k, v = cache[i].append(k, v)  # (B, nh, start + 1, hs)
            y = layer.attn.fused_attention(q, k, v, 0.0).view(B, nh * hs)  # one position: heads side by side
            x = self._residual(x, layer.proj(y), layer.ln_1)
            if layer.fc is not None:
                m = layer.ln_2(x) if self.pre_norm else x
                a = layer.fc(m)
                m = layer.out(F.relu(a) if self.relu else F.gelu(a))
                x = self._residual(x, m, layer.ln_2)
        cache.length = start + 1
        return self.head(self.ln_f(x))  # (B, V)

    def _residual(self, x: torch.Tensor, branch: torch.Tensor, post_norm: _Norm) -> torch.Tensor:
        """What Block.forward makes of x and one branch's output: pre-norm x + f, post-norm norm(x + f)."""
        y = branch + x if self.residual else branch
        return y if self.pre_norm else post_norm(y)
