"""Background training jobs: the runner interface, and the local runner that is the default.

The runner interface
--------------------
A *runner* is where training jobs run. Every browser session of one server shares one runner (and
the CLI may use one too); a page never trains in its own script run. ``JobRunner`` is the whole
contract, five operations:

``submit(spec) -> job_id``
    Validate a ``TrainSpec`` (ConfigError/DataError/JobError raised right here, before anything is
    written or queued), then queue it or start it. The job's run folder in the store gets a run id
    at once (``state(job_id).run_id``), but what the folder holds while the job waits is the
    runner's business: a page must not expect it to be empty, or to exist yet.
    ``submit_all(specs)`` submits several specs all or none (an ablation grid).
``stop(job_id)``
    Queued: dropped, status "stopped". Running: asked to stop; it saves a checkpoint and ends
    within a step. (``cancel`` is the historical name of the same call.)
``resume(run_id, max_iters=None) -> job_id``
    Continue a stopped or interrupted run of the store from its last checkpoint, as a new job.
``list() -> [JobSnapshot]``
    Every job the runner still remembers, newest first (``list_jobs`` is the same call).
``state(job_id) -> JobSnapshot``
    A copy of one job's progress (``snapshot`` is the same call); ``find_by_run(run_id)`` finds
    the newest job writing a run.

``get_runner()`` is the one factory the app uses: ``LocalJobRunner`` (below) by default, the Ray
runner (``tinygpt_core.ray_runner``, which alone imports Ray) when ``TINYGPT_RUNNER=ray``.

A ``JobSnapshot`` is plain data (status, message, queue position, step, metric rows, samples,
tokens/s, ETA), safe to keep and read from any thread. Jobs report through snapshots only: the
runner writes their run folders (config, metrics, checkpoints, status) in the store as they go, and
the store is what outlives a job. Nothing outside this module may depend on how a runner runs a job
(a thread, a child process, a remote GPU worker): pages and the CLI see the run through
``tinygpt_core.state`` (the disk and the runner's jobs merged) and drive jobs through the five
calls above. Implementations may take extra keyword-only options (for example who owns a job).

The local runner
----------------
``LocalJobRunner`` gives each job a daemon thread that hands it to an execution backend
(tinygpt_core.worker): by default a child process that trains it and streams its events back, so a
busy server (page reruns holding the interpreter lock) cannot slow training; or, for tests and
debugging, this thread itself (``TINYGPT_JOB_EXECUTION=thread``). The events feed a lock-guarded
progress record; a snapshot is a copy of that record, so a page can read it (and even mutate it)
without racing the job. Jobs are bounded per device: beyond ``max_jobs_per_device`` they wait in a
FIFO queue and start when a slot frees up; at most ``max_queued_jobs`` wait.

One subject, where training jobs run: the runner interface every front end codes against, the job
record and its event bookkeeping (shared with the Ray runner) and the local runner. That is why it runs past
400 lines; how a job executes in a child process lives in worker.py.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data, limits, owners, training
from .device import resolve_device
from .errors import JobError, RunError, TinyGPTError
from .runs import (
    EVAL_METRIC_COLUMNS,
    FINISHED_STATUSES,
    METRIC_COLUMNS,
    RUN_STATUSES,
    RunStore,
    RunWriter,
    os_reason,
    parse_layer_column,
)
from .worker import Execution, Task, make_execution, threads_per_job

log = logging.getLogger(__name__)

# The statuses a job can have: the run statuses (declared once, in runs) but "interrupted", which only
# the disk reports for a run whose process died. FINISHED_STATUSES and METRIC_COLUMNS are runs' own.
JOB_STATUSES = tuple(s for s in RUN_STATUSES if s != "interrupted")

MAX_METRIC_ROWS = 5_000  # per job in memory; the full history is in the run's metrics.csv
MAX_SAMPLES = 200  # most recent samples kept per job
KEEP_FINISHED = 50  # finished jobs remembered per runner (older ones are dropped)
RATE_WINDOW_S = 60.0  # the step rate (tokens/s, ETA) is measured over whole eval cycles of about this long


@dataclass(frozen=True)
class JobSnapshot:
    """A copy of one job's progress at one moment; safe to read from any thread."""

    id: str
    run_id: str | None
    run_dir: Path | None
    name: str
    status: str  # queued | running | done | stopped | diverged | error
    message: str
    device: str  # cpu | cuda | mps
    queue_position: int | None  # 1 = next to start; None unless queued
    step: int
    max_iters: int
    params: int | None
    metrics: list[dict]  # rows like metrics.csv, NaN where a value is absent (e.g. val_loss between evals)
    samples: list[dict]  # [{"step", "text"}]
    tokens_per_s: float | None
    elapsed_s: float
    eta_s: float | None
    best_val_loss: float | None
    best_step: int | None
    created_at: float  # time.time() at submit

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def progress(self) -> float:
        """Fraction of max_iters done, in [0, 1]."""
        return min(1.0, self.step / self.max_iters) if self.max_iters else 0.0

    def metrics_frame(self):
        """The metric rows as a pandas DataFrame with metrics.csv's columns (for the viz figures)."""
        import pandas as pd

        # Eval rows also hold the network-health columns (runs.LAYER_METRICS, one per layer).
        health = {k for r in self.metrics if len(r) > len(METRIC_COLUMNS) for k in r if parse_layer_column(k)}
        columns = list(METRIC_COLUMNS) + sorted(health, key=lambda c: parse_layer_column(c)[::-1])
        return pd.DataFrame(self.metrics, columns=columns).astype(float).astype({"step": int})


