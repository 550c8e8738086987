"""Where a job trains: the execution backends of the job runner, and the child process's main.

``LocalJobRunner`` (jobs.py) owns queueing, records and snapshots; an ``Execution`` owns how one job
is trained and how its events come back. Both backends call ``training.train`` / ``training.resume``
with a callback and a stop event, and return the run's final ``(status, message)``:

- ``ProcessExecution`` (the default): a child ``python -m tinygpt_core.worker`` trains the job. The
  runner's job thread sends it the pickled task, then only reads the events it streams back (batched
  about every 0.1 s) and feeds them to the runner's callback. A stop request is a message to the
  child, which checks it every step and ends with a checkpoint, exactly as a thread does. Training
  thus never shares the server's interpreter lock: a Streamlit server busy redrawing pages for
  watching browsers (plotly figures, post-run garbage collection, websocket traffic) cannot stall it.
  The child uses ``threads_per_job()`` torch threads, leaving the server a core. A child that dies
  without a result (killed, out of memory) ends the job as an error that says so. If the server
  dies, the child sees its control pipe close and exits at once, so the run reads as interrupted
  (resumable from its last checkpoint), as a thread's run would.
- ``ThreadExecution``: a thread of this process, as before. For tests that inject a fake trainer or
  a failing disk into this process, and for debugging. ``TINYGPT_JOB_EXECUTION=thread`` selects it.

A remote runner (Ray) has the same shape as the process backend: a task goes out, events stream
back, a stop is a message; no shared memory.

Why not ``multiprocessing``: Streamlit runs each page script as ``sys.modules["__main__"]``, so a
spawned multiprocessing child would re-run app.py; a plain ``python -m`` child imports only this
package. Messages are length-prefixed pickles between two processes of the same install.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import limits
from .errors import JobError, TinyGPTError
from .limits import cpu_cores

log = logging.getLogger(__name__)

EXECUTIONS = ("process", "thread")
EVENT_BATCH_S = 0.1  # the child sends step events at most this often (start, eval, sample and end at once)
_HEADER = struct.Struct("!I")


@dataclass
class Task:
    """One job to train: a new run (``spec``) or the continuation of ``run_dir`` (``spec`` None)."""

    run_dir: Path
    spec: Any = None  # training.TrainSpec; None resumes run_dir
    store_root: Path | None = None
    resume_max_iters: int | None = None
    threads: int | None = None  # torch intra-op threads for a child process (None: leave torch's default)


EventSink = Callable[[Any], None]  # receives training.TrainEvent objects, in order


class Execution(ABC):
    """Trains one task at a time per call; ``run`` blocks the calling (job) thread until the run ends."""

    name: str = ""

    @abstractmethod
    def run(self, task: Task, on_event: EventSink, stop: threading.Event) -> tuple[str, str]:
        """Train ``task``; events go to ``on_event``; ``stop`` set = save and end within a step.

        Returns the run's (status, message). Raises TinyGPTError when the run could not record its
        own end (e.g. the corpus vanished before it started, or the training process died): the
        runner then writes the error into the run folder."""

    def estimate_step_time(self, spec: Any, device: str, threads: int | None) -> float:
        """Seconds per optimizer step of ``spec``, measured where and as this backend trains it."""
        from . import training

        return training.estimate_step_time(spec, device=device)

    def close(self) -> None:  # noqa: B027 - optional: only backends that hold something override it
        """Release what the backend holds (a child still running is killed)."""


def threads_per_job(running: int = 1) -> int:
    """Torch threads for one training process when ``running`` jobs (it included) train at once:
    $TINYGPT_NUM_THREADS, else the cores left after one for the server, shared among them (at least 1).

    The runner asks when a job starts, with the jobs running then, so a run alone gets every core it
    got before, and the members of a grid started together split the machine between them."""
    env = os.environ.get("TINYGPT_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise JobError(f"TINYGPT_NUM_THREADS must be a whole number >= 1, got {env!r}.") from None
        if n < 1:
            raise JobError(f"TINYGPT_NUM_THREADS must be a whole number >= 1, got {env!r}.")
        return n
    running = max(1, running)
    return max(1, -(-(cpu_cores() - 1) // running))  # ceil: 2 jobs on 2 cores get 1 thread each, not 0


def grid_plan(members: int, max_jobs: int | None = None) -> tuple[int, int]:
    """(jobs at once, torch threads each) with which the local runner trains a grid of ``members`` runs
    by default: as many at once as it has slots (``max_jobs``, default the operator's per-device bound)."""
    if max_jobs is None:
        max_jobs = limits.current().max_jobs_per_device
    at_once = max(1, min(members, max_jobs))
    return at_once, threads_per_job(at_once)


def make_execution(name: str | None = None, warm: bool = False) -> Execution:
    """The backend called ``name`` (default: $TINYGPT_JOB_EXECUTION, else "process"); ``warm``: see
    ProcessExecution."""
    name = (name or os.environ.get("TINYGPT_JOB_EXECUTION") or "process").strip().lower()
    if name == "process":
        return ProcessExecution(warm=warm)
    if name == "thread":
        return ThreadExecution()
    raise JobError(f"TINYGPT_JOB_EXECUTION must be one of {', '.join(EXECUTIONS)}, got {name!r}.")


def run_task(task: Task, callbacks: list, stop: threading.Event) -> tuple[str, str]:
    """Train ``task`` in this process (the body of both backends)."""
    from . import training
    from .runs import RunStore

    if task.spec is None:
        result = training.resume(task.run_dir, max_iters=task.resume_max_iters, callbacks=callbacks, stop_event=stop)
    else:
        store = RunStore(task.store_root) if task.store_root is not None else None
        result = training.train(task.spec, task.run_dir, store=store, callbacks=callbacks, stop_event=stop)
    return result.status, result.message


class ThreadExecution(Execution):
    """Train on the calling thread, in this process."""

    name = "thread"

    def run(self, task: Task, on_event: EventSink, stop: threading.Event) -> tuple[str, str]:
        return run_task(task, [on_event], stop)


# --- the process backend -----------------------------------------------------------------------------


def _send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _recv(stream: IO[bytes]) -> Any:
    header = _read_exactly(stream, _HEADER.size)
    return pickle.loads(_read_exactly(stream, _HEADER.unpack(header)[0]))  # noqa: S301 - our own child's pipe


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "it did not exit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the system may have run out of memory)" if -code == signal.SIGKILL else ""
        return f"it was killed by {name}{hint}"
    return f"it exited with code {code}"


class ProcessExecution(Execution):
    """Train each task in a child ``python -m tinygpt_core.worker`` and stream its events back."""

    name = "process"

    def __init__(self, python: str | None = None, warm: bool = False):
        # warm: keep one spare child that has already imported torch and the trainer, so a job starts
        # in a fraction of a second instead of paying the imports (1-2 s, several on a busy machine).
        # The spare is started here and again whenever a job ends, never while one trains.
        self.python = python or sys.executable
        self.warm = warm
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen] = set()
        self._spare: subprocess.Popen | None = None
        self._closed = False
        if warm:
            self._ensure_spare()

    def _ensure_spare(self) -> None:
        with self._lock:
            if self._closed or (self._spare is not None and self._spare.poll() is None):
                return
        try:
            proc = self._spawn()
        except OSError:
            log.exception("could not start a spare training process")
            return
        with self._lock:
            self._spare = proc

    def _take(self) -> subprocess.Popen:
        with self._lock:
            proc, self._spare = self._spare, None
        if proc is not None and proc.poll() is None:
            return proc
        return self._spawn()

    def _spawn(self) -> subprocess.Popen:
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [self.python, "-m", "tinygpt_core.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # events; the child's own prints go to stderr (the server's log)
            env=env,
            bufsize=0,
        )
        with self._lock:
            self._children.add(proc)
        return proc

    def run(self, task: Task, on_event: EventSink, stop: threading.Event) -> tuple[str, str]:
        proc = self._take()
        done = threading.Event()
        write_lock = threading.Lock()

        def forward_stop() -> None:  # the child checks its own stop flag every step
            while not done.is_set():
                if stop.wait(0.05):
                    with write_lock, contextlib.suppress(OSError, ValueError):
                        _send(proc.stdin, ("stop",))
                    return

        try:
            try:
                with write_lock:
                    _send(proc.stdin, ("task", _picklable(task)))
            except OSError:
                pass  # the child died at once; its exit code says why, below
            threading.Thread(target=forward_stop, name="tinygpt-job-stop", daemon=True).start()
            result: tuple | None = None
            step = None
            while True:
                try:
                    msg = _recv(proc.stdout)
                except (EOFError, OSError):
                    break
                if msg[0] == "events":
                    for event in msg[1]:
                        step = event.step
                        on_event(event)
                elif msg[0] in ("result", "failed"):
                    result = msg
            code = proc.wait()
        finally:
            done.set()
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()
            with contextlib.suppress(OSError, ValueError):
                proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with self._lock:
                self._children.discard(proc)
                busy = bool(self._children - {self._spare})
            if self.warm and not busy:
                self._ensure_spare()
        if result is None:
            at = f" at step {step}" if step is not None else " before training started"
            raise JobError(
                f"The training process ended unexpectedly{at}: {_exit_reason(code)}. "
                "Resume the run to continue from its last checkpoint."
            )
        if result[0] == "failed":  # the run could not record its own end; the runner writes it
            raise JobError(result[1])
        return result[1], result[2]

    def estimate_step_time(self, spec: Any, device: str, threads: int | None) -> float:
        """Time a few steps in a training process like a job's (its own interpreter, ``threads`` threads)."""
        proc = self._take()
        try:
            try:
                _send(proc.stdin, ("estimate", (_picklable(Task(Path("."), spec)).spec, device, threads)))
                msg = _recv(proc.stdout)
            except (EOFError, OSError):
                raise JobError(f"The timing process ended unexpectedly: {_exit_reason(proc.wait())}.") from None
        finally:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()
            with contextlib.suppress(OSError, ValueError):
                proc.stdout.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with self._lock:
                self._children.discard(proc)
                busy = bool(self._children - {self._spare})
            if self.warm and not busy:
                self._ensure_spare()
        if msg[0] == "failed":
            raise JobError(msg[1])
        return float(msg[1])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            children = list(self._children)
        for proc in children:
            if proc.poll() is None:
                proc.kill()


