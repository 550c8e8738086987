"""The ladder on the Runs page (AppTest): Launch ladder queues one run per rung, and a ladder grid shows
each rung's val loss and gain in a table and a chart; the Attention page has nothing to show for a
bigram run; Home's overfit demo starts the overfit preset."""

from __future__ import annotations

import json
from pathlib import Path

import conftest
import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from tinygpt_core import jobs
from tinygpt_core.config import PRESETS
from tinygpt_core.ladder import RUNG_NAMES, ladder_specs
from tinygpt_core.runs import RunStore
from tinygpt_core.training import train

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(root))
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    st.cache_resource.clear()
    st.cache_data.clear()
    jobs.reset_runner()
    yield root
    jobs.reset_runner()
    st.cache_resource.clear()
    torch.set_num_threads(threads)


def _page(path: str, **params) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    for k, v in params.items():
        at.query_params[k] = v
    at.switch_page(path).run()
    assert not at.exception, at.exception
    return at


@pytest.mark.heavy  # seven runs trained (tests/test_ladder.py covers the ladder's core in the quick suite)
def test_ladder_grid_shows_each_rungs_val_loss_and_gain(runs_dir):
    store = RunStore(runs_dir)
    base = conftest.tiny_spec(max_iters=2, eval_interval=2, eval_iters=1, batch_size=4, sample_tokens=0)
    for spec in ladder_specs(base, grid_id="lad"):
        assert train(spec, store=store).status == "done"
    at = _page("app_pages/runs.py", grid="grid-lad")
    assert not at.error, [e.value for e in at.error]
    table = next(d.value for d in at.dataframe if "gain" in d.value.columns)
    assert list(table["rung"]) == list(RUNG_NAMES)
    assert table["gain"].isna().tolist() == [True] + [False] * 6
    assert table["gain"].iloc[1] == pytest.approx(table["val_loss"].iloc[0] - table["val_loss"].iloc[1])
    chart = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "ladder_chart" in c.proto.id)
    assert chart["data"][0]["type"] == "bar" and list(chart["data"][0]["x"]) == list(RUNG_NAMES)

    # The bigram rung has no attention: the Attention page says so instead of drawing an empty grid.
    bigram = next(
        p.name for p in runs_dir.iterdir() if json.loads((p / "config.json").read_text())["model"]["n_layer"] == 0
    )
    at = _page("app_pages/attention.py", run=bigram)
    assert not at.exception and not at.error
    assert any("bigram model" in i.value and "nothing to show" in i.value for i in at.info)


def test_launch_ladder_queues_one_run_per_rung(runs_dir):
    at = _page("app_pages/runs.py")
    at.number_input(key="grid_max_iters").set_value(10)
    at.button(key=next(b.key for b in at.button if b.label == "Launch ladder")).click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    runner = jobs.get_runner()
    names = sorted(s.name.split("/", 1)[1] for s in runner.list_jobs())
    for s in runner.list_jobs():
        runner.stop(s.id)  # the page's work is done: the runs themselves are not under test here
    assert names == sorted(RUNG_NAMES)


def test_home_overfit_demo_starts_the_overfit_preset(runs_dir):
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.button(key="quick_overfit").click().run()
    assert not at.exception and not at.error
    runner = jobs.get_runner()
    snap = runner.snapshot(at.query_params["job"])
    runner.stop(snap.id)
    assert snap.name == "overfit"
    assert snap.max_iters == PRESETS["overfit"].train["max_iters"]  # the overfit preset, unchanged
