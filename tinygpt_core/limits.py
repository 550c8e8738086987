"""Operator limits for a shared server: read from environment variables, with safe defaults.

One lab may serve a whole class from one machine, or be left open as a public demo. The person
running it sets these before starting the app (or the CLI); every place that could be abused asks
this module instead of hard-coding a number:

    TINYGPT_MAX_UPLOAD_MB        largest uploaded corpus, in MB              (default 10)
    TINYGPT_MAX_PARAMS           most parameters a model to train may have  (default 50_000_000)
    TINYGPT_MAX_ITERS            most optimizer steps one run may ask for    (default 100_000)
    TINYGPT_MAX_JOBS_PER_DEVICE  training jobs running at once per device   (default: one per CPU core)
    TINYGPT_MAX_QUEUED_JOBS      jobs waiting for a slot, over all devices  (default 32)
    TINYGPT_READ_ONLY            1/true/yes: show runs, allow no training, resuming or deleting (default off)
    TINYGPT_MAX_JOBS_PER_VISITOR runs one visitor may have training or waiting at once (default 12)
    TINYGPT_MAX_NEW_TOKENS       most tokens one decoding column may write      (default 400)
    TINYGPT_MAX_BEAMS            most beams of one beam-search column           (default 16)
    TINYGPT_MAX_DECODE_WORK      new tokens x beams, summed over a request's columns (default 3_200)
    TINYGPT_MAX_DECODES_AT_ONCE  decoding requests served at once; others wait their turn (default 1)
    TINYGPT_CHECKPOINT_BUDGET_MB disk one run's checkpoint history may fill (default 256; CLI too)
    TINYGPT_CORPUS_DIRS          folders (os.pathsep-separated) whose files visitors may train on
                                 (default none: the app offers no server path at all; see data.py)

Values are read on every call (cheap), so a test can set them with monkeypatch; a value that is not
a positive whole number (or a yes/no for the flag) is a ConfigError naming the variable.

The app (and its job runner) applies the defaults: it is what a class or the public reaches. The
CLI is run by someone who already has a shell on the machine, so it applies only the variables the
operator has actually set (``current(explicit_only=True)``): TINYGPT_READ_ONLY=1 stops CLI
training too, but an unset TINYGPT_MAX_ITERS does not cap a long run started from a terminal.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "TINYGPT_MAX_UPLOAD_MB": 10,
    "TINYGPT_MAX_PARAMS": 50_000_000,
    "TINYGPT_MAX_ITERS": 100_000,
    # None: one job per CPU core (cpu_cores()). Tiny models are dispatch-bound: a run gains little from
    # a second thread, while a second run in its own process keeps that core busy, so where cores are
    # idle an ablation grid finishes sooner side by side than one run after another (bench/grids.py).
    "TINYGPT_MAX_JOBS_PER_DEVICE": None,
    "TINYGPT_MAX_QUEUED_JOBS": 32,
    "TINYGPT_READ_ONLY": False,
    "TINYGPT_MAX_JOBS_PER_VISITOR": 12,  # a full ablation grid (baseline + every ablation) fits
    "TINYGPT_MAX_NEW_TOKENS": 400,
    "TINYGPT_MAX_BEAMS": 16,
    "TINYGPT_MAX_DECODE_WORK": 3_200,  # e.g. 400 tokens x 8 beams, or 4 columns x 400 tokens x 2
    "TINYGPT_MAX_DECODES_AT_ONCE": 1,
    "TINYGPT_CHECKPOINT_BUDGET_MB": 256,  # baby keeps its whole log-spaced history (~20 x 3 MB)
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int
    max_params: int
    max_iters: int
    max_jobs_per_device: int
    max_queued_jobs: int
    read_only: bool
    # Serving to untrusted visitors (defaults from DEFAULTS, so code building a Limits by hand keeps working).
    max_jobs_per_visitor: int = DEFAULTS["TINYGPT_MAX_JOBS_PER_VISITOR"]
    max_new_tokens: int = DEFAULTS["TINYGPT_MAX_NEW_TOKENS"]
    max_beams: int = DEFAULTS["TINYGPT_MAX_BEAMS"]
    max_decode_work: int = DEFAULTS["TINYGPT_MAX_DECODE_WORK"]
    max_decodes_at_once: int = DEFAULTS["TINYGPT_MAX_DECODES_AT_ONCE"]

    @property
    def max_upload_mb(self) -> int:
        return self.max_upload_bytes // 1_000_000


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default(name: str) -> int:
    """The default of a whole-number limit (the per-device job bound follows the machine's cores)."""
    value = DEFAULTS[name]
    return cpu_cores() if value is None else value


def _int(name: str, explicit_only: bool = False) -> int:
    raw = os.environ.get(name, "").strip().replace("_", "")
    if not raw:
        return sys.maxsize if explicit_only else default(name)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(
            f"{name}={os.environ[name]!r} is not a whole number >= 1; fix or unset it (default {default(name)})."
        )
    return value


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name}={os.environ[name]!r} is not a yes/no value; use 1 or 0.")


