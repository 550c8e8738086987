"""Background jobs: they run, report copies of their progress, queue per device, cancel, and fail loudly."""

from __future__ import annotations

import math
import threading
import time

import conftest
import pandas as pd
import pytest
from conftest import wait_until

from tinygpt_core import checkpoints, jobs, training, worker
from tinygpt_core.errors import ConfigError, DataError, JobError
from tinygpt_core.jobs import LocalJobRunner
from tinygpt_core.runs import load_run
from tinygpt_core.training import TrainEvent, TrainResult, TrainSpec

# This module's jobs run 20 steps with evals (and samples) at 10 and 20.
JOB_SETTINGS = dict(max_iters=20, eval_interval=10, eval_iters=2, batch_size=8, sample_tokens=20, warmup_iters=2)


def tiny_spec(**overrides) -> TrainSpec:
    return conftest.tiny_spec(**{**JOB_SETTINGS, **overrides})


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(params=["process", "thread"])
def any_runner(store, request):
    """Real training through each execution backend: a child process (the default) and a thread."""
    r = LocalJobRunner(store, max_jobs_per_device=1, execution=request.param)
    yield r
    r.shutdown()


class FakeTrainer:
    """Stands in for training.train: emits events, then blocks until released (or stopped)."""

    def __init__(self):
        self.calls: list[str] = []  # run ids in the order train() was entered
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, spec, run_dir=None, *, store=None, callbacks=(), stop_event=None):
        with self.lock:
            self.calls.append(run_dir.name)
        events = [
            TrainEvent(
                "start",
                0,
                {
                    "params": 123,
                    "device": "cpu",
                    "precision": "fp32",
                    "max_iters": spec.train.max_iters,
                    "run_dir": str(run_dir),
                },
            )
        ]
        for step in (1, 2):
            events.append(
                TrainEvent(
                    "step", step, {"loss": 4.0 - step, "lr": 1e-3, "tokens_per_s": 100.0, "elapsed_s": 0.1 * step}
                )
            )
        events.append(TrainEvent("eval", 2, {"train_loss": 2.5, "val_loss": 2.6, "best_val_loss": 2.6, "best_step": 2}))
        events.append(TrainEvent("sample", 2, {"text": "hello"}))
        for event in events:
            for cb in callbacks:
                cb(event)
        while not self.release.wait(0.01):
            if stop_event is not None and stop_event.is_set():
                return TrainResult("stopped", "Stopped by the user.", run_dir, 0, None, None, None)
        return TrainResult("done", "", run_dir, spec.train.max_iters, 1.0, 0.9, 1.0)


@pytest.fixture
def fake(monkeypatch) -> FakeTrainer:
    trainer = FakeTrainer()
    monkeypatch.setattr(training, "train", trainer)
    yield trainer
    trainer.release.set()


# --- real training --------------------------------------------------------------------------------


def test_job_runs_to_done_and_reports_metrics_and_samples(any_runner, store):
    runner = any_runner
    job_id = runner.submit(tiny_spec())
    first = runner.snapshot(job_id)
    assert first.run_id is not None and first.run_dir.is_dir()  # known at once, for the page's URL
    assert first.run_dir.parent == store.root

    snap = runner.wait(job_id, timeout=120)
    assert snap.status == "done", snap.message
    assert snap.finished and snap.eta_s is None
    assert snap.step == 20 and snap.max_iters == 20 and snap.params > 0
    steps = [row["step"] for row in snap.metrics]
    assert steps == sorted(steps) and steps[-1] == 20
    evals = [row for row in snap.metrics if not math.isnan(row["val_loss"])]
    assert [row["step"] for row in evals][-1] == 20 and not math.isnan(evals[-1]["train_loss"])
    assert snap.best_val_loss == min(row["val_loss"] for row in evals)
    assert snap.samples and all(isinstance(s["text"], str) and s["text"] for s in snap.samples)
    frame = snap.metrics_frame()
    assert list(frame.columns)[: len(jobs.METRIC_COLUMNS)] == list(jobs.METRIC_COLUMNS)
    assert len(frame) == len(snap.metrics)
    # The run the job wrote opens like any other run.
    run = load_run(snap.run_dir)
    # The in-memory rows are the rows of metrics.csv (written with 7 significant digits).
    # (network health included: the same per-layer columns, live and on disk).
    assert sorted(frame.columns) == sorted(run.metrics.columns)
    pd.testing.assert_frame_equal(frame, run.metrics[list(frame.columns)], check_dtype=False, rtol=1e-5)
    assert runner.find_by_run(snap.run_id).id == job_id


