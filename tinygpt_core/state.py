"""The state of a run, as the app shows it: the run store on disk and the runner's jobs, merged.

A run lives in two places while it trains: its folder in the store (what the runner has written so
far, and everything once it has ended) and the runner's live job (status, queue position, progress,
the newest metrics and samples, tokens/s, ETA). This module is the one place that merges them, so
pages only render a ``RunState`` and never know what the runner does with a folder:

- ``list_runs(store, runner)``: every run the app should list, newest first. A job waiting for a
  slot is listed even when its folder is empty or not there yet; a job that has ended is trusted
  over a folder whose status.json still says it is running (a full disk can keep the runner from
  writing the final status); a folder that cannot be opened is listed as "broken", with the reason.
- ``run_state(store, runner, run_id, job_id=None)``: one run, with its metrics and samples.
- ``launch_grid(runner, base_spec, ablations)``: an ablation grid, all runs or none.

What a run *can do* is decided here too, once: ``has_weights`` (it can be opened in Attention and
Sampling), ``can_resume`` (Resume continues it from its last checkpoint) and ``can_stop`` (this
server's runner has its job).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from . import checkpoints
from .errors import JobError, RunError, TinyGPTError
from .runs import (
    ACTIVE_STATUSES,
    BROKEN,
    FINISHED_STATUSES,
    METRIC_COLUMNS,
    RunStore,
    RunSummary,
    read_metrics,
    read_samples,
)

if TYPE_CHECKING:
    from .jobs import JobRunner, JobSnapshot
    from .training import TrainSpec

RESUMABLE_STATUSES = ("stopped", "interrupted")


@dataclass(frozen=True)
class RunState:
    """One run as the app shows it. Plain data: keep it, compare it, read it from any thread."""

    run_id: str
    path: Path | None  # the run's folder in the store; None while the runner has not made it yet
    name: str
    status: str  # RUN_STATUSES, or "broken" for a folder that cannot be opened
    message: str  # the status message (what it is doing, why it ended)
    step: int
    max_iters: int | None
    created_at: str  # ISO 8601 UTC; "" when unknown
    has_weights: bool  # best-val weights on disk that open: Attention and Sampling can load it
    can_resume: bool  # stopped or interrupted with a checkpoint and optimizer state, not at its end
    error: str | None = None  # why it failed or cannot be opened (broken, error, diverged); else None
    job_id: str | None = None  # the runner's job for this run, when it still has one
    queue_position: int | None = None  # 1 = next to start; None unless queued
    device: str | None = None
    params: int | None = None
    tokens_per_s: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    preset: str | None = None
    ablations: tuple[str, ...] = ()
    corpus: str | None = None
    tokenizer: str | None = None
    grid: tuple[str, str] | None = None  # (grid id, label) for a member of an ablation grid
    # Only run_state() fills these (a listing would read every metrics.csv): None in list_runs().
    metrics: pd.DataFrame | None = field(default=None, compare=False, repr=False)
    samples: tuple[dict, ...] = field(default=(), compare=False, repr=False)

    @property
    def id(self) -> str:
        """The run id (the name RunSummary uses)."""
        return self.run_id

    @property
    def active(self) -> bool:
        """Queued or running."""
        return self.status in ACTIVE_STATUSES

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES or self.status == BROKEN

    @property
    def broken(self) -> bool:
        return self.status == BROKEN

    @property
    def can_stop(self) -> bool:
        """Active and this server's runner has the job (another process's run is stopped there)."""
        return self.active and self.job_id is not None

    @property
    def progress(self) -> float:
        """Fraction of max_iters done, in [0, 1]."""
        return min(1.0, self.step / self.max_iters) if self.max_iters else 0.0

    @property
    def gap(self) -> float | None:
        """Final val loss minus final train loss: above 0 and growing, the model memorises."""
        if self.final_val_loss is None or self.final_train_loss is None:
            return None
        return self.final_val_loss - self.final_train_loss


@dataclass(frozen=True)
class GridLaunch:
    """An ablation grid that was queued: its id, the jobs (baseline first) and where they run."""

    grid_id: str
    job_ids: tuple[str, ...]
    run_ids: tuple[str, ...]
    device: str
    note: str  # e.g. "1 job at a time on each device of this server"


# --- the calls pages use ----------------------------------------------------------------------------


def list_runs(store: RunStore, runner: JobRunner | None) -> list[RunState]:
    """Every run the app should list, newest first: the store's folders merged with the runner's jobs.

    Listing reads no metrics.csv beyond the store's summary: ``metrics`` is None and ``samples`` empty
    (``run_state`` gives one run in full)."""
    jobs = _jobs_by_run(runner)
    states = []
    on_disk = set()
    for summary in store.list():
        on_disk.add(summary.id)
        states.append(_merge(summary, jobs.get(summary.id)))
    # Jobs whose folder the store does not list (yet): a runner may create it only when the job starts.
    waiting = [_from_job(job) for run_id, job in jobs.items() if run_id not in on_disk and not job.finished]
    waiting.sort(key=lambda s: s.created_at, reverse=True)
    return waiting + states


def run_state(store: RunStore, runner: JobRunner | None, run_id: str | None, job_id: str | None = None) -> RunState:
    """One run's current state, with its metrics and samples (from the live job while it has one).

    ``job_id`` (when the page knows it) finds the job even before it shows up by run id. RunError
    when neither the store nor the runner knows the run."""
    job = None
    if runner is not None and job_id:
        try:
            job = runner.snapshot(job_id)
        except TinyGPTError:
            job = None
        if job is not None and run_id and job.run_id != run_id:
            job = None  # a stale job id from another run: the run id decides
    if job is None and runner is not None and run_id:
        job = runner.find_by_run(run_id)
    run_id = run_id or (job.run_id if job is not None else None)
    if not run_id:
        raise RunError("No run given.")
    if job is not None and not job.finished:
        # Live: everything from the job (in memory, no metrics.csv read on every poll) but the weights.
        path = _path_or_none(store, run_id)
        state = _replace(
            _from_job(job),
            path=path,
            has_weights=job.status != "queued" and path is not None and _weights_present(path),
        )
        metrics, samples = job.metrics_frame(), tuple(dict(s) for s in job.samples)
    else:
        try:
            summary = store.summary(run_id)
        except RunError:
            if job is None or (job.status == "stopped" and job.step == 0):
                raise  # unknown, deleted, or cancelled before it started (nothing was kept)
            summary = None
        if summary is None:
            state = _from_job(job)
            metrics, samples = job.metrics_frame(), tuple(dict(s) for s in job.samples)
        else:
            state = _merge(summary, job)
            metrics, samples = _read_metrics(summary.path), tuple(read_samples(summary.path))
            if job is None:  # from disk alone: the run's wall-clock rate, like a live job's (see jobs._apply_event)
                state = _replace(state, tokens_per_s=_wall_tokens_per_s(summary.path, metrics))
    tokens_per_s = state.tokens_per_s if state.tokens_per_s is not None else _last(metrics, "tokens_per_s")
    return _replace(state, metrics=metrics, samples=samples, tokens_per_s=tokens_per_s)


def active_runs(runner: JobRunner | None) -> list[RunState]:
    """The runs this server's runner is training or has queued, newest first (no disk read)."""
    return [_from_job(job) for job in (_jobs_by_run(runner).values()) if not job.finished][::-1]


