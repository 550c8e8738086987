"""The state of a run (tinygpt_core.state): the store and the runner's jobs merged in one place.

Covers what the pages used to work out themselves: a queued job whose folder is empty or absent, a
job that ended before its status.json said so, a broken folder, whether a run has weights and
whether it can resume; and launching an ablation grid all or nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_spec, wait_until

from tinygpt_core import checkpoints, state, training
from tinygpt_core.errors import ConfigError, JobError, RunError
from tinygpt_core.jobs import JobRunner, JobSnapshot, LocalJobRunner
from tinygpt_core.runs import RunStore, RunWriter
from tinygpt_core.training import TrainResult, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def snapshot(run_id: str, status: str, **fields) -> JobSnapshot:
    values = dict(
        id=f"job-{run_id}",
        run_id=run_id,
        run_dir=None,
        name=run_id,
        status=status,
        message=f"{status} message",
        device="cpu",
        queue_position=1 if status == "queued" else None,
        step=0,
        max_iters=12,
        params=None,
        metrics=[],
        samples=[],
        tokens_per_s=None,
        elapsed_s=0.0,
        eta_s=None,
        best_val_loss=None,
        best_step=None,
        created_at=time.time(),
    )
    return JobSnapshot(**{**values, **fields})


class FakeRunner(JobRunner):
    """A runner that trains somewhere else: it only reports the snapshots it is given."""

    def __init__(self, snaps=(), refuse_at: int | None = None):
        self.snaps = {s.id: s for s in snaps}
        self.refuse_at = refuse_at
        self.submitted: list[str] = []
        self.cancelled: list[str] = []

    def submit(self, spec):
        if self.refuse_at is not None and len(self.submitted) == self.refuse_at:
            raise JobError("the server is full")
        job_id = f"j{len(self.submitted)}"
        self.submitted.append(job_id)
        self.snaps[job_id] = snapshot(f"run-{job_id}", "queued", id=job_id, name=spec.name)
        return job_id

    def resume(self, run_id, max_iters=None):
        raise JobError("not here")

    def snapshot(self, job_id):
        try:
            return self.snaps[job_id]
        except KeyError:
            raise JobError(f"No job {job_id!r}") from None

    def find_by_run(self, run_id):
        matches = [s for s in self.snaps.values() if s.run_id == run_id]
        return matches[-1] if matches else None

    def cancel(self, job_id):
        self.cancelled.append(job_id)

    def list_jobs(self):
        return list(reversed(self.snaps.values()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A store with one finished run ("done") and one stopped after 4 of 12 steps ("stopped")."""
    root = tmp_path_factory.mktemp("state") / "runs"
    store = RunStore(root)
    train(tiny_spec(name="done", max_iters=4, eval_interval=2, sample_tokens=4), store=store)
    stop = threading.Event()

    def stop_at_4(event: training.TrainEvent) -> None:
        if event.kind == "step" and event.step >= 4:
            stop.set()

    result = train(tiny_spec(name="stopped"), store=store, callbacks=[stop_at_4], stop_event=stop)
    assert result.status == "stopped"
    return root


def by_name(states: list[state.RunState]) -> dict[str, state.RunState]:
    return {s.name: s for s in states}


# --- runs on disk ------------------------------------------------------------------------------------


def test_runs_on_disk_have_weights_and_only_a_stopped_one_can_resume(trained):
    runs = by_name(state.list_runs(RunStore(trained), None))
    done, stopped = runs["done"], runs["stopped"]
    assert (done.status, stopped.status) == ("done", "stopped")
    assert done.has_weights and stopped.has_weights
    assert not done.can_resume and stopped.can_resume
    assert done.metrics is None and done.path == trained / done.run_id  # a listing reads no metrics
    assert done.step == 4 and done.max_iters == 4 and done.best_val_loss is not None and done.params
    assert not done.active and done.finished and not done.can_stop and done.error is None

    one = state.run_state(RunStore(trained), None, stopped.run_id)
    assert one.metrics is not None and list(one.metrics["step"])[-1] == 4
    assert one.tokens_per_s and one.can_resume and one.status == "stopped"


