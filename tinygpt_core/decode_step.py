"""One decoded token without nn.Module calls: the fast path of the KV-cache decoding loop.

Decoding one token is a forward pass over one position per sequence. At the lab's sizes that is
about a hundred operator calls of a few microseconds each, so its cost is dispatch, not arithmetic.
``DecodeStep`` computes what ``GPT.forward(idx[:, -1:], past_kv=cache)`` computes, for every
ablation, on the same cache, with four differences that change only the speed:

- each product takes the layout that is fastest for its rows. One decoded token is one row, a
  vector: ``torch.addmv`` on the Linear layer's own (out, in) weight (77 against 105 µs for the 16
  products of a ``baby`` step with ``addmm``; 2 threads, measured). Several rows (a prompt, beams)
  run ``addmm`` on a copy transposed to (in, out): 194 against 286 µs for 16 rows. The copies cost
  about 1 ms at ``baby`` size (46 ms at shakespeare-char's), so ``for_model`` keeps them on the model
  for the next generation for as long as its weights have not changed (``_weights_key``);
- one token's q, k, v product writes its result straight into the cache (``LayerKV.row``: the cache
  keeps each position's q, k and v side by side, in c_attn's order), instead of splitting it and
  copying k and v there (a decoded token 0.40 against 0.44 ms at ``baby`` size, measured side by side);
- no module calls, hook points or dropout: ``GPT.forward`` makes about 70 module calls per token
  at ``baby`` size. The weights and switches are read once into plain tuples and flags, so a layer
  costs its operators and little Python around them (at ``baby`` size this made a step about a fifth
  faster than the same operators behind small callable objects);
- the activation runs PyTorch's native exact-GELU kernel instead of oneDNN's (``gelu_rows``).

The model's own code still runs where it is cheap to call: the position embedding, the cache
write of several rows (``LayerKV.append``) and the attention kernel with its window
(``CausalSelfAttention.fused_attention``).
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
from .model import GPT, KVCache, LayerKV

# A LayerNorm as the arguments of F.layer_norm after x: (shape, weight, bias, eps); None is the
# no-layernorm ablation's identity. Plain tuples: attribute lookups and calls per layer add up here.
_Norm = tuple | None


def _norm(module: nn.Module) -> _Norm:
    if isinstance(module, nn.LayerNorm):
        return (module.normalized_shape, module.weight, module.bias, module.eps)
    return None  # nn.Identity


def _apply_norm(x: torch.Tensor, norm: _Norm) -> torch.Tensor:
    return x if norm is None else torch.layer_norm(x, *norm)  # F.layer_norm's Python wrapper: 0.4 µs more a call


# A Linear layer as (weight (out, in), the same transposed to (in, out) and contiguous, bias or None).
_Affine = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
# Rows of a Linear layer for one-row products only: (weight (out, in), bias or None).
_Vector = tuple[torch.Tensor, torch.Tensor | None]


def _linear(module: nn.Linear) -> _Affine:
    w = module.weight.detach()
    return w, w.t().contiguous(), None if module.bias is None else module.bias.detach()


def _affine(x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (in,) -> (out,), or rows x (N, in) -> (N, out).

    One row is a matrix-vector product on the Linear layer's own (out, in) layout: over the 16 products
    of a ``baby`` step 77 µs against 105 µs for ``addmm`` on the (in, out) copy (2 threads, measured).
    Several rows (a prompt, beams) are faster on the copy: 194 against 286 µs for 16 rows."""
    if x.dim() == 1:
        return torch.mv(weight, x) if bias is None else torch.addmv(bias, weight, x)
    return x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)


