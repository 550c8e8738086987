"""The in-place KV cache and the sliding context window: the cached path must pick exactly what recomputing
the window from scratch picks, inside the context and across slides, with work linear in the new tokens."""

from __future__ import annotations

import pytest
import torch

import tinygpt_core.model as model_mod
from tinygpt_core.config import ModelConfig
from tinygpt_core.decode_step import DecodeStep
from tinygpt_core.errors import ConfigError
from tinygpt_core.model import GPT, KVCache
from tinygpt_core.sampling import SamplingSettings, _beam_search, _NextLogits, context_length, generate_ids

V, BLOCK = 11, 16


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, **kw)).eval()
    with torch.no_grad():  # wider than GPT-2's init, so greedy choices are far from ties
        for p in model.parameters():
            p.normal_(0.0, 0.4 if model.config.use_layernorm else 0.15)
    return model


def count_fed_tokens(model: GPT, monkeypatch) -> list[int]:
    """Tokens the model is run on, per call (its forward, or the one-token decode step): the work decoding does."""
    fed: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: fed.append(args[0].numel()))
    step = DecodeStep.__call__
    monkeypatch.setattr(
        DecodeStep, "__call__", lambda self, tokens, cache: fed.append(tokens.numel()) or step(self, tokens, cache)
    )
    return fed


def test_context_length_exact_and_sliding():
    # exact: everything up to the context, then always the last block_size tokens
    assert [context_length(t, 8) for t in (1, 7, 8, 9, 30)] == [1, 7, 8, 8, 8]
    # slide 4: at 9 tokens the window jumps 4 ahead (keeps 5), grows back to 8, jumps again
    assert [context_length(t, 8, 4) for t in range(7, 18)] == [7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5]
    # slide = block_size: a slide keeps only the newest token
    assert [context_length(t, 8, 8) for t in (8, 9, 16, 17)] == [8, 1, 8, 1]
    # a 20-token prompt starts from its last 8 tokens (origin 12) and slides from there
    assert [context_length(t, 8, 4, origin=12) for t in (20, 21, 24, 25)] == [8, 5, 8, 5]


def test_a_prompt_longer_than_the_context_is_seen_whole_then_slides():
    model = tiny(seed=1)
    prompt = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(2))
    s = SamplingSettings(strategy="greedy", context_slide=BLOCK // 2)
    with torch.no_grad():
        first = model(prompt[:, -BLOCK:]).logits[0, -1].argmax()
    cached = generate_ids(model, prompt, 30, s, use_cache=True)
    assert cached[0, 20] == first
    assert torch.equal(cached, generate_ids(model, prompt, 30, s, use_cache=False))


@pytest.mark.parametrize(
    "kw, slide",
    [({}, 5), (dict(attn_window=5, pos_encoding="sinusoidal", qk_norm=True), 1), (dict(pos_encoding="none"), 5)],
)
def test_cached_logits_equal_the_recomputed_window_across_slides(kw, slide):
    model = tiny(**kw)
    seq = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(1))
    cached, recomputed = _NextLogits(model, True, slide), _NextLogits(model, False, slide)
    with torch.no_grad():
        for t in range(3, 33):  # one token at a time, through the context and several slides
            L = context_length(t, BLOCK, slide)
            by_hand = model(seq[:, t - L : t]).logits[:, -1]
            got = cached(seq[:, :t])
            torch.testing.assert_close(got, recomputed(seq[:, :t]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_cached_generation_picks_the_recomputed_tokens_across_slides(strategy):
    """(The exact window, slide 1, is covered by test_sampling's cache tests.)"""
    slide = BLOCK // 2
    model = tiny(seed=2)
    s = SamplingSettings(strategy=strategy, num_beams=3, temperature=1.3, context_slide=slide, repetition_penalty=1.2)
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    gen = (lambda: torch.Generator().manual_seed(4)) if strategy == "sample" else (lambda: None)
    with_cache = generate_ids(model, idx, 30, s, use_cache=True, generator=gen())  # 35 tokens: 3 slides of 8
    without = generate_ids(model, idx, 30, s, use_cache=False, generator=gen())
    assert with_cache.shape == (1, 35)
    assert torch.equal(with_cache, without)


def test_the_cache_is_written_in_place_and_decoding_concatenates_nothing(monkeypatch):
    model = tiny()
    cache = KVCache(model.config.n_layer, BLOCK)
    idx = torch.randint(0, V, (1, BLOCK), generator=torch.Generator().manual_seed(0))
    cats = []
    real_cat = torch.cat
    monkeypatch.setattr(model_mod.torch, "cat", lambda *a, **k: cats.append(1) or real_cat(*a, **k))
    with torch.no_grad():
        model(idx[:, :4], past_kv=cache)
        buffers = [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in cache.layers]
        steps = [model(idx[:, t : t + 1], past_kv=cache).logits for t in range(4, BLOCK)]
        full = model(idx).logits
    assert cats == []
    assert [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in cache.layers] == buffers  # never reallocated
    assert cache.length == BLOCK and cache[0].k.shape == (1, 2, BLOCK, 8)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 4:], atol=1e-5, rtol=1e-5)


