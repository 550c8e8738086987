"""Sampling: the logits processors against transformers' own warpers, and the decoding strategies."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tinygpt_core.config import ModelConfig
from tinygpt_core.errors import ConfigError, TokenizerError
from tinygpt_core.model import GPT
from tinygpt_core.sampling import (
    SamplingSettings,
    _NextLogits,
    apply_repetition_penalty,
    generate,
    generate_ids,
    hidden_token_ids,
    next_token_distribution,
    process_logits,
    text_stats,
)
from tinygpt_core.tokenizers import CharTokenizer

NEG_INF = float("-inf")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def hf_process(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """The transformers warpers chained in generate's order (temperature, top-k, top-p, min-p)."""
    ids = torch.zeros(logits.size(0), 1, dtype=torch.long)  # unused by these warpers
    x = logits
    if temperature != 1.0:
        x = TemperatureLogitsWarper(float(temperature))(ids, x)
    if top_k is not None:
        x = TopKLogitsWarper(top_k)(ids, x)
    if top_p is not None:
        x = TopPLogitsWarper(top_p)(ids, x)
    if min_p is not None:
        x = MinPLogitsWarper(min_p)(ids, x)
    return x


def assert_same_logits(ours, theirs):
    assert ours.shape == theirs.shape
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "different tokens removed"
    assert torch.equal(ours, theirs)


GRID = list(
    itertools.product(
        [0.5, 1.0, 1.7],  # temperature
        [None, 1, 3, 20, 1000],  # top_k (1000 > vocab)
        [None, 0.05, 0.5, 0.9, 1.0],  # top_p
        [None, 0.0, 0.1, 0.5, 1.0],  # min_p
    )
)


def test_process_logits_equals_transformers_warpers_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    for temperature, top_k, top_p, min_p in GRID:
        ours = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        theirs = hf_process(logits, temperature, top_k, top_p, min_p)
        assert_same_logits(ours, theirs)
    # the grid exercises real cutting, not only no-ops
    assert torch.isinf(process_logits(logits, top_p=0.5)).sum() > 100


def test_process_logits_equals_transformers_with_ties():
    g = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 4, (8, 30), generator=g).float()  # many exactly equal logits
    logits[0] = 0.0  # a flat row: everything tied
    for temperature, top_k, top_p, min_p in GRID:
        ours = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        assert_same_logits(ours, hf_process(logits, temperature, top_k, top_p, min_p))
    # top-k keeps every token tied with the k-th, so it may keep more than k
    kept = torch.isfinite(process_logits(logits, top_k=1)).sum(-1)
    assert kept[0] == 30 and torch.all(kept >= 1)


def test_process_logits_edge_cases():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    # top_k >= vocab, top_p = 1 and min_p = 0 keep everything (and return a new tensor)
    for kw in (dict(top_k=10), dict(top_k=11), dict(top_p=1.0), dict(min_p=0.0), {}):
        out = process_logits(logits, **kw)
        assert torch.equal(out, logits) and out is not logits
    # all -inf but one: that one survives every filter
    one = torch.full((2, 10), NEG_INF)
    one[0, 3], one[1, 7] = 2.0, -5.0
    for kw in (dict(top_k=3), dict(top_p=0.1), dict(min_p=0.9), dict(temperature=0.3, top_k=1, top_p=0.5, min_p=1.0)):
        out = process_logits(one, **kw)
        assert torch.isfinite(out).sum() == 2 and torch.isfinite(out[0, 3]) and torch.isfinite(out[1, 7])
        assert_same_logits(out, hf_process(one, **kw))
    # the top token always survives, even with min_p = 1 or a tiny top_p
    assert torch.isfinite(process_logits(logits, top_p=1e-9)).sum(-1).tolist() == [1, 1, 1]
    assert torch.isfinite(process_logits(logits, min_p=1.0)).sum(-1).tolist() == [1, 1, 1]
    # the input is never modified
    before = logits.clone()
    process_logits(logits, temperature=0.5, top_k=2, top_p=0.5, min_p=0.2)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("shape", [(40,), (3, 40), (2, 5, 40)])
