"""The Inspect page through AppTest (token loss, the difference of two runs, logit lens, head knockout) and
the Train page's network-health block, on two tiny trained runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tinygpt_core import viz
from tinygpt_core.runs import RunStore
from tinygpt_core.training import TrainSpec, train

pytestmark = pytest.mark.slow  # two real (tiny) training runs and a dozen AppTest script runs

APP = str(Path(__file__).resolve().parent.parent / "app.py")
N_LAYER, N_HEAD = 2, 2


def _spec(name: str, seed: int) -> TrainSpec:
    return TrainSpec.from_preset(
        "tiny",
        "builtin:tiny",
        n_layer=N_LAYER,
        n_head=N_HEAD,
        n_embd=32,
        block_size=16,
        batch_size=4,
        max_iters=6,
        eval_interval=2,
        eval_iters=1,
        warmup_iters=1,
        sample_tokens=0,
        device="cpu",
        seed=seed,
        name=name,
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("runs")
    a = train(_spec("base", 1), store=RunStore(root))
    b = train(_spec("other", 2), store=RunStore(root))
    assert a.status == b.status == "done"
    return root, a.run_dir.name, b.run_dir.name


@pytest.fixture
def app(two_runs, monkeypatch):
    root, run_a, _ = two_runs
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(root))
    st.cache_resource.clear()
    st.cache_data.clear()
    yield run_a
    st.cache_resource.clear()
    st.cache_data.clear()


def open_inspect(run_id: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    at.switch_page("app_pages/inspect.py")
    at.query_params["run"] = run_id
    at.run()
    assert not at.exception, at.exception
    return at


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def html_blocks(at: AppTest) -> list[str]:
    return [h.proto.body for h in at.get("html")]


def test_token_loss_colours_the_validation_split_and_compares_two_runs(app):
    at = open_inspect(app)
    assert not at.error
    tokens = [h for h in html_blocks(at) if "tinygpt-tokens" in h]
    assert len(tokens) == 1 and "expected: " in tokens[0] and "first token" in tokens[0]
    labels = [m.label for m in at.metric]
    assert labels[:3] == ["Mean loss", "Perplexity", "Uniform guess"]
    mean = float(at.metric[0].value)
    assert 0 < mean < 2 * float(at.metric[2].value)

    at.selectbox(key="insp_loss_other").select_index(1).run()
    assert not at.exception and not at.error
    blocks = [h for h in html_blocks(at) if "tinygpt-tokens" in h]
    assert len(blocks) == 2 and "other − base" in blocks[1]
    assert [m.label for m in at.metric][3:5] == ["base", "other"]


def test_your_own_text_with_unknown_symbols_is_cleaned_and_scored(app):
    at = open_inspect(app)
    at.radio(key="insp_loss_source").set_value("Your text").run()
    box = next(t for t in at.text_area if t.key.startswith("insp_loss_text_"))
    box.set_value("The light <script>€€ the").run()
    assert not at.exception
    assert any("never seen" in w.value for w in at.warning)  # the char tokenizer lacks € and <
    assert any("tinygpt-tokens" in h and "&lt;script" not in h for h in html_blocks(at))


def test_logit_lens_draws_a_row_per_layer(app):
    at = open_inspect(app)
    at.segmented_control(key="insp_view").set_value("Logit lens").run()
    assert not at.exception and not at.error
    figs = charts(at)
    assert len(figs) == 2
    heat = figs[0]["data"][0]
    assert heat["type"] == "heatmap" and heat["y"] == ["embeddings", "layer 0", "layer 1"]
    assert "Probability of the actual next token" in figs[1]["layout"]["title"]["text"]


def test_head_knockout_grid_set_loss_and_texts(app):
    at = open_inspect(app)
    at.segmented_control(key="insp_view").set_value("Head knockout").run()
    assert not at.exception and not at.error
    grid = charts(at)[0]
    assert grid["data"][0]["type"] == "heatmap" and len(grid["data"][0]["y"]) == N_LAYER
    assert "zero ablation" in grid["layout"]["title"]["text"]
    assert [m.label for m in at.metric][:1] == ["Val loss, every head"]
    assert len(at.code) == 2  # the text with every head and without the chosen ones
    heads = next(m for m in at.multiselect if m.key.startswith("insp_ko_heads_"))
    heads.set_value([(0, 0), (1, 1)]).run()
    at.radio(key="insp_ko_method").set_value("mean").run()
    assert not at.exception and not at.error
    assert "mean ablation" in charts(at)[0]["layout"]["title"]["text"]
    assert "Without L0H0, L1H1 (mean ablation)" in [c.value for c in at.caption]
    heads.set_value([]).run()
    assert any("Pick one or more heads" in i.value for i in at.info)


def test_train_page_plots_network_health_and_names_a_spike(two_runs, monkeypatch):
    root, run_a, _ = two_runs
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(root))
    st.cache_resource.clear()
    path = root / run_a / "metrics.csv"
    original = path.read_text()
    try:
        df = pd.read_csv(path)
        last = df["val_loss"].last_valid_index()
        df.loc[last, "grad_norm_l1"] = 1e4 * df["grad_norm_l1"].median()  # a spike at the last evaluation
        df.to_csv(path, index=False)
        at = AppTest.from_file(APP, default_timeout=90)
        at.run()
        at.switch_page("app_pages/train.py")
        at.query_params["run"] = run_a
        at.run()
        assert not at.exception
        live = [json.loads(c.proto.json) for c in at.get("bidi_component")]
        health = {c["ylabel"]: c for c in live if c.get("ylabel") in viz.HEALTH_TITLES.values()}  # not the boards
        assert set(health) == set(viz.HEALTH_TITLES.values())  # one in-place chart per measure
        assert {t["name"] for t in health["gradient norm"]["series"]} == {"layer 0", "layer 1"}
        assert any(w.value.startswith("Gradient spike in layer 1 at step 6") for w in at.warning)
    finally:
        path.write_text(original)
        st.cache_resource.clear()