def test_a_run_without_optimizer_state_cannot_resume(trained, tmp_path):
    store = RunStore(tmp_path / "runs")
    src = next(p for p in trained.iterdir() if p.name.startswith("stopped"))
    dst = store.root / src.name
    shutil.copytree(src, dst)
    checkpoints.last_checkpoint(dst).optimizer.unlink()
    (s,) = state.list_runs(store, None)
    assert s.status == "stopped" and s.has_weights and not s.can_resume


def test_a_broken_folder_is_listed_with_its_reason_and_no_weights(store):
    broken = store.root / "broken-20240101-000000"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    RunWriter(broken).write_status("done")
    (s,) = state.list_runs(store, None)
    assert s.status == "broken" and s.broken and "config.json" in s.error
    assert not s.has_weights and not s.can_resume
    one = state.run_state(store, None, s.run_id)
    assert one.broken and one.metrics is not None and one.metrics.empty


def test_an_unknown_run_is_a_run_error(store):
    with pytest.raises(RunError):
        state.run_state(store, FakeRunner(), "nope-20240101-000000")


# --- disk and jobs merged --------------------------------------------------------------------------------


def test_a_queued_job_without_a_folder_yet_is_listed_and_opens(store):
    runner = FakeRunner([snapshot("remote-20990101-000000", "queued", name="waiting")])
    (s,) = state.list_runs(store, runner)
    assert (s.name, s.status, s.queue_position, s.path) == ("waiting", "queued", 1, None)
    assert not s.has_weights and not s.can_resume and s.can_stop and s.active
    one = state.run_state(store, runner, s.run_id)
    assert one.status == "queued" and one.job_id == s.job_id and one.metrics is not None


def test_a_queued_job_with_only_a_status_file_is_queued_not_broken(store):
    folder = store.create("waiting")
    RunWriter(folder).write_status("queued", "Waiting.")
    runner = FakeRunner([snapshot(folder.name, "queued", name="waiting")])
    (s,) = state.list_runs(store, runner)
    assert s.status == "queued" and not s.broken and s.error is None and s.message == "queued message"


def test_a_job_that_ended_before_its_status_was_written_is_trusted(store):
    folder = store.create("ended")
    RunWriter(folder).write_status("running", "Training.", step=3)  # this process, fresh heartbeat
    runner = FakeRunner([snapshot(folder.name, "error", name="ended", message="disk full", step=3)])
    listed = {s.run_id: s for s in state.list_runs(store, runner)}[folder.name]
    assert listed.status == "error" and listed.error == "disk full" and not listed.active
    assert state.run_state(store, runner, folder.name).status == "error"


def test_a_live_job_wins_over_its_folder_and_a_stale_job_id_is_ignored(trained, tmp_path):
    store = RunStore(trained)
    done = by_name(state.list_runs(store, None))["done"]
    rows = [{"step": 1, "loss": 3.0, "train_loss": float("nan"), "val_loss": float("nan"), "lr": 0.001}]
    live = snapshot(done.run_id, "running", id="live", step=1, metrics=rows, samples=[{"step": 1, "text": "hi"}])
    runner = FakeRunner([live, snapshot("other", "running", id="stale")])
    one = state.run_state(store, runner, done.run_id, job_id="stale")
    assert one.status == "running" and one.job_id == "live" and one.can_stop and not one.can_resume
    assert list(one.metrics["step"]) == [1] and one.samples == ({"step": 1, "text": "hi"},)


