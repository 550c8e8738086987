"""The job runner on a Ray cluster: every training job trains on a Ray worker (a GPU share or CPUs).

Chosen by ``TINYGPT_RUNNER=ray`` (the app) or ``train --runner ray`` (the CLI); this is the only
module that imports Ray, and nothing imports it otherwise. Same five calls as ``LocalJobRunner``
(``jobs.JobRunner``); pages and the CLI do not know which runner they use.

How a job runs
--------------
- **One detached Ray actor per job** (``JobWorker``), named ``tinygpt-job-<worker id>`` in the
  namespace ``$TINYGPT_RAY_NAMESPACE`` (default "tinygpt"), asking for ``$TINYGPT_RAY_CPUS_PER_JOB``
  CPUs (default 1) and ``$TINYGPT_RAY_GPUS_PER_JOB`` of a GPU (default 0.25 when the cluster has GPUs,
  so four tiny runs share one; 0 on a CPU-only cluster). Ray queues the actors that do not fit; the
  job says so in its message ("Waiting for a GPU on the cluster…") with its place among this
  server's waiting jobs. The actor learns its run from the job it is handed (``start``).
- **Warm spares.** Ray gives every actor a new worker process, which must import Ray, torch and the
  trainer and pay torch's first-use costs before its first step (6-18 s on a busy node). So the app's
  runner keeps ``$TINYGPT_RAY_SPARES`` (default 1) actors started in advance, each having trained a
  few steps of a tiny model; a job of the same shape takes one and logs its first step about a
  second after submit, and a new spare is started behind it. A spare holds its CPU/GPU share while
  it waits, so it is only kept while the cluster has room for one more job besides it: it never
  holds the last free share (a job that would have to wait for it, this app's or anyone's, finds the
  room instead), and the spares are released after ``$TINYGPT_RAY_SPARE_IDLE_S`` (default 600 s)
  without a new job, and exit on their own a minute after their runner is gone. The CLI keeps none
  (it submits one job).
- **No shared filesystem.** The worker trains into a temporary folder of its own node and streams
  back (``JobWorker.stream``, a Ray streaming generator) the training events and every file of that
  folder that changed (``tinygpt_core.shipping``: whole files, appended tails, deletions). One
  driver thread per job applies them: events through the same bookkeeping as the local runner
  (``jobs._apply_event``), files into the run folder of this server's store, so a run trained
  through Ray is a run like any other. ``placement.json`` in the run records where it trained.
  A resume ships the run folder (config, tokenizer, corpus, checkpoints) to a new worker.
- **The code travels too**: the actor's runtime environment ships this package
  (``py_modules``), so the workers need the same Python packages (torch…) but not this repository.
  ``TINYGPT_RAY_SHIP_CODE=0`` skips that when the workers have tinygpt_core installed.
- **Stop** is an actor call that sets the trainer's stop event: it saves a checkpoint and ends
  within a step, as locally. A worker that dies (killed, node lost) ends the job as "interrupted"
  with every file it had shipped (metrics up to its last flush, the last checkpoint); Resume
  continues it. A job that raises on the worker ends as "error" with the reason; the runner serves on.
- **The app restarted** while jobs train: detached actors keep training, and the new runner finds
  them by their name's prefix (those of its own store, asking each which run it trains) and follows
  them again; a run whose worker is gone reads as interrupted from its folder (its status names a
  process that has ended). A worker whose run has ended and that nobody followed for
  ``$TINYGPT_RAY_ORPHAN_TIMEOUT_S`` (default 600 s) exits.
- **The cluster**: ``$RAY_ADDRESS`` (Ray's own variable; ``host:port`` of the head's GCS), else a
  Ray instance on this machine (joined if one runs, started otherwise). An address that does not
  answer is a ``JobError`` at once; there is no silent fallback to the local runner.

One subject, the runner on a Ray cluster (the job actor, following it, reattaching, faults); hence
past 400 lines. The message and file-shipping format is in shipping.py.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from . import data, limits, owners, training
from .errors import ConfigError, JobError, RunError, TinyGPTError
from .jobs import (
    FINISHED_STATUSES,
    KEEP_FINISHED,
    JobRunner,
    JobSnapshot,
    _apply_event,
    _default_message,
    _Job,
    _remove_unstarted,
    _snapshot_of,
    _write_status,
    job_record,
    visitor_capacity_check,
)
from .runs import HEARTBEAT_TIMEOUT_S, RunStore, RunWriter, read_metrics, read_samples
from .shipping import FolderMirror, FolderWatcher, pack_folder, write_changes

log = logging.getLogger(__name__)

ACTOR_PREFIX = "tinygpt-job-"  # + a worker id: a spare is named before it has a run
DEFAULT_NAMESPACE = "tinygpt"
DEFAULT_GPU_SHARE = 0.25  # of one GPU per job when the cluster has GPUs: four tiny runs per GPU
DEFAULT_SPARES = 1  # warm job actors the app's runner keeps ready
DEFAULT_SPARE_IDLE_S = 600.0  # spares are released after this long without a new job
SPARE_ORPHAN_S = 60.0  # a spare that nobody pinged for this long exits (its runner is gone)
KEEP_S = 1.0  # the spare keeper looks at the pool and the cluster's free room this often
PLACEMENT_FILE = "placement.json"
BATCH_S = 0.1  # the worker sends what it has at most this often
SCAN_INTERVAL_S = 0.5  # the worker looks for changed files at most this often (and after every eval)
ALIVE_S = 5.0  # with nothing to send, the worker says it is alive this often
_SUPERSEDED = object()  # JobWorker._take's answer to a stream that a newer one replaced
PING_S = 10.0  # the driver tells the worker it is still followed this often
STATUS_REFRESH_S = 10.0  # the driver refreshes the run's status.json (its heartbeat) this often
CONNECT_TIMEOUT_S = 5.0
RESOURCE_CACHE_S = 1.0


# --- settings ----------------------------------------------------------------------------------------


def _env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number >= 0, got {raw!r}.") from None
    if value < 0:
        raise ConfigError(f"{name} must be a number >= 0, got {raw!r}.")
    return value


def _check_reachable(address: str) -> None:
    """A TCP connection to ``host:port`` within a few seconds, or JobError: ray.init itself waits
    for minutes on an address where nothing answers."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise JobError(
            f"RAY_ADDRESS={address!r} is not host:port (for example 10.0.0.5:6379, the head's address "
            "printed by `ray start --head`)."
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise JobError(
            f"Cannot reach the Ray cluster at {target} (RAY_ADDRESS): {e.strerror or e}. Start its head "
            "(`ray start --head`) or fix RAY_ADDRESS. TINYGPT_RUNNER=ray never falls back to training "
            "on this machine; unset TINYGPT_RUNNER to use the local runner."
        ) from None