class JobRunner(ABC):
    """Where training jobs run: submit, stop, resume, list, state (see the module docstring).

    An implementation provides the abstract methods; ``stop``, ``list``, ``state``, ``submit_all``
    and ``wait`` are built on them."""

    @abstractmethod
    def submit(self, spec: training.TrainSpec, *, owner: str | None = None) -> str:
        """Validate ``spec`` (raising ConfigError/DataError right here), queue or start it, return its job id.

        ``owner`` (an app visitor, tinygpt_core.owners) is recorded with the run, bounds how many jobs
        that visitor may have at once (TINYGPT_MAX_JOBS_PER_VISITOR), and makes a path corpus go
        through data.load_visitor_corpus (TINYGPT_CORPUS_DIRS). None: the machine's own user."""

    @abstractmethod
    def resume(self, run_id: str, max_iters: int | None = None, *, owner: str | None = None) -> str:
        """Queue the continuation of a stopped or interrupted run of the store from its last checkpoint.

        ``owner``: who asks (counted against their TINYGPT_MAX_JOBS_PER_VISITOR); whether they may is
        the page's question to owners.can_manage."""

    @abstractmethod
    def snapshot(self, job_id: str) -> JobSnapshot:
        """A copy of the job's progress; JobError for an unknown (or long-finished, dropped) id."""

    @abstractmethod
    def find_by_run(self, run_id: str) -> JobSnapshot | None:
        """The job writing run ``run_id``, if this runner knows it."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Queued: removed (status "stopped"). Running: asked to stop; it saves and ends within one step."""

    @abstractmethod
    def list_jobs(self) -> list[JobSnapshot]:
        """Every job the runner remembers, newest first."""

    # --- the interface's names for the calls above -------------------------------------------------

    def stop(self, job_id: str) -> None:
        """Stop a job (see ``cancel``)."""
        self.cancel(job_id)

    def state(self, job_id: str) -> JobSnapshot:
        """One job's progress (see ``snapshot``)."""
        return self.snapshot(job_id)

    def list(self) -> list[JobSnapshot]:  # noqa: A003 - the interface's own word, like RunStore.list
        """Every job the runner remembers, newest first (see ``list_jobs``)."""
        return self.list_jobs()

    def submit_all(self, specs: Sequence[training.TrainSpec], **options: Any) -> list[str]:
        """Submit every spec or none: if one is refused, the ones already submitted are stopped and
        the refusal (naming the spec) is raised. Returns the job ids in the order of ``specs``.
        ``options`` (keyword-only extras of ``submit``) go to every submit."""
        specs = list(specs)
        job_ids: list[str] = []
        try:
            for spec in specs:
                job_ids.append(self.submit(spec, **options))
        except TinyGPTError as exc:
            for job_id in reversed(job_ids):
                with contextlib.suppress(TinyGPTError):
                    self.cancel(job_id)
            raise type(exc)(_refused(specs, len(job_ids), exc)) from None
        return job_ids

    def describe(self) -> str:
        """One line on where and how many jobs run at once, for the user (e.g. after a grid launch)."""
        return ""

    def estimate_step_time(self, spec: training.TrainSpec) -> float:
        """Seconds per optimizer step of ``spec`` on random tokens, timed the way this runner trains.

        The default times it in this process; runners that train elsewhere override it."""
        return training.estimate_step_time(spec, device=spec.train.device)

    def shutdown(self, timeout: float = 10.0) -> None:  # noqa: B027 - optional: runners that hold jobs override it
        """Stop every job and release what the runner holds (tests; the end of a CLI command)."""

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.05) -> JobSnapshot:
        """Block until the job has finished (or ``timeout`` seconds passed); returns its last snapshot."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            snap = self.snapshot(job_id)
            if snap.finished or (deadline is not None and time.monotonic() >= deadline):
                return snap
            time.sleep(poll_s)


@dataclass
class _Job:
    """The runner's live record of one job. Only touched with the runner's lock held."""

    id: str
    seq: int  # submission order, for stable sorting when created_at ties
    spec: training.TrainSpec | None  # None for a resume job: it continues run_dir with its saved settings
    name: str
    device: str
    run_dir: Path
    created_at: float
    max_iters: int
    status: str = "queued"
    message: str = ""
    step: int = 0
    params: int | None = None
    metrics: list[dict] = field(default_factory=list)
    samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_SAMPLES))
    tokens_per_s: float | None = None  # wall-clock rate, evals and waits included (see _apply_event)
    best_val_loss: float | None = None
    best_step: int | None = None
    started_at: float | None = None  # time.monotonic()
    finished_at: float | None = None
    # Event bookkeeping (see _apply_event): the training's own clock and the marks the step rate is taken from.
    tokens_per_step: int | None = None  # from the start event
    train_elapsed: float | None = None  # the run's training time (a resumed run's included) at the last event
    train_elapsed_at: float | None = None  # time.monotonic() when that event came
    rate_marks: collections.deque = field(default_factory=lambda: collections.deque(maxlen=256))  # (t, step)
    last_step_at: tuple[float, int] | None = None  # (t, step) of the newest step event
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    threads: int | None = None  # torch threads of its training process, set when it starts (_start_ready)
    resume_max_iters: int | None = None  # resume jobs only: the new total (None: the run's own)
    owner: str | None = None  # who submitted it (owners.py); None: the machine's own user

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES


class LocalJobRunner(JobRunner):
    """Runs jobs on daemon threads of this process, at most ``max_jobs_per_device`` at a time per device."""

    def __init__(
        self,
        store: RunStore | None = None,
        max_jobs_per_device: int | None = None,
        max_queued_jobs: int | None = None,
        execution: str | Execution | None = None,
    ):
        # execution: "process" (default: each job trains in a child process), "thread" (in this process:
        # for tests that inject fakes into it), an Execution, or None for $TINYGPT_JOB_EXECUTION.
        # None: the operator's limits (TINYGPT_MAX_JOBS_PER_DEVICE, TINYGPT_MAX_QUEUED_JOBS; see limits.py).
        if max_jobs_per_device is None:
            max_jobs_per_device = limits.current().max_jobs_per_device
        self.max_queued_jobs = limits.current().max_queued_jobs if max_queued_jobs is None else max_queued_jobs
        if max_jobs_per_device < 1:
            raise JobError(f"max_jobs_per_device must be >= 1, got {max_jobs_per_device}.")
        self.store = store if store is not None else RunStore()
        self.max_jobs_per_device = max_jobs_per_device
        self.execution = execution if isinstance(execution, Execution) else make_execution(execution)
        self._lock = threading.Lock()  # guards every _Job and the queues; never held while training
        self._jobs: dict[str, _Job] = {}
        self._queues: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)
        self._seq = itertools.count()
        self._holding = 0  # > 0 while submit_all queues a grid (guarded by _lock)

    # --- the JobRunner interface -----------------------------------------------------------------

    def submit(self, spec: training.TrainSpec, *, owner: str | None = None) -> str:
        if owner is not None:  # a visitor: a server path is read only inside TINYGPT_CORPUS_DIRS, once, here
            spec = dataclasses.replace(spec, corpus=data.load_visitor_corpus(spec.corpus))
            self.check_visitor_capacity(owner)
        # Validate, load the corpus, train the tokenizer, check the split, resolve the device:
        # ConfigError/DataError reach the caller before anything is written or queued.
        prepared = training.prepare(spec)
        limits.check_spec(prepared)  # read-only mode, max steps and max parameters set by the operator
        device = prepared.device.type
        del prepared  # the worker prepares again when the job starts: a queued job holds no token ids
        with self._lock:
            waiting = sum(len(q) for q in self._queues.values())
            if self._holding:  # a grid's members held in the queue that will start at once do not wait
                running = sum(1 for j in self._jobs.values() if j.device == device and j.status == "running")
                waiting -= min(len(self._queues[device]), max(0, self.max_jobs_per_device - running))
        if waiting >= self.max_queued_jobs:
            raise JobError(
                f"{waiting} jobs are already waiting for a free slot on this server (the limit is "
                f"{self.max_queued_jobs}); try again when some have finished."
            )
        # Creating the run folder now makes the run id known at once (the page puts it in the URL).
        run_dir = Path(self.store.create(spec.name))
        if owner is not None:
            try:
                owners.write_owner(run_dir, owner)
            except OSError as e:
                _remove_unstarted(run_dir)
                raise RunError(f"Cannot write to the run store {self.store.root}: {os_reason(e)}") from None
        job = _Job(
            id=uuid.uuid4().hex[:12],
            seq=next(self._seq),
            spec=spec,
            name=spec.name or run_dir.name,
            device=device,
            run_dir=run_dir,
            created_at=time.time(),
            max_iters=spec.train.max_iters,
            owner=owner,
        )
        # "queued" on disk lets the runs table show the folder as a run waiting to start, not a broken one.
        try:
            RunWriter(run_dir).write_status("queued", "Waiting for a free slot on " + device + ".")
        except OSError as e:  # disk full or read-only: nothing is queued, and no empty folder is left behind
            _remove_unstarted(run_dir)
            raise RunError(f"Cannot write to the run store {self.store.root}: {os_reason(e)}") from None
        with self._lock:
            self._jobs[job.id] = job
            self._queues[device].append(job.id)
            self._start_ready(device)
        return job.id

    def submit_all(self, specs: Sequence[training.TrainSpec], **options: Any) -> list[str]:
        """All or none: every spec is validated and the queue's room checked before any is queued."""
        specs = list(specs)
        owner = options.get("owner")
        if owner is not None:  # a visitor's cap (TINYGPT_MAX_JOBS_PER_VISITOR) counts every member at once
            self.check_visitor_capacity(owner, len(specs))
            specs = [dataclasses.replace(s, corpus=data.load_visitor_corpus(s.corpus)) for s in specs]
        devices = set()
        for i, spec in enumerate(specs):
            try:
                prepared = training.prepare(spec)  # settings, corpus, context and device, as in submit
                limits.check_spec(prepared)
                devices.add(prepared.device.type)
            except TinyGPTError as exc:
                raise type(exc)(_refused(specs, i, exc)) from None
            del prepared
        with self._lock:
            waiting = sum(len(q) for q in self._queues.values())
            running = sum(1 for j in self._jobs.values() if j.status == "running")
        free = max(0, self.max_jobs_per_device * len(devices) - running)
        must_wait = max(0, len(specs) - free)
        if waiting + must_wait > self.max_queued_jobs:
            raise JobError(
                f"These {len(specs)} runs would have to wait for a free slot, and this server lets at most "
                f"{self.max_queued_jobs} wait ({waiting} already do); nothing was launched. Choose fewer "
                "runs, or try again when some have finished."
            )
        # The members queue first and then start together, so that each is told how many share the
        # cores with it (threads_per_job): started one by one, the first would take every core.
        with self._lock:
            self._holding += 1
        try:
            return super().submit_all(specs, **options)
        finally:
            with self._lock:
                self._holding -= 1
                for queued_device in list(self._queues):
                    self._start_ready(queued_device)

    def describe(self) -> str:
        n = self.max_jobs_per_device
        return f"{n} job{'s' if n != 1 else ''} at a time on each device of this server"

    def resume(self, run_id: str, max_iters: int | None = None, *, owner: str | None = None) -> str:
        """Queue the continuation of a stopped or interrupted run from its last checkpoint; returns a job id.

        Checked here, before anything is queued: read-only mode, the run exists and is not training
        (in this process or another), it has a checkpoint with optimizer state, and it is not
        already at the end. A second resume of the same run while the first is queued or running is
        refused, so two users pressing Resume cannot train one run twice.
        """
        from .runs import load_checkpoint_state, read_config, read_status

        limits.check_writable("resuming runs")
        run_dir = self.store.path(run_id)
        cfg = read_config(run_dir)
        target = max_iters or cfg.train.max_iters
        limits.check_max_iters(target)
        if read_status(run_dir).status in ("running", "queued"):
            raise RunError(f"Run {run_id} is still training (or waiting to); it can be resumed once it has stopped.")
        _, optim_state, extra = load_checkpoint_state(run_dir, "last")  # RunError names a damaged file
        if optim_state is None or "step" not in extra:
            raise RunError(f"Run {run_id} has no optimizer.safetensors, so it cannot be resumed exactly.")
        if int(extra["step"]) >= target:
            raise RunError(f"Run {run_id} is already at step {int(extra['step'])} of {target}.")
        device = resolve_device(cfg.train.device).type
        with self._lock:
            if any(j.run_dir.name == run_dir.name and not j.finished for j in self._jobs.values()):
                raise JobError(f"Run {run_id} is already being resumed; watch that job instead.")
            if owner is not None:
                self._check_visitor_capacity(owner, 1)
            waiting = sum(len(q) for q in self._queues.values())
            if waiting >= self.max_queued_jobs:
                raise JobError(
                    f"{waiting} jobs are already waiting for a free slot on this server (the limit is "
                    f"{self.max_queued_jobs}); try again when some have finished."
                )
            job = _Job(
                id=uuid.uuid4().hex[:12],
                seq=next(self._seq),
                spec=None,
                name=cfg.name or run_dir.name,
                device=device,
                run_dir=run_dir,
                created_at=time.time(),
                max_iters=target,
                step=int(extra["step"]),
                resume_max_iters=max_iters,
                owner=owner,
            )
            # Nothing is written to the folder until it starts: cancelled while queued, the run stays as it was.
            self._jobs[job.id] = job
            self._queues[device].append(job.id)
            self._start_ready(device)
        return job.id

    def snapshot(self, job_id: str) -> JobSnapshot:
        with self._lock:
            return self._snapshot(self._get(job_id))

    def find_by_run(self, run_id: str) -> JobSnapshot | None:
        with self._lock:
            matches = [j for j in self._jobs.values() if j.run_dir.name == run_id]
            return self._snapshot(max(matches, key=lambda j: j.seq)) if matches else None

    def cancel(self, job_id: str) -> None:
        with self._lock:
            job = self._get(job_id)
            if job.status == "queued":
                self._queues[job.device].remove(job.id)
                job.status, job.message = "stopped", "Cancelled before it started."
                job.finished_at = time.monotonic()
                _remove_unstarted(job.run_dir)  # nothing was trained; leave no empty run in the store
                self._prune()
            elif job.status == "running":
                job.stop_event.set()  # the trainer checks it every step, saves, and ends as "stopped"
                job.message = "Stopping after the current step…"

    def estimate_step_time(self, spec: training.TrainSpec) -> float:
        """Timed by the execution backend: in a child process with the threads of a job that runs alone
        by default, so the figure holds for a run trained while pages are being watched."""
        return self.execution.estimate_step_time(spec, spec.train.device, threads_per_job(1))

    def list_jobs(self) -> list[JobSnapshot]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.seq, reverse=True)
            return [self._snapshot(j) for j in jobs]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel every job and wait (up to ``timeout`` s in all) for the worker threads to end."""
        with self._lock:
            # Queued ones first, so none of them starts when a running one ends.
            ids = [j.id for j in self._jobs.values() if j.status == "queued"]
            ids += [j.id for j in self._jobs.values() if j.status == "running"]
        for job_id in ids:
            self.cancel(job_id)
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = [j.thread for j in self._jobs.values() if j.thread is not None]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.execution.close()  # a child that did not stop in time is killed

    def check_visitor_capacity(self, owner: str, n: int = 1) -> None:
        """JobError unless ``owner`` may add ``n`` more jobs (TINYGPT_MAX_JOBS_PER_VISITOR); a page
        launching several runs at once (a grid) asks first, so none of them is queued when all cannot be."""
        with self._lock:
            self._check_visitor_capacity(owner, n)

    def _check_visitor_capacity(self, owner: str, n: int) -> None:
        visitor_capacity_check(self._jobs.values(), owner, n)

    # --- scheduling (lock held) ------------------------------------------------------------------

    def _get(self, job_id: str) -> _Job:
        return job_record(self._jobs, job_id)

    def _start_ready(self, device: str) -> None:
        """Start queued jobs of ``device`` while it has free slots (FIFO)."""
        if self._holding:
            return  # a grid is being queued: its members start together when it is (submit_all)
        queue = self._queues[device]
        running = sum(1 for j in self._jobs.values() if j.device == device and j.status == "running")
        # Jobs starting together (a grid's members) share the cores: each is told how many run with it.
        together = min(self.max_jobs_per_device, running + len(queue))
        while queue and running < self.max_jobs_per_device:
            job = self._jobs[queue.popleft()]
            job.status, job.message, job.started_at = "running", "Starting…", time.monotonic()
            job.threads = threads_per_job(together)
            job.thread = threading.Thread(target=self._work, args=(job,), name=f"tinygpt-job-{job.id}", daemon=True)
            job.thread.start()
            running += 1

    def _prune(self) -> None:
        """Forget the oldest finished jobs beyond KEEP_FINISHED (their runs stay on disk)."""
        finished = sorted((j for j in self._jobs.values() if j.finished), key=lambda j: j.seq)
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.id]

    # --- the worker thread -----------------------------------------------------------------------

    def _work(self, job: _Job) -> None:
        """Train one job through the execution backend; always ends with a finished status, never a
        silently dead thread (or child process)."""
        try:
            task = Task(
                run_dir=job.run_dir,
                spec=job.spec,
                store_root=self.store.root,
                resume_max_iters=job.resume_max_iters,
                threads=job.threads,
            )
            status, message = self.execution.run(task, lambda ev: self._publish(job, ev), job.stop_event)
            if job.spec is not None:
                job.spec._prepared = None  # the corpus's token ids: not pinned by a finished job's record
        except TinyGPTError as exc:  # e.g. the corpus file vanished between submit and start
            status, message = "error", str(exc)
            _write_status(job.run_dir, status, message)
        except BaseException as exc:  # noqa: BLE001 - a bug must surface on the page, not kill the thread quietly
            log.exception("training job %s crashed", job.id)
            status, message = "error", f"{type(exc).__name__}: {exc}"
            _write_status(job.run_dir, status, message)
        with self._lock:
            job.status = status if status in FINISHED_STATUSES else "error"
            job.message = message or _default_message(job.status)
            job.finished_at = time.monotonic()
            self._prune()
            self._start_ready(job.device)

    def _publish(self, job: _Job, event: training.TrainEvent) -> None:
        """The TrainCallback: copy the event into the job record. Runs on the training thread; never raises."""
        try:
            with self._lock:
                _apply_event(job, event)
        except Exception:  # noqa: BLE001 - a progress glitch must not abort training
            log.exception("could not record %s event of job %s", getattr(event, "kind", "?"), job.id)

    # --- snapshots (lock held) -------------------------------------------------------------------

    def _snapshot(self, job: _Job) -> JobSnapshot:
        position = None
        message = job.message
        if job.status == "queued":
            position = list(self._queues[job.device]).index(job.id) + 1
            message = self._queued_message(job, position)
        return _snapshot_of(job, position, message)

    def _queued_message(self, job: _Job, position: int) -> str:
        running = sum(1 for j in self._jobs.values() if j.device == job.device and j.status == "running")
        ahead = running + position - 1
        s = "" if ahead == 1 else "s"
        if ahead == 1:
            when = "It starts when that one finishes."
        elif position == 1:
            when = "It starts when one of them finishes."
        else:
            when = f"It starts when {position} of them have finished."
        return f"Queued: {ahead} job{s} ahead on {job.device}. {when}"


def _snapshot_of(job: _Job, position: int | None, message: str) -> JobSnapshot:
    """A JobSnapshot of a job record (lock held): copies, so the page may keep or mutate them.
    Shared by every runner that keeps ``_Job`` records (local, Ray)."""
    return JobSnapshot(
        id=job.id,
        run_id=job.run_dir.name,
        run_dir=job.run_dir,
        name=job.name,
        status=job.status,
        message=message,
        device=job.device,
        queue_position=position,
        step=job.step,
        max_iters=job.max_iters,
        params=job.params,
        metrics=[dict(row) for row in job.metrics],  # copies: the page may keep or mutate them
        samples=[dict(s) for s in job.samples],
        tokens_per_s=job.tokens_per_s,
        elapsed_s=_elapsed(job),
        eta_s=_eta(job),
        best_val_loss=job.best_val_loss,
        best_step=job.best_step,
        created_at=job.created_at,
    )


def job_record(jobs: dict, job_id: str) -> Any:
    """The record of ``job_id`` in a runner's ``jobs``; JobError (what to do instead) for an unknown id."""
    try:
        return jobs[job_id]
    except KeyError:
        raise JobError(
            f"No job {job_id!r}: it never existed here or finished long ago; open its run from the runs list instead."
        ) from None


