"""The Train page's issue-17 inputs (AppTest): the gpt2 tokenizer choice and the TensorBoard toggle."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from tinygpt_core import jobs

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    runs = tmp_path / "runs"
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(runs))
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    jobs.reset_runner()
    st.cache_resource.clear()
    yield runs
    jobs.reset_runner()
    st.cache_resource.clear()
    torch.set_num_threads(threads)


def _train_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("app_pages/train.py").run()
    assert not at.exception
    return at


def test_gpt2_tokenizer_is_offered_with_its_fixed_vocabulary(runs_dir):
    at = _train_page()
    assert "gpt2" in at.radio(key="train_tokenizer").options
    at.radio(key="train_tokenizer").set_value("gpt2").run()
    assert not at.exception and not at.error
    assert "train_vocab" not in {n.key for n in at.number_input}  # GPT-2's vocabulary is fixed
    assert any("GPT-2's own 50,257-token BPE" in c.value for c in at.caption)


@pytest.mark.heavy  # a real job (tests/test_tensorboard.py reads a CLI run's events back in the quick suite)
def test_tensorboard_toggle_writes_events_into_the_run_folder(runs_dir):
    at = _train_page()
    at.number_input(key="train_max_iters").set_value(10)
    at.number_input(key="train_eval_interval").set_value(5)
    at.toggle(key="train_tensorboard").set_value(True).run()
    at.button(key="train_start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    deadline = time.monotonic() + 120
    while not any(j.finished for j in jobs.get_runner().list_jobs()):
        assert time.monotonic() < deadline, "the run did not finish in time"
        time.sleep(0.3)
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    assert list(run.glob("events.out.tfevents.*"))  # tensorboard --logdir runs/ shows it under its own name
