"""Safety for a shared server: operator limits (tinygpt_core.limits) honoured by the job runner, the
CLI and the app; a read-only mode for public demos; nothing from a user file runs code; run names,
run ids in URLs and upload file names cannot reach outside the run store.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import conftest
import pytest
import streamlit as st
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from streamlit.testing.v1 import AppTest

from tinygpt_core import jobs, limits, training
from tinygpt_core.cli import main
from tinygpt_core.data import corpus_from_bytes
from tinygpt_core.errors import ConfigError, JobError, RunError
from tinygpt_core.jobs import LocalJobRunner
from tinygpt_core.runs import RunStore, load_run
from tinygpt_core.training import TrainResult, TrainSpec, train

APP = str(Path(__file__).resolve().parent.parent / "app.py")
LIMIT_VARS = list(limits.DEFAULTS)


def tiny_spec(**overrides) -> TrainSpec:
    """tests/conftest.py's tiny spec, shorter and without samples."""
    return conftest.tiny_spec(**{"max_iters": 6, "eval_interval": 3, "sample_tokens": 0, **overrides})


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Every test starts from the defaults, whatever the machine running CI has set."""
    for name in LIMIT_VARS:
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished tiny run, in a store of its own."""
    root = tmp_path_factory.mktemp("safety") / "runs"
    return train(tiny_spec(name="kept"), store=RunStore(root)).run_dir


class Blocking:
    """Stands in for training.train: holds its slot until released, so queueing can be observed."""

    def __init__(self):
        self.release = threading.Event()
        self.started: list[str] = []

    def __call__(self, spec, run_dir=None, *, store=None, callbacks=(), stop_event=None):
        self.started.append(run_dir.name)
        while not self.release.wait(0.01):
            if stop_event is not None and stop_event.is_set():
                return TrainResult("stopped", "Stopped.", run_dir, 0, None, None, None)
        return TrainResult("done", "", run_dir, 1, None, None, None)


# --- the limits module ----------------------------------------------------------------------------


def test_defaults_are_safe_for_a_shared_server():
    lim = limits.current()
    assert lim == limits.Limits(
        max_upload_bytes=10_000_000,
        max_params=50_000_000,
        max_iters=100_000,
        max_jobs_per_device=limits.cpu_cores(),  # one job per core: a grid uses the whole machine
        max_queued_jobs=32,
        read_only=False,
    )


@pytest.mark.parametrize(
    "name,value",
    [
        ("TINYGPT_MAX_PARAMS", "lots"),
        ("TINYGPT_MAX_ITERS", "0"),
        ("TINYGPT_MAX_JOBS_PER_DEVICE", "-1"),
        ("TINYGPT_READ_ONLY", "maybe"),
    ],
)
def test_a_malformed_limit_is_an_error_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        limits.current()


def test_the_job_bound_comes_from_the_environment_and_extra_jobs_queue_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_MAX_JOBS_PER_DEVICE", "2")
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(tmp_path / "runs"))
    fake = Blocking()
    monkeypatch.setattr(training, "train", fake)
    monkeypatch.setenv("TINYGPT_JOB_EXECUTION", "thread")  # the fake trainer lives in this process
    jobs.reset_runner()
    runner = jobs.get_runner()
    try:
        assert runner.max_jobs_per_device == 2
        ids = [runner.submit(tiny_spec(name=f"j{i}")) for i in range(3)]
        snaps = [runner.snapshot(i) for i in ids]
        assert [s.status for s in snaps] == ["running", "running", "queued"]
        assert snaps[2].message == "Queued: 2 jobs ahead on cpu. It starts when one of them finishes."
        assert len(fake.started) == 2
    finally:
        fake.release.set()
        jobs.reset_runner()