def visitor_capacity_check(jobs: Any, owner: str, n: int) -> None:
    """JobError unless ``owner`` may add ``n`` jobs to the unfinished ones among ``jobs`` (records with
    ``owner`` and ``finished``): TINYGPT_MAX_JOBS_PER_VISITOR, the one rule every runner applies."""
    cap = limits.current().max_jobs_per_visitor
    mine = sum(1 for j in jobs if j.owner == owner and not j.finished)
    if mine + n > cap:
        asked = "this" if n == 1 else f"these {n}"
        raise JobError(
            f"You already have {mine} run{'s' if mine != 1 else ''} training or waiting, and this server lets "
            f"one visitor have at most {cap} at once (TINYGPT_MAX_JOBS_PER_VISITOR), so that others get a "
            f"turn too. Stop one of yours, or wait for one to finish, then start {asked} again."
        )


# --- event bookkeeping -----------------------------------------------------------------------------


def _apply_event(job: _Job, event: training.TrainEvent) -> None:
    """Copy one training event into the job record (lock held).

    What the page shows is derived here, so the numbers agree with each other:
    - tokens/s and the ETA come from one step rate measured on the wall clock over whole eval cycles
      (``_rate``): an evaluation is as much a part of the remaining time as the steps, and a window that
      sometimes holds an eval and sometimes not is what made the ETA swing (27 s, then 23 min). The
      per-step rate the trainer reports (compute only) is kept in the metric rows, as in metrics.csv.
    - elapsed is the training's own clock (``elapsed_s`` of the events), so a resumed run counts its
      earlier sessions like its "Finished N steps in X s" message does.
    """
    data = event.data
    now = time.monotonic()
    if data.get("elapsed_s") is not None:
        job.train_elapsed, job.train_elapsed_at = float(data["elapsed_s"]), now
    if event.kind == "start":
        job.params = data.get("params")
        job.max_iters = int(data.get("max_iters") or job.max_iters)
        job.step = event.step  # a resumed run starts past 0
        job.tokens_per_step = data.get("tokens_per_step")
        precision = f" ({data['precision']})" if data.get("precision") else ""
        if not job.stop_event.is_set():  # keep "Stopping…" when cancel came before the first step
            job.message = f"Training on {data.get('device', job.device)}{precision}."
    elif event.kind == "step":
        job.step = event.step
        if not job.rate_marks:
            job.rate_marks.append((now, event.step))  # the first step of this job: the rate's starting point
        job.last_step_at = (now, event.step)
        job.tokens_per_s = _wall_tokens_per_s(job, data.get("tokens_per_s"))
        _add_row(
            job,
            {
                "step": event.step,
                "loss": data.get("loss"),
                "lr": data.get("lr"),
                "tokens_per_s": data.get("tokens_per_s"),
                "elapsed_s": data.get("elapsed_s"),
            },
        )
    elif event.kind == "eval":
        job.best_val_loss = data.get("best_val_loss")
        job.best_step = data.get("best_step")
        if job.rate_marks:
            job.rate_marks.append((now, event.step))  # one mark per eval: the rate spans whole eval cycles
        job.tokens_per_s = _wall_tokens_per_s(job, job.tokens_per_s)
        values = {c: data.get(c) for c in EVAL_METRIC_COLUMNS}
        values.update({k: v for k, v in data.items() if parse_layer_column(k)})  # network health (per layer)
        if data.get("elapsed_s") is not None:
            values["elapsed_s"] = data["elapsed_s"]  # the step's time now includes its eval, as in metrics.csv
        if job.metrics and job.metrics[-1]["step"] == event.step:  # the eval belongs to the step just logged
            job.metrics[-1].update({k: _num(v) for k, v in values.items()})
        else:
            _add_row(job, {"step": event.step, **values})
    elif event.kind == "sample":
        job.samples.append({"step": event.step, "text": data.get("text", "")})
    elif event.kind == "end":
        # The final status comes from train()'s result in _work; keep the message for the moment between.
        job.message = data.get("message") or job.message


