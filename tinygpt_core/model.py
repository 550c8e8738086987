"""The GPT: a decoder-only transformer whose every ablation is a ``ModelConfig`` field.

Two attention paths give identical outputs: a fast one through
``torch.nn.functional.scaled_dot_product_attention`` for training and generation, and an explicit
one (softmax of q·kᵀ) used when the caller asks for the attention weights. Inspection taps into
the model through ``return_attention=True`` and the named hook points (``hooks.HookPoint``: the
embeddings, each head's output, each block's output), which the logit lens, head knockout and the
health probe use; nothing else needs special cases. One reader of the weights runs this forward's maths
without the modules: ``decode_step.DecodeStep``, the sampling loop's path for one cached token, which
steps aside whenever hooks are active (tests/test_decode_step.py holds it to this file, ablation by ablation).

Shapes: B batch, T time (tokens), C = n_embd, nh = n_head, hs = head size = C / nh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import ConfigError
from .hooks import HookPoint, name_hook_points

QK_NORM_EPS = 1e-6


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor | None = None  # mean cross-entropy over all positions, None without targets
    attentions: list[torch.Tensor] | None = None  # one (B, nh, T, T_total) tensor per layer, when asked
    past_kv: KVCache | None = None  # the cache (written in place), when use_cache=True


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed position table of 'Attention Is All You Need': sin on even, cos on odd channels."""
    pos = torch.arange(n_pos, dtype=torch.float32).unsqueeze(1)  # (n_pos, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim/2,)
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


def attention_mask(t_query: int, t_key: int, window: int | None, device=None) -> torch.Tensor:
    """Boolean (t_query, t_key) mask, True where attention is allowed.

    Queries are the last ``t_query`` of ``t_key`` positions (the rest is cached past). A query at
    absolute position i sees keys j with j <= i, and with a window also i - j < window.
    """
    i = torch.arange(t_key - t_query, t_key, device=device).unsqueeze(1)  # (t_query, 1) absolute positions
    j = torch.arange(t_key, device=device).unsqueeze(0)  # (1, t_key)
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    return allowed


class KVCache:
    """Every layer's keys and values for incremental decoding, preallocated for the whole context.

    Pass it as ``past_kv`` and the model copies the new tokens' keys and values into the buffers
    in place: a decoded token costs a copy of its own entries, not a concatenation of everything
    cached so far. ``length`` is how many tokens it holds (the next token's position);
    ``cache[i]`` is layer i's ``LayerKV``, which unpacks as (k, v), each (B, nh, length, hs).
    ``reorder`` follows beam search's choice of parents, ``reset`` empties it and keeps the buffers.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len, self.length = max_len, 0  # max_len: the model's block_size
        self.layers = [LayerKV(self) for _ in range(n_layer)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    def reset(self) -> None:
        self.length = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Row b now continues the old row rows[b] (beam search); rows may change the batch size."""
        for layer in self.layers:
            if layer.qkv is not None:
                layer.adopt(layer.qkv.index_select(0, rows))


