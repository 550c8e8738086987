"""The Train page through AppTest: a run driven to the end from the widgets, Stop, a reload that
finds the run again, and every error path showing st.error instead of a traceback or a job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from tinygpt_core import jobs, training
from tinygpt_core.runs import RunStore, read_status

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    """A fresh run store and job runner per test; one torch thread (the test machine is small and shared)."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(runs))
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # for training done by the test itself, outside the app
    jobs.reset_runner()
    st.cache_resource.clear()
    yield runs
    jobs.reset_runner()  # stops whatever a test left running
    st.cache_resource.clear()
    torch.set_num_threads(threads)


def open_train(**values) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("app_pages/train.py").run()
    assert not at.exception
    for key, value in values.items():
        at.number_input(key=f"train_{key}").set_value(value)
    at.run()
    return at


def keys(elements) -> set[str]:
    return {e.key for e in elements}


def wait_until_finished(at: AppTest, timeout: float = 60.0) -> None:
    """Poll the page like its fragment timer would (run_every never fires in AppTest)."""
    deadline = time.monotonic() + timeout
    while "train_stop" in keys(at.button):
        assert time.monotonic() < deadline, "the run did not finish in time"
        time.sleep(0.2)
        at.run()
        assert not at.exception


def components(at: AppTest) -> list[dict]:
    """The data every v2 component on the page (live charts, live boards) was given on the last run."""
    return [json.loads(c.proto.json) for c in at.get("bidi_component")]


def live_chart(at: AppTest) -> dict:
    """The data the Train page's live loss chart was given on the last run."""
    (chart,) = [c for c in components(at) if c.get("ylabel", "").startswith("loss")]  # others: network health
    return chart


def status_board(at: AppTest) -> dict:
    """The live board with the run's progress and metric cards: {progress, metrics, facts}."""
    (board,) = [c for c in components(at) if "metrics" in c]
    return board


def samples_board(at: AppTest) -> dict:
    (board,) = [c for c in components(at) if "samples" in c]
    return board


def metric(at: AppTest, label: str) -> str:
    return next(m["value"] for m in status_board(at)["metrics"] if m["label"] == label)


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_train_run_to_the_end_then_reload_from_disk(runs_dir):
    at = open_train(max_iters=60, eval_interval=20)
    assert "tiny" in texts(at.selectbox) or at.selectbox(key="train_preset").value == "tiny"
    at.button(key="train_start").click().run()
    assert not at.exception and not at.error
    run_id, job_id = at.query_params["run"], at.query_params["job"]
    wait_until_finished(at)

    assert "Done" in texts(at.success) and not at.error
    chart = live_chart(at)
    names = [t["name"] for t in chart["series"]]
    assert names == ["batch loss", "train loss", "val loss"], names
    val = chart["series"][2]
    assert val["x"] == [20, 40, 60] and chart["best"]["x"] in val["x"]
    assert chart["best"]["y"] == min(val["y"])
    # Samples at each eval, newest first, with their steps; the run's figures on the board.
    samples = samples_board(at)["samples"]
    assert [s["title"] for s in samples] == ["step 60", "step 40", "step 20"]
    assert all(s["text"] for s in samples)
    board = status_board(at)
    assert board["progress"] is None  # it has ended: the alert says how
    assert metric(at, "Step") == "60" and abs(float(metric(at, "Best val")) - min(val["y"])) < 1e-3
    assert f"run {run_id}" in board["facts"]
    links = {p.proto.page: p.proto.query_string for p in at.get("page_link")}
    for page in ("attention", "sampling", "runs"):
        assert links.get(page) == f"run={run_id}", links

    # The run on disk is complete and finished.
    assert read_status(runs_dir / run_id).status == "done"
    assert jobs.get_runner().snapshot(job_id).status == "done"

    # A reload in a fresh process (no job in its runner) shows the finished run from disk.
    jobs.reset_runner()
    st.cache_resource.clear()
    again = AppTest.from_file(APP, default_timeout=60)
    again.query_params["run"] = run_id
    again.run()
    again.switch_page("app_pages/train.py")
    again.query_params["run"] = run_id
    again.run()
    assert not again.exception and not again.error
    assert "Done" in texts(again.success)
    assert "train_stop" not in keys(again.button)
    assert any(t["name"] == "val loss" for t in live_chart(again)["series"])