def test_the_queue_is_bounded_too(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_MAX_QUEUED_JOBS", "2")
    fake = Blocking()
    monkeypatch.setattr(training, "train", fake)
    store = RunStore(tmp_path / "runs")
    runner = LocalJobRunner(store, max_jobs_per_device=1, execution="thread")  # the fake trainer lives here
    try:
        for i in range(3):  # one running, two waiting
            runner.submit(tiny_spec(name=f"j{i}"))
        with pytest.raises(JobError, match="2 jobs are already waiting"):
            runner.submit(tiny_spec(name="one-too-many"))
        assert len(store.list()) == 3  # the refused one left no folder
    finally:
        fake.release.set()
        runner.shutdown()


@pytest.mark.parametrize(
    "env,overrides,message",
    [
        ({"TINYGPT_MAX_ITERS": "100"}, {"max_iters": 101}, "101 steps is more than this server allows (100"),
        ({"TINYGPT_MAX_PARAMS": "10000"}, {}, "more than this server allows (10,000"),
    ],
    ids=["max_iters", "max_params"],
)
def test_runner_and_cli_refuse_a_run_over_the_limits_before_writing_anything(
    tmp_path, monkeypatch, capsys, env, overrides, message
):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    store = RunStore(tmp_path / "runs")
    runner = LocalJobRunner(store)
    try:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            runner.submit(tiny_spec(**overrides))
    finally:
        runner.shutdown()
    argv = [
        "train",
        "--corpus",
        "builtin:tiny",
        "--runs-dir",
        str(store.root),
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--block-size",
        "16",
        "--max-iters",
        str(overrides.get("max_iters", 6)),
        "--no-progress",
    ]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not store.root.exists() or not any(store.root.iterdir())


def test_a_model_within_the_limits_still_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_MAX_PARAMS", "100000")
    monkeypatch.setenv("TINYGPT_MAX_ITERS", "6")
    runner = LocalJobRunner(RunStore(tmp_path / "runs"))
    try:
        assert runner.wait(runner.submit(tiny_spec()), timeout=120).status == "done"
    finally:
        runner.shutdown()


# --- read-only mode -------------------------------------------------------------------------------


def test_read_only_refuses_training_resuming_and_deleting_in_core_and_cli(trained, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TINYGPT_READ_ONLY", "1")
    store = RunStore(trained.parent)
    before = sorted(p.name for p in trained.iterdir())
    runner = LocalJobRunner(store)
    try:
        with pytest.raises(ConfigError, match="Training is turned off"):
            runner.submit(tiny_spec())
    finally:
        runner.shutdown()
    with pytest.raises(ConfigError, match="Deleting runs is turned off"):
        store.delete(trained.name)
    cases = [
        ["train", "--corpus", "builtin:tiny", "--out", str(tmp_path / "new"), "--max-iters", "2"],
        ["resume", str(trained), "--max-iters", "8"],
        ["runs", "delete", trained.name, "--runs-dir", str(store.root), "--yes"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "read-only mode" in err and "TINYGPT_READ_ONLY" in err, argv
    # Reading still works.
    assert main(["runs", "list", "--runs-dir", str(store.root)]) == 0
    assert trained.name in capsys.readouterr().out
    assert sorted(p.name for p in trained.iterdir()) == before
    assert not (tmp_path / "new").exists()


@pytest.fixture
def app_env(monkeypatch, trained):
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(trained.parent))
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "1")
    jobs.reset_runner()
    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    jobs.reset_runner()
    st.cache_resource.clear()
    st.cache_data.clear()


def _open(page: str | None = None, **query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90)
    for k, v in query.items():
        at.query_params[k] = v
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def _infos(at: AppTest) -> str:
    return "\n".join(str(e.value) for e in at.info)


def test_read_only_app_shows_runs_but_offers_no_training_or_deleting(app_env, monkeypatch, trained):
    monkeypatch.setenv("TINYGPT_READ_ONLY", "1")
    home = _open()
    assert "quick_start" not in {b.key for b in home.button}
    assert "read-only" in _infos(home)
    assert trained.name in "\n".join(m.value for m in home.markdown)  # the runs are still shown

    train_page = _open("app_pages/train.py")
    assert "train_start" not in {b.key for b in train_page.button}
    assert "Training is turned off" in _infos(train_page) and "TINYGPT_READ_ONLY" in _infos(train_page)

    runs_page = _open("app_pages/runs.py")
    assert "Launching ablation grids is turned off" in _infos(runs_page)
    assert not runs_page.get("form")  # no grid form to submit
    assert "runs_delete_confirm" not in {b.key for b in runs_page.button}
    assert runs_page.get("dataframe")  # the table of runs is there

    attention = _open("app_pages/attention.py", run=trained.name)
    assert attention.get("plotly_chart") and not attention.error  # opening a run still works
    assert not jobs.get_runner().list_jobs()


def test_the_app_refuses_settings_over_the_limits_before_start(app_env, monkeypatch):
    monkeypatch.setenv("TINYGPT_MAX_ITERS", "500")
    monkeypatch.setenv("TINYGPT_MAX_PARAMS", "20000")
    at = _open("app_pages/train.py")
    at.number_input(key="train_max_iters").set_value(501).run()
    errors = "\n".join(e.value for e in at.error)
    assert "501 steps is more than this server allows (500" in errors
    assert "parameters, more than this server allows (20,000" in errors  # the tiny preset is ~100k
    assert at.button(key="train_start").disabled
    assert not jobs.get_runner().list_jobs()


def test_the_app_caps_uploads_at_the_operator_limit(app_env, monkeypatch):
    monkeypatch.setenv("TINYGPT_MAX_UPLOAD_MB", "1")
    at = _open("app_pages/train.py")
    at.radio(key="train_source").set_value("Upload a .txt file").run()
    assert "up to 1 MB" in at.file_uploader(key="train_upload").label
    at.file_uploader(key="train_upload").set_value(("big.txt", b"abc " * 300_000, "text/plain")).run()
    assert not at.exception
    assert "uploads are limited to 1,000,000" in "\n".join(e.value for e in at.error)
    assert at.button(key="train_start").disabled


# --- nothing escapes the run store ----------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=hs.one_of(
        hs.text(max_size=80),
        hs.sampled_from(
            [
                "../../etc/passwd",
                "..",
                ".",
                "/",
                "/tmp/x",
                "C:\\Windows\\x",
                "a/../../b",
                "\x00",
                "~root",
                ".hidden",
                "con",
                "%2e%2e%2f",
                "\u2024\u2024/x",
                "..\u2215..\u2215x",
                " ",
                "\ufe30",
            ]
        ),
    )
)
def test_run_names_cannot_escape_the_store(tmp_path, name):
    root = (tmp_path / "runs").resolve()
    path = RunStore(root).create(name).resolve()
    assert path.parent == root and not path.name.startswith(".")
    path.rmdir()