def _add_row(job: _Job, values: dict[str, Any]) -> None:
    row = {col: _num(values.get(col)) for col in METRIC_COLUMNS}
    row.update({k: _num(v) for k, v in values.items() if parse_layer_column(k)})
    row["step"] = int(values["step"])
    job.metrics.append(row)
    if len(job.metrics) > MAX_METRIC_ROWS:
        job.metrics = _decimate(job.metrics)


def _decimate(rows: list[dict]) -> list[dict]:
    """Halve a long history: keep every other row, every eval row (the val curve) and the latest row."""
    last = len(rows) - 1
    kept = [r for i, r in enumerate(rows) if i % 2 == 0 or i == last or not math.isnan(r["val_loss"])]
    if len(kept) > MAX_METRIC_ROWS * 3 // 4:  # evals alone are too many (eval every step): thin them too
        kept = [r for i, r in enumerate(rows) if i % 2 == 0 or i == last]
    return kept


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _elapsed(job: _Job) -> float:
    """The run's training time: the trainer's clock at its last event (a resumed run's earlier sessions
    included), plus the time since that event while it still runs. Before the first event: time since start."""
    if job.started_at is None:
        return 0.0
    end = job.finished_at if job.finished_at is not None else time.monotonic()
    if job.train_elapsed is None:
        return max(0.0, end - job.started_at)
    if job.finished_at is not None:
        return job.train_elapsed  # the end event's: what "Finished N steps in X s" says
    return job.train_elapsed + max(0.0, end - job.train_elapsed_at)


