"""Ablations: the registry (every entry builds, changes the forward, grids, has a CLI flag, exports or is
refused), the grids made from it and the comparison table against the baseline.

The registry tests are parametrised over ``REGISTRY``: a new entry is tested here without any edit.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from tinygpt_core import cli
from tinygpt_core.ablation_registry import REGISTRY, Ablation
from tinygpt_core.ablations import (
    BASELINE,
    ablation_overrides,
    compare_to_baseline,
    grid_specs,
    metrics_summary,
    parse_grid_name,
    with_gap,
)
from tinygpt_core.config import ACTIVATIONS, NORM_POSITIONS, POS_ENCODINGS, ModelConfig
from tinygpt_core.errors import ConfigError, ExportError
from tinygpt_core.model import GPT
from tinygpt_core.training import TrainSpec

ENTRIES = pytest.mark.parametrize("a", list(REGISTRY), ids=lambda a: a.name)
V, BLOCK, T = 13, 16, 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine
    yield
    torch.set_num_threads(n)


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


@pytest.mark.parametrize("label", REGISTRY.grid_options())
def test_each_ablation_changes_only_its_model_field(base, label):
    baseline, ablated = grid_specs(base, [label], grid_id="g")
    _, overrides = ablation_overrides(label)
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
    for label in REGISTRY.grid_options():
        a, overrides = REGISTRY.parse(label)
        assert ModelConfig(**overrides).ablations() == ([label] if a.labelled else [])


def test_labels_of_runs_written_before_the_registry_are_unchanged():
    cfg = ModelConfig(
        use_layernorm=False,
        use_residual=False,
        pos_encoding="none",
        norm_position="post",
        swap_qk=True,
        attn_window=5,
        activation="relu",
        tie_weights=False,
        bias=False,
        n_head=1,
    )
    assert cfg.ablations() == [
        "no-layernorm",
        "no-residual",
        "pos-none",
        "post-norm",
        "swap-qk",
        "window-5",
        "relu",
        "untied",
        "no-bias",
    ]
    assert ModelConfig().ablations() == []
    # A config.json written before QK-norm existed has no qk_norm key and still loads, without it.
    old = ModelConfig().to_dict()
    del old["qk_norm"]
    assert ModelConfig.from_dict(old).qk_norm is False


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


# --- every registered ablation ------------------------------------------------------------------------


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16), **kw})


def _scrambled(cfg: ModelConfig, seed: int) -> GPT:
    """Every parameter redrawn (norm gains and biases too), so no part is an identity or zero by accident."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if cfg.use_layernorm else 0.2)
    return model


def _tokens(t: int = T) -> torch.Tensor:
    return torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(1))


@ENTRIES
def test_registered_ablation_builds_and_changes_the_forward(a: Ablation):
    cfg = _cfg(**a.overrides())
    ablated = _scrambled(cfg, seed=0)
    # The baseline architecture with the very same weights wherever the two share a parameter:
    # the difference in logits is the ablation's computation, not different weights.
    baseline = _scrambled(_cfg(), seed=1)
    own = baseline.state_dict()
    shared = {k: v for k, v in ablated.state_dict().items() if k in own and own[k].shape == v.shape}
    baseline.load_state_dict(shared, strict=False)
    idx = _tokens()
    with torch.no_grad():
        fast, slow = ablated(idx), ablated(idx, return_attention=True)
        base = baseline(idx).logits
    assert fast.logits.shape == (2, T, V)
    assert (fast.logits - base).abs().max().item() > 1e-3, f"{a.name} leaves the forward unchanged"
    # The fast (SDPA) path and the inspection path that returns per-head attention agree.
    torch.testing.assert_close(fast.logits, slow.logits, atol=1e-5, rtol=1e-5)
    assert len(slow.attentions) == cfg.n_layer  # none for the bigram model
    for weights in slow.attentions:
        assert weights.shape == (2, cfg.n_head, T, T)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, cfg.n_head, T))


