"""Token loss, logit lens and head knockout against hand-worked references (tinygpt_core.tokenloss,
lens, knockout and the hook points they share): knocking out a head is exactly zeroing its columns
of the output projection, the lens of the last layer is exactly the model's logits, token loss is
exactly the cross-entropy, and hooks stay in the thread that set them."""

from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinygpt_core import knockout, lens, tokenloss
from tinygpt_core.config import ModelConfig
from tinygpt_core.errors import ConfigError
from tinygpt_core.hooks import hook_names, run_with_hooks
from tinygpt_core.model import GPT
from tinygpt_core.tokenizers import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "the cat sat on the mat. the dog sat on the log. "


def model_of(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=20, n_layer=2, n_head=4, n_embd=32, block_size=16, dropout=0.0)
    return GPT(ModelConfig(**{**cfg, **kw})).eval()


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("char", TEXT)


def ids_of(n: int, vocab: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (n,), generator=torch.Generator().manual_seed(seed))


# --- hook points ------------------------------------------------------------------------------------


def test_hook_points_are_named_and_add_no_weights():
    m = model_of()
    assert hook_names(m) == [
        "hook_embed",
        "blocks.0.attn.hook_z",
        "blocks.0.hook_resid_post",
        "blocks.1.attn.hook_z",
        "blocks.1.hook_resid_post",
    ]
    assert not any("hook" in k for k in m.state_dict())  # run folders and export see the same weights


def test_unknown_hook_point_is_a_clear_error():
    with pytest.raises(ValueError, match="not a hook point"):
        with run_with_hooks(model_of(), {"blocks.9.attn.hook_z": lambda z: None}):
            pass


def test_hooks_apply_only_in_the_thread_that_set_them():
    m = model_of()
    x = ids_of(8)[None]
    clean = m(x).logits
    seen_elsewhere = {}
    entered, done = threading.Event(), threading.Event()

    def other():
        entered.wait(5)
        seen_elsewhere["logits"] = m(x).logits  # another visitor's forward while this thread knocks heads out
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with knockout.heads_removed(m, [(0, 0), (1, 2)]):
        entered.set()
        done.wait(5)
        knocked = m(x).logits
    t.join()
    assert torch.equal(seen_elsewhere["logits"], clean)
    assert not torch.allclose(knocked, clean)
    assert torch.equal(m(x).logits, clean)  # and nothing is left behind after the block


# --- head knockout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer,head", [(0, 0), (1, 3)])
def test_zero_knockout_equals_zeroing_the_heads_output_projection_columns(layer, head):
    m = model_of()
    hs = m.config.n_embd // m.config.n_head
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.blocks[layer].attn.c_proj.weight[:, head * hs : (head + 1) * hs] = 0
    x = ids_of(16)[None]
    with knockout.heads_removed(m, [(layer, head)], "zero"):
        got = m(x).logits
    want = ref(x).logits
    assert torch.equal(got, want), (got - want).abs().max()  # exactly: the same sums with the same zero terms


def test_knockout_grid_matches_one_head_at_a_time_and_its_hand_computed_loss():
    m = model_of()
    ids = ids_of(50)
    grid = knockout.knockout_grid(m, ids.tolist(), "zero")
    x, y = knockout.windows(ids.tolist(), 16)  # 49 targets -> 3 windows of 16
    assert x.shape == (3, 16) and grid.n_tokens == 48
    assert torch.equal(y[0], ids[1:17]) and torch.equal(x[1], ids[16:32])
    base = F.cross_entropy(m(x).logits.flatten(0, 1), y.flatten()).item()
    assert grid.base_loss == pytest.approx(base, abs=1e-5)
    hs = 8
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.blocks[1].attn.c_proj.weight[:, 2 * hs : 3 * hs] = 0
    one = F.cross_entropy(ref(x).logits.flatten(0, 1), y.flatten()).item()
    assert grid.loss[1, 2] == pytest.approx(one, abs=1e-5)
    assert grid.delta.shape == (2, 4)
    assert grid.delta[1, 2] == pytest.approx(one - base, abs=1e-5)


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_the_batched_grid_agrees_with_knocking_out_each_head_on_its_own(method):
    m = model_of()
    ids = ids_of(50).tolist()
    grid = knockout.knockout_grid(m, ids, method)
    for layer in range(2):
        for h in range(4):
            base, alone = knockout.knockout_loss(m, ids, [(layer, h)], method)
            assert grid.base_loss == pytest.approx(base, abs=1e-5)
            assert grid.loss[layer, h] == pytest.approx(alone, abs=1e-5), (layer, h)


