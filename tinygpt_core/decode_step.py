"""One decoded token without nn.Module calls: the fast path of the KV-cache decoding loop.

Decoding one token is a forward pass over one position per sequence. At the lab's sizes that is
about a hundred operator calls of a few microseconds each, so its cost is dispatch, not arithmetic.
``DecodeStep`` computes what ``GPT.forward(idx[:, -1:], past_kv=cache)`` computes, for every
ablation, on the same cache, with three differences that change only the speed:

- every weight matrix is kept transposed, (in, out) and contiguous. On CPU a one-row product
  against PyTorch's (out, in) Linear layout takes a slower path: 8.1 against 5.1 µs at 128 → 384,
  44 against 34 µs at 384 → 1152 (one thread, measured). The copies cost about 1 ms at ``baby``
  size (46 ms at shakespeare-char's), as much as 20-50 decoded tokens, so ``for_model`` keeps them
  on the model for the next generation for as long as its weights have not changed (``_weights_key``);
- no module calls, hook points or dropout: ``GPT.forward`` makes about 70 module calls per token
  at ``baby`` size. The weights and switches are read once into plain tuples and flags, so a layer
  costs its operators and little Python around them (at ``baby`` size this made a step about a fifth
  faster than the same operators behind small callable objects);
- the activation runs PyTorch's native exact-GELU kernel instead of oneDNN's (``gelu_rows``).

The model's own code still runs where it is cheap to call: the position embedding, the cache
write (``LayerKV.append``) and the attention kernel with its window (``CausalSelfAttention.fused_attention``).
The step serves only where it is the same computation (``for_model`` and ``usable``): a ``GPT`` in
eval mode with float32 weights, no autocast, no ``run_with_hooks`` active in this thread (knockout
decodes through its hooks) and no PyTorch forward hooks on its modules. Everywhere else the
sampling loop calls the model itself. tests/test_decode_step.py checks that both give the same
logits for every registered ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as torch_module
from torch.optim.optimizer import register_optimizer_step_post_hook

from .hooks import hooks_active
from .model import GPT, KVCache

# A LayerNorm as the arguments of F.layer_norm after x: (shape, weight, bias, eps); None is the
# no-layernorm ablation's identity. Plain tuples: attribute lookups and calls per layer add up here.
_Norm = tuple | None


def _norm(module: nn.Module) -> _Norm:
    if isinstance(module, nn.LayerNorm):
        return (module.normalized_shape, module.weight, module.bias, module.eps)
    return None  # nn.Identity


def _apply_norm(x: torch.Tensor, norm: _Norm) -> torch.Tensor:
    return x if norm is None else F.layer_norm(x, *norm)


def _transposed(module: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (in, out) contiguous, bias or None) of a Linear layer."""
    return module.weight.detach().t().contiguous(), None if module.bias is None else module.bias.detach()


def _affine(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)  # (B, in) -> (B, out)