def grid_members(states: list[RunState], grid_id: str) -> list[RunState]:
    """The runs of one ablation grid (from ``list_runs``), in the order they were listed."""
    return [s for s in states if s.grid is not None and s.grid[0] == grid_id]


def known_grids(states: list[RunState]) -> list[str]:
    """The ids of every grid with a run in ``states``, newest first (ids start with a UTC timestamp)."""
    return sorted({s.grid[0] for s in states if s.grid is not None}, reverse=True)


def launch_grid(
    runner: JobRunner, base: TrainSpec, ablations: list[str], grid_id: str | None = None, **submit_options: Any
) -> GridLaunch:
    """Queue an ablation grid: the baseline plus one run per ablation, all of them or none.

    Every member is validated, and the runner's room checked, before any is queued; a refusal names
    the member and says why (ConfigError, DataError, JobError), and nothing is left queued.
    ``submit_options`` go to the runner's submit for every member."""
    from .ablations import grid_specs

    return _launch_specs(runner, grid_specs(base, ablations, grid_id), submit_options)


def launch_ladder(runner: JobRunner, base: TrainSpec, grid_id: str | None = None, **submit_options: Any) -> GridLaunch:
    """Queue the bigram-to-transformer ladder (``ladder.ladder_specs``: one run per rung, ``base`` on top)
    as a grid, all of it or none, like ``launch_grid``."""
    from .ladder import ladder_specs

    return _launch_specs(runner, ladder_specs(base, grid_id), submit_options)