class LayerKV:
    """One layer's part of a ``KVCache``: one buffer (B, max_len, 3, nh, hs) allocated by the first write.

    A position's slots hold a query, key and value side by side, in c_attn's order, so the product
    that computes one decoded token's q, k and v can write them straight into the cache: one
    contiguous row of 3·C numbers (``row``; ``decode_step`` does this), with no split, copy or slicing
    per token. The query's slot is that product's scratch space; attention reads only ``k`` and
    ``v``, (B, nh, max_len, hs) views of the buffer."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.qkv: torch.Tensor | None = None  # (B, max_len, 3, nh, hs)
        self.k: torch.Tensor | None = None  # views of it, each (B, nh, max_len, hs)
        self.v: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None  # batch 1: (max_len, 3C), for row()

    def adopt(self, qkv: torch.Tensor) -> None:
        """Use ``qkv`` (B, max_len, 3, nh, hs) as the buffer (a new one, or the old one's rows reordered)."""
        self.qkv = qkv
        slots = qkv.permute(2, 0, 3, 1, 4)  # (3, B, nh, max_len, hs); select, not unbind: its views may be written
        self.k, self.v = slots[1], slots[2]
        self.rows = qkv.view(qkv.size(1), -1) if qkv.size(0) == 1 else None

    def _ensure(self, B: int, nh: int, hs: int, like: torch.Tensor) -> None:
        buf = self.qkv
        fits = buf is not None and buf.shape[0] == B and buf.shape[3] == nh
        if not fits or buf.dtype != like.dtype or buf.device != like.device:
            self.adopt(like.new_empty(B, self.cache.max_len, 3, nh, hs))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at positions length..length+T; return the keys and values up to there.

        The cache's length moves on once every layer has written (``GPT.forward``)."""
        start, T = self.cache.length, k.size(2)
        B, nh, _, hs = k.shape
        self._ensure(B, nh, hs, k)
        self.k.narrow(2, start, T).copy_(k)
        self.v.narrow(2, start, T).copy_(v)
        return self.k.narrow(2, 0, start + T), self.v.narrow(2, 0, start + T)

    def row(self, pos: int, nh: int, hs: int, like: torch.Tensor) -> torch.Tensor:
        """Position ``pos``'s (3·nh·hs,) row of q, k and v for one sequence (batch 1), contiguous, to write into.

        ``like`` is the tensor the row's product reads: a buffer of another dtype is replaced."""
        rows = self.rows
        if rows is None or rows.dtype != like.dtype:
            self._ensure(1, nh, hs, like)
            rows = self.rows
        return rows[pos]

    def __iter__(self):
        if self.qkv is None:
            raise ConfigError("This layer's KV cache is empty: run the model with it first.")
        n = self.cache.length
        return iter((self.k.narrow(2, 0, n), self.v.narrow(2, 0, n)))

    def __getitem__(self, i: int) -> torch.Tensor:
        return tuple(self)[i]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.window, self.swap_qk = cfg.n_head, cfg.attn_window, cfg.swap_qk
        if cfg.qk_norm:  # one RMSNorm (gain per channel, shared by the heads) for queries, one for keys
            self.q_norm = nn.RMSNorm(cfg.head_size, eps=QK_NORM_EPS)
            self.k_norm = nn.RMSNorm(cfg.head_size, eps=QK_NORM_EPS)
        else:
            self.q_norm = self.k_norm = None
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.hook_z = HookPoint()  # (B, nh, T, hs): each head's output, before c_proj mixes the heads

    def forward(
        self, x: torch.Tensor, past: LayerKV | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        # One view and one permute give q, k and v as (B, nh, T, hs) each (three ops fewer per
        # projection than split, view and transpose: a decoded token's step is dispatch-bound).
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        if self.swap_qk:  # the ablation: each projection plays the other's role
            q, k = k, q
        if self.q_norm is not None:  # QK-norm, per head, before the cache and both attention paths
            # In float32 (the gains' dtype) whatever autocast made of q and k, then back to v's dtype.
            q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        if past is not None:
            k, v = past.append(k, v)  # (B, nh, T_total, hs): the cached past and these T tokens
        t_total = k.size(2)
        kv, dtype = (k, v), q.dtype

        if need_weights:
            # Explicit path: the same math as SDPA, with the weights kept for inspection.
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T_total)
            mask = attention_mask(T, t_total, self.window, x.device)
            scores = scores.masked_fill(~mask, float("-inf"))
            weights = F.softmax(scores.float(), dim=-1).to(q.dtype)
            y = self.attn_dropout(weights) @ v  # (B, nh, T, hs)
        else:
            weights = None
            p = self.dropout if self.training else 0.0
            if q.dtype == torch.bfloat16 and x.device.type == "cpu":
                # PyTorch's CPU flash-attention backward is ~4x slower in bf16 than in fp32 (profiled
                # at 4.1 vs 0.8 ms a layer on the baby model), so bf16 runs attend in fp32 there;
                # autocast would cast the inputs straight back to bf16, hence it is paused.
                with torch.autocast("cpu", enabled=False):
                    y = self.fused_attention(q.float(), k.float(), v.float(), p).to(dtype)
            else:
                y = self.fused_attention(q, k, v, p)
        y = self.hook_z(y).transpose(1, 2).reshape(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y)), weights, kv

    def fused_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        """Fused attention of q (B, nh, T, hs) over k, v (B, nh, T_total, hs): causal, windowed if configured."""
        T, t_total = q.size(2), k.size(2)
        if self.window is None and T == t_total:  # no cached past: plain causal attention
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        if self.window is None and T == 1:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # one new token sees the whole cache
        mask = attention_mask(T, t_total, self.window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.ff_mult * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.act = nn.GELU() if cfg.activation == "gelu" else nn.ReLU()
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


def _norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.use_layernorm else nn.Identity()


class Block(nn.Module):
    """One transformer block. Pre-norm: x + f(ln(x)). Post-norm: ln(x + f(x)). No residual: drop the x +."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm, self.residual = cfg.norm_position == "pre", cfg.use_residual
        self.ln_1, self.attn = _norm(cfg), CausalSelfAttention(cfg)
        # use_mlp=False (the no-mlp ablation) leaves attention alone in the block: no MLP, no norm before it.
        self.ln_2, self.mlp = (_norm(cfg), MLP(cfg)) if cfg.use_mlp else (None, None)
        self.hook_resid_post = HookPoint()  # (B, T, C): the residual stream this block hands on

    def forward(self, x: torch.Tensor, past: LayerKV | None = None, need_weights: bool = False):
        if self.pre_norm:
            a, weights, kv = self.attn(self.ln_1(x), past, need_weights)
            x = x + a if self.residual else a
            if self.mlp is not None:
                m = self.mlp(self.ln_2(x))
                x = x + m if self.residual else m
        else:
            a, weights, kv = self.attn(x, past, need_weights)
            x = self.ln_1(x + a if self.residual else a)
            if self.mlp is not None:
                m = self.mlp(x)
                x = self.ln_2(x + m if self.residual else m)
        return self.hook_resid_post(x), weights, kv


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg = cfg.validate()
        # n_layer 0 is the bigram model: token embedding → head, so each position's logits depend on its
        # own token only. It has no positions (they would make the logits depend on where the token is)
        # and no final norm (nothing has mixed anything to rescale).
        self.bigram = cfg.n_layer == 0
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        positions = "none" if self.bigram else cfg.pos_encoding
        if positions == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif positions == "sinusoidal":
            self.register_buffer("sin_table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_embed = HookPoint()  # (B, T, C): the residual stream before the first block
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # Post-norm blocks already end in a LayerNorm; pre-norm needs one before the head.
        self.ln_f = _norm(cfg) if cfg.norm_position == "pre" and not self.bigram else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        name_hook_points(self)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting tied weights once; non_embedding drops the position table (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and hasattr(self, "wpe"):
            n -= self.wpe.weight.numel()
        return n

    def position_embedding(self, start: int, T: int, device) -> torch.Tensor | float:
        if self.bigram:
            return 0.0
        if self.config.pos_encoding == "learned":
            # Rows start..start+T of the table: the same as wpe(arange), without building the indices
            # (a decoded token's step is dispatch-bound) and with a plain slice-add backward.
            return self.wpe.weight[start : start + T]  # (T, C)
        if self.config.pos_encoding == "sinusoidal":
            return self.sin_table[start : start + T]
        return 0.0

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        return_attention: bool = False,
        past_kv: KVCache | None = None,
        use_cache: bool = False,
    ) -> ModelOutput:
        """Logits of every position; with ``past_kv`` (a ``KVCache``) the tokens continue the cached ones.

        The cache is written in place. ``use_cache=True`` returns it as ``.past_kv`` (a new one,
        holding block_size tokens, when none was passed).
        """
        B, T = idx.shape
        if use_cache and past_kv is None:
            past_kv = KVCache(len(self.blocks), self.config.block_size)
        start = 0 if past_kv is None else past_kv.length  # a bigram model's cache has no layers, only a length
        if start + T > self.config.block_size:
            raise ConfigError(
                f"Sequence of {start + T} tokens is longer than the model's context ({self.config.block_size}). "
                "Keep only its last block_size tokens (the samplers and inspection do this for you)."
            )
        x = self.hook_embed(self.drop(self.wte(idx) + self.position_embedding(start, T, idx.device)))  # (B, T, C)
        attentions = []
        for i, block in enumerate(self.blocks):
            x, weights, _ = block(x, None if past_kv is None else past_kv[i], return_attention)
            attentions.append(weights)
        if past_kv is not None:
            past_kv.length = start + T
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return ModelOutput(
            logits=logits,
            loss=loss,
            attentions=attentions if return_attention else None,
            past_kv=past_kv if use_cache else None,
        )

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices (Linear and embedding weights), not biases or LayerNorm gains."""
        params = {id(p): p for p in self.parameters() if p.requires_grad}  # tied weights once
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def flops_per_token(self, T: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), nanoGPT/PaLM estimate: 6N + 12·L·C·T."""
        cfg = self.config
        T = T or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T


def count_params(config: ModelConfig) -> int:
    """The parameters a model of ``config`` has (tied weights once), counted without allocating them.

    The model is built on torch's meta device, so even a large configuration is counted in milliseconds;
    pages and the run store ask this instead of building a model (or importing torch) themselves."""
    with torch.device("meta"):
        return GPT(config).num_params()