def connect(address: str | None = None) -> str:
    """Join the Ray cluster (``address``, else $RAY_ADDRESS, else a local instance); returns where.

    A process already connected to Ray (a notebook) is used as it is: its workers must be able to import
    tinygpt_core then."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None
    if address not in (None, "auto", "local"):
        _check_reachable(address)
    if ray.is_initialized():
        return _describe_address()
    try:
        ray.init(
            address=address,
            runtime_env=_job_runtime_env(),
            log_to_driver=False,
            include_dashboard=False,
            configure_logging=False,
        )
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError…
        where = address or "this machine"
        raise JobError(
            f"Cannot connect to the Ray cluster at {where}: {type(e).__name__}: {e}. Check RAY_ADDRESS "
            "(and that this machine runs the cluster's Ray and Python versions); there is no fallback "
            "to the local runner."
        ) from None
    return _describe_address()


def _describe_address() -> str:
    with contextlib.suppress(Exception):
        return ray.get_runtime_context().gcs_address
    return "the Ray cluster"


def _package_dir() -> str:
    return str(Path(__file__).resolve().parent)


def _job_runtime_env() -> dict | None:
    """This package, uploaded to the cluster for this process's actors (Ray accepts a local folder
    only for the whole connection, hence at ray.init)."""
    if os.environ.get("TINYGPT_RAY_SHIP_CODE", "1").strip().lower() in ("0", "false", "no"):
        return None
    return {"py_modules": [_package_dir()], "excludes": ["__pycache__", "*.pyc"]}


# --- the worker (runs on a Ray node) -----------------------------------------------------------------


@ray.remote(max_restarts=0, max_concurrency=4)
class JobWorker:
    """One training job on a Ray worker: trains into a private folder, streams events and files.

    A threaded actor: ``stream`` (a generator) runs while ``stop`` and ``ping`` are called."""

    def __init__(self, owner: str, name: str, orphan_timeout_s: float = 600.0, warm: dict | None = None):
        """``warm`` ({"device", "threads"}): a spare, which trains a tiny model once (in the background,
        so it answers calls meanwhile) before it takes a job."""
        self.owner, self.name = owner, name
        self.run_id: str | None = None  # set by start(): the run this worker trains
        self.dir: Path | None = None
        self.watcher: FolderWatcher | None = None
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        # Messages for the owner, put and taken under the lock: only the newest stream may take one (an
        # older stream, whose owner died, must not take a message meant for the owner that replaced it).
        self.out: collections.deque = collections.deque()
        self.out_ready = threading.Condition(self.lock)
        self.thread: threading.Thread | None = None
        self.final: tuple | None = None
        self.step = 0
        self.last_scan = 0.0
        self.after_eval = False
        self.resync = False  # a new owner: ship every file again at the next scan
        self.generation = 0  # the newest stream; an older one ends
        self.last_ping = time.monotonic()
        self.orphan_timeout_s = orphan_timeout_s
        self.warm = threading.Event()
        threading.Thread(target=self._watchdog, name="tinygpt-orphan-watchdog", daemon=True).start()
        if warm is None:
            self.warm.set()
        else:
            threading.Thread(target=self._warm_up, args=(warm,), name="tinygpt-warm-up", daemon=True).start()

    # --- calls from the driver ---

    def info(self) -> dict:
        return {
            "owner": self.owner,
            "run_id": self.run_id,
            "started": self.thread is not None,
            "finished": self.final is not None,
            "step": self.step,
            "warm": self.warm.is_set(),
        }

    def wait_warm(self) -> bool:
        """Returns once the warm-up is over (at once for a worker started for a job)."""
        self.warm.wait()
        return True

    def placement(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            "runner": "ray",
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "actor": self.name,
        }

    def start(self, payload: dict) -> dict:
        """Unpack the shipped files of run ``payload["run_id"]`` and start training (once); returns
        where it trains. A spare still warming up finishes that first."""
        self.warm.wait()
        with self.lock:
            if self.thread is None:
                self.run_id = str(payload["run_id"])
                self.dir = Path(tempfile.mkdtemp(prefix=f"tinygpt-{self.run_id[-40:].replace('/', '_')}-"))
                self.watcher = FolderWatcher(self.dir)
                write_changes(self.dir, payload.get("files") or [])
                self.watcher.mark_known()
                threads = payload.get("threads")
                if threads:
                    import torch

                    torch.set_num_threads(int(threads))
                self.thread = threading.Thread(target=self._train, args=(payload,), name="tinygpt-train", daemon=True)
                self.thread.start()
        return self.placement()

    def stop(self) -> None:
        self.stop_event.set()

    def ping(self) -> None:
        self.last_ping = time.monotonic()

    def stream(self, full: bool = False):
        """Batches of messages (see tinygpt_core.shipping) until the run's result; ``full``: a new
        owner, so every file is shipped again and what the previous owner did not take is dropped."""
        with self.lock:
            self.generation += 1
            generation = self.generation
            self.last_ping = time.monotonic()
            if full:
                self.resync = True
                self.out.clear()  # what the previous owner did not take; the final is put again below
                if self.final is not None:  # training has ended: nobody else scans any more
                    self.watcher.forget()
                    self._put(("files", self.watcher.changes()))
                    self._put(self.final)
            self.out_ready.notify_all()  # an older stream waiting for a message ends now
        while True:
            msg = self._take(generation, ALIVE_S)
            if msg is _SUPERSEDED:
                return  # a newer stream took over
            if msg is None:
                yield [("alive",)]
                continue
            batch = [msg]
            deadline = time.monotonic() + BATCH_S
            while batch[-1][0] not in ("result", "failed"):
                more = self._take(generation, max(0.0, deadline - time.monotonic()))
                if more is None or more is _SUPERSEDED:
                    break
                batch.append(more)
            yield batch
            if batch[-1][0] in ("result", "failed"):
                return

    def _put(self, msg: tuple) -> None:  # lock held
        self.out.append(msg)
        self.out_ready.notify_all()

    def _take(self, generation: int, timeout: float):
        """The next message for stream ``generation``: None when none came within ``timeout``,
        _SUPERSEDED once a newer stream exists (checked with the taking, under one lock)."""
        deadline = time.monotonic() + timeout
        with self.out_ready:
            while True:
                if self.generation != generation:
                    return _SUPERSEDED
                if self.out:
                    return self.out.popleft()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.out_ready.wait(left)

    def close(self) -> None:
        """The owner has everything: remove the folder and end this worker."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        ray.actor.exit_actor()

    # --- on the worker ---

    def _train(self, payload: dict) -> None:
        callbacks = [self._on_event]
        try:
            if payload.get("spec") is None:
                result = training.resume(
                    self.dir, max_iters=payload.get("max_iters"), callbacks=callbacks, stop_event=self.stop_event
                )
            else:
                result = training.train(payload["spec"], self.dir, callbacks=callbacks, stop_event=self.stop_event)
            final: tuple = ("result", result.status, result.message)
        except TinyGPTError as exc:  # e.g. a damaged checkpoint shipped for a resume
            final = ("failed", str(exc))
        except BaseException as exc:  # noqa: BLE001 - a bug must reach the app, not kill the worker quietly
            log.exception("training crashed on the Ray worker")
            final = ("failed", f"{type(exc).__name__}: {exc}")
        with self.lock:
            self._ship_files()
            self.final = final
            self._put(final)

    def _on_event(self, event: training.TrainEvent) -> None:
        """The training callback (on the training thread): files first, when due, then the event."""
        self.step = event.step
        now = time.monotonic()
        due = event.kind in ("start", "end") or (
            event.kind == "step" and (self.after_eval or now - self.last_scan >= SCAN_INTERVAL_S)
        )
        with self.lock:
            if due:
                self._ship_files()
                self.after_eval = False
            if event.kind == "eval":
                self.after_eval = True  # checkpoints are written after the eval event: ship at the next step
            self._put(("events", [event]))

    def _ship_files(self) -> None:  # lock held
        if self.resync:
            self.watcher.forget()
            self.resync = False
        self.last_scan = time.monotonic()
        try:
            changes = self.watcher.changes()
        except OSError:
            log.exception("could not scan the run folder")
            return
        if changes:
            self._put(("files", changes))

    def _warm_up(self, settings: dict) -> None:
        try:
            _warm_up(settings.get("device", "cpu"), settings.get("threads"))
        finally:
            self.warm.set()

    def _watchdog(self) -> None:
        """End this worker once nobody needs it: a finished run that no app followed for the orphan
        timeout, or a spare (never handed a job) whose runner stopped pinging it."""
        while True:
            time.sleep(min(10.0, self.orphan_timeout_s, SPARE_ORPHAN_S / 4))
            quiet = time.monotonic() - self.last_ping
            finished_orphan = self.final is not None and quiet > self.orphan_timeout_s
            lost_spare = self.thread is None and quiet > SPARE_ORPHAN_S
            if finished_orphan or lost_spare:
                if self.dir is not None:
                    shutil.rmtree(self.dir, ignore_errors=True)
                os._exit(0)


