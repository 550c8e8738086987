"""Mechanism tests of the GPT: each checks one claim a careful reader of model.py would ask about.

Models are tiny and seeded; most tests re-draw every parameter (LayerNorm gains and biases too)
from a wide normal so that no part of the network is close to an identity or to zero, which
would let a wrong computation pass by accident.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinygpt_core.config import ModelConfig
from tinygpt_core.errors import ConfigError
from tinygpt_core.model import GPT, attention_mask, sinusoidal_table

V, BLOCK, T = 13, 16, 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# Every ablation on its own, plus a few combinations.
ABLATIONS: dict[str, dict] = {
    "baseline": {},
    "no-layernorm": dict(use_layernorm=False),
    "no-residual": dict(use_residual=False),
    "pos-sinusoidal": dict(pos_encoding="sinusoidal"),
    "pos-none": dict(pos_encoding="none"),
    "post-norm": dict(norm_position="post"),
    "swap-qk": dict(swap_qk=True),
    "window-3": dict(attn_window=3),
    "relu": dict(activation="relu"),
    "untied": dict(tie_weights=False),
    "no-bias": dict(bias=False),
    "post+window+sinusoidal": dict(norm_position="post", attn_window=4, pos_encoding="sinusoidal"),
    "swap+no-residual+no-bias": dict(swap_qk=True, use_residual=False, bias=False),
    "no-pos+no-layernorm+relu+untied+window-1": dict(
        pos_encoding="none", use_layernorm=False, activation="relu", tie_weights=False, attn_window=1
    ),
}


def make_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def scrambled(seed: int = 0, **kw) -> GPT:
    """A model in eval mode whose every parameter is redrawn from N(0, std²).

    std is 0.5, or 0.2 without LayerNorm: nothing then rescales the residual stream and wider
    weights would push logits into the thousands, where float32 rounding alone exceeds tolerances.
    """
    torch.manual_seed(seed)
    model = GPT(make_cfg(**kw)).eval()
    std = 0.5 if model.config.use_layernorm else 0.2
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def tokens(seed: int = 1, t: int = T, b: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_fast_attention_path_equals_explicit_path(name):
    model = scrambled(**ABLATIONS[name])
    idx = tokens()
    fast = model(idx).logits
    slow = model(idx, return_attention=True)
    assert slow.attentions is not None and len(slow.attentions) == 2
    torch.testing.assert_close(fast, slow.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["baseline", "window-3", "post+window+sinusoidal", "pos-none"])
@pytest.mark.parametrize("explicit", [False, True])
def test_causal_mask_later_tokens_never_change_earlier_logits(name, explicit):
    model = scrambled(**ABLATIONS[name])
    idx = tokens(b=1)
    t = 7
    changed = idx.clone()
    changed[0, t] = (idx[0, t] + 1) % V
    a = model(idx, return_attention=explicit).logits
    b = model(changed, return_attention=explicit).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert not torch.allclose(a[:, t], b[:, t])  # the change itself is visible where it may be


def _layer_norm(ln, x):
    if isinstance(ln, torch.nn.Identity):
        return x
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + ln.eps) * ln.weight
    return y + ln.bias if ln.bias is not None else y


def _linear(lin, x):
    y = x @ lin.weight.T
    return y + lin.bias if lin.bias is not None else y


def _attn_by_hand(attn, x, window=None, swap=False):
    B, Tq, C = x.shape
    nh = attn.n_head
    hs = C // nh
    q, k, v = _linear(attn.c_attn, x).split(C, dim=-1)
    if swap:
        q, k = k, q
    out = torch.zeros_like(x)
    heads = []
    for h in range(nh):
        sl = slice(h * hs, (h + 1) * hs)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(hs)  # (B, T, T)
        i = torch.arange(Tq)[:, None]
        j = torch.arange(Tq)[None, :]
        allowed = (j <= i) & ((i - j < window) if window else True)
        w = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        heads.append(w @ v[..., sl])
    out = torch.cat(heads, dim=-1)
    return _linear(attn.c_proj, out)


def _mlp_by_hand(mlp, x, act):
    h = _linear(mlp.c_fc, x)
    h = F.gelu(h) if act == "gelu" else torch.clamp(h, min=0)
    return _linear(mlp.c_proj, h)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(norm_position="post"),
        dict(use_residual=False),
        dict(norm_position="post", use_residual=False),
        dict(use_layernorm=False, activation="relu", bias=False),
        dict(swap_qk=True, attn_window=2),
    ],
)
def test_one_block_decomposes_into_its_parts(kw):
    model = scrambled(**kw)
    cfg = model.config
    block = model.blocks[0]
    x = torch.randn(2, T, cfg.n_embd, generator=torch.Generator().manual_seed(3))

    def attn(h):
        return _attn_by_hand(block.attn, h, cfg.attn_window, cfg.swap_qk)

    def mlp(h):
        return _mlp_by_hand(block.mlp, h, cfg.activation)

    ln1 = lambda h: _layer_norm(block.ln_1, h)  # noqa: E731
    ln2 = lambda h: _layer_norm(block.ln_2, h)  # noqa: E731
    if cfg.norm_position == "pre" and cfg.use_residual:
        h = x + attn(ln1(x))
        expected = h + mlp(ln2(h))
    elif cfg.norm_position == "pre":
        h = attn(ln1(x))
        expected = mlp(ln2(h))
    elif cfg.use_residual:
        h = ln1(x + attn(x))
        expected = ln2(h + mlp(h))
    else:
        h = ln1(attn(x))
        expected = ln2(mlp(h))
    with torch.no_grad():
        got, _, _ = block(x)
        expected = expected.detach()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_whole_forward_is_embeddings_blocks_final_norm_head():
    model = scrambled(pos_encoding="learned")
    idx = tokens()
    with torch.no_grad():
        x = model.wte(idx) + model.wpe(torch.arange(T))
        for blk in model.blocks:
            x = blk(x)[0]
        expected = _layer_norm(model.ln_f, x) @ model.lm_head.weight.T
        torch.testing.assert_close(model(idx).logits, expected, atol=1e-5, rtol=1e-4)


def test_sinusoidal_table_values():
    d = 16
    table = sinusoidal_table(50, d)
    assert table.shape == (50, d)
    for pos in (0, 1, 7, 49):
        for i in (0, 1, 3, 7):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    assert sinusoidal_table(4, 5).shape == (4, 5)  # odd widths work too (last channel is a sin)


def test_sinusoidal_model_adds_the_table_and_no_pos_adds_nothing():
    sin = scrambled(pos_encoding="sinusoidal")
    torch.testing.assert_close(sin.position_embedding(3, 4, "cpu"), sinusoidal_table(BLOCK, 16)[3:7])
    assert not hasattr(sin, "wpe")
    none = scrambled(pos_encoding="none", n_layer=1)
    assert none.position_embedding(0, 4, "cpu") == 0.0
    # Without positions a one-layer model cannot see order: permuting the context leaves the
    # prediction at the last position unchanged when the last token stays. (With more layers the
    # earlier positions' own causal prefixes change, so this only holds for one layer.)
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    perm = torch.tensor([[3, 1, 4, 2, 5]])
    torch.testing.assert_close(none(idx).logits[0, -1], none(perm).logits[0, -1], atol=1e-5, rtol=1e-5)
    sin1 = scrambled(pos_encoding="sinusoidal", n_layer=1)
    assert not torch.allclose(sin1(idx).logits[0, -1], sin1(perm).logits[0, -1], atol=1e-3)


@pytest.mark.parametrize("window", [1, 2, 5])
def test_window_mask_limits_how_far_back_a_query_sees(window):
    model = scrambled(attn_window=window)
    out = model(tokens(), return_attention=True)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    inside = (j <= i) & (i - j < window)
    for w in out.attentions:  # (B, nh, T, T)
        assert torch.all(w[..., ~inside] == 0)
        assert torch.all(w[..., inside] > 0)
    # With a cache, the 3 queries are the last 3 of 6 positions (absolute 3, 4, 5).
    assert attention_mask(3, 6, window=2).tolist() == [
        [False, False, True, True, False, False],
        [False, False, False, True, True, False],
        [False, False, False, False, True, True],
    ]


def test_attention_mask_without_cache():
    assert attention_mask(6, 6, 2)[3].tolist() == [False, False, True, True, False, False]
    assert attention_mask(6, 6, None)[3].tolist() == [True, True, True, True, False, False]


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_attention_rows_are_distributions(name):
    model = scrambled(**ABLATIONS[name])
    out = model(tokens(), return_attention=True)
    for w in out.attentions:
        assert w.shape == (2, 2, T, T)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, T))
        assert torch.all(w.triu(diagonal=1) == 0)


def test_swap_qk_equals_swapping_the_projection_weights():
    swapped = scrambled(swap_qk=True)
    plain = scrambled(swap_qk=False)
    plain.load_state_dict(swapped.state_dict())
    C = 16
    with torch.no_grad():
        for blk in plain.blocks:
            wq, wk, wv = blk.attn.c_attn.weight.clone().split(C, dim=0)  # rows: q, k, v outputs
            blk.attn.c_attn.weight.copy_(torch.cat([wk, wq, wv], 0))
            bq, bk, bv = blk.attn.c_attn.bias.clone().split(C)
            blk.attn.c_attn.bias.copy_(torch.cat([bk, bq, bv]))
    idx = tokens()
    torch.testing.assert_close(swapped(idx).logits, plain(idx).logits, atol=1e-5, rtol=1e-5)
    # and the swap is not a no-op: the same weights without the swap give other logits
    same_weights = scrambled(swap_qk=False)
    same_weights.load_state_dict(swapped.state_dict())
    assert not torch.allclose(swapped(idx).logits, same_weights(idx).logits, atol=1e-3)


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_kv_cache_equals_full_forward(name):
    model = scrambled(**ABLATIONS[name])
    idx = tokens(t=BLOCK)
    full = model(idx, return_attention=True)
    # a prefix, then a chunk of several tokens, then one token at a time
    out = model(idx[:, :5], use_cache=True)
    pieces, past = [out.logits], out.past_kv
    out = model(idx[:, 5:9], past_kv=past, use_cache=True, return_attention=True)
    torch.testing.assert_close(out.attentions[1], full.attentions[1][:, :, 5:9, :9], atol=1e-5, rtol=1e-5)
    pieces.append(out.logits)
    past = out.past_kv
    for t in range(9, BLOCK):
        out = model(idx[:, t : t + 1], past_kv=past, use_cache=True)
        pieces.append(out.logits)
        past = out.past_kv
    assert past[0][0].shape == (2, 2, BLOCK, 8)  # (B, nh, T, hs)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="longer than the model's context"):
        model(idx[:, :1], past_kv=past)


def test_tied_weights_share_one_tensor():
    tied = GPT(make_cfg())
    assert tied.lm_head.weight is tied.wte.weight
    with torch.no_grad():
        tied.wte.weight[3].add_(1.0)
    assert torch.equal(tied.lm_head.weight[3], tied.wte.weight[3])
    untied = GPT(make_cfg(tie_weights=False))
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == V * 16


def _expected_params(cfg: ModelConfig) -> int:
    C, L, Vv = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    H = cfg.ff_mult * C
    b = 1 if cfg.bias else 0
    ln = (2 * C if cfg.bias else C) if cfg.use_layernorm else 0
    per_block = (
        ln
        + (C * 3 * C + b * 3 * C)
        + (C * C + b * C)  # ln_1, c_attn, attn.c_proj
        + ln
        + (C * H + b * H)
        + (H * C + b * C)  # ln_2, c_fc, mlp.c_proj
    )
    n = Vv * C + L * per_block
    n += cfg.block_size * C if cfg.pos_encoding == "learned" else 0
    n += ln if cfg.norm_position == "pre" else 0  # ln_f
    n += 0 if cfg.tie_weights else Vv * C
    return n


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(bias=False),
        dict(tie_weights=False, pos_encoding="sinusoidal"),
        dict(use_layernorm=False, norm_position="post", ff_mult=2, n_layer=3),
    ],
)
def test_parameter_count_formula(kw):
    model = GPT(make_cfg(**kw))
    assert model.num_params() == _expected_params(model.config)
    wpe = BLOCK * 16 if model.config.pos_encoding == "learned" else 0
    assert model.num_params(non_embedding=True) == _expected_params(model.config) - wpe


def test_known_size_baby_model():
    # nanoGPT's baby Shakespeare-char model (65 chars, 4x128, context 64): 0.80M parameters
    model = GPT(ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
    assert (
        model.num_params()
        == 65 * 128
        + 64 * 128
        + 4 * (2 * 256 + 128 * 384 + 384 + 128 * 128 + 128 + 128 * 512 + 512 + 512 * 128 + 128)
        + 256
    )


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=500, block_size=64, n_layer=4, n_head=4, n_embd=128, tie_weights=False))
    resid_std = 0.02 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(resid_std, rel=0.05), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight", "lm_head.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name
        elif name.startswith("blocks") and "ln" in name and name.endswith("weight") or name == "ln_f.weight":
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            raise AssertionError(f"unexpected parameter {name}")


def test_loss_is_cross_entropy_by_hand():
    model = scrambled()
    idx = tokens()
    targets = tokens(seed=9)
    out = model(idx, targets=targets)
    logp = torch.log_softmax(out.logits, dim=-1)
    by_hand = -logp.gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(out.loss, by_hand)
    masked = targets.clone()
    masked[:, :5] = -1  # ignored positions (padding)
    keep = masked != -1
    by_hand = -logp.gather(-1, targets[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(model(idx, targets=masked).loss, by_hand)
    assert model(idx).loss is None


def test_positions_continue_from_the_cache_and_context_is_bounded():
    model = scrambled()
    idx = tokens(t=BLOCK + 1)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(idx)
    # a single token at position 5 (through a 5-token cache) is not the same as that token at 0
    past = model(idx[:, :5], use_cache=True).past_kv
    at5 = model(idx[:, 5:6], past_kv=past).logits
    at0 = model(idx[:, 5:6]).logits
    assert not torch.allclose(at5, at0, atol=1e-3)