def test_kv_cache_reorder_follows_the_chosen_rows_and_reset_keeps_the_buffers():
    model = tiny()
    idx = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(idx, use_cache=True).past_kv
        k_before = cache[1][0].clone()
        cache.reorder(torch.tensor([2, 2, 0, 1]))  # four beams from three
        assert cache[1][0].shape[0] == 4 and torch.equal(cache[1][0], k_before[[2, 2, 0, 1]])
        rows = idx[[2, 2, 0, 1]]
        nxt = torch.tensor([[1], [2], [3], [4]])
        stepped = model(nxt, past_kv=cache).logits[:, -1]
        full = model(torch.cat([rows, nxt], dim=1)).logits[:, -1]
        torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
        ptr = cache[0].k.data_ptr()
        cache.reset()
        assert cache.length == 0
        model(rows[:, :2], past_kv=cache)
        assert cache.length == 2 and cache[0].k.data_ptr() == ptr


def test_sliding_decoding_work_is_linear_and_rebuilds_once_per_slide(monkeypatch):
    """Past the context, slide s feeds one token per step plus one window of block_size - s + 1 per slide;
    the exact window (s = 1) must recompute block_size tokens at every step, so it feeds far more."""
    model = tiny()
    fed = count_fed_tokens(model, monkeypatch)
    idx = torch.tensor([[1, 2, 3]])
    n = 60
    generate_ids(model, idx, n, SamplingSettings(strategy="greedy", context_slide=8))
    # the prompt, then the window fills one token at a time; each slide refills 9 and 7 more follow
    slides = sum(1 for k in fed if k > 1) - 1
    assert fed[0] == 3 and set(fed[1:]) <= {1, BLOCK - 8 + 1}
    assert slides == len(range(BLOCK + 1, 3 + n, 8))  # one refill per 8 tokens past the context
    sliding_work = sum(fed)
    fed.clear()
    generate_ids(model, idx, n, SamplingSettings(strategy="greedy"))
    assert sum(fed) > 5 * sliding_work  # block_size tokens per step past the context
    assert max(fed) == BLOCK


def test_beam_search_feeds_one_token_per_beam_per_step_and_its_work_is_linear(monkeypatch):
    model = tiny(seed=3)
    fed = count_fed_tokens(model, monkeypatch)
    s = SamplingSettings(strategy="beam", num_beams=4, context_slide=4)
    work = {}
    with torch.no_grad():
        for n in (20, 28, 36):
            fed.clear()
            seqs, _ = _beam_search(model, torch.tensor([[1, 2]]), n, s, True)
            assert seqs.shape == (4, 2 + n)
            work[n] = sum(fed)
    assert fed[0] == 2 and fed[1:14] == [4] * 13  # the context fills one token per beam per step
    assert set(k for k in fed if k > 4) == {4 * (BLOCK - 4 + 1)}  # each slide: every beam's 13-token window
    # 8 more tokens (2 slide periods) cost the same wherever they start: linear in the new tokens
    assert work[36] - work[28] == work[28] - work[20] == 2 * (3 * 4 + 4 * 13)


def test_context_slide_is_validated():
    with pytest.raises(ConfigError, match="context_slide must be a whole number >= 1"):
        SamplingSettings(context_slide=0).validate()
    with pytest.raises(ConfigError, match="cannot exceed the model's context"):
        generate_ids(tiny(), torch.tensor([[1]]), 3, SamplingSettings(strategy="greedy", context_slide=BLOCK + 1))
    assert "slide=8" in SamplingSettings(strategy="greedy", context_slide=8).describe()
