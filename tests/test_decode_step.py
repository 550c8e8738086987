"""The one-token decode step must compute what the model computes, for every ablation, and step aside
wherever it would not (hooks, training mode, autocast, other dtypes)."""

from __future__ import annotations

import pytest
import torch

from tinygpt_core.ablation_registry import REGISTRY
from tinygpt_core.config import ModelConfig
from tinygpt_core.decode_step import DecodeStep, gelu_rows
from tinygpt_core.hooks import run_with_hooks
from tinygpt_core.model import GPT, KVCache
from tinygpt_core.sampling import SamplingSettings, generate_ids

V, BLOCK = 13, 12


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(**(dict(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16) | overrides))
    model = GPT(cfg).eval()
    with torch.no_grad():  # wider than GPT-2's init, so every part moves the logits visibly
        for p in model.parameters():
            p.normal_(0.0, 0.3 if cfg.use_layernorm and cfg.use_residual else 0.15)
    return model


def count_steps(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, t, c: calls.append(t.numel()) or real(self, t, c))
    return calls


COMBINED = {"everything at once": dict(norm_position="post", qk_norm=True, swap_qk=True, attn_window=3, bias=False)}
CASES = {ab.name: ab.overrides() for ab in REGISTRY} | {"baseline": {}} | COMBINED


@pytest.mark.parametrize("batch", [1, 3], ids=["one sequence", "three"])  # one decoded row is a vector
@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_the_step_gives_the_models_logits_and_cache_for_every_ablation(overrides, batch):
    model = tiny(**overrides)
    step = DecodeStep.for_model(model)
    assert step is not None and step.usable()
    idx = torch.randint(0, V, (batch, BLOCK), generator=torch.Generator().manual_seed(1))
    ours, theirs = KVCache(model.config.n_layer, BLOCK), KVCache(model.config.n_layer, BLOCK)
    # a prompt into the empty cache, a few tokens onto a cached past, then one token at a time
    spans = [(0, 3), (3, 5)] + [(t, t + 1) for t in range(5, BLOCK)]  # past the windows of 3 and 8
    with torch.no_grad():
        for a, b in spans:
            got = step(idx[:, a:b], ours)
            want = model(idx[:, a:b], past_kv=theirs).logits[:, -1]
            assert got.shape == (batch, V) and got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert ours.length == theirs.length == b
        for mine, model_kv in zip(ours.layers, theirs.layers):
            torch.testing.assert_close(list(mine), list(model_kv), atol=1e-6, rtol=1e-6)