def test_snapshots_are_copies(runner, fake):
    job_id = runner.submit(tiny_spec())
    wait_until(lambda: runner.snapshot(job_id).samples)
    snap = runner.snapshot(job_id)
    assert [(r["step"], r["loss"]) for r in snap.metrics] == [(1, 3.0), (2, 2.0)]
    assert math.isnan(snap.metrics[0]["val_loss"]) and snap.metrics[1]["val_loss"] == 2.6  # eval joins its step
    assert snap.samples == [{"step": 2, "text": "hello"}] and snap.best_val_loss == 2.6
    n_rows, first_loss = len(snap.metrics), snap.metrics[0]["loss"]
    snap.metrics[0]["loss"] = 999.0
    snap.metrics.clear()
    snap.samples[0]["text"] = "changed"
    again = runner.snapshot(job_id)
    assert len(again.metrics) == n_rows and again.metrics[0]["loss"] == first_loss
    assert again.samples[0]["text"] != "changed"
    with pytest.raises(Exception):
        snap.status = "done"  # frozen


def test_cancel_running_job_stops_it_and_saves(any_runner):
    runner = any_runner
    job_id = runner.submit(tiny_spec(max_iters=100_000, eval_interval=50_000))
    wait_until(lambda: runner.snapshot(job_id).step > 2)
    running = runner.snapshot(job_id)
    assert running.status == "running" and running.tokens_per_s and running.eta_s is not None
    runner.cancel(job_id)
    snap = runner.wait(job_id, timeout=30)
    assert snap.status == "stopped"
    assert snap.step < 100_000
    assert checkpoints.can_resume(snap.run_dir)


def test_spec_errors_raise_in_submit_and_leave_nothing_behind(runner, store, tmp_path):
    with pytest.raises(ConfigError, match="divisible"):
        runner.submit(tiny_spec(n_embd=30, n_head=4))
    with pytest.raises(DataError):
        runner.submit(TrainSpec.from_preset("tiny", str(tmp_path / "missing.txt"), device="cpu"))
    assert runner.list_jobs() == []
    assert not store.root.exists() or not any(store.root.iterdir())


# --- scheduling, with a stand-in trainer ------------------------------------------------------------


def test_jobs_beyond_the_bound_queue_fifo_and_start_when_one_ends(runner, fake):
    a = runner.submit(tiny_spec())
    b = runner.submit(tiny_spec())
    c = runner.submit(tiny_spec())
    wait_until(lambda: len(fake.calls) == 1)
    assert runner.snapshot(a).status == "running"
    sb, sc = runner.snapshot(b), runner.snapshot(c)
    assert (sb.status, sb.queue_position) == ("queued", 1)
    assert sb.message == "Queued: 1 job ahead on cpu. It starts when that one finishes."
    assert (sc.status, sc.queue_position) == ("queued", 2)
    assert sc.message.startswith("Queued: 2 jobs ahead on cpu.")
    assert sb.run_id and sb.run_id != runner.snapshot(a).run_id  # run id known while queued

    time.sleep(0.2)
    assert len(fake.calls) == 1  # the bound holds while the first is still running
    fake.release.set()
    assert runner.wait(a, timeout=10).status == "done"
    assert runner.wait(b, timeout=10).status == "done"
    assert runner.wait(c, timeout=10).status == "done"
    assert fake.calls == [runner.snapshot(j).run_id for j in (a, b, c)]  # FIFO


def test_two_slots_per_device_run_two_jobs_at_once(store, fake):
    runner = LocalJobRunner(store, max_jobs_per_device=2, execution="thread")
    try:
        ids = [runner.submit(tiny_spec()) for _ in range(3)]
        wait_until(lambda: len(fake.calls) == 2)
        assert [runner.snapshot(i).status for i in ids] == ["running", "running", "queued"]
        assert runner.snapshot(ids[2]).message.startswith("Queued: 2 jobs ahead on cpu.")
    finally:
        fake.release.set()
        runner.shutdown()


class RecordingExecution(worker.Execution):
    """Records the torch threads each task is given, and blocks until released (no training)."""

    def __init__(self):
        self.threads: list[int | None] = []
        self.release = threading.Event()

    def run(self, task, on_event, stop):
        self.threads.append(task.threads)
        self.release.wait(10)
        return "done", "ok"