@ENTRIES
def test_registered_ablation_kv_cache_equals_full_forward(a: Ablation):
    model = _scrambled(_cfg(**a.overrides()), seed=2)
    idx = _tokens(BLOCK)
    with torch.no_grad():
        full = model(idx).logits
        out = model(idx[:, :5], use_cache=True)
        pieces, past = [out.logits], out.past_kv
        for t in range(5, BLOCK):
            out = model(idx[:, t : t + 1], past_kv=past, use_cache=True)
            pieces.append(out.logits)
            past = out.past_kv
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@ENTRIES
def test_registered_ablation_can_be_used_in_a_grid(base, a: Ablation):
    assert a.grid and a.label() in REGISTRY.grid_options()
    baseline, ablated = grid_specs(base, [a.label()], grid_id="g")
    assert _model_diff(baseline.model, ablated.model) == a.overrides()
    assert ablated.name == f"grid-g/{a.label()}"
    if a.parametric:  # any n, not only the default
        _, other = grid_specs(base, [a.label(3)], grid_id="g")
        assert _model_diff(baseline.model, other.model) == a.overrides(3) and other.name == f"grid-g/{a.label(3)}"


@ENTRIES
def test_registered_ablation_has_a_cli_flag_that_round_trips(a: Ablation, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert a.flag in capsys.readouterr().out
    parser = cli.build_parser()
    preset = parser.parse_args(["train", "--corpus", "builtin:tiny"])
    args = parser.parse_args(["train", "--corpus", "builtin:tiny", *a.cli_args()])
    assert getattr(args, a.field) == a.overrides()[a.field]
    spec, plain = cli.spec_from_args(args), cli.spec_from_args(preset)
    assert _model_diff(plain.model, spec.model) == a.overrides()
    assert spec.model.ablations() == ([a.label()] if a.labelled else [])


@ENTRIES
def test_registered_ablation_exports_with_matching_logits_or_is_refused(a: Ablation, tmp_path):
    from tinygpt_core.export import check_exportable, export_model, verify_export

    cfg = _cfg(**a.overrides())
    model = _scrambled(cfg, seed=3)
    out = tmp_path / "hf"
    if a.exportable:
        assert check_exportable(cfg) == []
        export_model(model, out)
        assert verify_export(model, out) < 1e-4
    else:
        assert check_exportable(cfg) == [a.refusal(cfg)]
        with pytest.raises(ExportError, match=re.escape(a.refusal(cfg))):
            export_model(model, out)
        assert not out.exists()


@ENTRIES
def test_registered_ablation_toggles_round_trip(a: Ablation):
    cfg = _cfg(**a.overrides())
    state = REGISTRY.toggle_state(cfg)
    back = ModelConfig(**{**cfg.to_dict(), **REGISTRY.toggle_overrides(state)})
    assert back == cfg
    if a.toggle:
        assert state[a.name] == (a.value if a.parametric else True)
        assert not any(REGISTRY.toggle_state(_cfg()).values())  # the baseline: every toggle off
    else:
        assert a.name not in state and a.field not in REGISTRY.toggle_overrides(state)


def test_cli_choices_are_the_configs_own():
    actions = {act.dest: act for act in cli.build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert list(actions["pos_encoding"].choices) == list(POS_ENCODINGS)
    assert list(actions["norm_position"].choices) == list(NORM_POSITIONS)
    assert list(actions["activation"].choices) == list(ACTIVATIONS)


def test_a_declaration_mistake_fails_with_the_entrys_name():
    from tinygpt_core.ablation_registry import Registry

    ok = REGISTRY.get("qk-norm")
    with pytest.raises(ValueError, match="no field"):
        Registry([dataclasses.replace(ok, field="qk_nrom")])
    with pytest.raises(ValueError, match="already the baseline"):
        Registry([dataclasses.replace(ok, value=False)])
    with pytest.raises(ValueError, match="declared twice"):
        Registry([ok, ok])


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    """QK-norm normalises each head's q and k: scaling the q and k projections (weights and biases)
    leaves the output unchanged, while without QK-norm it sharpens attention and changes it."""
    idx = _tokens()
    for qk_norm in (True, False):
        model = _scrambled(_cfg(qk_norm=qk_norm), seed=4)
        with torch.no_grad():
            before = model(idx, return_attention=True)
            for blk in model.blocks:
                C = blk.attn.c_attn.in_features
                blk.attn.c_attn.weight[: 2 * C] *= 10.0
                blk.attn.c_attn.bias[: 2 * C] *= 10.0
            after = model(idx, return_attention=True)
        if qk_norm:
            torch.testing.assert_close(after.logits, before.logits, atol=1e-4, rtol=1e-4)
            assert all(isinstance(b.attn.q_norm, torch.nn.RMSNorm) for b in model.blocks)
        else:
            assert (after.logits - before.logits).abs().max().item() > 1e-2


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