def _picklable(task: Task) -> Task:
    """The task as sent: with the corpus already tokenized when that pickles (the child skips the work)."""
    try:
        pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
        return task
    except Exception:  # noqa: BLE001 - e.g. a tokenizer holding something unpicklable: the child redoes it
        spec = task.spec
        if spec is not None and getattr(spec, "_prepared", None) is not None:
            import copy

            spec = copy.copy(spec)
            spec._prepared = None
        return Task(task.run_dir, spec, task.store_root, task.resume_max_iters, task.threads)


# --- the child ---------------------------------------------------------------------------------------


def _estimate(out: IO[bytes], spec: Any, device: str, threads: int | None) -> int:
    from . import training

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        _send(out, ("estimate", training.estimate_step_time(spec, device=device)))
    except TinyGPTError as exc:
        _send(out, ("failed", str(exc)))
    except Exception as exc:  # noqa: BLE001 - reported to the page, not a silent dead process
        _send(out, ("failed", f"{type(exc).__name__}: {exc}"))
    return 0


class _Sender:
    """The child's side of the event pipe: step events batched, everything else sent at once."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.lock = threading.Lock()
        self.pending: list = []
        self.last = time.monotonic()

    def event(self, event: Any) -> None:
        with self.lock:
            self.pending.append(event)
            now = time.monotonic()
            if event.kind != "step" or now - self.last >= EVENT_BATCH_S:
                self._flush(now)

    def _flush(self, now: float) -> None:
        if self.pending:
            _send(self.stream, ("events", self.pending))
            self.pending = []
        self.last = now

    def send(self, msg: tuple) -> None:
        with self.lock:
            self._flush(time.monotonic())
            _send(self.stream, msg)


def main() -> int:
    """The child: read a task from stdin, train it, stream events and the result to (the original) stdout."""
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything printed lands in the server's log, never in the event stream
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    with contextlib.suppress(AttributeError, ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C of the server: the closed pipe ends us
    from . import training  # imported before the task arrives: a spare child is warm

    if not select.select([inp], [], [], 0)[0]:
        # No task waiting: this is a spare. Train two steps of a tiny model on one thread, so the job it
        # is handed later skips the first-use costs (the lazy optimizer imports alone take 2-5 s).
        import torch

        torch.set_num_threads(1)
        training.warm_up("auto")

    try:
        kind, task = _recv(inp)
    except EOFError:
        return 0  # the server went away before handing over a task (or a spare was not needed)
    if kind == "estimate":
        return _estimate(out, *task)
    assert kind == "task"
    if task.threads:
        import torch

        torch.set_num_threads(task.threads)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
    stop = threading.Event()

    def control() -> None:
        while True:
            try:
                msg = _recv(inp)
            except (EOFError, OSError):
                # The server is gone: end now, as its training thread would have (the run reads as
                # interrupted and resumes from its last checkpoint).
                os._exit(3)
            if msg[0] == "stop":
                stop.set()

    threading.Thread(target=control, name="tinygpt-worker-control", daemon=True).start()
    sender = _Sender(out)
    try:
        status, message = run_task(task, [sender.event], stop)
        sender.send(("result", status, message))
    except TinyGPTError as exc:  # e.g. the corpus file vanished between submit and start
        sender.send(("failed", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - a bug must surface on the page, not kill the child quietly
        log.exception("training crashed in the worker process")
        sender.send(("failed", f"{type(exc).__name__}: {exc}"))
    sys.stderr.flush()
    # Everything is sent; skip interpreter shutdown, which would wait on the control thread's read.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