def test_a_grid_shares_the_cores_and_a_lone_run_keeps_them(store, monkeypatch):
    monkeypatch.delenv("TINYGPT_NUM_THREADS", raising=False)
    monkeypatch.setattr(worker, "cpu_cores", lambda: 16)
    execution = RecordingExecution()
    runner = LocalJobRunner(store, max_jobs_per_device=4, execution=execution)
    try:
        alone = runner.submit(tiny_spec())
        wait_until(lambda: len(execution.threads) == 1)
        assert execution.threads == [15]  # a run on its own: every core but the server's
        execution.release.set()
        runner.wait(alone, timeout=10)
        execution.release.clear()
        ids = runner.submit_all([tiny_spec(name=f"m{i}") for i in range(6)])
        wait_until(lambda: len(execution.threads) == 5)
        # Four members start together (the slots) and split the 15 cores; the other two wait.
        assert execution.threads[1:] == [4, 4, 4, 4]
        assert [runner.snapshot(i).status for i in ids].count("queued") == 2
    finally:
        execution.release.set()
        runner.shutdown()


def test_cancel_queued_job_removes_it(runner, fake):
    a = runner.submit(tiny_spec())
    b = runner.submit(tiny_spec())
    run_dir_b = runner.snapshot(b).run_dir
    runner.cancel(b)
    snap = runner.snapshot(b)
    assert snap.status == "stopped" and snap.finished and snap.queue_position is None
    assert not run_dir_b.exists()  # the empty folder made at submit is gone
    fake.release.set()
    assert runner.wait(a, timeout=10).status == "done"
    time.sleep(0.1)
    assert len(fake.calls) == 1  # the cancelled job never started


def test_cancel_running_job_sets_its_stop_event(runner, fake):
    a = runner.submit(tiny_spec())
    wait_until(lambda: runner.snapshot(a).status == "running" and fake.calls)
    runner.cancel(a)
    assert runner.wait(a, timeout=10).status == "stopped"


def test_exception_inside_train_ends_job_as_error_and_frees_the_slot(runner, monkeypatch):
    calls = []

    def broken(spec, run_dir=None, **kwargs):
        calls.append(run_dir)
        if len(calls) == 1:
            raise RuntimeError("boom in the loop")
        return TrainResult("done", "", run_dir, 1, None, None, None)

    monkeypatch.setattr(training, "train", broken)
    a = runner.submit(tiny_spec())
    b = runner.submit(tiny_spec())
    snap = runner.wait(a, timeout=10)
    assert snap.status == "error" and "boom in the loop" in snap.message
    assert runner.wait(b, timeout=10).status == "done"


def test_find_by_run_and_unknown_ids(runner, fake):
    a = runner.submit(tiny_spec())
    run_id = runner.snapshot(a).run_id
    assert runner.find_by_run(run_id).id == a
    assert runner.find_by_run("no-such-run") is None
    with pytest.raises(JobError):
        runner.snapshot("nope")
    with pytest.raises(JobError):
        runner.cancel("nope")
    assert [s.id for s in runner.list_jobs()] == [a]


