"""Jobs trained in a child process: events stream back, stop reaches the child, a dead child is an error.

The scheduling itself (queue, bound, cancel while queued) is tested in test_jobs.py with a stand-in
trainer in a thread; here real tiny runs go through ``ProcessExecution``, the runner's default.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tinygpt_core import checkpoints, worker
from tinygpt_core.jobs import LocalJobRunner
from tinygpt_core.runs import RunStore, read_metrics, read_status
from tinygpt_core.training import TrainSpec
from tinygpt_core.worker import ProcessExecution

ROOT = Path(__file__).resolve().parent.parent
PR_SET_CHILD_SUBREAPER = 36


def tiny_spec(corpus: str = "builtin:tiny", **overrides) -> TrainSpec:
    settings = dict(
        max_iters=20,
        eval_interval=10,
        eval_iters=2,
        n_layer=1,
        n_embd=32,
        block_size=16,
        batch_size=8,
        sample_tokens=10,
        device="cpu",
        warmup_iters=2,
    )
    settings.update(overrides)
    return TrainSpec.from_preset("tiny", corpus, **settings)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "1")  # the child's torch threads (a busy 2-core test box)


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(tmp_path / "runs")


@pytest.fixture
def runner(store):
    r = LocalJobRunner(store, max_jobs_per_device=1, execution="process")
    yield r
    r.shutdown()


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def child_pid(run_dir: Path) -> int:
    """The training process's pid, as the child recorded it in status.json."""
    return json.loads((run_dir / "status.json").read_text())["pid"]


def test_the_default_runner_trains_in_a_child_process_and_streams_its_events(runner):
    assert isinstance(runner.execution, ProcessExecution)
    job_id = runner.submit(tiny_spec())
    snap = runner.wait(job_id, timeout=120)
    assert snap.status == "done", snap.message
    assert child_pid(snap.run_dir) != os.getpid()  # the run was written by another process
    assert [r["step"] for r in snap.metrics if r["loss"] == r["loss"]] == list(range(1, 21))  # every step, in order
    assert snap.samples and snap.best_val_loss is not None and snap.params > 0
    assert list(read_metrics(snap.run_dir)["step"]) == list(range(1, 21))


@pytest.mark.heavy  # a process fault, like the kill-restart tests: CI's heavy stage
def test_a_killed_training_process_ends_the_job_as_an_error_that_says_so(runner, store):
    job_id = runner.submit(tiny_spec(max_iters=100_000, eval_interval=50_000))
    wait_until(lambda: runner.snapshot(job_id).step > 2, what="a few steps")
    os.kill(child_pid(runner.snapshot(job_id).run_dir), signal.SIGKILL)
    snap = runner.wait(job_id, timeout=30)
    assert snap.status == "error"
    assert "ended unexpectedly at step" in snap.message and "SIGKILL" in snap.message
    assert read_status(snap.run_dir).status == "error"  # on disk too, not a run stuck at "running"
    # The slot is free again: the next job trains.
    assert runner.wait(runner.submit(tiny_spec()), timeout=120).status == "done"