def gelu_rows(a: torch.Tensor) -> torch.Tensor:
    """Exact GELU of a row or a few rows (any leading shape), through PyTorch's own vectorised kernel,
    not oneDNN's.

    For a contiguous float32 input ``F.gelu`` calls oneDNN, whose per-call setup costs 10-15 µs
    whatever the size (measured: 12 µs for 512 values against 2.3 µs for the native kernel, one
    thread); the native kernel serves non-contiguous inputs. So each row is viewed as its even and
    odd halves interleaved (the same memory, no copy); the elementwise result keeps its input's
    layout, so viewing it back gives the rows in order. tests/test_decode_step.py holds the values
    to ``F.gelu``'s (float rounding apart), which would catch a kernel that laid its output out
    differently."""
    n = a.size(-1)
    if n % 2 or not a.is_contiguous():  # an odd width cannot be paired; a strided input already goes native
        return F.gelu(a)
    return F.gelu(a.as_strided((a.numel() // n, 2, n // 2), (n, 1, 2))).as_strided(a.shape, a.stride())


# Every optimizer step in this process, counted by a global post-step hook. Fused optimizers (fused
# AdamW) write the weights without bumping their version counters, so versions alone cannot tell a
# kept copy of the weights that it has gone stale; after an optimizer step anywhere, every model's
# kept decode step is rebuilt at its next generation.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _weights_key(params: list[torch.Tensor]) -> tuple:
    """What changes, for a model's ``params``, whenever the weights do: an optimizer step anywhere, any
    other in-place write (it bumps the tensor's version counter: ``copy_``, ``load_state_dict``,
    ``normal_``) and new storage (``model.to``, a reassigned parameter). Writes through ``.data``, which
    bypass version counting, are the one way past it; nothing in the lab writes weights that way."""
    return _optimizer_steps[0], tuple((id(p), p._version, p.data_ptr()) for p in params)


def _has_forward_hooks(modules: list[nn.Module]) -> bool:
    """Whether PyTorch would run a forward (pre-)hook inside a model of ``modules``: theirs or global ones."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


@dataclass(frozen=True, slots=True)
class _Layer:
    """One block's weights and switches, read once from the model."""

    attn: nn.Module  # the block's CausalSelfAttention (its fused_attention applies a window)
    windowed: bool  # an attention window: the mask needs fused_attention; otherwise plain SDPA
    swap_qk: bool
    ln_1: _Norm
    qkv: _Affine
    q_norm: torch.Tensor | None  # QK-norm gains (hs,), None without it
    k_norm: torch.Tensor | None
    qk_eps: float | None
    qkv_row: _Vector  # one row's product of q, k and v, which writes them into the cache
    proj: _Affine
    ln_2: _Norm
    fc: _Affine | None  # None: the no-mlp ablation
    out: _Affine | None


def _qkv_rows(c_attn: nn.Linear, swap_qk: bool) -> _Vector:
    """c_attn as one row's product of q, k and v in that order (the cache row's, ``LayerKV.row``): the
    layer's own weights, or under the swap-qk ablation a copy with its key and query rows exchanged."""
    w, b = c_attn.weight.detach(), None if c_attn.bias is None else c_attn.bias.detach()
    if not swap_qk:
        return w, b
    C = w.size(1)
    swap = torch.cat([torch.arange(C, 2 * C), torch.arange(C), torch.arange(2 * C, 3 * C)])
    return w[swap], None if b is None else b[swap]


def _layer(block: nn.Module) -> _Layer:
    attn = block.attn
    qn, kn = attn.q_norm, attn.k_norm
    mlp = block.mlp
    return _Layer(
        attn=attn,
        windowed=attn.window is not None,
        swap_qk=attn.swap_qk,
        ln_1=_norm(block.ln_1),
        qkv=_linear(attn.c_attn),
        q_norm=None if qn is None else qn.weight,
        k_norm=None if kn is None else kn.weight,
        qk_eps=None if qn is None else qn.eps,
        qkv_row=_qkv_rows(attn.c_attn, attn.swap_qk),
        proj=_linear(attn.c_proj),
        ln_2=None if mlp is None else _norm(block.ln_2),
        fc=None if mlp is None else _linear(mlp.c_fc),
        out=None if mlp is None else _linear(mlp.c_proj),
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
        self.head = _linear(model.lm_head)  # (V, C) and (C, V): the embedding's when the weights are tied

    @classmethod
    def for_model(cls, model: nn.Module) -> DecodeStep | None:
        """The step for ``model``, or None when it cannot serve it (not a GPT, weights not float32, or
        forward hooks registered on its modules with PyTorch's ``register_forward_hook`` and the like).

        The step built for the model's current weights is reused (kept on the model, so it lives as long
        as the model and is shared by every thread decoding with it); any change to them builds a new one."""
        if not isinstance(model, GPT):
            return None
        # One walk over the modules serves every check (each of model.parameters() and model.modules()
        # walks the tree again: 186 µs for three walks at baby size, asked once per generation).
        modules = list(model.modules())
        params = [p for m in modules for p in m._parameters.values() if p is not None]
        if any(p.dtype != torch.float32 for p in params):
            return None
        if _has_forward_hooks(modules):  # PyTorch's own module hooks run only where modules are called
            return None
        key = _weights_key(params)
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
        pre, residual, C = self.pre_norm, self.residual, self.n_head * self.head_size
        one = B * T == 1  # the decoding loop's step: one row is a vector, every product a matrix-vector one
        rows = (C,) if one else (B * T, C)
        attend = self._attend_one if one else self._attend_rows
        pos = self.model.position_embedding(start, T, tokens.device)
        x = (F.embedding(tokens, self.wte) + pos).view(rows)
        for layer, past in zip(self.layers, cache.layers):
            y = attend(layer, past, _apply_norm(x, layer.ln_1) if pre else x, B, T, start)  # rows, heads side by side
            a = _affine(y, *layer.proj)
            x = (x + a if residual else a) if pre else _apply_norm(x + a if residual else a, layer.ln_1)
            if layer.fc is not None:
                m = _affine(_apply_norm(x, layer.ln_2) if pre else x, *layer.fc)
                m = _affine(F.relu(m) if self.relu else gelu_rows(m), *layer.out)
                x = (x + m if residual else m) if pre else _apply_norm(x + m if residual else m, layer.ln_2)
        cache.length = start + T
        if T > 1:
            x = x.view(B, T, C)[:, -1]  # only the last position's logits are asked for
        return _affine(_apply_norm(x, self.ln_f), *self.head).view(B, -1)  # (B, V)

    def _attend_one(self, layer: _Layer, past: LayerKV, h: torch.Tensor, B: int, T: int, start: int) -> torch.Tensor:
        """Attention of one token of one sequence, h (C,) -> (C,). Its q, k, v product writes straight into
        the cache's row for this position (``LayerKV.row``): no view, split or copy moves k and v there."""
        nh, hs = self.n_head, self.head_size
        C = nh * hs
        row = past.row(start, nh, hs, h)  # (3C,)
        w, b = layer.qkv_row
        torch.mv(w, h, out=row) if b is None else torch.addmv(b, w, h, out=row)
        q = row[:C].view(1, nh, 1, hs)
        if layer.q_norm is not None:  # normalised before the cache, as the model does
            q = F.rms_norm(q, (hs,), layer.q_norm, layer.qk_eps)
            k_row = row[C : 2 * C].view(nh, hs)
            k_row.copy_(F.rms_norm(k_row, (hs,), layer.k_norm, layer.qk_eps))
        k, v = past.k.narrow(2, 0, start + 1), past.v.narrow(2, 0, start + 1)  # (1, nh, start + 1, hs)
        if layer.windowed:
            return layer.attn.fused_attention(q, k, v, 0.0).view(C)
        return F.scaled_dot_product_attention(q, k, v).view(C)  # one query sees the whole cache: no mask

    def _attend_rows(self, layer: _Layer, past: LayerKV, h: torch.Tensor, B: int, T: int, start: int) -> torch.Tensor:
        """Attention of T tokens of B sequences (a prompt, beams), h (B·T, C) -> (B·T, C)."""
        nh, hs = self.n_head, self.head_size
        qkv = _affine(h, *layer.qkv)
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
            return F.scaled_dot_product_attention(q, k, v).view(B * T, nh * hs)
        # the model's own causal or windowed attention
        return layer.attn.fused_attention(q, k, v, 0.0).transpose(1, 2).reshape(B * T, nh * hs)