def test_long_histories_are_decimated_but_keep_evals_and_the_latest_step(runner, monkeypatch):
    n = 3 * jobs.MAX_METRIC_ROWS

    def chatty(spec, run_dir=None, *, callbacks=(), **kwargs):
        for step in range(1, n + 1):
            for cb in callbacks:
                cb(TrainEvent("step", step, {"loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0, "elapsed_s": 0.0}))
                if step % 1000 == 0:
                    cb(
                        TrainEvent(
                            "eval", step, {"train_loss": 1.0, "val_loss": 2.0, "best_val_loss": 2.0, "best_step": step}
                        )
                    )
        return TrainResult("done", "", run_dir, n, 2.0, 1.0, 2.0)

    monkeypatch.setattr(training, "train", chatty)
    snap = runner.wait(runner.submit(tiny_spec()), timeout=60)
    assert snap.status == "done"
    assert len(snap.metrics) <= jobs.MAX_METRIC_ROWS
    assert snap.metrics[-1]["step"] == n
    assert [r["step"] for r in snap.metrics if r["val_loss"] == 2.0] == list(range(1000, n + 1, 1000))


def test_only_the_most_recent_finished_jobs_are_kept(runner, monkeypatch):
    monkeypatch.setattr(jobs, "KEEP_FINISHED", 3)
    monkeypatch.setattr(
        training, "train", lambda spec, run_dir=None, **kw: TrainResult("done", "", run_dir, 1, None, None, None)
    )
    ids = [runner.submit(tiny_spec()) for _ in range(5)]
    wait_until(lambda: len(runner.list_jobs()) == 3 and all(s.finished for s in runner.list_jobs()))
    assert [s.id for s in runner.list_jobs()] == ids[:1:-1]  # newest first
    with pytest.raises(JobError):
        runner.snapshot(ids[0])


def test_get_runner_is_a_process_wide_singleton(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(tmp_path))
    jobs.reset_runner()
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(jobs.get_runner())) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r is results[0] for r in results)
        assert results[0].store.root == tmp_path
    finally:
        jobs.reset_runner()
    assert jobs.get_runner() is not results[0]
    jobs.reset_runner()


# --- the numbers a job reports agree with each other -------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _job(max_iters: int) -> jobs._Job:
    from pathlib import Path

    return jobs._Job(
        id="j", seq=0, spec=None, name="n", device="cpu", run_dir=Path("r"), created_at=0.0, max_iters=max_iters
    )


def test_tokens_per_s_and_eta_are_wall_clock_rates_that_include_evals(monkeypatch):
    # 400 steps of 10 ms with an eval of 2 s every 20 steps: the trainer's per-step figure (compute only)
    # is 10x the real rate, and a window of recent steps with or without an eval made the ETA swing.
    clock = Clock()
    monkeypatch.setattr(jobs.time, "monotonic", clock)
    job = _job(400)
    job.status, job.started_at = "running", clock.t
    step_s, eval_s, every, tokens_per_step = 0.01, 2.0, 20, 512
    cycle_s = every * step_s + eval_s
    end_t = clock.t + 400 / every * cycle_s

    def event(kind, step, **data):
        jobs._apply_event(job, TrainEvent(kind, step, data))

    event("start", 0, params=1, device="cpu", max_iters=400, tokens_per_step=tokens_per_step, elapsed_s=0.0)
    ratios = []
    for step in range(1, 401):
        clock.t += step_s
        event("step", step, loss=1.0, lr=1e-3, tokens_per_s=tokens_per_step / step_s, elapsed_s=0.0)
        if step % every == 0:
            clock.t += eval_s
            event("eval", step, train_loss=1.0, val_loss=1.0, best_val_loss=1.0, best_step=step)
        if every < step <= 360:  # from the first eval on, while two or more cycles are left
            ratios.append(jobs._eta(job) / (end_t - clock.t))
            real = tokens_per_step * every / cycle_s
            assert job.tokens_per_s == pytest.approx(real, rel=0.1)  # not 51k: the per-step compute rate
    # Never the swing between "27 s" and "23 min": within 30% of the time really left, all the way.
    assert 0.7 < min(ratios) and max(ratios) < 1.3, (min(ratios), max(ratios))


def test_elapsed_is_the_runs_training_time_including_earlier_sessions(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(jobs.time, "monotonic", clock)
    job = _job(30)
    job.status, job.started_at = "running", clock.t
    jobs._apply_event(job, TrainEvent("start", 20, {"max_iters": 30, "elapsed_s": 6.6}))  # resumed at step 20
    clock.t += 1.0
    assert jobs._elapsed(job) == pytest.approx(7.6)  # not this job's 1 s
    jobs._apply_event(job, TrainEvent("end", 30, {"status": "done", "message": "m", "elapsed_s": 10.6}))
    clock.t += 5.0
    job.status, job.finished_at = "done", clock.t
    assert jobs._elapsed(job) == 10.6


@pytest.mark.slow
def test_a_resumed_runs_time_agrees_with_its_finished_message(runner, store):
    from tinygpt_core import state

    stop = threading.Event()

    def stop_at_4(event):
        if event.kind == "step" and event.step >= 4:
            stop.set()

    first = training.train(tiny_spec(name="resumed"), store=store, callbacks=[stop_at_4], stop_event=stop)
    assert first.status == "stopped"
    snap = runner.wait(runner.resume(first.run_dir.name), timeout=120)
    assert snap.status == "done", snap.message
    said = float(snap.message.split(" in ")[1].split(" s")[0])  # "Finished 20 steps in 10.6 s: …"
    assert snap.elapsed_s == pytest.approx(said, abs=0.05)  # the job's Time, this session and the first
    on_disk = state.run_state(store, None, first.run_dir.name)  # once the job is forgotten (a restart)
    assert on_disk.elapsed_s == pytest.approx(said, abs=0.05)
    assert on_disk.tokens_per_s is not None and on_disk.tokens_per_s > 0