def test_an_error_before_training_in_the_child_reaches_the_job(runner, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, a small corpus. " * 200, encoding="utf-8")
    first = runner.submit(tiny_spec(max_iters=100_000, eval_interval=50_000))  # holds the only slot
    spec = tiny_spec(str(corpus))
    second = runner.submit(spec)  # validated here, then queued
    spec._prepared = None  # the child must read the file itself ...
    corpus.unlink()  # ... and it is gone by then
    runner.cancel(first)
    snap = runner.wait(second, timeout=120)
    assert snap.status == "error" and "corpus.txt" in snap.message
    assert read_status(snap.run_dir).status == "error"


def test_stop_reaches_the_child_and_resume_continues_in_a_new_one(runner):
    job_id = runner.submit(tiny_spec(max_iters=100_000, eval_interval=50_000))
    wait_until(lambda: runner.snapshot(job_id).step > 3, what="a few steps")
    runner.cancel(job_id)
    stopped = runner.wait(job_id, timeout=30)
    assert stopped.status == "stopped" and checkpoints.can_resume(stopped.run_dir)
    resumed = runner.wait(runner.resume(stopped.run_id, max_iters=stopped.step + 5), timeout=120)
    assert resumed.status == "done", resumed.message
    assert list(read_metrics(resumed.run_dir)["step"]) == list(range(1, stopped.step + 6))


def test_a_warm_spare_process_takes_the_next_job_and_shutdown_ends_it(store):
    execution = ProcessExecution(warm=True)
    runner = LocalJobRunner(store, max_jobs_per_device=1, execution=execution)
    try:
        spare = execution._spare
        assert spare is not None and spare.poll() is None
        snap = runner.wait(runner.submit(tiny_spec(max_iters=5, eval_interval=5)), timeout=120)
        assert snap.status == "done", snap.message
        assert child_pid(snap.run_dir) == spare.pid  # the job ran in the process started ahead of it
        wait_until(lambda: execution._spare is not None, what="a new spare once the job ended")
        new_spare = execution._spare
        assert new_spare.pid != spare.pid
    finally:
        runner.shutdown()
    new_spare.wait(timeout=10)  # killed by shutdown, not left behind


@pytest.mark.heavy  # a process fault, like the kill-restart tests: CI's heavy stage
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses prctl and /proc")
def test_the_training_process_ends_when_its_server_dies(tmp_path):
    """A server killed mid-run takes its jobs with it: the run reads as interrupted and resumable."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from tinygpt_core.jobs import LocalJobRunner
        from tinygpt_core.runs import RunStore
        from tinygpt_core.training import TrainSpec
        runner = LocalJobRunner(RunStore({str(tmp_path / "runs")!r}), execution="process")
        spec = TrainSpec.from_preset("tiny", "builtin:tiny", max_iters=100_000, eval_interval=5, eval_iters=1,
                                     n_layer=1, n_embd=32, block_size=16, batch_size=8, device="cpu")
        job = runner.submit(spec)
        while runner.snapshot(job).step < 12:
            time.sleep(0.05)
        print(runner.snapshot(job).run_dir, flush=True)
        time.sleep(600)
        """
    )
    # Orphans are re-parented to this process (not to a container's pid 1, which may never reap
    # them), so the test can reap the training process once it exits.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            run_dir = Path(server.stdout.readline().strip())
            pid = child_pid(run_dir)
        finally:
            server.kill()
            server.wait(timeout=30)

        def reaped() -> bool:
            try:
                return os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:
                return True

        wait_until(reaped, timeout=30, what="the orphaned training process to exit")
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    status = read_status(run_dir)
    assert status.status == "interrupted" and "resume" in status.message


def test_threads_per_job_leaves_the_server_a_core(monkeypatch):
    monkeypatch.delenv("TINYGPT_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert worker.threads_per_job(1) == max(1, cores - 1)
    assert worker.threads_per_job(64) == 1
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "3")
    assert worker.threads_per_job(1) == 3


def test_jobs_running_together_split_the_cores(monkeypatch):
    monkeypatch.delenv("TINYGPT_NUM_THREADS", raising=False)
    monkeypatch.setattr(worker, "cpu_cores", lambda: 2)
    # The 2-core machine: a run alone and each of two side by side get one thread (no core is idle).
    assert worker.threads_per_job(1) == worker.threads_per_job(2) == 1
    assert worker.grid_plan(6, max_jobs=2) == (2, 1)
    monkeypatch.setattr(worker, "cpu_cores", lambda: 16)
    assert [worker.threads_per_job(n) for n in (1, 2, 3, 16)] == [15, 8, 5, 1]
    assert worker.grid_plan(3, max_jobs=16) == (3, 5)  # never more at once than members


def test_the_step_time_estimate_is_timed_in_a_training_process(runner):
    per_step = runner.estimate_step_time(tiny_spec())
    assert 0 < per_step < 10
    thread_runner = LocalJobRunner(runner.store, execution="thread")
    assert 0 < thread_runner.estimate_step_time(tiny_spec()) < 10
