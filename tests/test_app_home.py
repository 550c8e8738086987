"""Home through AppTest: it renders with the device, Quick start submits a job and opens the Train
page on it, and runs written outside the app (as the CLI does) are listed with links."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from tinygpt_core import device, jobs
from tinygpt_core.device import device_info
from tinygpt_core.runs import RunStore
from tinygpt_core.training import TrainSpec, train

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    runs = tmp_path / "runs"
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(runs))
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # for training done by the test itself, outside the app
    jobs.reset_runner()
    st.cache_resource.clear()
    yield runs
    jobs.reset_runner()
    st.cache_resource.clear()
    torch.set_num_threads(threads)


def text_of(at: AppTest) -> str:
    return "\n".join(str(e.value) for e in [*at.markdown, *at.caption, *at.info])


def test_home_renders_with_the_device_and_no_runs(runs_dir):
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and not at.error
    assert at.title[0].value == "TinyGPT Lab"
    info = device_info()
    assert info.name in text_of(at)
    if info.kind == "cpu":
        # The app set torch's thread count once at start-up, from $TINYGPT_NUM_THREADS (1 here).
        assert "· 1 torch thread\n" in text_of(at)
    assert "No runs yet" in text_of(at)
    # One link per page of the lab.
    pages = {p.proto.page for p in at.get("page_link")}
    assert {"train", "runs", "attention", "sampling", "tokenizers"} <= pages


@pytest.mark.parametrize("env", [None, "2"], ids=["unset", "two"])
def test_the_server_computes_on_one_torch_thread_unless_told_otherwise(runs_dir, monkeypatch, env):
    """Each page run is a new thread, and OpenMP teams of two threads on the same cores wait on each
    other (device.SERVER_THREADS), so the server's default is one thread; $TINYGPT_NUM_THREADS overrides."""
    monkeypatch.setattr(device, "_threads_configured", None)  # a fresh server process
    if env is None:
        monkeypatch.delenv("TINYGPT_NUM_THREADS")
    else:
        monkeypatch.setenv("TINYGPT_NUM_THREADS", env)
    torch.set_num_threads(3)  # not what either case wants: the app must set it
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    want = int(env or 1)
    seen: list[int] = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # as the next page run
    later.start()
    later.join()
    assert seen == [want]
    if device_info().kind == "cpu":
        assert f"· {want} torch thread{'s' if want > 1 else ''}\n" in text_of(at)


def test_quick_start_submits_and_opens_the_train_page(runs_dir):
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.button(key="quick_start").click().run()
    assert not at.exception and not at.error
    job_id, run_id = at.query_params["job"], at.query_params["run"]
    snap = jobs.get_runner().snapshot(job_id)
    assert snap.run_id == run_id and snap.name == "quick-start"
    assert snap.max_iters == 400  # the tiny preset, unchanged
    # We are on the Train page's live view of that run.
    assert at.title[0].value == "quick-start"
    assert "train_stop" in {b.key for b in at.button}
    assert (runs_dir / run_id).is_dir()


def test_recent_runs_lists_a_run_written_outside_the_app(runs_dir):
    spec = TrainSpec.from_preset(
        "tiny", "builtin:tiny", max_iters=10, eval_interval=5, n_layer=1, batch_size=4, name="cli-made"
    )
    result = train(spec, store=RunStore(runs_dir))
    assert result.status == "done"
    run_id = result.run_dir.name

    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and not at.error
    text = text_of(at)
    assert "cli-made" in text and run_id in text
    assert f"{result.best_val_loss:.3f}" in text
    links = [(p.proto.page, p.proto.query_string) for p in at.get("page_link")]
    for page in ("train", "attention", "sampling"):
        assert (page, f"run={run_id}") in links, links