def _rate(job: _Job) -> float | None:
    """Steps per second on the wall clock, evals included; None until it can be measured.

    Measured between marks (this job's first step, then each eval) spanning about RATE_WINDOW_S and at
    least one whole eval cycle, so every window holds its share of evaluation time. Before the first
    eval it is the rate since the first step (there has been no eval to include yet)."""
    marks = job.rate_marks
    if len(marks) >= 2:
        t1, s1 = marks[-1]
        t0, s0 = marks[-2]
        for t, s in reversed(marks):  # widen to the oldest mark still within the window
            if t1 - t < RATE_WINDOW_S:
                t0, s0 = t, s
            else:
                break
        if t0 == t1:
            t0, s0 = marks[-2]
    elif marks and job.last_step_at is not None:
        (t0, s0), (t1, s1) = marks[0], job.last_step_at
    else:
        return None
    if s1 <= s0 or t1 <= t0:
        return None
    return (s1 - s0) / (t1 - t0)


def _wall_tokens_per_s(job: _Job, fallback: float | None) -> float | None:
    """Tokens trained per wall-clock second (evals and waits included), from ``_rate``; ``fallback`` (the
    trainer's own per-step figure) until it can be measured or when the tokens per step are unknown."""
    rate = _rate(job)
    if rate is None or not job.tokens_per_step:
        return fallback
    return rate * job.tokens_per_step


