"""The bigram model (n_layer 0) and the ladder grid from it to the full transformer."""

from __future__ import annotations

import math

import pytest
import torch

from tinygpt_core.ablation_registry import REGISTRY
from tinygpt_core.ablations import parse_grid_name
from tinygpt_core.config import ModelConfig
from tinygpt_core.errors import ConfigError
from tinygpt_core.ladder import LADDER, LADDER_DROPOUT, RUNG_NAMES, is_ladder, ladder_specs, ladder_table
from tinygpt_core.model import GPT
from tinygpt_core.training import TrainSpec


@pytest.fixture
def base() -> TrainSpec:
    return TrainSpec.from_preset("baby", "builtin:tiny", max_iters=20, seed=5)


def _diff(a: ModelConfig, b: ModelConfig) -> dict:
    da, db = a.to_dict(), b.to_dict()
    return {k: db[k] for k in da if da[k] != db[k]}


def test_bigram_logits_depend_only_on_the_current_token():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=0, n_embd=16, tie_weights=False)).eval()
    assert len(model.blocks) == 0 and not hasattr(model, "wpe")
    idx = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, :-1] = (changed[:, :-1] + 3) % 11  # every earlier token different, the last one kept
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
        table = model.lm_head(model.wte.weight)  # the bigram table: one row of logits per token
    torch.testing.assert_close(a[:, -1], b[:, -1])
    assert (a[:, :-1] - b[:, :-1]).abs().max() > 1e-3
    torch.testing.assert_close(a, table[idx])  # same token at any position: same row


def test_bigram_trains_and_samples_with_the_kv_cache(tmp_path):
    from tinygpt_core import load_run
    from tinygpt_core.sampling import SamplingSettings, generate
    from tinygpt_core.training import train

    spec = TrainSpec.from_preset("tiny", "builtin:tiny", n_layer=0, max_iters=30, eval_interval=30, seed=1)
    result = train(spec, tmp_path / "run")
    assert result.status == "done" and result.final_val_loss < math.log(spec.model.vocab_size or 100)
    run = load_run(tmp_path / "run")
    assert run.config.model.ablations() == ["bigram"]
    out = generate(run.model, run.tokenizer, "The ", SamplingSettings(strategy="greedy", max_new_tokens=5))
    assert out.text


def test_bigram_has_no_attention_to_inspect():
    from tinygpt_core.inspection import no_attention_reason

    assert "bigram" in no_attention_reason(ModelConfig(n_layer=0))
    assert no_attention_reason(ModelConfig()) is None


def test_ladder_members_climb_one_addition_at_a_time(base):
    specs = ladder_specs(base, grid_id="lad")
    assert [parse_grid_name(s.name) for s in specs] == [("grid-lad", r) for r in RUNG_NAMES]
    assert RUNG_NAMES == ("bigram", "one-head", "multi-head", "mlp", "residual", "layernorm", "dropout")
    for spec in specs:  # same data, tokenizer, training settings and seed: a fair comparison
        assert spec.train == base.train and spec.corpus == base.corpus and spec.tokenizer == base.tokenizer
        assert spec.model.tie_weights is False
    # Each rung differs from the one below by exactly what it adds.
    for below, above, rung in zip(specs, specs[1:], LADDER[1:]):
        removed = rung.without()
        assert _diff(above.model, below.model) == removed, rung.name
    # The top rung is the baseline (untied, with dropout); the bottom one is the bigram model.
    assert _diff(base.model, specs[-1].model) == {"tie_weights": False, "dropout": LADDER_DROPOUT}
    # The bigram model has no blocks; below the residual rung one block; then the preset's depth (baby: 4).
    assert [s.model.n_layer for s in specs] == [0, 1, 1, 1, 4, 4, 4]
    assert {r.lifts for r in LADDER if r.lifts} <= {a.name for a in REGISTRY}  # rungs are registry ablations


def test_ladder_keeps_a_baseline_dropout_and_refuses_a_baseline_it_cannot_climb_to(base):
    base.model.dropout = 0.1
    assert ladder_specs(base)[-1].model.dropout == 0.1
    base.model.n_head = 1
    with pytest.raises(ConfigError, match=r"several heads \(n_head >= 2\)"):
        ladder_specs(base)


def test_ladder_table_gains_and_detection():
    rows = [
        {"name": "grid-g/one-head", "status": "done", "steps": 9, "final_val_loss": 2.0, "best_val_loss": 2.0},
        {"name": "grid-g/bigram", "status": "done", "steps": 9, "final_val_loss": 2.5, "best_val_loss": 2.4},
        {"name": "grid-g/multi-head", "status": "queued", "steps": 0, "final_val_loss": None},
    ]
    table = ladder_table(rows)
    assert list(table["rung"]) == ["bigram", "one-head", "multi-head"]  # bottom first, whatever the order given
    assert math.isnan(table["gain"][0]) and table["gain"][1] == pytest.approx(0.5) and math.isnan(table["gain"][2])
    assert is_ladder(["bigram", "one-head"]) and not is_ladder(["baseline", "no-mlp"]) and not is_ladder([])


def test_ladder_figure_has_one_bar_per_evaluated_rung():
    from tinygpt_core.viz import ladder_figure

    rows = [
        {"name": "grid-g/bigram", "final_val_loss": 2.5},
        {"name": "grid-g/one-head", "final_val_loss": 2.1},
        {"name": "grid-g/mlp", "final_val_loss": None},
    ]
    fig = ladder_figure(ladder_table(rows))
    (bar,) = fig.data
    assert list(bar.x) == ["bigram", "one-head"] and list(bar.text) == ["", "+0.400"]