def test_stop_and_second_tab_sees_the_live_job(runs_dir):
    at = open_train(max_iters=100_000, eval_interval=50)
    at.button(key="train_start").click().run()
    run_id = at.query_params["run"]
    assert "train_stop" in keys(at.button)

    # A second tab of the same browser (same owner cookie: AppTest has no cookies, so the session's
    # token is copied) that only knows the run id finds the live job and can stop it too.
    other = AppTest.from_file(APP, default_timeout=60)
    other.session_state["_tinygpt_owner_token"] = at.session_state["_tinygpt_owner_token"]
    other.run()
    other.switch_page("app_pages/train.py")
    other.query_params["run"] = run_id
    other.run()
    assert not other.exception
    assert "train_stop" in keys(other.button)
    progress = status_board(other)["progress"]  # running (the runner starts it at once: the slot is free), live
    assert progress is not None and 0 <= progress["fraction"] < 1

    # Another browser sees it live too, but may not stop it (issue 11: runs belong to who started them).
    stranger = AppTest.from_file(APP, default_timeout=60)
    stranger.run()
    stranger.switch_page("app_pages/train.py")
    stranger.query_params["run"] = run_id
    stranger.run()
    assert not stranger.exception and status_board(stranger)["progress"] is not None
    assert "train_stop" not in keys(stranger.button)
    assert any("Only whoever started this run" in c.value for c in stranger.caption)

    at.button(key="train_stop").click().run()
    wait_until_finished(at, timeout=30)
    assert "Stopped" in texts(at.info) and "Stopped. Stopped" not in texts(at.info)  # said once
    assert not at.error
    assert read_status(runs_dir / run_id).status == "stopped"


def test_upload_errors_show_instead_of_starting(runs_dir):
    at = open_train()
    at.radio(key="train_source").set_value("Upload a .txt file").run()
    uploader = at.file_uploader(key="train_upload")

    uploader.set_value(("empty.txt", b"", "text/plain")).run()
    assert not at.exception
    assert "empty" in texts(at.error)
    assert at.button(key="train_start").disabled

    at.file_uploader(key="train_upload").set_value(("weights.txt", b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "text/plain"))
    at.run()
    assert "not UTF-8" in texts(at.error)
    assert at.button(key="train_start").disabled

    at.file_uploader(key="train_upload").set_value(("notes.txt", "héllo wörld ".encode() * 400, "text/plain"))
    at.run()
    assert not at.error
    assert not at.button(key="train_start").disabled
    assert "4,800 characters" in texts(at.caption)
    assert not jobs.get_runner().list_jobs()


def test_invalid_sizes_show_errors_and_start_nothing(runs_dir):
    # n_embd not divisible by n_head: shown as it is typed, and Start is disabled.
    at = open_train(n_head=3)
    assert "divisible" in texts(at.error)
    assert at.button(key="train_start").disabled

    # A context longer than the corpus: only known once the corpus is tokenised, i.e. on Start.
    at = open_train(block_size=4096)
    assert not at.error
    at.button(key="train_start").click().run()
    assert not at.exception
    assert "context" in texts(at.error) and "Cannot start" in texts(at.error)
    assert "run" not in at.query_params
    assert not jobs.get_runner().list_jobs()
    assert not RunStore(runs_dir).list()  # nothing written


def test_diverged_run_shows_the_message(runs_dir, monkeypatch):
    # A learning rate no model survives: the weights overflow after one update and the loss turns NaN.
    monkeypatch.setattr(training, "lr_at", lambda step, cfg: 1e30)
    monkeypatch.setenv("TINYGPT_JOB_EXECUTION", "thread")  # so the patch reaches the training loop
    at = open_train(max_iters=40, eval_interval=10)
    at.button(key="train_start").click().run()
    wait_until_finished(at)
    errors = texts(at.error).replace("\\", "")  # the message is escaped for markdown (":" as "\:")
    assert "Diverged" in errors and "learning rate" in errors
    assert not at.success
    # The message and the Step metric name the same step: the last one applied.
    step = metric(at, "Step").replace(",", "")
    assert f"stopped at step {step}:" in errors or f"at step {step}:" in errors


def test_ablation_toggles_come_from_the_registry_and_reach_the_run(runs_dir):
    from tinygpt_core.ablation_registry import REGISTRY
    from tinygpt_core.runs import read_config

    at = open_train(max_iters=2, eval_interval=2)
    toggles = {t.key: t for t in at.toggle if t.key.startswith("train_abl_")}
    assert set(toggles) == {f"train_abl_{a.key}" for a in REGISTRY.toggles()}
    assert not any(t.value for t in toggles.values())  # tiny is the GPT-2 baseline

    # A preset's ablations show on its toggles (the reverse mapping config -> toggles).
    at.selectbox(key="train_preset").set_value("tinystories").run()
    assert at.toggle(key="train_abl_pos_sinusoidal").value and at.toggle(key="train_abl_window").value
    assert at.number_input(key="train_abl_window_n").value == 256
    at.selectbox(key="train_preset").set_value("tiny").run()
    for key, value in dict(max_iters=2, eval_interval=2).items():
        at.number_input(key=f"train_{key}").set_value(value)
    assert not at.toggle(key="train_abl_window").value

    at.toggle(key="train_abl_qk_norm").set_value(True).run()
    at.toggle(key="train_abl_pos_sinusoidal").set_value(True).run()
    at.toggle(key="train_abl_pos_none").set_value(True).run()
    assert not at.toggle(key="train_abl_pos_sinusoidal").value  # alternatives on one field: one at a time
    at.toggle(key="train_abl_window").set_value(True).run()
    at.number_input(key="train_abl_window_n").set_value(4).run()
    assert not at.exception and not at.error
    at.button(key="train_start").click().run()
    run_id = at.query_params["run"]
    wait_until_finished(at)
    assert read_config(runs_dir / run_id).model.ablations() == ["pos-none", "window-4", "qk-norm"]