def _eta(job: _Job) -> float | None:
    """Seconds left at the wall-clock step rate over whole eval cycles (``_rate``); None until it can be measured."""
    if job.status != "running":
        return None
    rate = _rate(job)
    if rate is None:
        return None
    return max(0.0, (job.max_iters - job.step) / rate)


def _refused(specs: Sequence[training.TrainSpec], index: int, exc: Exception) -> str:
    """Why a batch was refused, naming the member: "Run 3 of 5 (grid-…/relu) was refused: …"."""
    name = specs[index].name or f"#{index + 1}"
    return f"Run {index + 1} of {len(specs)} ({name}) was refused, so none was launched: {exc}"


def _default_message(status: str) -> str:
    return {
        "done": "Finished.",
        "stopped": "Stopped.",
        "diverged": "The loss diverged.",
        "error": "Training failed.",
    }.get(status, "")


def _write_status(run_dir: Path, status: str, message: str) -> None:
    """Record a failure train() could not record itself, so the run does not stay "queued" on disk."""
    try:
        RunWriter(run_dir).write_status(status, message)
    except Exception:  # noqa: BLE001 - the job's own status already carries the message
        log.exception("could not write the status of %s", run_dir)


def _remove_unstarted(path: Path) -> None:
    """Delete the folder made at submit, if it still holds nothing but its "queued" status (and owner)."""
    try:
        if {p.name for p in path.iterdir()} <= {"status.json", owners.OWNER_FILE}:
            (path / "status.json").unlink(missing_ok=True)
            (path / owners.OWNER_FILE).unlink(missing_ok=True)
            path.rmdir()
    except OSError:
        pass