def test_one_token_at_a_time_from_an_empty_cache_writes_the_models_cache():
    """A one-token prompt: the first write into the cache is the one-row product's (``LayerKV.row``)."""
    model = tiny(**CASES["everything at once"])
    step = DecodeStep.for_model(model)
    idx = torch.randint(0, V, (1, BLOCK), generator=torch.Generator().manual_seed(2))
    ours, theirs = KVCache(model.config.n_layer, BLOCK), KVCache(model.config.n_layer, BLOCK)
    with torch.no_grad():
        for t in range(BLOCK):
            got, want = step(idx[:, t : t + 1], ours), model(idx[:, t : t + 1], past_kv=theirs).logits[:, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for mine, model_kv in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(list(mine), list(model_kv), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_generation_takes_the_step_and_picks_what_the_model_picks(strategy, monkeypatch):
    model = tiny(seed=2)
    s = SamplingSettings(strategy=strategy, num_beams=3, temperature=1.2, context_slide=4)
    gen = (lambda: torch.Generator().manual_seed(5)) if strategy == "sample" else (lambda: None)
    idx = torch.tensor([[1, 2, 3]])
    calls = count_steps(monkeypatch)
    fast = generate_ids(model, idx, 25, s, generator=gen(), banned_ids=[0])
    assert len(calls) > 15  # most tokens: one per step, slides refill through the model
    assert 0 not in fast[0, 3:].tolist()  # the step's logits take the ban like the model's
    monkeypatch.setattr(DecodeStep, "for_model", classmethod(lambda cls, m: None))
    assert torch.equal(fast, generate_ids(model, idx, 25, s, generator=gen(), banned_ids=[0]))


def test_hooks_send_decoding_through_the_model(monkeypatch):
    """Knockout decodes inside run_with_hooks: the step, which has no hook points, must step aside."""
    model = tiny(seed=3)
    idx, s = torch.tensor([[4, 5]]), SamplingSettings(strategy="greedy")
    plain = generate_ids(model, idx, 8, s)
    calls = count_steps(monkeypatch)
    with run_with_hooks(model, {"blocks.1.hook_resid_post": torch.neg}):
        knocked = generate_ids(model, idx, 8, s)
    assert calls == [] and not torch.equal(plain, knocked)
    with torch.no_grad(), run_with_hooks(model, {"blocks.1.hook_resid_post": torch.neg}):
        by_hand = model(knocked[:, :-1]).logits[0].argmax(-1)
    assert torch.equal(knocked[0, 2:], by_hand[1:])  # each token is the hooked model's greedy choice


def test_generation_after_an_optimizer_step_uses_the_new_weights(monkeypatch):
    """Training samples text between steps, and fused AdamW writes the weights without bumping their
    version counters: the step kept from the generation before must not be reused."""
    model = tiny(seed=4)
    idx, s = torch.tensor([[1, 2, 3]]), SamplingSettings(strategy="greedy")
    generate_ids(model, idx, 9, s)  # a generation before the step, as training's samples do
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    model.train()
    model(idx, idx).loss.backward()
    versions = [p._version for p in model.parameters()]
    opt.step()
    assert [p._version for p in model.parameters()] == versions  # why nothing may be kept
    model.eval()
    step, cache = DecodeStep.for_model(model), KVCache(2, BLOCK)
    with torch.no_grad():
        model(idx[:, :2], past_kv=cache)
        torch.testing.assert_close(step(idx[:, 2:], cache), model(idx).logits[:, -1], atol=1e-5, rtol=1e-5)
    sampled = SamplingSettings(strategy="sample", temperature=2.0)
    after = generate_ids(model, idx, 20, sampled, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(DecodeStep, "for_model", classmethod(lambda cls, m: None))
    assert torch.equal(after, generate_ids(model, idx, 20, sampled, generator=torch.Generator().manual_seed(0)))


def test_the_step_stands_aside_where_it_would_differ():
    model = tiny()
    step = DecodeStep.for_model(model)
    model.train()
    assert not step.usable()
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not step.usable()
    assert step.usable()
    assert DecodeStep.for_model(tiny().to(torch.bfloat16)) is None
    assert DecodeStep.for_model(torch.nn.Linear(2, 2)) is None
    # PyTorch's own module hooks run only where modules are called: generation goes through the model
    for register in (
        lambda: model.lm_head.register_forward_hook(lambda mod, inp, out: -out),
        lambda: model.blocks[1].mlp.register_forward_pre_hook(lambda mod, args: (args[0] * 0,)),
        lambda: torch.nn.modules.module.register_module_forward_hook(lambda mod, inp, out: out),
    ):
        handle = register()
        try:
            assert DecodeStep.for_model(model) is None
        finally:
            handle.remove()
    assert DecodeStep.for_model(model) is not None
    idx = torch.tensor([[1, 2, 3]])
    with model.lm_head.register_forward_hook(lambda mod, inp, out: -out):  # greedy now picks the least likely
        hooked = generate_ids(model, idx, 8, SamplingSettings(strategy="greedy"))
        assert torch.equal(hooked, greedy_by_hand(model, idx, 8))  # every token through the hooked model


@pytest.mark.parametrize("shape", [(512,), (1, 512), (3, 64), (2, 7), (1, 1)])
def test_gelu_rows_is_the_exact_gelu_and_hands_back_contiguous_rows(shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 4
    got = gelu_rows(a)
    torch.testing.assert_close(got, torch.nn.functional.gelu(a), atol=1e-6, rtol=1e-6)
    assert got.shape == a.shape and got.is_contiguous()
    strided = torch.randn(4, 10)[:, ::2]  # a strided input is passed through as it is
    torch.testing.assert_close(gelu_rows(strided), torch.nn.functional.gelu(strided))


def greedy_by_hand(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx[:, -BLOCK:]).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_the_step_is_kept_for_the_next_generation_until_the_weights_change(monkeypatch):
    model = tiny(seed=6)
    idx, s = torch.tensor([[1, 2, 3]]), SamplingSettings(strategy="greedy")
    builds: list[int] = []
    real_init = DecodeStep.__init__
    monkeypatch.setattr(DecodeStep, "__init__", lambda self, m: builds.append(1) or real_init(self, m))
    first = generate_ids(model, idx, 6, s)
    assert torch.equal(generate_ids(model, idx, 6, s), first) and len(builds) == 1  # copies made once
    other = tiny(seed=7)
    changes = {
        "an in-place write": lambda: model.blocks[0].mlp.c_fc.weight.mul_(-1.5),
        "load_state_dict": lambda: model.load_state_dict(other.state_dict()),
        "new storage": lambda: model.to(torch.float64).to(torch.float32),
        "a reassigned parameter": lambda: setattr(
            model.blocks[1].attn.c_proj, "weight", torch.nn.Parameter(-other.blocks[1].attn.c_proj.weight)
        ),
    }
    for name, change in changes.items():
        with torch.no_grad():
            change()
        before = len(builds)
        got = generate_ids(model, idx, 6, s)
        assert len(builds) == before + 1, name
        assert torch.equal(got, greedy_by_hand(model, idx, 6)), name
