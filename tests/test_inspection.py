"""Inspection: attention maps from the model, and per-head statistics on weights whose answer we know."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinygpt_core.config import ModelConfig
from tinygpt_core.errors import TokenizerError
from tinygpt_core.inspection import (
    AttentionMaps,
    attention_maps,
    head_stats,
    induction_from_weights,
    induction_scores,
    repeated_random_tokens,
)
from tinygpt_core.model import GPT, ModelOutput
from tinygpt_core.tokenizers import CharTokenizer

TEXT = "the cat sat on the mat.\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train(TEXT)


def tiny_model(vocab: int, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, block_size=16, n_layer=2, n_head=3, n_embd=24)
    return GPT(ModelConfig(**{**cfg, **kw})).eval()


ABLATIONS = [
    {},
    dict(attn_window=3),
    dict(pos_encoding="none"),
    dict(pos_encoding="sinusoidal"),
    dict(swap_qk=True),
    dict(norm_position="post"),
    dict(use_layernorm=False),
    dict(use_residual=False),
    dict(norm_position="post", attn_window=2, swap_qk=True, bias=False, tie_weights=False),
]


@pytest.mark.parametrize("kw", ABLATIONS)
def test_attention_maps_shapes_and_rows(tok, kw):
    model = tiny_model(tok.vocab_size, **kw)
    maps = attention_maps(model, tok, "the cat")
    assert isinstance(maps, AttentionMaps) and not maps.cropped
    assert maps.weights.shape == (2, 3, 7, 7) and maps.weights.dtype == np.float32
    assert maps.tokens == list("the cat") and maps.token_ids == tok.encode("the cat")
    np.testing.assert_allclose(maps.weights.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(maps.weights, k=1) == 0)  # causal: no query looks ahead
    if kw.get("attn_window"):
        w = kw["attn_window"]
        i, j = np.indices((7, 7))
        assert np.all(maps.weights[..., i - j >= w] == 0)
    stats = head_stats(maps)
    assert set(stats) == {"entropy", "mean_distance", "prev_token", "first_token"}
    assert all(v.shape == (2, 3) for v in stats.values())


def test_attention_maps_are_the_models_own_weights(tok):
    model = tiny_model(tok.vocab_size)
    maps = attention_maps(model, tok, "the mat")
    with torch.no_grad():
        out = model(torch.tensor([tok.encode("the mat")]), return_attention=True)
    np.testing.assert_allclose(maps.weights[1], out.attentions[1][0].numpy(), atol=1e-7)


def test_long_text_is_cropped_to_the_last_block(tok):
    model = tiny_model(tok.vocab_size)
    long = TEXT * 2  # 48 tokens > block_size 16
    maps = attention_maps(model, tok, long)
    assert maps.cropped and maps.weights.shape[-1] == 16
    assert maps.token_ids == tok.encode(long)[-16:] and "".join(maps.tokens) == long[-16:]
    assert not attention_maps(model, tok, long[:16]).cropped  # exactly block_size fits


def test_bad_text(tok):
    model = tiny_model(tok.vocab_size)
    with pytest.raises(TokenizerError, match="never seen"):
        attention_maps(model, tok, "the dog")  # no 'd', 'g' in the corpus
    with pytest.raises(TokenizerError, match="empty"):
        attention_maps(model, tok, "")


def test_attention_maps_restore_training_mode(tok):
    model = tiny_model(tok.vocab_size, dropout=0.5).train()
    a = attention_maps(model, tok, "the cat").weights
    b = attention_maps(model, tok, "the cat").weights
    np.testing.assert_array_equal(a, b)  # no dropout noise in the maps
    assert model.training


def crafted_weights(T: int = 6) -> np.ndarray:
    """Layer 0: head 0 previous-token, head 1 uniform, head 2 first-token. Layer 1: identity (self)."""
    w = np.zeros((2, 3, T, T))
    for i in range(T):
        w[0, 0, i, max(i - 1, 0)] = 1.0
        w[0, 1, i, : i + 1] = 1.0 / (i + 1)
        w[0, 2, i, 0] = 1.0
        w[1, :, i, i] = 1.0
    return w


def test_head_stats_of_crafted_attention():
    T = 6
    s = head_stats(crafted_weights(T))
    i = np.arange(T)
    # previous-token head: one key per row (entropy 0), one step back except row 0
    assert s["prev_token"][0, 0] == pytest.approx(1.0)
    assert s["entropy"][0, 0] == pytest.approx(0.0)
    assert s["mean_distance"][0, 0] == pytest.approx((T - 1) / T)
    assert s["first_token"][0, 0] == pytest.approx(1 / (T - 1))  # only query 1's previous token is 0
    # uniform head: entropy log(i + 1), distance i / 2, first-token weight 1 / (i + 1)
    assert s["entropy"][0, 1] == pytest.approx(np.mean(np.log(i + 1)), rel=1e-6)
    assert s["mean_distance"][0, 1] == pytest.approx(np.mean(i / 2), rel=1e-6)
    assert s["first_token"][0, 1] == pytest.approx(np.mean(1 / (i[1:] + 1)), rel=1e-6)
    assert s["prev_token"][0, 1] == pytest.approx(np.mean(1 / (i[1:] + 1)), rel=1e-6)
    # first-token head
    assert s["first_token"][0, 2] == pytest.approx(1.0)
    assert s["mean_distance"][0, 2] == pytest.approx(np.mean(i))
    # self-attending heads
    assert np.all(s["prev_token"][1] == 0) and np.all(s["first_token"][1] == 0)
    assert np.all(s["mean_distance"][1] == 0) and np.all(s["entropy"][1] == 0)
    # tensors and AttentionMaps give the same numbers as arrays
    t = head_stats(torch.tensor(crafted_weights(T), dtype=torch.float32))
    m = head_stats(
        AttentionMaps(tokens=list("abcdef"), token_ids=list(range(6)), weights=crafted_weights(T).astype(np.float32))
    )
    for k in s:
        np.testing.assert_allclose(t[k], s[k], rtol=1e-6)
        np.testing.assert_allclose(m[k], s[k], rtol=1e-6)


def test_head_stats_single_token_and_bad_shape():
    s = head_stats(np.ones((1, 2, 1, 1)))
    assert np.all(np.isnan(s["prev_token"])) and np.all(s["entropy"] == 0)
    with pytest.raises(ValueError, match="n_layer, n_head, T, T"):
        head_stats(np.ones((2, 3, 4)))


def test_repeated_random_tokens():
    x = repeated_random_tokens(50, 10, 4, seed=1)
    assert x.shape == (4, 20) and x.dtype == torch.long
    assert torch.equal(x[:, :10], x[:, 10:])
    assert all(len(set(row[:10].tolist())) == 10 for row in x)  # no repeats inside one copy
    assert torch.equal(x, repeated_random_tokens(50, 10, 4, seed=1))
    assert not torch.equal(x, repeated_random_tokens(50, 10, 4, seed=2))
    small = repeated_random_tokens(3, 10, 2, seed=0)  # fewer tokens than positions: repeats allowed
    assert small.max() < 3 and torch.equal(small[:, :10], small[:, 10:])
    shifted = repeated_random_tokens(20, 5, 3, seed=0, low=10)
    assert shifted.min() >= 10 and shifted.max() < 20


def induction_pattern(T: int, S: int) -> np.ndarray:
    """(T, T) attention of a perfect induction head on a repeated sequence of length S."""
    w = np.zeros((T, T))
    for i in range(T):
        if i >= S:
            w[i, i - S + 1] = 1.0
        else:
            w[i, : i + 1] = 1.0 / (i + 1)
    return w


def test_induction_from_constructed_weights():
    S = 5
    w = crafted_weights(2 * S)  # previous-token, uniform, first-token, self heads
    w[1, 1] = induction_pattern(2 * S, S)
    scores = induction_from_weights(w, S)
    assert scores.shape == (2, 3)
    assert scores[1, 1] == pytest.approx(1.0)
    assert scores[0, 0] == 0 and scores[0, 2] == 0 and scores[1, 0] == 0  # other patterns score 0
    q = np.arange(S, 2 * S)
    assert scores[0, 1] == pytest.approx(np.mean(1 / (q + 1)))  # uniform: 1 / (i + 1)
    batched = np.stack([w, crafted_weights(2 * S)])  # (B, L, H, T, T): averaged over the batch
    assert induction_from_weights(batched, S)[1, 1] == pytest.approx(0.5)


class InductionModel(torch.nn.Module):
    """A stand-in model whose layer-1 head-0 attention is a real induction head computed from the
    tokens (attend to the token after the previous occurrence of the current token), and whose
    other heads attend uniformly."""

    def __init__(self, vocab: int = 30, block: int = 64):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=8)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, return_attention=False, **_):
        B, T = idx.shape
        uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
        layers = [uniform.expand(B, 2, T, T).clone() for _ in range(2)]
        for b in range(B):
            for i in range(T):
                earlier = [j for j in range(i) if idx[b, j] == idx[b, i]]
                if earlier:
                    row = torch.zeros(T)
                    row[earlier[-1] + 1] = 1.0
                    layers[1][b, 0, i] = row
        return ModelOutput(logits=torch.zeros(B, T, self.config.vocab_size), attentions=layers)


def test_induction_scores_find_the_induction_head():
    scores = induction_scores(InductionModel(), seq_len=12, batch=3, seed=0)
    assert scores.shape == (2, 2)
    assert scores[1, 0] == pytest.approx(1.0)
    q = np.arange(12, 24)
    np.testing.assert_allclose(np.delete(scores.ravel(), 2), np.mean(1 / (q + 1)), rtol=1e-6)


def test_induction_scores_on_a_real_model_and_small_context():
    model = tiny_model(40, block_size=16, attn_window=4)
    scores = induction_scores(model, seq_len=32, batch=2)  # seq_len is reduced to 8 to fit
    assert scores.shape == (2, 3)
    assert np.all((scores >= 0) & (scores <= 1))
    # a window of 4 cannot reach back seq_len - 1 = 7 positions: an induction score of exactly 0
    assert np.all(scores == 0)
    full = induction_scores(tiny_model(40, block_size=16), seq_len=8, batch=2, vocab_range=(5, 40))
    assert np.all(full > 0)
    with pytest.raises(ValueError, match="vocab_range"):
        induction_scores(model, vocab_range=(10, 50))