def _launch_specs(runner: JobRunner, specs: list[TrainSpec], submit_options: dict[str, Any]) -> GridLaunch:
    job_ids = runner.submit_all(specs, **submit_options)
    snaps = [runner.snapshot(j) for j in job_ids]
    grid = _grid_of(specs[0].name)
    return GridLaunch(
        grid_id=grid[0] if grid else "",
        job_ids=tuple(job_ids),
        run_ids=tuple(s.run_id or "" for s in snaps),
        device=snaps[0].device if snaps else "",
        note=runner.describe(),
    )


def has_weights(summary: RunSummary) -> bool:
    """Whether a run on disk can be opened for inspection: not broken, best-val weights present.

    The one definition of "has weights" (the store has already checked the file is sound when the
    run is not broken)."""
    return summary.broken_reason is None and _weights_present(summary.path)


def can_resume(summary: RunSummary) -> bool:
    """Whether Resume can continue a run on disk: stopped or interrupted, optimizer state saved, steps left."""
    if summary.status not in RESUMABLE_STATUSES or summary.broken_reason is not None:
        return False
    if not checkpoints.can_resume(summary.path):  # the last checkpoint holds optimizer state
        return False
    return summary.max_iters is None or summary.steps < summary.max_iters


# --- merging ----------------------------------------------------------------------------------------


def _weights_present(path: Path) -> bool:
    return (path / checkpoints.BEST_FILE).is_file()


def _path_or_none(store: RunStore, run_id: str) -> Path | None:
    try:
        return store.path(run_id)
    except RunError:
        return None


def _jobs_by_run(runner: JobRunner | None) -> dict[str, JobSnapshot]:
    """The runner's jobs keyed by run id, the newest job of each run winning."""
    if runner is None:
        return {}
    try:
        jobs = runner.list_jobs()  # newest first
    except JobError:
        return {}
    out: dict[str, JobSnapshot] = {}
    for job in reversed(jobs):
        if job.run_id:
            out[job.run_id] = job
    return out


def _merge(summary: RunSummary, job: JobSnapshot | None) -> RunState:
    """A run on disk, with its live job (if any) laid over it."""
    state = _from_summary(summary)
    if job is None:
        return state
    live = dict(
        job_id=job.id,
        device=job.device,
        tokens_per_s=job.tokens_per_s,
        elapsed_s=job.elapsed_s if job.elapsed_s else state.elapsed_s,
        params=job.params or state.params,
    )
    if not job.finished:
        # The job knows better than the folder it is writing (which may hold nothing yet).
        return _replace(
            state,
            **live,
            name=job.name,
            grid=_grid_of(job.name) or state.grid,  # a queued member's folder has no config (so no name) yet
            status=job.status,
            message=job.message,
            error=None,
            step=max(state.step, job.step),
            max_iters=job.max_iters,
            queue_position=job.queue_position,
            eta_s=job.eta_s,
            best_val_loss=job.best_val_loss if job.best_val_loss is not None else state.best_val_loss,
            best_step=job.best_step if job.best_step is not None else state.best_step,
            has_weights=False if job.status == "queued" else state.has_weights,
            can_resume=False,
        )
    if summary.status in ACTIVE_STATUSES:
        # The job ended but its folder still says it trains (its last status write failed): trust the job.
        return _replace(
            state,
            **live,
            status=job.status,
            message=job.message,
            error=job.message if job.status in ("error", "diverged") else None,
            step=max(state.step, job.step),
        )
    return _replace(state, **live)