def test_process_logits_shapes(shape):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=0.8, top_k=10, top_p=0.7, min_p=0.05)
    out = process_logits(logits, **kw)
    assert out.shape == logits.shape
    rows = hf_process(logits.reshape(-1, 40), **kw)
    assert_same_logits(out.reshape(-1, 40), rows)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(temperature=0), "use greedy for temperature 0"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.01), "min_p"),
    ],
)
def test_invalid_settings_raise_config_error(kw, message):
    with pytest.raises(ConfigError, match=message):
        process_logits(torch.zeros(5), **kw)
    with pytest.raises(ConfigError, match=message):
        SamplingSettings(**kw).validate()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(strategy="nucleus"), "strategy"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=500), "vocabulary size"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=10**9), "max_new_tokens"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(seed=-1), "seed"),
        (dict(length_penalty=float("inf")), "length_penalty"),
    ],
)
def test_invalid_sampling_settings(kw, message):
    with pytest.raises(ConfigError, match=message):
        SamplingSettings(**kw).validate(vocab_size=50)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_transformers(penalty):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 20, generator=g) * 2
    prev = torch.randint(0, 20, (3, 9), generator=g)  # with repeats
    ours = apply_repetition_penalty(logits, prev, penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(prev, logits.clone())
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, logits)
    # a 1-D logits vector with 1-D history behaves like one row
    torch.testing.assert_close(apply_repetition_penalty(logits[1], prev[1], penalty), ours[1])
    assert torch.equal(apply_repetition_penalty(logits, prev, 1.0), logits)


# --- decoding with a model ---------------------------------------------------------------------

TEXT = "abcdefgh ij\n"


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train(TEXT)


def tiny_model(vocab: int, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=16)
    model = GPT(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # wider than GPT-2 init, so the distributions are far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.4 if model.config.use_layernorm else 0.15)
    return model


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size)


def test_greedy_is_argmax_and_deterministic(model):
    idx = torch.tensor([[1, 2, 3]])
    s = SamplingSettings(strategy="greedy")
    out = generate_ids(model, idx, 20, s, use_cache=False)
    assert torch.equal(out, generate_ids(model, idx, 20, s, use_cache=False))
    seq = idx
    with torch.no_grad():
        for _ in range(20):  # by hand: argmax of the last position over the last block_size tokens
            nxt = model(seq[:, -16:]).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert torch.equal(out, seq)


def test_seeded_sampling_is_reproducible(model, tok):
    s = SamplingSettings(strategy="sample", temperature=1.5, max_new_tokens=30, seed=7)
    a = generate(model, tok, "abc", s)
    b = generate(model, tok, "abc", s)
    assert a.token_ids == b.token_ids and a.text == b.text
    c = generate(model, tok, "abc", SamplingSettings(strategy="sample", temperature=1.5, max_new_tokens=30, seed=8))
    assert c.token_ids != a.token_ids
    # the low-level entry point with a generator is reproducible too
    idx = torch.tensor([[1, 2]])
    x = generate_ids(model, idx, 15, s, generator=torch.Generator().manual_seed(3))
    y = generate_ids(model, idx, 15, s, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, y)


def test_sampling_with_top_k_1_is_greedy(model, tok):
    greedy = generate(model, tok, "abc", SamplingSettings(strategy="greedy", max_new_tokens=25))
    topk1 = generate(model, tok, "abc", SamplingSettings(strategy="sample", top_k=1, max_new_tokens=25, seed=0))
    assert greedy.token_ids == topk1.token_ids


def test_sampled_tokens_respect_the_filters(model, tok):
    s = SamplingSettings(strategy="sample", top_k=3, max_new_tokens=40, seed=1, temperature=2.0)
    res = generate(model, tok, "ab", s)
    assert all(step.rank <= 3 for step in res.steps)  # the model's rank: temperature keeps the order
    assert all(step.token in [t for t, _ in step.top[:3]] for step in res.steps)
    assert any(step.rank > 1 for step in res.steps)  # it really samples


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(attn_window=3),
        dict(pos_encoding="sinusoidal"),
        dict(pos_encoding="none", norm_position="post"),
        dict(swap_qk=True, use_residual=False),
        dict(use_layernorm=False),
    ],
)
def test_kv_cache_generation_equals_no_cache_past_block_size(tok, kw):
    model = tiny_model(tok.vocab_size, **kw)
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    for strategy in ("greedy", "beam"):
        s = SamplingSettings(strategy=strategy, num_beams=3)
        with_cache = generate_ids(model, idx, 30, s, use_cache=True)  # 35 tokens > block_size 16
        without = generate_ids(model, idx, 30, s, use_cache=False)
        assert with_cache.shape == (1, 35)
        assert torch.equal(with_cache, without)