def current(explicit_only: bool = False) -> Limits:
    """The limits in force now: the environment variables, else the defaults (else no limit, with
    ``explicit_only``: the CLI's view)."""
    return Limits(
        max_upload_bytes=_int("TINYGPT_MAX_UPLOAD_MB") * 1_000_000,
        max_params=_int("TINYGPT_MAX_PARAMS", explicit_only),
        max_iters=_int("TINYGPT_MAX_ITERS", explicit_only),
        max_jobs_per_device=_int("TINYGPT_MAX_JOBS_PER_DEVICE"),
        max_queued_jobs=_int("TINYGPT_MAX_QUEUED_JOBS"),
        read_only=_flag("TINYGPT_READ_ONLY"),
        max_jobs_per_visitor=_int("TINYGPT_MAX_JOBS_PER_VISITOR"),
        max_new_tokens=_int("TINYGPT_MAX_NEW_TOKENS"),
        max_beams=_int("TINYGPT_MAX_BEAMS"),
        max_decode_work=_int("TINYGPT_MAX_DECODE_WORK"),
        max_decodes_at_once=_int("TINYGPT_MAX_DECODES_AT_ONCE"),
    )


def checkpoint_budget_bytes() -> int:
    """The disk one run's kept checkpoints may fill (checkpoints.history_plan thins the history to fit).

    Applied by the CLI as well as the app: it bounds a run's folder, not a visitor."""
    return _int("TINYGPT_CHECKPOINT_BUDGET_MB") * 1_000_000


READ_ONLY_NOTE = (
    "This lab is in read-only mode (TINYGPT_READ_ONLY is set by whoever runs it): you can open "
    "and compare runs, but not train, resume or delete them."
)


def check_writable(action: str, lim: Limits | None = None) -> None:
    """ConfigError when the lab is read-only; ``action`` says what was refused ("training", "deleting runs")."""
    if (lim or current()).read_only:
        raise ConfigError(f"{action.capitalize()} is turned off: {READ_ONLY_NOTE}")


def check_max_iters(max_iters: int, lim: Limits | None = None) -> None:
    limit = (lim or current()).max_iters
    if max_iters > limit:
        raise ConfigError(
            f"{max_iters:,} steps is more than this server allows ({limit:,}, TINYGPT_MAX_ITERS); ask for fewer steps."
        )


def check_params(params: int, lim: Limits | None = None) -> None:
    limit = (lim or current()).max_params
    if params > limit:
        raise ConfigError(
            f"The model has {params:,} parameters, more than this server allows ({limit:,}, "
            "TINYGPT_MAX_PARAMS); use fewer layers, a smaller width or a smaller vocabulary."
        )


def model_params(model_cfg: Any) -> int:
    """Parameters of a ModelConfig's GPT, counted on the meta device (no memory is allocated)."""
    import torch

    from .model import GPT

    with torch.device("meta"):
        return GPT(model_cfg).num_params()


def check_spec(run: Any, lim: Limits | None = None) -> None:
    """Every limit a training request must respect: read-only, max_iters, parameters.

    ``run`` is the PreparedRun of ``training.prepare(spec)``: its model config carries the
    tokenizer's real vocabulary, so the parameter count is the one the run would have. A bare
    TrainSpec is prepared here, and only when the parameter limit is in force (prepare it yourself
    and pass the result on to ``train`` to do that work once).
    """
    lim = lim or current()
    check_writable("training", lim)
    spec = getattr(run, "spec", run)
    check_max_iters(spec.train.max_iters, lim)
    if lim.max_params < sys.maxsize:
        if not hasattr(run, "model_config"):
            from .spec import prepare

            run = prepare(run)
        check_params(model_params(run.model_config), lim)


# --- serving to visitors: corpus folders and decoding work -----------------------------------------