def _from_summary(s: RunSummary) -> RunState:
    error = s.broken_reason
    if error is None and s.status in ("error", "diverged"):
        error = s.message or s.status
    return RunState(
        run_id=s.id,
        path=s.path,
        name=s.name,
        status=s.status,
        message=s.message,
        step=s.steps,
        max_iters=s.max_iters,
        created_at=s.created_at or _folder_time(s.path),
        has_weights=has_weights(s),
        can_resume=can_resume(s),
        error=error,
        params=s.params,
        elapsed_s=s.elapsed_s,
        best_val_loss=s.best_val_loss,
        best_step=s.best_step,
        final_train_loss=s.final_train_loss,
        final_val_loss=s.final_val_loss,
        preset=s.preset,
        ablations=tuple(s.ablations),
        corpus=s.corpus,
        tokenizer=s.tokenizer,
        grid=_grid_of(s.name),
    )


def _from_job(job: JobSnapshot) -> RunState:
    """A run known only from its job (its folder is not in the store yet, or no more)."""
    return RunState(
        run_id=job.run_id or "",
        path=None,
        name=job.name,
        status=job.status,
        message=job.message,
        step=job.step,
        max_iters=job.max_iters,
        created_at=datetime.fromtimestamp(job.created_at, UTC).isoformat(timespec="seconds"),
        has_weights=False,
        can_resume=False,
        error=job.message if job.status in ("error", "diverged") else None,
        job_id=job.id,
        queue_position=job.queue_position,
        device=job.device,
        params=job.params,
        tokens_per_s=job.tokens_per_s,
        elapsed_s=job.elapsed_s,
        eta_s=job.eta_s,
        best_val_loss=job.best_val_loss,
        best_step=job.best_step,
        grid=_grid_of(job.name),
    )


def _replace(state: RunState, **changes) -> RunState:
    return dataclasses.replace(state, **changes)


def _grid_of(name: str | None) -> tuple[str, str] | None:
    from .ablations import parse_grid_name

    return parse_grid_name(name)


def _folder_time(path: Path) -> str:
    try:
        return datetime.fromtimestamp(os.path.getmtime(path), UTC).isoformat(timespec="seconds")
    except OSError:
        return ""


def _read_metrics(path: Path) -> pd.DataFrame:
    try:
        return read_metrics(path)
    except RunError:
        return pd.DataFrame(columns=list(METRIC_COLUMNS))


def _wall_tokens_per_s(path: Path, metrics: pd.DataFrame) -> float | None:
    """Tokens trained per second of the run's training time (evaluations included), from metrics.csv and the
    config's tokens per step; None when it cannot be worked out. (metrics.csv's own tokens_per_s column is
    the rate while computing a step, which leaves the evaluations out.)"""
    from .runs import read_config

    try:
        cfg = read_config(path)
        rows = metrics.dropna(subset=["elapsed_s"])
        if len(rows) < 2:
            return None
        steps = float(rows["step"].iloc[-1] - rows["step"].iloc[0])
        seconds = float(rows["elapsed_s"].iloc[-1] - rows["elapsed_s"].iloc[0])
    except (RunError, KeyError, ValueError, TypeError):
        return None
    if steps <= 0 or not seconds > 0:
        return None
    return steps / seconds * cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size


def _last(df: pd.DataFrame | None, col: str) -> float | None:
    if df is None or df.empty or col not in df:
        return None
    s = df[col].dropna()
    value = float(s.iloc[-1]) if len(s) else None
    return None if value is None or math.isnan(value) else value


__all__ = [
    "RunState",
    "GridLaunch",
    "list_runs",
    "run_state",
    "grid_members",
    "known_grids",
    "launch_grid",
    "active_runs",
    "has_weights",
    "can_resume",
    "RESUMABLE_STATUSES",
]