def test_kv_cache_logits_match_a_full_forward(tok):
    model = tiny_model(tok.vocab_size, attn_window=5)
    seq = torch.randint(0, tok.vocab_size, (2, 30), generator=torch.Generator().manual_seed(5))
    cached = _NextLogits(model, use_cache=True)
    with torch.no_grad():
        for t in range(3, 31):  # grows one token at a time, through and past block_size
            full = model(seq[:, max(0, t - 16) : t]).logits[:, -1]
            torch.testing.assert_close(cached(seq[:, :t]), full, atol=1e-5, rtol=1e-5)


def test_beam_search_with_one_beam_is_greedy(model, tok):
    for rep in (1.0, 1.5):
        greedy = generate(
            model, tok, "abc", SamplingSettings(strategy="greedy", max_new_tokens=20, repetition_penalty=rep)
        )
        beam = generate(
            model, tok, "abc", SamplingSettings(strategy="beam", num_beams=1, max_new_tokens=20, repetition_penalty=rep)
        )
        assert beam.token_ids == greedy.token_ids
        assert beam.text == greedy.text and beam.beams[0][0] == greedy.text


def _logprob_of(model, prompt_ids, new_ids, hidden=()):
    seq = torch.tensor([prompt_ids + new_ids])
    with torch.no_grad():
        logits = model(seq).logits[0]
        logits[:, list(hidden)] = float("-inf")  # tokens the sampler never writes (special tokens)
        logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt_ids) - 1 + k, t].item() for k, t in enumerate(new_ids))


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_scores_are_sorted_and_normalised_log_probs(model, tok, length_penalty):
    n = 6
    res = generate(
        model,
        tok,
        "abc",
        SamplingSettings(strategy="beam", num_beams=4, max_new_tokens=n, length_penalty=length_penalty),
    )
    scores = [s for _, s in res.beams]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert len({text for text, _ in res.beams}) == 4  # distinct beams
    prompt_ids = tok.encode("abc")
    for text, score in res.beams:
        expected = _logprob_of(model, prompt_ids, tok.encode(text), hidden_token_ids(tok)) / n**length_penalty
        assert score == pytest.approx(expected, abs=1e-4)
    assert res.token_ids == tok.encode(res.beams[0][0])
    assert [step.token_id for step in res.steps] == res.token_ids  # the winner's own history
    assert sum(step.logprob for step in res.steps) == pytest.approx(res.beams[0][1] * n**length_penalty, abs=1e-4)


def test_beam_search_finds_the_exact_best_sequences_when_wide_enough():
    # vocab 4, 2 new tokens, 4 beams: step 1 keeps every token, so step 2 ranks all 16 sequences
    model = tiny_model(4, seed=3)
    s = SamplingSettings(strategy="beam", num_beams=4, max_new_tokens=2)
    with torch.no_grad():
        seqs = [[a, b] for a in range(4) for b in range(4)]
        exact = sorted(seqs, key=lambda ab: _logprob_of(model, [1], ab), reverse=True)[0]
    assert generate_ids(model, torch.tensor([[1]]), 2, s)[0, 1:].tolist() == exact


def test_generate_records_steps(model, tok):
    res = generate(model, tok, "abc", SamplingSettings(strategy="greedy", max_new_tokens=12))
    assert len(res.steps) == len(res.token_ids) == 12
    assert res.text == tok.decode(res.token_ids) and res.full_text == "abc" + res.text
    assert res.prompt_ids == tok.encode("abc") and res.beams is None
    for step in res.steps:
        assert step.rank == 1 and step.prob == pytest.approx(math.exp(step.logprob))
        assert step.top[0] == (step.token, pytest.approx(step.prob))
        probs = [p for _, p in step.top]
        assert len(probs) == 10 and probs == sorted(probs, reverse=True)
    assert res.tokens_per_s > 0 and res.elapsed_s > 0


def _model_logprobs(model, ids: list[int], new: list[int], hidden=()) -> list[float]:
    """The model's own log-probability of each new token: the plain softmax at temperature 1, over the
    tokens it may write (``hidden``: the special tokens, which a model that is not a chat model never writes)."""
    out = []
    with torch.no_grad():
        for t in range(len(new)):
            ctx = torch.tensor([(ids + new[:t])[-model.config.block_size :]])
            logits = model(ctx).logits[0, -1]
            logits[list(hidden)] = float("-inf")
            out.append(float(torch.log_softmax(logits, dim=-1)[new[t]]))
    return out