def corpus_dirs() -> tuple[Path, ...]:
    """The folders visitors may read corpora from (TINYGPT_CORPUS_DIRS, os.pathsep-separated), resolved.

    Empty (the default): the app offers no server path at all. A listed folder that does not exist
    is a ConfigError naming it, so an operator's typo does not silently turn the option off.
    """
    raw = os.environ.get("TINYGPT_CORPUS_DIRS", "")
    out: list[Path] = []
    for part in raw.split(os.pathsep):
        if not part.strip():
            continue
        path = Path(part.strip()).expanduser()
        if not path.is_absolute():
            raise ConfigError(f"TINYGPT_CORPUS_DIRS: {part.strip()!r} is not an absolute path; list absolute folders.")
        if not path.is_dir():
            raise ConfigError(f"TINYGPT_CORPUS_DIRS: {part.strip()!r} is not a folder on this server; fix or drop it.")
        out.append(path.resolve())
    return tuple(dict.fromkeys(out))


def decode_work(settings: Any) -> int:
    """What one decoding column costs, in token steps: new tokens x beams (1 for greedy and sampling)."""
    beams = settings.num_beams if settings.strategy == "beam" else 1
    return int(settings.max_new_tokens) * int(beams)


def check_decode(settings_list: Any, lim: Limits | None = None) -> None:
    """ConfigError (saying what to lower) unless a decoding request fits the operator's bounds.

    ``settings_list`` holds the SamplingSettings of every column one request decodes: each column's
    new tokens (TINYGPT_MAX_NEW_TOKENS) and beams (TINYGPT_MAX_BEAMS), and their total work, new
    tokens x beams summed over the columns (TINYGPT_MAX_DECODE_WORK).
    """
    lim = lim or current()
    settings_list = list(settings_list)
    for s in settings_list:
        if s.max_new_tokens > lim.max_new_tokens:
            raise ConfigError(
                f"{s.max_new_tokens:,} new tokens is more than this server decodes per request "
                f"({lim.max_new_tokens:,}, TINYGPT_MAX_NEW_TOKENS); ask for fewer tokens."
            )
        if s.strategy == "beam" and s.num_beams > lim.max_beams:
            raise ConfigError(
                f"{s.num_beams} beams is more than this server allows ({lim.max_beams}, TINYGPT_MAX_BEAMS); "
                "use fewer beams."
            )
    work = sum(decode_work(s) for s in settings_list)
    if work > lim.max_decode_work:
        raise ConfigError(
            f"This request asks for {work:,} token steps (new tokens x beams, over every column), more than this "
            f"server allows at once ({lim.max_decode_work:,}, TINYGPT_MAX_DECODE_WORK). Ask for fewer new tokens, "
            "fewer beams or fewer columns."
        )


_decode_slots: tuple[int, threading.BoundedSemaphore] | None = None
_decode_slots_lock = threading.Lock()
DECODE_WAIT_S = 120.0


@contextlib.contextmanager
def decode_slot(wait_s: float = DECODE_WAIT_S, lim: Limits | None = None):
    """Hold one of the server's TINYGPT_MAX_DECODES_AT_ONCE decoding slots while decoding.

    Decoding runs in a visitor's own script thread, on the cores every other visitor's page needs
    too; queueing requests (instead of running them all at once) keeps the other pages responsive.
    After ``wait_s`` seconds without a slot: JobError saying the server is busy and what to do.
    """
    global _decode_slots
    from .errors import JobError

    n = (lim or current()).max_decodes_at_once
    with _decode_slots_lock:
        if _decode_slots is None or _decode_slots[0] != n:
            _decode_slots = (n, threading.BoundedSemaphore(n))
        slots = _decode_slots[1]
    if not slots.acquire(timeout=wait_s):
        raise JobError(
            f"The server is busy decoding for other visitors (it decodes {n} request(s) at a time, "
            "TINYGPT_MAX_DECODES_AT_ONCE); try again in a moment, or ask for fewer tokens."
        )
    try:
        yield
    finally:
        slots.release()


# Inspection (token loss, logit lens, head knockout): how many tokens one request may score. Fixed rather
# than an operator setting: at this size one request costs about a second of a core at baby size, and the
# views stop being readable long before.
MAX_INSPECT_TOKENS = 4096


def check_inspect_tokens(n: int, what: str = "tokens to score") -> None:
    """ConfigError (saying what to lower) when an inspection request asks for more than MAX_INSPECT_TOKENS."""
    if not 1 <= n <= MAX_INSPECT_TOKENS:
        raise ConfigError(
            f"{n:,} {what} is outside what one inspection scores (1 to {MAX_INSPECT_TOKENS:,}); ask for fewer."
        )


__all__ = [
    "MAX_INSPECT_TOKENS",
    "check_inspect_tokens",
    "DEFAULTS",
    "Limits",
    "current",
    "check_writable",
    "check_max_iters",
    "check_params",
    "check_spec",
    "model_params",
    "READ_ONLY_NOTE",
    "corpus_dirs",
    "decode_work",
    "check_decode",
    "decode_slot",
]