def test_estimate_time_is_timed_in_a_training_process_and_says_so(runs_dir):
    at = open_train(max_iters=200)
    at.button(key="train_estimate").click().run()
    assert not at.exception and not at.error
    time_metric = next(m for m in at.metric if m.label == "Time")
    assert time_metric.value.endswith("ms/step")
    assert any("timed in a training process like the run's" in c.value for c in at.caption)


def test_watch_in_the_active_jobs_banner_puts_the_run_in_the_url(runs_dir):
    from conftest import tiny_spec

    runner = jobs.get_runner()
    job_id = runner.submit(tiny_spec(name="watched", max_iters=100_000, eval_interval=1000))
    run_id = runner.state(job_id).run_id
    at = open_train()
    assert "run" not in at.query_params  # the setup view, with the banner
    at.button(key=f"train_watch_{run_id}").click().run()
    assert not at.exception
    assert at.query_params["run"] == run_id and at.query_params["job"] == job_id  # a reload keeps the run
    # The run view (its New run button), not the setup form. The job was started outside this browser, so it
    # shows no Stop button here (only its owner or the operator may stop it).
    assert "train_new" in keys(at.button) and "train_start" not in keys(at.button)
    runner.stop(job_id)


def test_the_setup_form_keeps_its_edits_across_a_visit_to_another_page(runs_dir):
    at = open_train(n_layer=3, n_embd=96, max_iters=123)
    at.toggle(key="train_abl_qk_norm").set_value(True)
    at.radio(key="train_tokenizer").set_value("bpe").run()
    at.number_input(key="train_vocab").set_value(300).run()
    at.text_input(key="train_name").set_value("kept").run()
    at.switch_page("app_pages/runs.py").run()
    assert not at.exception
    at.switch_page("app_pages/train.py").run()
    assert not at.exception
    values = {k: at.number_input(key=f"train_{k}").value for k in ("n_layer", "n_embd", "max_iters", "vocab")}
    assert values == {"n_layer": 3, "n_embd": 96, "max_iters": 123, "vocab": 300}
    assert at.toggle(key="train_abl_qk_norm").value and at.radio(key="train_tokenizer").value == "bpe"
    assert at.text_input(key="train_name").value == "kept"


@pytest.mark.parametrize(
    "field, value, label, allowed",
    [
        ("n_layer", 49, "Layers", "<= 48"),  # 0 is allowed: the bigram model
        ("n_layer", -3, "Layers", "<= 48"),
        ("n_embd", 0, "Width", "<= 4,096"),
        ("max_iters", -1, "Steps (max_iters)", ">= 1"),
        ("block_size", 99999, "Context", "<= 8,192"),
    ],
)
def test_a_number_out_of_range_is_named_with_its_range_and_start_waits(runs_dir, field, value, label, allowed):
    at = open_train(**{field: value})
    assert not at.exception
    errors = texts(at.error)
    assert f"**{label}**" in errors and allowed in errors and str(value) in errors
    assert at.button(key="train_start").disabled  # never trains with the previous value
    assert at.number_input(key=f"train_{field}").value == value  # the value typed reached the server
    help_text = at.number_input(key=f"train_{field}").help
    assert "Allowed:" in help_text  # the range is stated before anything is typed (from the core's ranges)


def test_a_builtin_corpus_missing_here_is_marked_and_explained_before_start(runs_dir, monkeypatch, tmp_path):
    from tinygpt_core import data

    monkeypatch.setattr(data, "_shakespeare_candidates", lambda: [tmp_path / "nowhere.txt"])
    at = open_train()
    box = at.selectbox(key="train_builtin")
    assert box.format_func("shakespeare").endswith("(not downloaded)")
    assert not box.format_func("tiny").endswith("(not downloaded)")
    box.set_value("shakespeare").run()
    assert not at.exception
    assert any("builtin:shakespeare cannot be used" in w.value for w in at.warning)
    assert at.button(key="train_start").disabled
    assert data.builtin_corpus_problem("shakespeare") == str(
        pytest.raises(Exception, data.load_corpus, "builtin:shakespeare").value
    )