def test_mean_knockout_replaces_the_head_by_its_average_output():
    m = model_of()
    ids = ids_of(33)
    x, _ = knockout.windows(ids.tolist(), 16)
    means = knockout.head_means(m, x)
    captured = {}
    with run_with_hooks(m, {"blocks.0.attn.hook_z": lambda z: captured.setdefault("z", z.clone())}):
        m(x)
    assert torch.allclose(means[0], captured["z"].mean(dim=(0, 2)), atol=1e-6)
    with knockout.heads_removed(m, [(0, 1)], "mean", means):
        with run_with_hooks(m, {"blocks.0.attn.hook_z": lambda z: captured.__setitem__("after", z.clone())}):
            m(x)
    after = captured["after"]
    assert torch.allclose(after[:, 1], means[0, 1].expand_as(after[:, 1]))  # every position: the mean
    assert torch.equal(after[:, 0], captured["z"][:, 0])  # the other heads untouched


def test_knockout_rejects_bad_heads_and_methods():
    m = model_of()
    with pytest.raises(ConfigError, match="Layer 2, head 0 does not exist"):
        knockout.knockout_loss(m, ids_of(20).tolist(), [(2, 0)])
    with pytest.raises(ConfigError, match="Unknown knockout method"):
        knockout.knockout_grid(m, ids_of(20).tolist(), "random")
    with pytest.raises(ConfigError, match="outside what one inspection scores"):
        knockout.knockout_grid(m, [1] * 5000)


def test_knocking_out_every_head_of_an_attention_only_copy_leaves_the_embedding_path():
    m = model_of()
    base, gone = knockout.knockout_loss(m, ids_of(40).tolist(), [(i, h) for i in range(2) for h in range(4)])
    assert math.isfinite(base) and math.isfinite(gone) and gone != base


# --- logit lens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"norm_position": "post"}, {"use_layernorm": False}])
def test_logit_lens_of_the_last_layer_is_the_models_own_logits(kw):
    m = model_of(**kw)
    x = ids_of(12)[None]
    out = lens.lens_logits(m, x)
    assert out.shape == (3, 1, 12, 20)
    assert torch.equal(out[-1], m(x).logits.float())


def test_logit_lens_of_the_embeddings_is_the_unembedded_token_plus_position(tok):
    m = model_of(vocab_size=tok.vocab_size)
    x = torch.tensor([tok.encode("the cat")])
    out = lens.lens_logits(m, x)
    emb = m.wte(x) + m.wpe(torch.arange(x.size(1)))
    assert torch.allclose(out[0], m.lm_head(m.ln_f(emb)), atol=1e-6)


def test_logit_lens_tables_top_tokens_and_the_next_tokens_probability(tok):
    m = model_of(vocab_size=tok.vocab_size)
    result = lens.logit_lens(m, tok, "the cat sat")
    T = len(tok.encode("the cat sat"))
    assert result.layers == ["embeddings", "layer 0", "layer 1"]
    assert result.top_ids.shape == result.next_probs.shape == (3, T)
    probs = F.softmax(m(torch.tensor([result.ids])).logits[0], dim=-1)
    assert result.top_ids[-1].tolist() == probs.argmax(-1).tolist()
    want = probs[torch.arange(T - 1), torch.tensor(result.ids[1:])].detach().numpy()
    assert np.allclose(result.next_probs[-1, :-1], want, atol=1e-6)
    assert np.isnan(result.next_probs[:, -1]).all()  # the last position has no next token in the text
    assert not result.cropped
    long = lens.logit_lens(m, tok, TEXT)
    assert long.cropped and len(long.ids) == 16