def test_temperature_has_one_upper_bound_for_every_caller(model, tok):
    """Issue 12 item 13: the CLI, generate and the app all refuse the same temperatures, and name the bound."""
    from tinygpt_core.sampling import MAX_TEMPERATURE

    SamplingSettings(temperature=MAX_TEMPERATURE).validate()
    for bad in (MAX_TEMPERATURE * 1.01, 1e6):
        with pytest.raises(ConfigError, match=f"at most {MAX_TEMPERATURE:g}"):
            SamplingSettings(temperature=bad).validate()
        with pytest.raises(ConfigError, match="at most"):
            process_logits(torch.zeros(4), temperature=bad)


def test_greedy_and_top_k_1_report_the_same_model_probabilities(model, tok):
    """Issue 12 item 7: two strategies writing the same text show the same numbers (the model's own)."""
    greedy = generate(model, tok, "abc", SamplingSettings(strategy="greedy", max_new_tokens=12))
    top1 = generate(model, tok, "abc", SamplingSettings(strategy="sample", top_k=1, max_new_tokens=12, seed=5))
    assert top1.token_ids == greedy.token_ids
    assert [s.prob for s in top1.steps] == pytest.approx([s.prob for s in greedy.steps], abs=1e-6)
    assert [s.rank for s in top1.steps] == [s.rank for s in greedy.steps] == [1] * 12
    mean_g = text_stats(greedy.token_ids, [s.logprob for s in greedy.steps])["mean_logprob"]
    mean_1 = text_stats(top1.token_ids, [s.logprob for s in top1.steps])["mean_logprob"]
    assert mean_1 == pytest.approx(mean_g, abs=1e-6) and mean_g < -0.01  # an untrained model is unsure
    own = _model_logprobs(model, tok.encode("abc"), greedy.token_ids, hidden_token_ids(tok))
    assert [s.logprob for s in greedy.steps] == pytest.approx(own, abs=1e-5)
    # What each picked from: top-k 1 and greedy keep one token, so that token had probability 1 there.
    assert [s.filtered_prob for s in top1.steps] == [s.filtered_prob for s in greedy.steps] == [1.0] * 12


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(strategy="sample", top_p=0.6, temperature=0.7, repetition_penalty=1.3),
        SamplingSettings(strategy="beam", num_beams=3, repetition_penalty=1.3),
        SamplingSettings(strategy="greedy", repetition_penalty=1.3),
    ],
    ids=["sample", "beam", "greedy"],
)
def test_steps_report_the_model_probability_and_the_filtered_one(model, tok, settings):
    settings.max_new_tokens, settings.seed = 10, 2 if settings.strategy == "sample" else None
    res = generate(model, tok, "abca", settings)
    model_lp = _model_logprobs(model, tok.encode("abca"), res.token_ids, hidden_token_ids(tok))
    assert [s.logprob for s in res.steps] == pytest.approx(model_lp, abs=1e-5)  # no penalty, filter or temperature
    for step in res.steps:
        assert step.prob == pytest.approx(math.exp(step.logprob))
        assert sum(p for _, p in step.top) <= 1 + 1e-5 and len(step.top) == 10  # the model's top 10 candidates
        assert 0 < step.filtered_prob <= 1
    if settings.strategy == "sample":  # sharpened and cut: the picked tokens were likelier after the filters
        assert any(s.filtered_prob > s.prob + 1e-3 for s in res.steps)


def test_prompts_unknown_symbols_and_empty(model, tok):
    with pytest.raises(TokenizerError, match="never seen"):
        generate(model, tok, "abc€", SamplingSettings(max_new_tokens=3))
    res = generate(model, tok, "", SamplingSettings(strategy="greedy", max_new_tokens=5))
    assert res.prompt_ids == tok.encode("\n") and len(res.token_ids) == 5 and res.full_text == res.text
    no_newline = CharTokenizer.train("xyz")
    m = tiny_model(no_newline.vocab_size)
    assert generate(m, no_newline, "", SamplingSettings(max_new_tokens=2, seed=0)).prompt_ids == [0]


def test_long_prompt_is_cropped_to_the_context(model, tok):
    long = TEXT * 5  # 60 tokens > block_size 16
    res = generate(model, tok, long, SamplingSettings(strategy="greedy", max_new_tokens=3))
    short = generate(model, tok, long[-16:], SamplingSettings(strategy="greedy", max_new_tokens=3))
    assert res.token_ids == short.token_ids