def _warm_up(device: str, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    training.warm_up(device)


# --- the driver (the app's server or the CLI) -------------------------------------------------------


@dataclass
class _RayJob(_Job):
    """A job record, plus what the Ray runner needs to follow it."""

    payload: dict | None = None
    actor: Any = None
    callbacks: list = field(default_factory=list)
    gpus: float = 0.0
    cpus: float = 1.0
    reattached: bool = False
    from_spare: bool = False  # its actor was a warm spare (one that may have died meanwhile)
    last_status: float = 0.0  # time.monotonic() of the last status.json written for it


@dataclass
class _Spare:
    """A warm job actor of the runner's pool, not yet handed a job."""

    actor: Any
    ready: Any  # ObjectRef of its wait_warm(): resolves once it has warmed up (or raises if it died)
    cpus: float
    gpus: float


class RayJobRunner(JobRunner):
    """Runs each job as a detached Ray actor on the cluster; the run store stays on this machine."""

    def __init__(
        self,
        store: RunStore | None = None,
        *,
        address: str | None = None,
        namespace: str | None = None,
        gpus_per_job: float | None = None,
        cpus_per_job: float | None = None,
        reattach: bool = True,
        spares: int | None = None,
    ):
        """``spares``: warm job actors to keep ready (default $TINYGPT_RAY_SPARES, else 1; the CLI
        passes 0)."""
        self.store = store if store is not None else RunStore()
        self.address = connect(address)
        self.namespace = namespace or os.environ.get("TINYGPT_RAY_NAMESPACE", "").strip() or DEFAULT_NAMESPACE
        try:
            resources = ray.cluster_resources()
        except Exception as e:  # noqa: BLE001
            raise JobError(f"The Ray cluster at {self.address} does not answer: {e}") from None
        self.cluster_cpus = float(resources.get("CPU", 0))
        self.cluster_gpus = float(resources.get("GPU", 0))
        env_gpus = _env_float("TINYGPT_RAY_GPUS_PER_JOB", None)
        default_gpus = DEFAULT_GPU_SHARE if self.cluster_gpus > 0 else 0.0
        self.gpus_per_job = (
            gpus_per_job if gpus_per_job is not None else (default_gpus if env_gpus is None else env_gpus)
        )
        self.cpus_per_job = cpus_per_job if cpus_per_job is not None else _env_float("TINYGPT_RAY_CPUS_PER_JOB", 1.0)
        if self.gpus_per_job > 1 and self.gpus_per_job != int(self.gpus_per_job):
            raise ConfigError(
                f"TINYGPT_RAY_GPUS_PER_JOB must be a fraction up to 1 or a whole number, got {self.gpus_per_job:g}."
            )
        self.orphan_timeout_s = _env_float("TINYGPT_RAY_ORPHAN_TIMEOUT_S", 600.0)
        self.spare_count = int(spares if spares is not None else _env_float("TINYGPT_RAY_SPARES", DEFAULT_SPARES))
        self.spare_idle_s = _env_float("TINYGPT_RAY_SPARE_IDLE_S", DEFAULT_SPARE_IDLE_S)
        self.owner = f"{socket.gethostname()}:{self.store.root.resolve()}"
        self._lock = threading.Lock()
        self._jobs: dict[str, _RayJob] = {}
        self._seq = iter(range(1 << 62))
        self._free_cache: tuple[float, dict] = (0.0, {})
        self._where: dict[str, str] = {}  # job id -> "host (ip)" it trains on
        self._spares: list[_Spare] = []
        self._last_demand = time.monotonic()  # the last submit or resume: spares are released when idle
        self._closed = False
        self._keeper_wake = threading.Event()
        if reattach:
            self._reattach()
        if self.spare_count > 0:
            threading.Thread(target=self._keep_spares, name="tinygpt-ray-spares", daemon=True).start()

    # --- the JobRunner interface -----------------------------------------------------------------

    def submit(
        self,
        spec: training.TrainSpec,
        *,
        owner: str | None = None,
        run_dir: str | Path | None = None,
        callbacks=(),
    ) -> str:
        """As JobRunner.submit (``owner``: an app visitor, as there); ``run_dir`` trains into that folder
        instead of a new one of the store (the CLI's --out), ``callbacks`` get every TrainEvent on this
        machine (the CLI's progress bar)."""
        if owner is not None:  # a visitor: a server path is read only inside TINYGPT_CORPUS_DIRS, once, here
            spec = dataclasses.replace(spec, corpus=data.load_visitor_corpus(spec.corpus))
            self.check_visitor_capacity(owner)
        gpus, shipped = self._validate(spec)
        self._check_room()
        if run_dir is None:
            run_dir = Path(self.store.create(spec.name))
        else:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        job = self._new_job(spec.name or run_dir.name, run_dir, spec.train.max_iters, gpus, callbacks)
        job.spec, job.owner = spec, owner
        job.payload = {"run_id": run_dir.name, "spec": shipped, "files": [], "threads": self._threads()}
        try:
            if owner is not None:
                owners.write_owner(run_dir, owner)
            RunWriter(run_dir).write_status("queued", "Waiting for room on the Ray cluster.")
        except OSError as e:
            _remove_unstarted(run_dir)
            raise RunError(f"Cannot write to the run store {self.store.root}: {e.strerror or e}") from None
        self._launch(job)
        return job.id

    def check_visitor_capacity(self, owner: str, n: int = 1) -> None:
        """JobError unless ``owner`` may add ``n`` more jobs (TINYGPT_MAX_JOBS_PER_VISITOR)."""
        with self._lock:
            visitor_capacity_check(self._jobs.values(), owner, n)

    def resume(self, run_id: str, max_iters: int | None = None, *, owner: str | None = None, callbacks=()) -> str:
        """As JobRunner.resume (``owner`` counts against that visitor's cap): the run's folder is shipped
        to a worker, which continues it."""
        if owner is not None:
            self.check_visitor_capacity(owner)
        from .runs import load_checkpoint_state, read_config, read_status

        limits.check_writable("resuming runs")
        run_dir = self.store.path(run_id)
        cfg = read_config(run_dir)
        target = max_iters or cfg.train.max_iters
        limits.check_max_iters(target)
        if read_status(run_dir).status in ("running", "queued"):
            raise RunError(f"Run {run_id} is still training (or waiting to); it can be resumed once it has stopped.")
        _, optim_state, extra = load_checkpoint_state(run_dir, "last")
        if optim_state is None or "step" not in extra:
            raise RunError(f"Run {run_id} has no optimizer.safetensors, so it cannot be resumed exactly.")
        if int(extra["step"]) >= target:
            raise RunError(f"Run {run_id} is already at step {int(extra['step'])} of {target}.")
        gpus = self._gpus_for(cfg.train.device)
        self._check_room()
        files = pack_folder(run_dir, skip=("status.json",))
        if not (run_dir / "corpus.txt").is_file():  # a built-in corpus: the worker gets the exact text
            from .shipping import FileChange

            text = training._resume_corpus_text(run_dir, cfg.corpus)
            files.append(FileChange("corpus.txt", text.encode("utf-8", errors="surrogatepass")))
        with self._lock:
            if any(j.run_dir.name == run_dir.name and not j.finished for j in self._jobs.values()):
                raise JobError(f"Run {run_id} is already being resumed; watch that job instead.")
        job = self._new_job(cfg.name or run_dir.name, run_dir, target, gpus, callbacks)
        job.step = int(extra["step"])
        job.resume_max_iters = max_iters
        job.payload = {
            "run_id": run_dir.name,
            "spec": None,
            "files": files,
            "max_iters": max_iters,
            "threads": self._threads(),
        }
        self._end_stale_workers(run_dir.name)
        self._launch(job)
        return job.id

    def snapshot(self, job_id: str) -> JobSnapshot:
        with self._lock:
            job = self._get(job_id)
            return self._snapshot(job)

    def find_by_run(self, run_id: str) -> JobSnapshot | None:
        with self._lock:
            matches = [j for j in self._jobs.values() if j.run_dir.name == run_id]
            return self._snapshot(max(matches, key=lambda j: j.seq)) if matches else None

    def cancel(self, job_id: str) -> None:
        actor = None
        with self._lock:
            job = self._get(job_id)
            if job.status == "queued":
                job.status, job.message = "stopped", "Cancelled before it started."
                job.finished_at = time.monotonic()
                job.stop_event.set()
                actor = job.actor
                if job.spec is not None:
                    _remove_unstarted(job.run_dir)
            elif job.status == "running":
                job.stop_event.set()
                job.message = "Stopping after the current step…"
                if job.actor is not None:
                    job.actor.stop.remote()
        if actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    def list_jobs(self) -> list[JobSnapshot]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.seq, reverse=True)
            return [self._snapshot(j) for j in jobs]

    def describe(self) -> str:
        gpu = f", {self.gpus_per_job:g} GPU" if self.gpus_per_job else ""
        return (
            f"each job on the Ray cluster at {self.address} ({self.cluster_cpus:g} CPUs, {self.cluster_gpus:g} GPUs) "
            f"asking for {self.cpus_per_job:g} CPU{gpu}; the cluster queues what does not fit"
            + (f"; {self.spare_count} warm worker(s) kept ready while it has room" if self.spare_count else "")
        )

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every job of this runner, release its spares and wait (up to ``timeout`` s) for the
        jobs' ends to arrive."""
        with self._lock:
            self._closed = True
            ids = [j.id for j in self._jobs.values() if not j.finished]
        self._keeper_wake.set()
        self._release_spares("the runner shuts down")
        for job_id in ids:
            with contextlib.suppress(TinyGPTError):
                self.cancel(job_id)
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = [j.thread for j in self._jobs.values() if j.thread is not None]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # --- submission helpers ----------------------------------------------------------------------

    def _gpus_for(self, device: str) -> float:
        if device == "mps":
            raise ConfigError("A Ray cluster trains on CUDA GPUs or CPUs: choose device auto, cuda or cpu.")
        if device == "cuda" and self.gpus_per_job <= 0:
            raise ConfigError(
                "This Ray cluster's jobs get no GPU (it has none, or TINYGPT_RAY_GPUS_PER_JOB is 0): "
                "choose device auto or cpu."
            )
        return 0.0 if device == "cpu" else self.gpus_per_job

    def _validate(self, spec: training.TrainSpec) -> tuple[float, training.TrainSpec]:
        """Validate and prepare on this machine, which may have no GPU (the device is the worker's
        business): (GPU share, the spec to ship). The shipped spec carries the corpus text itself, so the
        worker reads no file of this machine (no shared filesystem)."""
        gpus = self._gpus_for(spec.train.device)
        local = spec
        if spec.train.device != "cpu":
            precision = "fp32" if spec.train.precision == "fp16" else spec.train.precision
            local = dataclasses.replace(spec, train=dataclasses.replace(spec.train, device="cpu", precision=precision))
        prepared = training.prepare(local)
        limits.check_spec(prepared)
        return gpus, dataclasses.replace(spec, corpus=prepared.corpus)

    def _threads(self) -> int:
        return max(1, int(self.cpus_per_job))

    def _new_job(self, name: str, run_dir: Path, max_iters: int, gpus: float, callbacks) -> _RayJob:
        return _RayJob(
            id=uuid.uuid4().hex[:12],
            seq=next(self._seq),
            spec=None,
            name=name,
            device="cuda" if gpus > 0 else "cpu",
            run_dir=run_dir,
            created_at=time.time(),
            max_iters=max_iters,
            callbacks=list(callbacks),
            gpus=gpus,
            cpus=self.cpus_per_job,
        )

    def _check_room(self) -> None:
        """The operator's bound on waiting jobs (TINYGPT_MAX_QUEUED_JOBS) holds here too: Ray would queue
        without end."""
        limit = limits.current().max_queued_jobs
        with self._lock:
            waiting = sum(1 for j in self._jobs.values() if j.status == "queued")
        if waiting >= limit:
            raise JobError(
                f"{waiting} jobs are already waiting for room on the Ray cluster (the limit is {limit}); "
                "try again when some have started."
            )

    def _prune(self) -> None:  # lock held
        """Forget the oldest finished jobs beyond KEEP_FINISHED (their runs stay on disk)."""
        finished = sorted((j for j in self._jobs.values() if j.finished), key=lambda j: j.seq)
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.id]
            self._where.pop(job.id, None)

    def _launch(self, job: _RayJob) -> None:
        with self._lock:
            if not job.reattached:
                self._last_demand = time.monotonic()
            self._jobs[job.id] = job
            job.thread = threading.Thread(target=self._follow, args=(job,), name=f"tinygpt-ray-{job.id}", daemon=True)
            job.thread.start()

    # --- the driver thread of one job ------------------------------------------------------------

    def _follow(self, job: _RayJob) -> None:
        """Create (or find again) the job's actor, then apply what it streams until the run ends."""
        final: tuple | None = None
        mirror = FolderMirror(job.run_dir, on_status=lambda s, m, step: self._worker_status(job, s, m, step))
        try:
            writer = RunWriter(job.run_dir)
            if not job.reattached:
                actor = self._create_actor(job)
                if actor is None:
                    return  # cancelled before its actor was made
                try:
                    placement = ray.get(actor.start.remote(job.payload))  # waits while Ray queues the actor
                except ray.exceptions.RayActorError:
                    if not job.from_spare:
                        raise
                    # The spare died before it was handed the job (its node went, or a restarted app
                    # on this store ended it): a fresh actor takes the job instead.
                    log.warning("job %s: its warm spare was gone; starting a fresh worker", job.id)
                    actor = self._create_actor(job, use_spare=False)
                    if actor is None:
                        return
                    placement = ray.get(actor.start.remote(job.payload))
                job.payload = None
            else:
                actor = job.actor
                placement = ray.get(actor.placement.remote(), timeout=30)
            with self._lock:
                if job.status == "stopped" and job.finished_at is not None:
                    return  # cancelled while it waited; the actor was killed
                job.status = "running"
                job.started_at = time.monotonic()
                if not job.stop_event.is_set():
                    job.message = f"Starting on {placement.get('hostname')} ({placement.get('node_ip')})…"
                stop_now = job.stop_event.is_set()
            if stop_now:
                actor.stop.remote()
            self._where[job.id] = f"{placement.get('hostname')} ({placement.get('node_ip')})"
            self._record_placement(job, placement)
            job.last_status = time.monotonic()
            last_ping = time.monotonic()
            seeded = not job.reattached
            for ref in actor.stream.options(num_returns="streaming").remote(job.reattached):
                batch = ray.get(ref)
                for msg in batch:
                    kind = msg[0]
                    if kind == "files":
                        mirror.apply(msg[1])
                        if not seeded:
                            self._seed_from_disk(job)
                            seeded = True
                    elif kind == "events":
                        self._apply_events(job, msg[1])
                    elif kind in ("result", "failed"):
                        final = msg
                now = time.monotonic()
                if now - last_ping >= PING_S:
                    actor.ping.remote()
                    last_ping = now
                if final is None and now - job.last_status >= STATUS_REFRESH_S:
                    with self._lock:
                        step, message = job.step, job.message
                    self._write_status(writer, "running", message, step)
            if final is None:
                raise JobError("the worker's stream ended without a result")
            self._close(actor)
        except Exception as exc:  # noqa: BLE001 - every end is recorded: lost worker, failed start, bug
            with self._lock:
                if job.status == "stopped" and job.finished_at is not None:
                    return  # cancelled while queued: the killed actor's error is expected
            final = self._lost(job, exc)
        if final[0] == "result":
            status, message = final[1], final[2]
        else:
            status, message = final[0], final[1]
            if status == "failed":
                status = "error"
                _write_status(job.run_dir, status, message)
        with self._lock:
            job.status = status if status in FINISHED_STATUSES else "error"
            job.message = message or _default_message(job.status)
            job.finished_at = time.monotonic()
            self._prune()

    def _create_actor(self, job: _RayJob, use_spare: bool = True):
        """The job's actor: a warm spare of its shape when the pool has one, else a new one."""
        with self._lock:
            if job.finished:
                return None
            spare = self._take_spare(job) if use_spare else None
            if spare is not None:
                job.actor, job.from_spare = spare.actor, True
            else:
                job.actor, job.from_spare = self._new_actor(job.cpus, job.gpus), False
            actor = job.actor
        self._keeper_wake.set()  # replenish the pool behind it
        return actor

    def _new_actor(self, cpus: float, gpus: float, warm: bool = False, **options: Any):
        name = ACTOR_PREFIX + uuid.uuid4().hex
        return JobWorker.options(
            name=name,
            namespace=self.namespace,
            lifetime="detached",
            num_cpus=cpus,
            num_gpus=gpus,
            **options,
        ).remote(
            self.owner,
            name,
            self.orphan_timeout_s,
            {"device": "cuda" if gpus > 0 else "cpu", "threads": self._threads()} if warm else None,
        )

    # --- the pool of warm spares ---------------------------------------------------------------------

    def _take_spare(self, job: _RayJob) -> _Spare | None:  # lock held
        """The oldest spare of the job's shape (most likely warm by now), out of the pool."""
        for spare in self._spares:
            if (spare.cpus, spare.gpus) == (job.cpus, job.gpus):
                self._spares.remove(spare)
                return spare
        return None

    def _keep_spares(self) -> None:
        """The keeper thread: tend the pool about every KEEP_S, and at once when a spare was taken."""
        last_ping = time.monotonic()
        failing = False  # log a failure once, not every second while the cluster is away
        while not self._closed:
            try:
                ping = time.monotonic() - last_ping >= PING_S
                self._tend_spares(ping)
                if ping:
                    last_ping = time.monotonic()
                failing = False
            except Exception:  # noqa: BLE001 - the pool is an optimisation: jobs still start without it
                if not failing:
                    log.exception("could not tend the pool of spare Ray workers")
                failing = True
            self._keeper_wake.wait(KEEP_S)
            self._keeper_wake.clear()

    def _tend_spares(self, ping: bool) -> None:
        """Drop dead spares; release them all when the runner is idle or the cluster has no room for one
        more job besides them; else start one more while below the target and everything is warm.

        A spare holds its CPU/GPU share while it waits. "Room for one more job besides the spares"
        (``ray.available_resources()`` counts the spares' shares as used) means a spare never holds
        the last free share: any job that arrives, this app's of another shape or another app's on the
        same cluster, finds room instead of waiting behind a spare; and while a job of this runner
        waits, no spare is started."""
        with self._lock:
            spares = list(self._spares)
            idle = time.monotonic() - self._last_demand > self.spare_idle_s
            waiting = any(j.status == "queued" and not j.finished for j in self._jobs.values())
        pending = []
        for spare in spares:
            done, _ = ray.wait([spare.ready], timeout=0)
            if not done:
                pending.append(spare)
                continue
            try:
                ray.get(spare.ready, timeout=0)
            except Exception:  # noqa: BLE001 - it died (killed, node lost): forget it
                self._forget_spare(spare)
                continue
            if ping:
                spare.actor.ping.remote()
        if ping:
            for spare in pending:  # still warming up (or not placed yet: the ping waits for it)
                spare.actor.ping.remote()
        share = {"CPU": self.cpus_per_job, "GPU": self.gpus_per_job}
        free = self._free_resources(fresh=True)
        room_for_one = all(free.get(k, 0.0) >= v for k, v in share.items() if v > 0)
        if idle or not room_for_one:
            if spares:
                self._release_spares("idle" if idle else "the cluster has no room for one more job besides them")
            return
        with self._lock:
            count = len(self._spares)
        room_for_two = all(free.get(k, 0.0) >= 2 * v for k, v in share.items() if v > 0)
        if self._closed or waiting or pending or count >= self.spare_count or not room_for_two:
            return
        actor = self._new_actor(self.cpus_per_job, self.gpus_per_job, warm=True, scheduling_strategy="SPREAD")
        spare = _Spare(actor, actor.wait_warm.remote(), self.cpus_per_job, self.gpus_per_job)
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._spares.append(spare)
        if closed:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self._free_cache = (0.0, {})  # the next look sees the spare's share taken

    def _forget_spare(self, spare: _Spare) -> None:
        with self._lock:
            if spare in self._spares:
                self._spares.remove(spare)

    def _release_spares(self, why: str) -> None:
        with self._lock:
            spares, self._spares = self._spares, []
        for spare in spares:
            log.info("releasing a spare Ray worker: %s", why)
            with contextlib.suppress(Exception):
                ray.kill(spare.actor, no_restart=True)
        if spares:
            self._free_cache = (0.0, {})

    def spares_ready(self) -> int:
        """How many spares are warm and waiting for a job now (the benchmark waits for one)."""
        with self._lock:
            refs = [s.ready for s in self._spares]
        return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else 0

    def _apply_events(self, job: _RayJob, events: list) -> None:
        for event in events:
            if event.kind == "start":  # the folder it reports is the worker's; the run's is here
                event.data = {**event.data, "run_dir": str(job.run_dir), "worker": self._where.get(job.id, "")}
        with self._lock:
            for event in events:
                try:
                    _apply_event(job, event)
                    if event.kind == "start" and not job.stop_event.is_set() and event.data.get("worker"):
                        job.message = f"{job.message.rstrip('.')} on {event.data['worker']}, a Ray worker."
                except Exception:  # noqa: BLE001 - a progress glitch must not end the job
                    log.exception("could not record %s event of job %s", getattr(event, "kind", "?"), job.id)
        for event in events:
            for cb in job.callbacks:
                try:
                    cb(event)
                except Exception:  # noqa: BLE001
                    log.exception("a progress callback of job %s raised", job.id)

    def _worker_status(self, job: _RayJob, status: str, message: str, step: int) -> None:
        """The worker wrote status.json: write it here, with this process as the one following the run."""
        self._write_status(RunWriter(job.run_dir), status, message, step)
        job.last_status = time.monotonic()

    @staticmethod
    def _write_status(writer: RunWriter, status: str, message: str, step: int) -> None:
        try:
            writer.write_status(status, message, step)
        except (OSError, ValueError):
            log.exception("could not write the status of %s", writer.run_dir)

    def _record_placement(self, job: _RayJob, placement: dict) -> None:
        """placement.json: where each stretch of the run trained (runner, node, host, GPUs, resources)."""
        from .runs import utc_now_iso, write_json_atomic

        path = job.run_dir / PLACEMENT_FILE
        entry = {
            **placement,
            "cluster": self.address,
            "resources": {"CPU": job.cpus, "GPU": job.gpus},
            "device": job.device,
            "started_at": utc_now_iso(),
            "reattached": job.reattached,
        }
        try:
            history = json.loads(path.read_text()).get("history", []) if path.is_file() else []
        except (OSError, ValueError, AttributeError):
            history = []
        try:
            write_json_atomic(path, {"runner": "ray", **entry, "history": [*history, entry]})
        except OSError:
            log.exception("could not write %s", path)

    def _seed_from_disk(self, job: _RayJob) -> None:
        """A job found again after a restart: its curves so far, from the files just shipped."""
        try:
            df = read_metrics(job.run_dir)
        except RunError:
            return
        rows = [{c: (float(r[c]) if c != "step" else int(r[c])) for c in df.columns} for _, r in df.iterrows()]
        samples = read_samples(job.run_dir)
        with self._lock:
            job.metrics = rows[-5000:]
            job.samples.extend(samples)
            if rows:
                job.step = max(job.step, rows[-1]["step"])

    def _lost(self, job: _RayJob, exc: Exception) -> tuple:
        """The worker died, could not start, or the stream broke: how the run ends, recorded on disk."""
        with self._lock:
            step, started = job.step, job.started_at is not None
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, ray.exceptions.RuntimeEnvSetupError):
            message = f"The Ray cluster could not set up the job's environment: {reason}"
            _write_status(job.run_dir, "error", message)
            return ("error", message)
        if not started:
            message = f"The job could not start on the Ray cluster: {type(exc).__name__}: {reason}"
            _write_status(job.run_dir, "error", message)
            return ("error", message)
        message = (
            f"The Ray worker training this run ended unexpectedly at step {step} ({type(exc).__name__}). "
            "Resume the run to continue from its last checkpoint."
        )
        log.warning("job %s: %s: %s", job.id, message, reason)
        with contextlib.suppress(Exception):
            RunWriter(job.run_dir).write_status("interrupted", message, step)
        return ("interrupted", message)

    def _close(self, actor) -> None:
        with contextlib.suppress(Exception):
            ray.get(actor.close.remote(), timeout=10)
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)

    # --- found again after a restart ---------------------------------------------------------------

    def _workers(self) -> list[tuple[Any, dict]]:
        """This store's job actors on the cluster, each with its ``info()`` (asked of all at once)."""
        try:
            named = ray.util.list_named_actors(all_namespaces=True)
        except Exception:  # noqa: BLE001
            log.exception("could not list the cluster's actors")
            return []
        actors = []
        for entry in named:
            name = entry.get("name", "") if isinstance(entry, dict) else str(entry)
            if isinstance(entry, dict) and entry.get("namespace") == self.namespace and name.startswith(ACTOR_PREFIX):
                with contextlib.suppress(ValueError):  # gone since the listing
                    actors.append(ray.get_actor(name, namespace=self.namespace))
        asked = [(a, a.info.remote()) for a in actors]
        refs = [ref for _, ref in asked]
        answered = set(ray.wait(refs, num_returns=len(refs), timeout=10)[0]) if refs else set()
        found = []
        for actor, ref in asked:
            if ref not in answered:  # not started yet (Ray queues it) or stuck
                continue
            try:
                info = ray.get(ref)
            except Exception:  # noqa: BLE001 - it died meanwhile
                continue
            if info.get("owner") == self.owner:  # not another app's that shares the cluster and namespace
                found.append((actor, info))
        return found

    def _end_stale_workers(self, run_id: str) -> None:
        """Before a resume: end any worker still holding this run (its owner died unseen, e.g. a CLI
        that did not find it again), so two workers never train one run."""
        for actor, info in self._workers():
            if info.get("run_id") == run_id:  # the run's status said it was not training here
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)

    def _reattach(self) -> None:
        """Follow again the workers this store's runs left training on the cluster."""
        from .runs import read_config

        for actor, info in self._workers():
            if not info.get("started"):  # a spare or an unstarted job of a runner that is gone
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
                continue
            run_id = str(info.get("run_id") or "")
            try:
                run_dir = self.store.path(run_id)
            except (RunError, ValueError):
                continue
            try:
                cfg = read_config(run_dir)
                title, max_iters = cfg.name or run_id, cfg.train.max_iters
                device = cfg.train.device
            except RunError:
                title, max_iters, device = run_id, 0, "cpu"
            job = self._new_job(title, run_dir, max_iters, self.gpus_per_job if device != "cpu" else 0.0, ())
            job.status, job.message = "queued", "Found again on the Ray cluster after a restart of the app."
            job.step = int(info.get("step") or 0)
            job.actor = actor
            job.reattached = True
            self._launch(job)

    # --- snapshots (lock held) ---------------------------------------------------------------------

    def _get(self, job_id: str) -> _RayJob:
        return job_record(self._jobs, job_id)

    def _snapshot(self, job: _RayJob) -> JobSnapshot:
        position, message = None, job.message
        if job.status == "queued" and not job.reattached:
            waiting = sorted((j for j in self._jobs.values() if j.status == "queued"), key=lambda j: j.seq)
            position = [j.id for j in waiting].index(job.id) + 1
            message = self._queued_message(job, position)
        return _snapshot_of(job, position, message)

    def _queued_message(self, job: _RayJob, position: int) -> str:
        if job.stop_event.is_set():
            return job.message
        what = "a GPU" if job.gpus > 0 else "room"
        need = f"{job.cpus:g} CPU" + (f" and {job.gpus:g} GPU" if job.gpus else "")
        ahead = position - 1
        ahead_text = (
            f" {ahead} job{'s' if ahead != 1 else ''} of this server wait{'s' if ahead == 1 else ''} ahead of it."
            if ahead
            else ""
        )
        if self._fits(job):
            return f"Starting a worker on the Ray cluster ({need})…{ahead_text}"
        return f"Waiting for {what} on the cluster: each job asks for {need} and the cluster is full.{ahead_text}"

    def _fits(self, job: _RayJob) -> bool:
        """Whether the cluster has room for the job right now (cached: a snapshot must be cheap)."""
        free = self._free_resources()
        return free.get("CPU", 0) >= job.cpus and free.get("GPU", 0) >= job.gpus

    def _free_resources(self, fresh: bool = False) -> dict:
        """The cluster's free resources (cached for RESOURCE_CACHE_S unless ``fresh``)."""
        at, free = self._free_cache
        if fresh or time.monotonic() - at > RESOURCE_CACHE_S:
            try:
                free = ray.available_resources()
            except Exception:  # noqa: BLE001
                free = {}
            self._free_cache = (time.monotonic(), free)
        return free


__all__ = ["RayJobRunner", "JobWorker", "connect", "ACTOR_PREFIX", "PLACEMENT_FILE", "HEARTBEAT_TIMEOUT_S"]
