"""Ablation grids: what specs a grid makes, and the comparison table against the baseline."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tinygpt_core.ablations import (
    ABLATIONS,
    BASELINE,
    ablation_overrides,
    compare_to_baseline,
    grid_specs,
    metrics_summary,
    parse_grid_name,
    with_gap,
)
from tinygpt_core.config import ModelConfig
from tinygpt_core.errors import ConfigError
from tinygpt_core.training import TrainSpec


@pytest.fixture
def base() -> TrainSpec:
    return TrainSpec.from_preset("tiny", "builtin:tiny", max_iters=30, seed=7)


def _model_diff(a: ModelConfig, b: ModelConfig) -> dict:
    da, db = a.to_dict(), b.to_dict()
    return {k: db[k] for k in da if da[k] != db[k]}


def test_grid_is_baseline_then_each_ablation_named_by_grid(base):
    specs = grid_specs(base, ["no-layernorm", "relu", "window-4"], grid_id="abc")
    assert [s.name for s in specs] == [
        "grid-abc/baseline",
        "grid-abc/no-layernorm",
        "grid-abc/relu",
        "grid-abc/window-4",
    ]
    assert [parse_grid_name(s.name) for s in specs] == [
        ("grid-abc", "baseline"),
        ("grid-abc", "no-layernorm"),
        ("grid-abc", "relu"),
        ("grid-abc", "window-4"),
    ]


@pytest.mark.parametrize("label", list(ABLATIONS))
def test_each_ablation_changes_only_its_model_field(base, label):
    baseline, ablated = grid_specs(base, [label], grid_id="g")
    _, overrides = ABLATIONS[label]
    assert baseline.model == base.model
    assert _model_diff(baseline.model, ablated.model) == overrides
    # Same data, tokenizer, training settings and seed: the comparison is fair.
    assert ablated.train == base.train and ablated.train.seed == 7
    assert (ablated.corpus, ablated.tokenizer, ablated.tokenizer_vocab_size, ablated.preset) == (
        base.corpus,
        base.tokenizer,
        base.tokenizer_vocab_size,
        base.preset,
    )


def test_labels_match_the_models_own_ablation_labels():
    # The run table shows ModelConfig.ablations(); a grid label must read the same there
    # (one-head is an architecture size, not a departure ModelConfig labels).
    for label, (_, overrides) in ABLATIONS.items():
        if label == "one-head":
            continue
        assert ModelConfig(**overrides).ablations() == [label]


def test_grid_does_not_share_or_mutate_the_base_spec(base):
    before = dataclasses.asdict(base.model), dataclasses.asdict(base.train), base.name
    specs = grid_specs(base, ["one-head", "untied"], grid_id="g")
    assert (dataclasses.asdict(base.model), dataclasses.asdict(base.train), base.name) == before
    specs[1].train.lr = 0.5  # changing one spec leaves the others alone
    assert specs[0].train.lr == base.train.lr == specs[2].train.lr
    assert specs[1].model is not specs[2].model is not base.model


def test_duplicates_dropped_and_fresh_grid_ids_differ(base):
    specs = grid_specs(base, ["relu", "relu"])
    assert len(specs) == 2
    other = grid_specs(base, ["relu"])
    assert parse_grid_name(specs[0].name)[0] != parse_grid_name(other[0].name)[0]


@pytest.mark.parametrize(
    "ablations, match",
    [
        ([], "at least one"),
        (["no-such-thing"], "Unknown ablation"),
        (["window-32"], "smaller than 32"),  # tiny preset: block_size 32 -> the window sees everything
        (["window-0"], "at least 1"),
    ],
)
def test_bad_grids_are_refused_with_a_clear_message(base, ablations, match):
    with pytest.raises(ConfigError, match=match):
        grid_specs(base, ablations)


def test_an_ablation_equal_to_the_baseline_is_refused():
    sinusoidal = TrainSpec.from_preset("tiny", "builtin:tiny", pos_encoding="sinusoidal")
    with pytest.raises(ConfigError, match="already how the baseline"):
        grid_specs(sinusoidal, ["pos-sinusoidal"])


def test_any_window_size_parses_and_junk_does_not():
    assert ablation_overrides("window-12")[1] == {"attn_window": 12}
    with pytest.raises(ConfigError):
        ablation_overrides("window-x")


def _s(name, val, train=None, best=None, status="done", steps=30):
    return dict(name=name, status=status, steps=steps, final_val_loss=val, final_train_loss=train, best_val_loss=best)


def test_compare_to_baseline_delta_ratio_and_gap():
    df = compare_to_baseline(
        [
            _s("grid-g/relu", 2.4, train=2.0),
            _s("grid-g/baseline", 2.0, train=1.5, best=1.9),
            _s("grid-g/no-residual", 3.0, train=3.1),
        ]
    )
    assert list(df["ablation"]) == [BASELINE, "relu", "no-residual"]
    assert df["delta"].tolist() == pytest.approx([0.0, 0.4, 1.0])
    assert df["ratio"].tolist() == pytest.approx([1.0, 1.2, 1.5])
    assert df["gap"].tolist() == pytest.approx([0.5, 0.4, -0.1])
    assert df.loc[0, "best_val_loss"] == pytest.approx(1.9)


def test_compare_marks_unknowns_as_nan():
    # A queued run has no losses; without a finished baseline nothing has a delta yet.
    df = compare_to_baseline([_s("grid-g/baseline", None, status="running"), _s("grid-g/relu", 2.0)])
    assert math.isnan(df.loc[0, "final_val_loss"]) and math.isnan(df.loc[1, "delta"])
    assert math.isnan(df.loc[1, "ratio"]) and math.isnan(df.loc[1, "gap"])
    empty = compare_to_baseline([])
    assert empty.empty and "delta" in empty.columns


def test_compare_accepts_objects_with_attributes():
    class Summary:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    df = compare_to_baseline([Summary(**_s("grid-g/baseline", 2.0)), Summary(**_s("grid-g/untied", 1.0))])
    assert df["ratio"].tolist() == pytest.approx([1.0, 0.5])


def test_parse_grid_name_ignores_other_runs():
    assert parse_grid_name("quick-start") is None
    assert parse_grid_name(None) is None
    assert parse_grid_name("grid-/x") is None


def test_metrics_summary_and_gap_use_eval_rows_only():
    import pandas as pd

    nan = math.nan
    m = pd.DataFrame(
        {
            "step": [1, 2, 3, 4],
            "loss": [4.0, 3.0, 2.5, 2.0],
            "train_loss": [nan, 3.1, nan, 1.8],
            "val_loss": [nan, 3.0, nan, 2.2],
            "lr": [1e-3] * 4,
            "tokens_per_s": [1.0] * 4,
            "elapsed_s": [0.1, 0.2, 0.3, 0.4],
        }
    )
    s = metrics_summary(m)
    assert s == {"steps": 4, "final_train_loss": 1.8, "final_val_loss": 2.2, "best_val_loss": 2.2, "best_step": 4}
    gap = with_gap(m)["gap"]
    assert gap.iloc[1] == pytest.approx(-0.1) and gap.iloc[3] == pytest.approx(0.4)
    assert gap.isna().tolist() == [True, False, True, False]
    assert "gap" not in m.columns  # the input is left alone
    assert metrics_summary(m.iloc[:0])["steps"] == 0
