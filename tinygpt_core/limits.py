"""Operator limits for a shared server: read from environment variables, with safe defaults.

One lab may serve a whole class from one machine, or be left open as a public demo. The person
running it sets these before starting the app (or the CLI); every place that could be abused asks
this module instead of hard-coding a number:

    TINYGPT_MAX_UPLOAD_MB        largest uploaded corpus, in MB              (default 10)
    TINYGPT_MAX_PARAMS           most parameters a model to train may have  (default 50_000_000)
    TINYGPT_MAX_ITERS            most optimizer steps one run may ask for    (default 100_000)
    TINYGPT_MAX_JOBS_PER_DEVICE  training jobs running at once per device   (default 1)
    TINYGPT_MAX_QUEUED_JOBS      jobs waiting for a slot, over all devices  (default 32)
    TINYGPT_READ_ONLY            1/true/yes: show runs, allow no training, resuming or deleting (default off)

Values are read on every call (cheap), so a test can set them with monkeypatch; a value that is not
a positive whole number (or a yes/no for the flag) is a ConfigError naming the variable.

The app (and its job runner) applies the defaults: it is what a class or the public reaches. The
CLI is run by someone who already has a shell on the machine, so it applies only the variables the
operator has actually set (``current(explicit_only=True)``): TINYGPT_READ_ONLY=1 stops CLI
training too, but an unset TINYGPT_MAX_ITERS does not cap a long run started from a terminal.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "TINYGPT_MAX_UPLOAD_MB": 10,
    "TINYGPT_MAX_PARAMS": 50_000_000,
    "TINYGPT_MAX_ITERS": 100_000,
    "TINYGPT_MAX_JOBS_PER_DEVICE": 1,
    "TINYGPT_MAX_QUEUED_JOBS": 32,
    "TINYGPT_READ_ONLY": False,
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

    @property
    def max_upload_mb(self) -> int:
        return self.max_upload_bytes // 1_000_000


def _int(name: str, explicit_only: bool = False) -> int:
    raw = os.environ.get(name, "").strip().replace("_", "")
    if not raw:
        return sys.maxsize if explicit_only else DEFAULTS[name]
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(
            f"{name}={os.environ[name]!r} is not a whole number >= 1; fix or unset it (default {DEFAULTS[name]})."
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
    )


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


__all__ = [
    "DEFAULTS",
    "Limits",
    "current",
    "check_writable",
    "check_max_iters",
    "check_params",
    "check_spec",
    "model_params",
    "READ_ONLY_NOTE",
]
