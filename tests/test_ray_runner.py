"""The Ray runner against a real Ray head on loopback (2 CPUs, started once per session: conftest.ray_head).

Never a mock of Ray: jobs train on real Ray worker processes and ship their run folders back. Each
job asks for one CPU, so two train at once; each runner keeps one warm spare actor (one CPU) while
the cluster has room for one more job besides it, so most jobs here train in a spare's process. Kept
few and short; `-m "not ray"` leaves them out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, ray_missing, tiny_spec, wait_until

from tinygpt_core import checkpoints, state
from tinygpt_core.errors import JobError
from tinygpt_core.runs import load_run, read_metrics, read_status
from tinygpt_core.training import TrainSpec

needs_ray = pytest.mark.skipif(ray_missing() is not None, reason=str(ray_missing()))
LONG = dict(max_iters=20_000, eval_interval=10)  # far more than a test waits for: it is stopped or killed


def _done(runner, job_id, timeout=120):
    snap = runner.wait(job_id, timeout=timeout)
    assert snap.finished, f"job {job_id} did not finish: {snap.status} {snap.message}"
    return snap


def _placement(run_dir: Path) -> dict:
    return json.loads((run_dir / "placement.json").read_text())


# --- without Ray ---------------------------------------------------------------------------------------


def test_nothing_imports_ray_without_tinygpt_runner():
    """The embedded default: the core, the CLI's runner choice and the app's pages never import Ray."""
    code = textwrap.dedent(
        """
        import sys
        from streamlit.testing.v1 import AppTest
        import tinygpt_core.jobs, tinygpt_core.state, tinygpt_core.cli
        runner = tinygpt_core.jobs.get_runner()
        assert type(runner).__name__ == "LocalJobRunner", runner
        AppTest.from_file("app.py", default_timeout=60).run()
        bad = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
        assert not bad, bad
        print("no ray")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TINYGPT_RUNNER", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "no ray" in out.stdout, out.stderr[-2000:]


def test_unknown_runner_is_a_clear_error(monkeypatch):
    from tinygpt_core.errors import ConfigError
    from tinygpt_core.jobs import make_runner

    monkeypatch.setenv("TINYGPT_RUNNER", "slurm")
    with pytest.raises(ConfigError, match="TINYGPT_RUNNER must be one of local, ray"):
        make_runner()


@needs_ray
@pytest.mark.timeout(60)
def test_a_stream_whose_owner_was_replaced_takes_no_message_meant_for_the_new_owner():
    """The app restarts: its old stream on the worker (blocked waiting for the next message) must end
    without taking anything. It once took the first message after the new owner's stream began, the
    whole metrics.csv that a resync ships, and the new owner's copy lost its first rows."""
    import threading

    from tinygpt_core.ray_runner import JobWorker

    worker = JobWorker.__ray_metadata__.modified_class("app", "tinygpt-job-test")  # the class, not an actor
    # As if handed a job: its watchdog would otherwise end this very process as a spare nobody pings.
    worker.thread = threading.current_thread()
    got_old, got_new = [], []
    old = threading.Thread(target=lambda: got_old.extend(worker.stream()), daemon=True)
    old.start()
    time.sleep(0.3)  # the old stream now waits for a message
    new = threading.Thread(target=lambda: got_new.extend(worker.stream(full=True)), daemon=True)
    new.start()
    wait_until(lambda: worker.generation == 2, 10)
    with worker.lock:
        worker._put(("files", ["metrics.csv, whole"]))
        worker._put(("result", "done", "finished"))
    new.join(10)
    old.join(10)
    assert not new.is_alive() and not old.is_alive()
    assert got_old == []  # it ended at once, with nothing
    sent = [msg for batch in got_new for msg in batch if msg[0] != "alive"]
    assert sent == [("files", ["metrics.csv, whole"]), ("result", "done", "finished")]


# --- on a real cluster -----------------------------------------------------------------------------------