@pytest.mark.parametrize("run_id", ["../..", "../outside", "..%2F..%2Fetc", "/etc", ".", "", "a\x00b"])
def test_run_ids_in_urls_cannot_reach_outside_the_store(app_env, tmp_path, run_id):
    (tmp_path / "outside").mkdir(exist_ok=True)
    for page in ("app_pages/train.py", "app_pages/attention.py", "app_pages/sampling.py", "app_pages/runs.py"):
        at = _open(page, run=run_id)
        assert not at.exception
    with pytest.raises(RunError):
        RunStore(tmp_path / "runs").path(run_id)


@settings(max_examples=150, deadline=None)
@given(name=hs.text(max_size=200))
def test_upload_file_names_become_plain_base_names(name):
    corpus = corpus_from_bytes(name, b"some text to learn from")
    assert corpus.name and "/" not in corpus.name and "\\" not in corpus.name
    assert not corpus.name.startswith(".") and all(c.isprintable() for c in corpus.name)


def test_an_upload_named_like_a_path_writes_only_inside_its_run(tmp_path):
    store = RunStore(tmp_path / "runs")
    corpus = corpus_from_bytes("../../../outside.txt", ("the cat sat on the mat. " * 40).encode())
    run_dir = train(
        TrainSpec(corpus=corpus, model=tiny_spec().model, train=tiny_spec().train, name="../../escape"), store=store
    ).run_dir
    assert run_dir.parent == store.root
    outside = [p for p in tmp_path.rglob("*") if store.root not in p.parents and p != store.root]
    assert outside == []
    assert (run_dir / "corpus.txt").read_text().startswith("the cat")


# --- nothing from a user file runs code ------------------------------------------------------------


TOKENIZER_ATTACKS = {
    "extra key": lambda d: {**d, "__class__": "os.system"},
    "wrong kind": lambda d: {**d, "kind": "pickle"},
    "vocab is code": lambda d: {**d, "vocab": "__import__('os').system('touch pwned')"},
    "not an object": lambda d: ["kind", "char"],
    "NaN constant": None,  # written raw below
    "pickle bytes": None,
}


@pytest.mark.parametrize("attack", list(TOKENIZER_ATTACKS))
def test_a_tokenizer_json_with_unexpected_content_is_refused_with_a_message(trained, tmp_path, capsys, attack):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    original = json.loads((trained / "tokenizer.json").read_text())
    if attack == "NaN constant":
        (run_dir / "tokenizer.json").write_text('{"kind": "char", "version": NaN}')
    elif attack == "pickle bytes":
        import pickle

        (run_dir / "tokenizer.json").write_bytes(pickle.dumps(os.getcwd))
    else:
        (run_dir / "tokenizer.json").write_text(json.dumps(TOKENIZER_ATTACKS[attack](original)))
    with pytest.raises(RunError, match="tokenizer.json is invalid"):
        load_run(run_dir)
    code = main(["generate", str(run_dir), "--prompt", "a", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "tokenizer.json is invalid" in err and "Traceback" not in err
    assert not Path("pwned").exists()


def test_the_cli_applies_only_the_limits_an_operator_has_set(monkeypatch):
    import sys

    assert limits.current(explicit_only=True).max_iters == sys.maxsize  # a terminal user's long run is fine
    assert limits.current().max_iters == 100_000  # the app's default
    monkeypatch.setenv("TINYGPT_MAX_ITERS", "5000")
    assert limits.current(explicit_only=True).max_iters == 5000


@pytest.mark.parametrize(
    "name,value",
    [
        ("TINYGPT_MAX_JOBS_PER_DEVICE", "lots"),
        # The same path with other variables, 11-14 s each: in CI's heavy stage, so the README command stays fast.
        pytest.param("TINYGPT_READ_ONLY", "maybe", marks=pytest.mark.heavy),
        pytest.param("TINYGPT_MAX_UPLOAD_MB", "-3", marks=pytest.mark.heavy),
    ],
)
def test_a_malformed_limit_shows_on_every_page_instead_of_a_traceback(app_env, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    for page in (None, "app_pages/train.py", "app_pages/runs.py", "app_pages/attention.py", "app_pages/sampling.py"):
        at = _open(page)  # asserts no exception
        if page in (None, "app_pages/train.py", "app_pages/runs.py"):  # the pages that train or delete say why not
            assert name in "\n".join(e.value for e in at.error)
            assert "train_start" not in {b.key for b in at.button}
