"""The Attention page's step slider through AppTest: scrubbing re-renders the heads at a kept step,
the over-training charts, and a run without a history (slider hidden with the reason)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tests.test_app_attention import array, heatmaps, title
from tinygpt_core.runs import RunStore
from tinygpt_core.training import TrainSpec, train

APP = str(Path(__file__).resolve().parent.parent / "app.py")
SETTINGS = dict(
    n_layer=2,
    n_head=2,
    n_embd=32,
    block_size=16,
    batch_size=4,
    max_iters=8,
    eval_interval=4,
    eval_iters=1,
    warmup_iters=1,
    sample_tokens=0,
    device="cpu",
)


def _train(root: Path, name: str, keep: str) -> str:
    spec = TrainSpec.from_preset("tiny", "builtin:tiny", name=name, keep_checkpoints=keep, **SETTINGS)
    result = train(spec, store=RunStore(root))
    assert result.status == "done", result.message
    return result.run_dir.name


@pytest.fixture(scope="module")
def history_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    _train(root, "history", "log")
    return root


@pytest.fixture
def use_store(monkeypatch):
    def _use(root: Path) -> None:
        monkeypatch.setenv("TINYGPT_RUNS_DIR", str(root))
        st.cache_resource.clear()
        st.cache_data.clear()

    yield _use
    st.cache_resource.clear()
    st.cache_data.clear()


def open_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    at.switch_page("app_pages/attention.py").run()
    assert not at.exception
    return at


def grid_weights(at: AppTest) -> np.ndarray:
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    grid = [f for f in figs if "attention ·" in title(f)][0]
    return array(heatmaps(grid)[0]["z"])


def test_step_slider_scrubs_through_kept_steps(history_store, use_store):
    use_store(history_store)
    at = open_page()
    assert not at.error
    assert len(at.select_slider) == 1
    slider = at.select_slider[0]
    assert slider.options[:5] == ["step 0", "step 1", "step 2", "step 4", "step 8"]
    assert any("Kept 5 checkpoints" in c.value for c in at.caption)
    final = grid_weights(at)
    slider.set_value(0).run()
    assert not at.exception and not at.error
    at_init = grid_weights(at)
    # the initial weights attend almost uniformly; the trained ones do not: the heatmaps were recomputed
    assert not np.allclose(at_init, final, atol=1e-4)
    rows = np.nansum(at_init, axis=1)
    assert np.allclose(rows, 1.0, atol=1e-4)
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    over = [f for f in figs if "over training" in title(f)]
    assert len(over) == 2  # each head's scores over the kept steps, and loss per position × step
    lines = [t for t in over[0]["data"] if t.get("type") == "scatter"]
    assert len(lines) == 2 * 2  # one line per layer and head
    assert array(heatmaps(over[1])[0]["z"]).shape == (5, 16)


def test_run_without_history_hides_the_slider_and_says_why(tmp_path, use_store):
    _train(tmp_path, "no-history", "last")
    use_store(tmp_path)
    at = open_page()
    assert not at.exception and not at.error
    assert not at.get("select_slider")
    assert any("kept only its last checkpoint" in c.value for c in at.caption)
    assert grid_weights(at).size  # the page still shows the heads