# --- the process-wide runner -----------------------------------------------------------------------

RUNNERS = ("local", "ray")  # TINYGPT_RUNNER / `train --runner`
_default_runner: JobRunner | None = None
_default_lock = threading.Lock()


def runner_kind(kind: str | None = None) -> str:
    """The runner to use: ``kind``, else $TINYGPT_RUNNER, else "local"; ConfigError for anything else."""
    import os

    from .errors import ConfigError

    value = (kind if kind is not None else os.environ.get("TINYGPT_RUNNER", "")).strip().lower() or "local"
    if value not in RUNNERS:
        raise ConfigError(f"TINYGPT_RUNNER must be one of {', '.join(RUNNERS)}, got {value!r}.")
    return value


def make_runner(
    kind: str | None = None, store: RunStore | None = None, *, warm: bool = False, **ray_options: Any
) -> JobRunner:
    """A new runner of ``kind`` (see ``runner_kind``). "ray" imports Ray only here, and connects to
    the cluster at once ($RAY_ADDRESS, else a local Ray instance): JobError when it cannot, never a
    silent fallback to the local runner. ``ray_options`` go to ``RayJobRunner`` (e.g. reattach);
    ``warm`` keeps a local runner's next training process started in advance (the app's server)."""
    if runner_kind(kind) == "ray":
        try:
            import ray  # noqa: F401 - only to say clearly that it is missing
        except ImportError:
            from .errors import ConfigError

            raise ConfigError(
                "The Ray runner (TINYGPT_RUNNER=ray or --runner ray) needs Ray: pip install -r requirements-ray.txt"
            ) from None
        from .ray_runner import RayJobRunner

        return RayJobRunner(store, **ray_options)
    return LocalJobRunner(store, execution=make_execution(warm=warm))


def get_runner() -> JobRunner:
    """The one runner of this process (created on first use, chosen by $TINYGPT_RUNNER), so every
    browser session shares its jobs."""
    global _default_runner
    with _default_lock:
        if _default_runner is None:
            # The server's local runner keeps a warm training process ready, so Quick start starts at once.
            _default_runner = make_runner(warm=True)
        return _default_runner


def reset_runner() -> None:
    """Stop the process-wide runner's jobs and forget it (tests; a changed TINYGPT_RUNS_DIR)."""
    global _default_runner
    with _default_lock:
        runner, _default_runner = _default_runner, None
    if runner is not None:
        runner.shutdown()


__all__ = [
    "JobSnapshot",
    "JobRunner",
    "LocalJobRunner",
    "get_runner",
    "make_runner",
    "runner_kind",
    "reset_runner",
    "JOB_STATUSES",
    "RUNNERS",
]