def test_generation_leaves_the_model_mode_alone(tok):
    m = tiny_model(tok.vocab_size, dropout=0.5)
    m.train()
    a = generate(m, tok, "abc", SamplingSettings(strategy="greedy", max_new_tokens=8))
    b = generate(m, tok, "abc", SamplingSettings(strategy="greedy", max_new_tokens=8))
    assert a.token_ids == b.token_ids  # ran in eval mode: no dropout noise
    assert m.training


def test_generation_switches_modes_only_when_a_module_is_training(tok, monkeypatch):
    m = tiny_model(tok.vocab_size, dropout=0.5).eval()
    m.blocks[0].train()  # one submodule left training: dropout there would make decoding random
    a = generate(m, tok, "abc", SamplingSettings(strategy="greedy", max_new_tokens=8))
    b = generate(m, tok, "abc", SamplingSettings(strategy="greedy", max_new_tokens=8))
    assert a.token_ids == b.token_ids
    assert not any(mod.training for mod in m.modules())  # the root was in eval mode: so is all of it now

    def no_switch(*args, **kwargs):  # a model wholly in eval mode (a loaded run's) needs no switching
        raise AssertionError("mode switched")

    monkeypatch.setattr(m, "train", no_switch)
    assert generate(m, tok, "abc", SamplingSettings(strategy="greedy", max_new_tokens=8)).token_ids == a.token_ids


def test_next_token_distribution(model, tok):
    settings = [
        SamplingSettings(strategy="sample", top_k=3),
        SamplingSettings(strategy="sample", top_k=3),
        SamplingSettings(strategy="sample", temperature=0.5, top_p=0.8, min_p=0.1),
        SamplingSettings(strategy="greedy"),
        SamplingSettings(strategy="beam", num_beams=2),
    ]
    d = next_token_distribution(model, tok, "abc", settings)
    V = tok.vocab_size
    assert len(d["tokens"]) == V and d["probs"].shape == (V,)
    assert d["probs"].sum() == pytest.approx(1.0, abs=1e-5)
    labels = list(d["kept"])
    assert labels == [
        "sample T=1 top-k=3",
        "sample T=1 top-k=3 (2)",
        "sample T=0.5 top-p=0.8 min-p=0.1",
        "greedy",
        "beam ×2",
    ]
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("abc")])).logits[0, -1]
    expected = torch.isfinite(process_logits(logits, temperature=0.5, top_p=0.8, min_p=0.1)).numpy()
    assert (d["kept"][labels[2]] == expected).all()
    assert d["kept"][labels[0]].sum() == 3 and d["kept"]["greedy"].sum() == 1 and d["kept"]["beam ×2"].sum() == 2
    assert d["kept"]["greedy"][d["probs"].argmax()]
    for label in labels:
        p = d["processed"][label]
        assert p.sum() == pytest.approx(1.0, abs=1e-5) and (p[~d["kept"][label]] == 0).all()
    named = next_token_distribution(model, tok, "abc", {"mine": SamplingSettings(top_k=2)})
    assert list(named["kept"]) == ["mine"] and not named["cropped"]


def test_text_stats_on_crafted_sequences():
    s = text_stats([1, 2, 3, 4, 1, 2, 3, 4], [-1.0, -2.0, -3.0, -2.0, -1.0, -1.0, -1.0, -1.0])
    assert s["mean_logprob"] == pytest.approx(-1.5)
    assert s["perplexity"] == pytest.approx(math.exp(1.5))
    assert s["distinct_2"] == pytest.approx(4 / 7)  # (1,2) (2,3) (3,4) (4,1) among 7 bigrams
    assert s["repetition"] == pytest.approx(1 / 5)  # 1234 occurs again as the 5th 4-gram
    s = text_stats([5, 6, 7, 8, 9], None)
    assert s["distinct_2"] == 1.0 and s["repetition"] == 0.0 and math.isnan(s["mean_logprob"])
    loop = text_stats([1] * 10, [0.0] * 10)
    assert loop["distinct_2"] == pytest.approx(1 / 9) and loop["repetition"] == pytest.approx(6 / 7)
    short = text_stats([1, 2], [-1.0, -1.0])
    assert math.isnan(short["repetition"]) and short["distinct_2"] == 1.0 and short["n_tokens"] == 2