def test_a_real_runner_merged_queued_then_finished(store, runner, monkeypatch):
    release = threading.Event()

    def blocking(spec, run_dir=None, *, store=None, callbacks=(), stop_event=None):
        while not release.wait(0.01):
            if stop_event is not None and stop_event.is_set():
                break
        return TrainResult("done", "", run_dir, 1, None, None, None)

    monkeypatch.setattr(training, "train", blocking)
    first = runner.submit(tiny_spec(name="first"))
    second = runner.submit(tiny_spec(name="second"))
    runs = by_name(state.list_runs(store, runner))
    assert runs["first"].status == "running" and runs["second"].status == "queued"
    assert runs["second"].queue_position == 1 and not runs["second"].broken
    assert [r.name for r in state.active_runs(runner)] == ["second", "first"]
    release.set()
    wait_until(lambda: runner.state(second).finished and runner.state(first).finished)
    assert not state.active_runs(runner)


# --- grids -------------------------------------------------------------------------------------------------


def test_launch_grid_queues_baseline_and_ablations(store):
    runner = FakeRunner()
    launch = state.launch_grid(runner, tiny_spec(), ["no-layernorm", "pos-none"])
    assert len(launch.job_ids) == 3 and launch.grid_id.startswith("grid-") and launch.device == "cpu"
    names = [runner.snaps[j].name for j in launch.job_ids]
    assert names == [f"{launch.grid_id}/{label}" for label in ("baseline", "no-layernorm", "pos-none")]
    listed = state.list_runs(store, runner)
    assert state.known_grids(listed) == [launch.grid_id]
    assert {m.grid[1] for m in state.grid_members(listed, launch.grid_id)} == {"baseline", "no-layernorm", "pos-none"}


def test_queued_grid_members_whose_folders_hold_only_a_status_are_listed_in_their_grid(store):
    # The local runner makes each member's folder at submit (named grid-<id>-<label>-<time>) with only its
    # "queued" status: the grid's name is the job's until the config is written, and so is its grid.
    name = "grid-250101-000000-ab12/relu"
    folder = store.create(name)
    RunWriter(folder).write_status("queued", "Waiting.")
    runner = FakeRunner([snapshot(folder.name, "queued", name=name)])
    (s,) = state.list_runs(store, runner)
    assert s.name == name and s.grid == ("grid-250101-000000-ab12", "relu")
    assert state.known_grids([s]) == ["grid-250101-000000-ab12"]


def test_a_refused_member_stops_the_others_and_names_itself():
    runner = FakeRunner(refuse_at=2)
    with pytest.raises(JobError, match=r"Run 3 of 3 \(grid-.*/pos-none\) was refused.*server is full"):
        state.launch_grid(runner, tiny_spec(), ["no-layernorm", "pos-none"])
    assert runner.cancelled == ["j1", "j0"]


def test_the_local_runner_refuses_a_grid_it_cannot_queue_before_queueing_any(store):
    runner = LocalJobRunner(store, max_jobs_per_device=1, max_queued_jobs=1)
    try:
        with pytest.raises(JobError, match="at most 1 wait.*nothing was launched"):
            state.launch_grid(runner, tiny_spec(), ["no-layernorm", "pos-none"])
        assert not runner.list() and not store.list()
    finally:
        runner.shutdown()


def test_an_invalid_member_is_refused_before_anything_is_queued(store, monkeypatch):
    runner = LocalJobRunner(store, max_jobs_per_device=1)
    base = tiny_spec()
    bad = dataclasses.replace(base, model=dataclasses.replace(base.model, n_head=3))  # 32 % 3 != 0
    try:
        with pytest.raises(ConfigError, match=r"Run 2 of 2 \(x/2\) was refused"):
            runner.submit_all([dataclasses.replace(base, name="x/1"), dataclasses.replace(bad, name="x/2")])
        assert not runner.list() and not store.list()
    finally:
        runner.shutdown()


def test_run_state_is_plain_data(trained):
    s = state.run_state(RunStore(trained), None, by_name(state.list_runs(RunStore(trained), None))["done"].run_id)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.status = "running"  # type: ignore[misc]
    assert json.dumps(s.created_at) and s.id == s.run_id