@needs_ray
@pytest.mark.ray
def test_unreachable_cluster_is_an_error_not_a_local_run(tmp_path, monkeypatch):
    """RAY_ADDRESS where nothing answers: a JobError naming it at once; the CLI trains nothing locally."""
    import socket

    from tinygpt_core.jobs import make_runner
    from tinygpt_core.runs import RunStore

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    t0 = time.monotonic()
    with pytest.raises(JobError, match=r"Cannot reach the Ray cluster at .*RAY_ADDRESS.*never falls back"):
        make_runner("ray", RunStore(tmp_path / "runs"))
    assert time.monotonic() - t0 < 15

    out = tmp_path / "cli-run"
    env = {**os.environ, "RAY_ADDRESS": dead}
    cmd = [sys.executable, "-m", "tinygpt_core", "train", "--corpus", "builtin:tiny", "--preset", "tiny"]
    cmd += ["--max-iters", "5", "--device", "cpu", "--out", str(out), "--runner", "ray", "--no-progress"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "error: Cannot reach the Ray cluster" in res.stderr
    assert not (out / "metrics.csv").exists()


@needs_ray
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_jobs_train_at_once_and_come_back_as_ordinary_runs(ray_runner, store):
    a = ray_runner.submit(tiny_spec(name="ray-a", **LONG))
    b = ray_runner.submit(tiny_spec(name="ray-b", seed=2, **LONG))
    # Both train at the same moment (one CPU each on a 2-CPU cluster), each on its own worker.
    both = lambda: all(ray_runner.state(j).status == "running" and ray_runner.state(j).step > 0 for j in (a, b))  # noqa: E731
    wait_until(both, 180)
    wait_until(lambda: all(ray_runner.state(j).step >= 25 for j in (a, b)), 120)  # a checkpoint each (step 20)
    for job_id in (a, b):
        ray_runner.stop(job_id)
    pids = set()
    for job_id in (a, b):
        snap = _done(ray_runner, job_id, timeout=90)
        assert snap.status == "stopped", snap.message
        assert snap.step >= 25 and len(snap.metrics) == snap.step and snap.samples
        run = load_run(snap.run_dir)  # the folder in this machine's store opens like a local run
        assert list(run.metrics["step"]) == list(range(1, snap.step + 1))
        assert read_status(snap.run_dir).status == "stopped"
        where = _placement(snap.run_dir)
        assert where["runner"] == "ray" and where["node_id"] and where["pid"] != os.getpid()
        assert where["resources"] == {"CPU": 1.0, "GPU": 0.0}
        pids.add(where["pid"])
    assert len(pids) == 2
    rows = {r.run_id: r for r in state.list_runs(store, ray_runner)}
    assert {rows[ray_runner.state(j).run_id].status for j in (a, b)} == {"stopped"}
    assert all(rows[ray_runner.state(j).run_id].can_resume for j in (a, b))


@needs_ray
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_warm_spare_takes_the_next_job_and_never_holds_the_last_cpu(ray_runner):
    """The pool of warm actors: a spare warms up while the cluster is idle and the next job trains in
    its process; while that job holds one of the 2 CPUs no spare takes the other (a job arriving, this
    app's or another's, finds room); a new spare warms up once the job ends; an idle pool is released."""
    import ray

    wait_until(lambda: ray_runner.spares_ready() == 1, 180, every_s=0.2)
    spare_pid = ray.get(ray_runner._spares[0].actor.placement.remote())["pid"]
    job = ray_runner.submit(tiny_spec(name="ray-warm", **LONG))
    wait_until(lambda: ray_runner.state(job).step > 0, 60)
    assert _placement(ray_runner.state(job).run_dir)["pid"] == spare_pid  # trained in the warm process
    deadline = time.monotonic() + 4  # several turns of the keeper
    while time.monotonic() < deadline:
        assert not ray_runner._spares, "a spare took the cluster's last free CPU"
        assert ray.available_resources().get("CPU", 0) >= 1
        time.sleep(0.2)
    ray_runner.stop(job)
    assert _done(ray_runner, job, timeout=60).status == "stopped"
    wait_until(lambda: ray_runner.spares_ready() == 1, 180, every_s=0.2)  # room again: a new spare
    assert ray.get(ray_runner._spares[0].actor.placement.remote())["pid"] != spare_pid
    ray_runner.spare_idle_s = 0.0  # no job since: the pool is released and its CPU freed
    wait_until(lambda: not ray_runner._spares and ray.available_resources().get("CPU", 0) == 2, 30)


@needs_ray
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stop_saves_a_checkpoint_and_the_run_resumes(ray_runner, store):
    job = ray_runner.submit(tiny_spec(name="ray-stop", **LONG))
    wait_until(lambda: ray_runner.state(job).step >= 15, 120)
    ray_runner.stop(job)
    snap = _done(ray_runner, job, timeout=60)
    assert snap.status == "stopped", snap.message
    run = state.run_state(store, ray_runner, snap.run_id)
    assert run.status == "stopped" and run.can_resume and run.has_weights
    again = ray_runner.resume(snap.run_id, max_iters=snap.step + 10)
    done = _done(ray_runner, again)
    assert done.status == "done" and done.step == snap.step + 10
    assert list(read_metrics(snap.run_dir)["step"]) == list(range(1, snap.step + 11))


@needs_ray
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_worker_leaves_an_interrupted_run_that_resumes(ray_runner, store):
    job = ray_runner.submit(tiny_spec(name="ray-kill", **LONG))
    run_dir = ray_runner.state(job).run_dir
    # Wait until a checkpoint (step 20) has come back to this machine's store.
    wait_until(lambda: checkpoints.can_resume(run_dir) and ray_runner.state(job).step >= 25, 120)
    pid = _placement(run_dir)["pid"]
    os.kill(pid, signal.SIGKILL)  # the Ray worker process training the job
    snap = _done(ray_runner, job, timeout=90)
    assert snap.status == "interrupted", snap.message
    assert "Resume" in snap.message
    run = state.run_state(store, ray_runner, snap.run_id)
    assert run.status == "interrupted" and run.can_resume, run
    from tinygpt_core.runs import load_checkpoint_state

    ckpt_step = int(load_checkpoint_state(run_dir, "last")[2]["step"])
    steps = list(read_metrics(run_dir)["step"])
    assert steps[:ckpt_step] == list(range(1, ckpt_step + 1))  # every metric up to the last checkpoint
    again = ray_runner.resume(snap.run_id, max_iters=ckpt_step + 10)
    done = _done(ray_runner, again)
    assert done.status == "done", done.message
    assert list(read_metrics(run_dir)["step"]) == list(range(1, ckpt_step + 11))
    assert len(_placement(run_dir)["history"]) == 2  # trained twice, by two workers


@needs_ray
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_ablation_grid_runs_through_launch_grid(ray_runner, store):
    launch = state.launch_grid(ray_runner, tiny_spec(max_iters=40, eval_interval=20), ["no-layernorm"])
    assert len(launch.job_ids) == 2 and "Ray cluster" in launch.note
    for job_id in launch.job_ids:
        assert _done(ray_runner, job_id).status == "done"
    states = state.list_runs(store, ray_runner)
    members = state.grid_members(states, launch.grid_id)
    assert len(members) == 2 and all(m.status == "done" and m.has_weights for m in members)


_DRIVER_PID = os.getpid()  # pickled by value with the class below: the worker sees this process's pid


class _RaisesOnTheWorker(TrainSpec):
    """Validates here; raises when the Ray worker (another process) trains it."""

    def validate(self):
        if os.getpid() != _DRIVER_PID:
            raise RuntimeError("boom on the worker")
        return super().validate()


@needs_ray
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_that_raises_on_the_worker_shows_its_error_and_the_runner_serves_on(ray_runner):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker cannot import this test module
    base = tiny_spec(max_iters=10)
    bad = _RaisesOnTheWorker(corpus=base.corpus, model=base.model, train=base.train, name="ray-raises")
    job = ray_runner.submit(bad)
    snap = _done(ray_runner, job)
    assert snap.status == "error" and "RuntimeError: boom on the worker" in snap.message
    assert read_status(snap.run_dir).status == "error"
    ok = ray_runner.submit(tiny_spec(name="ray-after", max_iters=10))
    assert _done(ray_runner, ok).status == "done"


@needs_ray
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_restarted_app_finds_its_jobs_on_the_cluster_again(ray_head, store):
    """The process that submitted dies; a new runner on the same store follows the job to its end."""
    from tinygpt_core.ray_runner import RayJobRunner

    code = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from conftest import tiny_spec
        from tinygpt_core.runs import RunStore
        from tinygpt_core.ray_runner import RayJobRunner
        r = RayJobRunner(RunStore({str(store.root)!r}), address={ray_head!r}, reattach=False)
        job = r.submit(tiny_spec(name="ray-orphan", max_iters=400, eval_interval=50))
        while r.state(job).step < 5:
            time.sleep(0.05)
        print(r.state(job).run_id, flush=True)
        os._exit(0)  # the app dies without a word
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = out.stdout.strip().splitlines()[-1]
    runner = RayJobRunner(store, address=ray_head)  # reattach=True: as an app server starting
    try:
        snap = runner.find_by_run(run_id)
        assert snap is not None, "the job was not found again"
        done = _done(runner, snap.id)
        assert done.status == "done" and done.step == 400, done.message
        assert list(read_metrics(store.path(run_id))["step"]) == list(range(1, 401))
        assert state.run_state(store, runner, run_id).status == "done"
    finally:
        runner.shutdown()


@needs_ray
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_trains_on_ray_and_ctrl_c_stops_the_job_on_the_cluster(ray_head, tmp_path):
    out = tmp_path / "cli-ray"
    env = {**os.environ, "RAY_ADDRESS": ray_head, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tinygpt_core", "train", "--corpus", "builtin:tiny", "--preset", "tiny"]
    cmd += ["--max-iters", "20000", "--eval-interval", "10", "--device", "cpu", "--out", str(out), "--runner", "ray"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The worker's metrics come back into --out as it trains (a checkpoint included).
        wait_until(lambda: checkpoints.can_resume(out) or proc.poll() is not None, 180, every_s=0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the job stops on the cluster, saving a checkpoint
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert "status:     stopped" in stdout and f"run dir:    {out}" in stdout
    assert "Training on cpu" in stdout and str(out) in stdout  # the start line names this folder, not the worker's
    assert read_status(out).status == "stopped"
    assert _placement(out)["runner"] == "ray"
    assert len(read_metrics(out)) > 0