# --- beam search with back-pointers: the same beams as the old re-indexing search, in linear work --------


def _reference_beam_search(model, idx, max_new_tokens, settings, use_cache):
    """The lab's beam search before back-pointers (re-indexes every beam's whole history each step):
    kept here, verbatim in its logic, as the reference the linear version must match exactly."""
    from tinygpt_core.sampling import TOP_N

    nb = settings.num_beams
    next_logits = _NextLogits(model, use_cache)
    seqs = idx
    scores = torch.zeros(1, device=idx.device)
    hist = []
    for _ in range(max_new_tokens):
        raw = logits = next_logits(seqs)
        if settings.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seqs, settings.repetition_penalty)
        logp = torch.log_softmax(logits, dim=-1)
        V = logp.size(-1)
        total = (scores[:, None] + logp).reshape(-1)
        scores, flat = torch.topk(total, min(nb, total.numel()))
        rows, tokens = flat // V, flat % V
        seqs = torch.cat([seqs[rows], tokens[:, None]], dim=1)
        next_logits.reorder(rows)
        lp = torch.log_softmax(raw[rows], dim=-1)  # StepInfo: the model's own distribution (issue 12)
        chosen = lp.gather(1, tokens[:, None])[:, 0]
        rank = 1 + (lp > chosen[:, None]).sum(dim=1)
        top = torch.topk(lp, min(TOP_N, V), dim=-1)
        filtered = logp[rows].gather(1, tokens[:, None])[:, 0]  # and the penalised one beam scores with
        hist = [[h[rows] for h in step] for step in hist]
        hist.append([tokens, chosen, rank, top.values, top.indices, filtered])
    rows_ = [tuple(h[0] for h in step) for step in hist]
    return seqs, scores / (max_new_tokens**settings.length_penalty), rows_


@pytest.mark.parametrize("num_beams", [1, 2, 5, 12])
@pytest.mark.parametrize("rep", [1.0, 1.4])
@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_with_back_pointers_equals_the_reindexing_search(tok, num_beams, rep, use_cache):
    from tinygpt_core.sampling import _beam_search, _Recorder

    model = tiny_model(tok.vocab_size, seed=3)
    s = SamplingSettings(strategy="beam", num_beams=num_beams, repetition_penalty=rep, length_penalty=0.7)
    # A short prompt, one longer than the context (16), and generation well past the context.
    for prompt in ([1], [4, 2, 7], [i % tok.vocab_size for i in range(1, 21)]):
        idx = torch.tensor([prompt])
        with torch.no_grad():
            recorder = _Recorder()
            seqs, scores = _beam_search(model, idx, 40, s, use_cache, recorder)
            ref_seqs, ref_scores, ref_rows = _reference_beam_search(model, idx, 40, s, use_cache)
        assert torch.equal(seqs, ref_seqs), prompt
        assert torch.equal(scores, ref_scores), prompt
        assert len(recorder.rows) == len(ref_rows) == 40
        for ours, theirs in zip(recorder.rows, ref_rows):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_beam_search_work_per_step_does_not_grow_with_the_tokens_written(tok, monkeypatch):
    """Linear, not quadratic: no step copies a per-beam tensor whose length grows with the tokens written.

    The old search concatenated (beams, prompt + tokens so far) at every step; now each step's
    per-beam tensors are bounded by the context (block_size + 1), and only the final read-back
    through the back-pointers builds the full sequences, once."""
    import tinygpt_core.sampling as sampling

    model = tiny_model(tok.vocab_size, seed=3)  # block_size 16
    s = SamplingSettings(strategy="beam", num_beams=4, repetition_penalty=1.2)
    widths: list[int] = []
    real_cat = torch.cat

    def spying_cat(tensors, *args, **kwargs):
        out = real_cat(tensors, *args, **kwargs)
        if out.dim() == 2 and out.size(0) == 4:  # (beams, tokens)
            widths.append(out.size(1))
        return out

    monkeypatch.setattr(sampling.torch, "cat", spying_cat)
    with torch.no_grad():
        seqs, _ = sampling._beam_search(model, torch.tensor([[1, 2]]), 300, s, True)
    monkeypatch.undo()
    assert seqs.shape == (4, 302)
    assert widths[-1] == 302  # the one final read-back
    assert max(widths[:-1]) <= 16 + 1  # every step: at most the context plus the new token