def gelu_rows(a: torch.Tensor) -> torch.Tensor:
    """Exact GELU of a few rows, through PyTorch's own vectorised kernel rather than oneDNN's.

    For a contiguous float32 input ``F.gelu`` calls oneDNN, whose per-call setup costs 10-15 µs
    whatever the size (measured: 12 µs for 512 values against 2.3 µs for the native kernel, one
    thread); the native kernel serves non-contiguous inputs. So each row is viewed as its even and
    odd halves interleaved (the same memory, no copy); the elementwise result keeps its input's
    layout, so viewing it back gives the rows in order. tests/test_decode_step.py holds the values
    to ``F.gelu``'s (float rounding apart), which would catch a kernel that laid its output out
    differently."""
    B, n = a.shape
    if n % 2 or not a.is_contiguous():  # an odd width cannot be paired; a strided input already goes native
        return F.gelu(a)
    return F.gelu(a.as_strided((B, 2, n // 2), (n, 1, 2))).as_strided((B, n), (n, 1))


# Every optimizer step in this process, counted by a global post-step hook. Fused optimizers (fused
# AdamW) write the weights without bumping their version counters, so versions alone cannot tell a
# kept copy of the weights that it has gone stale; after an optimizer step anywhere, every model's
# kept decode step is rebuilt at its next generation.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _weights_key(model: nn.Module) -> tuple:
    """What changes whenever the weights do: an optimizer step anywhere, any other in-place write (it
    bumps the tensor's version counter: ``copy_``, ``load_state_dict``, ``normal_``) and new storage
    (``model.to``, a reassigned parameter). Writes through ``.data``, which bypass version counting,
    are the one way past it; nothing in the lab writes weights that way."""
    return _optimizer_steps[0], tuple((id(p), p._version, p.data_ptr()) for p in model.parameters())


def _has_forward_hooks(model: nn.Module) -> bool:
    """Whether PyTorch would run a forward (pre-)hook inside ``model``: its modules' or global ones."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@dataclass(frozen=True, slots=True)
class _Layer:
    """One block's weights and switches, read once from the model."""

    attn: nn.Module  # the block's CausalSelfAttention (its fused_attention applies a window)
    windowed: bool  # an attention window: the mask needs fused_attention; otherwise plain SDPA
    swap_qk: bool
    ln_1: _Norm
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    q_norm: torch.Tensor | None  # QK-norm gains (hs,), None without it
    k_norm: torch.Tensor | None
    qk_eps: float | None
    proj: tuple[torch.Tensor, torch.Tensor | None]
    ln_2: _Norm
    fc: tuple[torch.Tensor, torch.Tensor | None] | None  # None: the no-mlp ablation
    out: tuple[torch.Tensor, torch.Tensor | None] | None


def _layer(block: nn.Module) -> _Layer:
    attn = block.attn
    qn, kn = attn.q_norm, attn.k_norm
    mlp = block.mlp
    return _Layer(
        attn=attn,
        windowed=attn.window is not None,
        swap_qk=attn.swap_qk,
        ln_1=_norm(block.ln_1),
        qkv=_transposed(attn.c_attn),
        q_norm=None if qn is None else qn.weight,
        k_norm=None if kn is None else kn.weight,
        qk_eps=None if qn is None else qn.eps,
        proj=_transposed(attn.c_proj),
        ln_2=None if mlp is None else _norm(block.ln_2),
        fc=None if mlp is None else _transposed(mlp.c_fc),
        out=None if mlp is None else _transposed(mlp.c_proj),
    )


class DecodeStep:
    """``step(tokens, cache)``: float32 logits (B, V) of the token after ``tokens``, through the cache.

    ``tokens`` is (B, T): each sequence's next T tokens, usually one (a decoded token), or a whole
    prompt into an empty cache; ``cache`` holds their earlier tokens and is extended in place,
    exactly as ``model(tokens, past_kv=cache)`` would extend it, whose last position's logits these are.
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
        self.head = _transposed(model.lm_head)  # (C, V): the embedding, transposed, when the weights are tied

    @classmethod
    def for_model(cls, model: nn.Module) -> DecodeStep | None:
        """The step for ``model``, or None when it cannot serve it (not a GPT, weights not float32, or
        forward hooks registered on its modules with PyTorch's ``register_forward_hook`` and the like).

        The step built for the model's current weights is reused (kept on the model, so it lives as long
        as the model and is shared by every thread decoding with it); any change to them builds a new one."""
        if not isinstance(model, GPT) or any(p.dtype != torch.float32 for p in model.parameters()):
            return None
        if _has_forward_hooks(model):  # PyTorch's own module hooks run only where modules are called
            return None
        key = _weights_key(model)
        kept = model.__dict__.get("_decode_step")
        if kept is not None and kept[0] == key:
            return kept[1]
        step = cls(model)
        model.__dict__["_decode_step"] = (key, step)  # plain attribute: not a module, parameter or buffer
        return step

    def usable(self) -> bool:
        """Whether this call computes what the model would: eval mode, no autocast, no active hooks."""
        if self.model.training or torch.is_autocast_enabled(self.wte.device.type):
            return False
        return not hooks_active()

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, T = tokens.shape
        start = cache.length
        nh, hs, pre, residual = self.n_head, self.head_size, self.pre_norm, self.residual
        pos = self.model.position_embedding(start, T, tokens.device)
        x = (F.embedding(tokens, self.wte) + pos).view(B * T, nh * hs)  # one row per position
        for layer, past in zip(self.layers, cache.layers):
            qkv = _affine(_apply_norm(x, layer.ln_1) if pre else x, *layer.qkv)
            if T == 1:  # (B, 3C) is already (B, 3, nh, 1, hs): no permute
                q, k, v = qkv.view(B, 3, nh, 1, hs).unbind(1)
            else:
                q, k, v = qkv.view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
            if layer.swap_qk:
                q, k = k, q
            if layer.q_norm is not None:
                q = F.rms_norm(q, (hs,), layer.q_norm, layer.qk_eps)
                k = F.rms_norm(k, (hs,), layer.k_norm, layer.qk_eps)
            k, v = past.append(k, v)  # (B, nh, start + T, hs)
            if T == 1 and not layer.windowed:  # one query sees the whole cache: no mask, no checks
                y = F.scaled_dot_product_attention(q, k, v).view(B, nh * hs)
            else:  # the model's own causal or windowed attention
                y = layer.attn.fused_attention(q, k, v, 0.0).transpose(1, 2).reshape(B * T, nh * hs)
            a = _affine(y, *layer.proj)
            x = (x + a if residual else a) if pre else _apply_norm(x + a if residual else a, layer.ln_1)
            if layer.fc is not None:
                m = _affine(_apply_norm(x, layer.ln_2) if pre else x, *layer.fc)
                m = _affine(F.relu(m) if self.relu else gelu_rows(m), *layer.out)
                x = (x + m if residual else m) if pre else _apply_norm(x + m if residual else m, layer.ln_2)
        cache.length = start + T
        if T > 1:
            x = x.view(B, T, nh * hs)[:, -1]  # only the last position's logits are asked for
        return _affine(_apply_norm(x, self.ln_f), *self.head)  # (B, V)