# --- token loss --------------------------------------------------------------------------------------


def test_token_loss_is_the_cross_entropy_of_each_next_token(tok):
    m = model_of(vocab_size=tok.vocab_size)
    ids = tok.encode("the cat sat on the")  # 18 tokens: one window of 16 inputs
    ids = ids[:17]
    tl = tokenloss.token_losses(m, tok, ids)
    x = torch.tensor([ids])
    want = F.cross_entropy(m(x[:, :-1]).logits[0], x[0, 1:], reduction="none").detach().numpy()
    assert np.isnan(tl.loss[0])
    assert np.allclose(tl.loss[1:], want, atol=1e-5)
    assert tl.mean_loss == pytest.approx(float(want.mean()), abs=1e-5)
    probs = F.softmax(m(x[:, :-1]).logits[0], dim=-1)
    top = probs.topk(5, dim=-1)
    assert tl.top_ids[1:].tolist() == top.indices.tolist()
    assert np.allclose(tl.top_probs[1:], top.values.detach().numpy(), atol=1e-6)


def test_long_text_scores_each_token_in_the_window_that_gives_it_most_context(tok):
    m = model_of(vocab_size=tok.vocab_size)
    ids = tok.encode(TEXT)
    # context 16, stride 8: windows start at 0, 8, 16, 24 and 31 (the last one ends at the end of the text)
    assert len(ids) == 48
    tl = tokenloss.token_losses(m, tok, ids)
    assert np.isfinite(tl.loss[1:]).all()
    # token p is scored in the first window that still holds it: the one starting at the smallest s >= p - 16
    for p, start in [(5, 0), (16, 0), (17, 8), (20, 8), (33, 24), (40, 24), (41, 31), (47, 31)]:
        ctx = torch.tensor([ids[start:p]])
        want = F.cross_entropy(m(ctx).logits[0, -1:], torch.tensor([ids[p]])).item()
        assert tl.loss[p] == pytest.approx(want, abs=1e-5), p


def test_two_runs_compared_token_by_token(tok):
    a = tokenloss.token_losses(model_of(vocab_size=tok.vocab_size), tok, tok.encode("the cat sat"))
    torch.manual_seed(5)
    other = GPT(model_of(vocab_size=tok.vocab_size).config).eval()
    b = tokenloss.token_losses(other, tok, tok.encode("the cat sat"))
    d = tokenloss.compare(a, b)
    assert np.allclose(d.diff[1:], b.loss[1:] - a.loss[1:])
    worst = d.worst(3)
    assert all(d.diff[p] > 0 for p in worst) and worst == sorted(worst, key=lambda p: -d.diff[p])
    colours = d.colours()
    assert colours[0] is None and all(0 <= c <= 1 for c in colours[1:])
    c = tokenloss.token_losses(model_of(vocab_size=tok.vocab_size), tok, tok.encode("the dog"))
    with pytest.raises(ConfigError, match="different tokens"):
        tokenloss.compare(a, c)


def test_hover_titles_name_the_loss_and_the_top_guesses(tok):
    tl = tokenloss.token_losses(model_of(vocab_size=tok.vocab_size), tok, tok.encode("the"))
    titles = tokenloss.hover_titles(tl, tok)
    assert titles[0].startswith("first token")
    assert titles[1].startswith(f"loss {tl.loss[1]:.2f} nats") and titles[1].count("'") >= 10
    assert tokenloss.loss_colours(tl)[0] is None
