"""The Runs & ablations page, driven headless with AppTest against a temporary run store."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import conftest
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tinygpt_core import jobs, owners
from tinygpt_core.runs import RunStore, read_config
from tinygpt_core.training import TrainSpec, train

APP = str(Path(__file__).resolve().parent.parent / "app.py")
PAGE = "app_pages/runs.py"


def small_spec(name: str, **overrides) -> TrainSpec:
    """tests/conftest.py's tiny spec: 20 steps, evals (and samples) at 10 and 20."""
    settings = dict(max_iters=20, eval_interval=10, eval_iters=2, batch_size=8, sample_tokens=10, warmup_iters=2)
    return conftest.tiny_spec(name=name, **{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two real, finished runs ("a" and "b" with ReLU), trained once per module and copied per test."""
    root = tmp_path_factory.mktemp("trained")
    store = RunStore(root)
    for name, extra in (("a", {}), ("b", {"activation": "relu"})):
        assert train(small_spec(name, **extra), store=store).status == "done"
    return root


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    """An empty run store for this test; the cached store and the job runner start fresh."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(root))
    st.cache_resource.clear()
    st.cache_data.clear()
    jobs.reset_runner()
    yield root
    jobs.reset_runner()
    st.cache_resource.clear()


@pytest.fixture
def with_runs(runs_dir, trained) -> Path:
    for p in trained.iterdir():
        shutil.copytree(p, runs_dir / p.name)
    broken = runs_dir / "broken-20240101-000000"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    return runs_dir


def open_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page(PAGE).run()
    assert not at.exception, at.exception
    return at


def runs_table(at: AppTest):
    return next(d.value for d in at.dataframe if "params" in d.value.columns)


def run_ids(at: AppTest) -> dict[str, str]:
    df = runs_table(at)
    return dict(zip(df["name"], df["id"]))


def chart_spec(at: AppTest, key_part: str) -> dict:
    for chart in at.get("plotly_chart"):
        if key_part in chart.proto.id:
            return json.loads(chart.proto.spec)
    raise AssertionError(f"no chart with key containing {key_part!r}")


def values(arr) -> list[float]:
    """A plotly trace array: a plain list, or plotly 6+'s typed array {"dtype", "bdata"}."""
    if isinstance(arr, dict) and "bdata" in arr:
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(arr["bdata"]), dtype=arr["dtype"]).tolist()
    return list(arr)


def texts(elements) -> str:
    return " ".join(e.value for e in elements)


def test_empty_store_explains_what_to_do(runs_dir):
    at = open_page()
    assert not at.error
    info = texts(at.info)
    assert "No runs yet" in info and "No grids yet" in info


def test_table_lists_every_run_with_broken_ones_and_their_reason(with_runs):
    at = open_page()
    assert not at.error
    df = runs_table(at)
    assert sorted(df["name"]) == ["a", "b", "broken-20240101-000000"]
    broken = df[df["name"] == "broken-20240101-000000"].iloc[0]
    assert broken["status"] == "broken" and "config.json" in broken["message"]
    a = df[df["name"] == "a"].iloc[0]
    assert a["status"] == "done" and a["steps"] == 20 and a["params"] > 0
    assert a["gap"] == pytest.approx(a["final_val"] - a["final_train"])
    assert df[df["name"] == "b"].iloc[0]["ablations"] == ["relu"]
    # Broken runs cannot be overlaid: only the two good ones are offered.
    assert sorted(at.multiselect(key="runs_overlay").options) == ["a", "b"]


def test_overlay_draws_val_solid_train_dashed_and_the_gap(with_runs):
    at = open_page()
    overlay = at.multiselect(key="runs_overlay")
    ids = run_ids(at)
    overlay.set_value([ids["a"], ids["b"]]).run()
    assert not at.exception and not at.warning
    traces = {t["name"]: t for t in chart_spec(at, "runs_overlay_chart")["data"]}
    assert {"a", "a · train", "b", "b · train"} <= set(traces)
    assert traces["a · train"]["line"]["dash"] == "dash" and traces["a"]["line"]["dash"] == "solid"

    at.segmented_control(key="runs_curve").set_value("gap (val − train)").run()
    assert not at.exception
    gap = {t["name"]: t for t in chart_spec(at, "runs_overlay_chart")["data"]}
    assert set(gap) == {"a", "b"}
    a = runs_table(at).set_index("name").loc["a"]
    assert values(gap["a"]["y"])[-1] == pytest.approx(a["final_val"] - a["final_train"], abs=1e-6)


def _pick_run(at: AppTest, name: str) -> str:
    run_id = run_ids(at)[name]
    at.selectbox(key="runs_manage").set_value(run_id).run()
    return run_id


def _own(at: AppTest, run_dir: Path) -> None:
    """Make this AppTest session the run's owner (issue 11), as if its browser had started it."""
    token = owners.new_token()
    at.session_state["_tinygpt_owner_token"] = token
    owners.write_owner(run_dir, owners.visitor_owner(token))
    at.run()


def test_delete_asks_first_and_removes_the_folder(with_runs):
    at = open_page()
    run_id = _pick_run(at, "a")
    assert (with_runs / run_id).is_dir()
    # Not ours (made outside the app: the machine user's): the delete button is not there at all.
    assert "runs_delete_confirm" not in {b.key for b in at.button}
    _own(at, with_runs / run_id)
    assert any(d.label == "Download .zip" for d in at.get("download_button"))
    at.button(key="runs_delete_confirm").click().run()
    assert not at.exception and not at.error
    assert not (with_runs / run_id).exists()
    assert "Deleted run a" in texts(at.success)
    assert "a" not in set(runs_table(at)["name"])


def test_a_running_run_is_not_deleted(with_runs):
    at = open_page()
    run_id = _pick_run(at, "b")
    _own(at, with_runs / run_id)
    # Pretend this process is training it: a fresh heartbeat from a live pid.
    (with_runs / run_id / "status.json").write_text(
        json.dumps({"status": "running", "message": "", "step": 3, "pid": os.getpid(), "updated_at": time.time()})
    )
    at.button(key="runs_delete_confirm").click().run()
    assert not at.exception
    assert "still training" in texts(at.error)
    assert (with_runs / run_id).is_dir()


def _wait_for_grid(at: AppTest, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert not at.exception, at.exception
        if not any(not j.finished for j in jobs.get_runner().list_jobs()):
            at.run()  # one more run to draw the finished state
            return
        assert time.monotonic() < deadline, "grid did not finish"
        time.sleep(0.5)
        at.run()  # fragments never tick in AppTest: each run() redraws the live view


@pytest.mark.slow
def test_grid_launch_queues_runs_and_compares_them_to_the_baseline(runs_dir, monkeypatch):
    monkeypatch.setenv("TINYGPT_MAX_JOBS_PER_DEVICE", "1")  # the default is one per core; one shows the queue
    at = open_page()
    at.number_input(key="grid_max_iters").set_value(10)
    at.multiselect(key="grid_ablations").set_value(["relu"])
    at.button(key=next(b.key for b in at.button if b.label == "Launch grid")).click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Launched **grid-" in texts(at.success)
    grid_id = at.query_params["grid"][0] if isinstance(at.query_params["grid"], list) else at.query_params["grid"]

    snaps = jobs.get_runner().list_jobs()
    assert sorted(s.name for s in snaps) == [f"{grid_id}/baseline", f"{grid_id}/relu"]
    # One job at a time on the device: the second waits with a message saying so.
    assert any(s.status == "queued" and "Queued" in s.message for s in snaps) or all(s.finished for s in snaps)

    _wait_for_grid(at)
    table = next(d.value for d in at.dataframe if "delta" in d.value.columns)
    assert list(table["ablation"]) == ["baseline", "relu"]
    assert list(table["status"]) == ["done", "done"]
    base, relu = table.iloc[0], table.iloc[1]
    assert base["delta"] == 0 and base["ratio"] == 1
    assert relu["ratio"] == pytest.approx(relu["final_val_loss"] / base["final_val_loss"])
    assert not math.isnan(relu["delta"])
    traces = [t["name"] for t in chart_spec(at, "grid_overlay_chart")["data"]]
    assert "baseline (baseline)" in traces and "relu" in traces
    assert "2 of 2 runs finished" in " ".join(p.proto.text for p in at.get("progress"))

    # Same data and seed on disk; only the activation differs.
    cfgs = {c.name: c for c in (read_config(p) for p in runs_dir.iterdir())}
    b, r = cfgs[f"{grid_id}/baseline"], cfgs[f"{grid_id}/relu"]
    assert b.train == r.train and b.corpus == r.corpus
    assert (b.model.activation, r.model.activation) == ("gelu", "relu")


def test_a_pointless_grid_is_refused_before_anything_is_queued(runs_dir):
    at = open_page()
    at.multiselect(key="grid_ablations").set_value(["window-8"])
    at.number_input(key="grid_window").set_value(64)  # tiny's context is 32: the window would see it all
    at.button(key=next(b.key for b in at.button if b.label == "Launch grid")).click().run()
    assert not at.exception
    assert "smaller than 32" in texts(at.error)
    assert jobs.get_runner().list_jobs() == []
    assert list(runs_dir.iterdir()) == []


def test_grid_form_offers_every_registered_ablation(runs_dir):
    from tinygpt_core.ablation_registry import REGISTRY

    at = open_page()
    shown = at.multiselect(key="grid_ablations").options
    expected = [f"{a.name.replace('{n}', 'N')} ({a.title.lower()})" if a.parametric else a.label() for a in REGISTRY]
    assert shown == expected and "qk-norm" in shown and "no-bias" in shown and "one-head" in shown
    assert at.number_input(key="grid_window").value == REGISTRY.get("window-{n}").value


def test_table_names_grid_members_whole_with_their_grid_and_no_literal_none(with_runs):
    # Run "a" becomes a member of a grid, with a name longer than any column's default width.
    config_path = next(p for p in with_runs.iterdir() if p.name.startswith("a-")) / "config.json"
    config = json.loads(config_path.read_text())
    long_name = "grid-250101-000000-ab12/no-layernorm+pos-none+window-12"
    config_path.write_text(json.dumps({**config, "name": long_name}))
    at = open_page()
    table = next(d for d in at.dataframe if "params" in d.value.columns)
    df = table.value
    assert df.set_index("name").loc[long_name, "grid"] == "grid-250101-000000-ab12"
    assert df.set_index("name")["grid"].drop(long_name).isna().all()  # not in a grid: nothing, shown as "–"
    assert table.proto.placeholder == "–"  # st.dataframe's default would print None in the empty cells
    columns = json.loads(table.proto.columns)
    assert columns["name"]["width"] >= 8 * len(long_name)  # the whole name fits: nothing is cut
    assert columns["grid"]["width"] >= 8 * len("grid-250101-000000-ab12")


def _launch(at: AppTest) -> None:
    at.button(key=next(b.key for b in at.button if b.label == "Launch grid")).click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]


def _query_grid(at: AppTest) -> str:
    value = at.query_params["grid"]
    return value[0] if isinstance(value, list) else value


@pytest.mark.parametrize("field, value, named", [("grid_max_iters", -5, "max_iters"), ("grid_seed", -1, "seed")])
def test_a_grid_number_out_of_range_is_named_and_launches_nothing(runs_dir, field, value, named):
    """Issue 12 item 5 on the grid form: the value typed is the value checked (no widget bound that a browser
    enforces by silently keeping the old value), and Launch says what is wrong."""
    at = open_page()
    at.number_input(key=field).set_value(value)
    at.button(key=next(b.key for b in at.button if b.label == "Launch grid")).click().run()
    assert not at.exception
    assert f"{named} must be a whole number >=" in texts(at.error) and str(value) in texts(at.error)
    assert "grid" not in at.query_params and not jobs.get_runner().list_jobs()


@pytest.mark.slow
def test_a_second_grid_opens_on_the_grid_tab_showing_the_new_grid(runs_dir):
    at = open_page()
    at.number_input(key="grid_max_iters").set_value(10)
    at.multiselect(key="grid_ablations").set_value(["relu"])
    _launch(at)
    first = _query_grid(at)
    assert at.selectbox(key="runs_grid_pick").value == first

    time.sleep(1.1)  # grid ids carry the second they were made in
    at.multiselect(key="grid_ablations").set_value(["no-layernorm"])
    _launch(at)
    second = _query_grid(at)
    assert second != first and f"Launched **{second}**" in texts(at.success)
    assert at.selectbox(key="runs_grid_pick").value == second  # the selector shows the new grid, not the old one
    assert at.session_state["runs_tab"] == "Ablation grid"  # and its tab is the one open
    names = sorted(s.name for s in jobs.get_runner().list_jobs() if s.name.startswith(second))
    assert names == [f"{second}/baseline", f"{second}/no-layernorm"]  # the form's new choice, not the old one

    # Enter in a number input of the grid form changes the value; only the button launches.
    form = next(f for f in at.get("form"))
    assert form.proto.form.enter_to_submit is False


def test_png_download_says_why_it_is_unavailable_instead_of_an_empty_file(with_runs, monkeypatch):
    from tinygpt_core import viz

    monkeypatch.setattr(viz, "_png_unavailable", None)
    monkeypatch.setattr(viz, "_find_browser", lambda: None)  # a server without Chrome/Chromium
    at = open_page()
    ids = run_ids(at)
    at.multiselect(key="runs_overlay").set_value([ids["a"], ids["b"]]).run()
    assert not at.exception
    png = next(d for d in at.get("download_button") if d.proto.label == "Chart as PNG")
    assert png.proto.disabled and png.proto.help == viz.PNG_NO_BROWSER
    assert viz.PNG_NO_BROWSER in texts(at.caption)
    html = next(d for d in at.get("download_button") if d.proto.label == "Chart as HTML")
    assert not html.proto.disabled
