"""The run store: one folder per training run, written atomically, read back safely.

A run folder is the unit everything shares (the CLI writes it, the app lists and opens it, export
reads it):

    config.json          RunConfig: model, training, tokenizer and corpus settings
    tokenizer.json       the trained tokenizer
    metrics.csv          one row per optimizer step (train/val loss on eval steps only)
    model.safetensors    weights with the best validation loss so far
    checkpoints/step-N/  the last checkpoint (weights + optimizer state), atomic as a whole (checkpoints.py)
    status.json          queued | running | done | stopped | diverged | error | interrupted, with a heartbeat
    samples.json         [{"step", "text"}] generated at each eval

Every JSON file is written to a temporary file in the same folder and renamed over the target, so
a reader (another thread, the app, a crash) never sees half a file. The checkpoint format (weights,
optimizer state, how a checkpoint is made atomic, reading weights safely) is ``checkpoints``' job;
this module is the store: folders, listing, status, metrics, samples. ``RunWriter`` is the only
code that writes into a run folder. One subject (a run folder's files other than weights, read and
written), which is why it runs past 400 lines.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import shutil
import time
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import checkpoints, limits
from .config import TOKENIZER_KINDS, ModelConfig, TrainConfig
from .errors import ConfigError, RunError, TokenizerError
from .fileio import write_bytes_atomic
from .model import GPT, count_params

# The statuses of a run, declared once for the whole lab (jobs, the run state and the pages import them).
# A job is only ever queued, running or one of the first four finished ones; "interrupted" is what the
# disk says of a run whose process ended without finishing it. A run folder that cannot be opened is
# listed with the extra status BROKEN.
RUN_STATUSES = ("queued", "running", "done", "stopped", "diverged", "error", "interrupted")
ACTIVE_STATUSES = ("queued", "running")
FINISHED_STATUSES = ("done", "stopped", "diverged", "error", "interrupted")
BROKEN = "broken"
RUN_CONFIG_VERSION = 1
METRIC_COLUMNS = [
    "step",
    "loss",
    "train_loss",
    "val_loss",
    "lr",
    "tokens_per_s",
    "elapsed_s",
    "induction_score",  # at each eval: the best head's induction score (dynamics.eval_dynamics)
    "icl_score",  # at each eval: loss late in the context minus loss early in it (negative: context helps)
    "chat_accuracy",  # at each eval of a chat run: exact-match accuracy on held-out prompts (finetune.py)
]
# Columns filled only at evaluations (empty between them), from the eval event of the same name.
EVAL_METRIC_COLUMNS = ("train_loss", "val_loss", "induction_score", "icl_score", "chat_accuracy")
# Columns added after the first runs were written: an older metrics.csv lacks them (read as NaN), and a
# resumed old run keeps appending under its own header.
LATER_METRIC_COLUMNS = ("induction_score", "icl_score", "chat_accuracy")
# Network health, one column per transformer block and measure, filled at each evaluation (tinygpt_core.health
# says what each means): "grad_norm_l0", "update_ratio_l0", "act_rms_l0", "grad_norm_l1", ... A run's
# metrics.csv gets them for its own number of layers; runs written before them simply lack them.
LAYER_METRICS = ("grad_norm", "update_ratio", "act_rms")
_LAYER_COLUMN = re.compile(r"^(" + "|".join(LAYER_METRICS) + r")_l(\d+)$")


def layer_column(metric: str, layer: int) -> str:
    return f"{metric}_l{layer}"


def parse_layer_column(column: str) -> tuple[str, int] | None:
    """("grad_norm", 2) for "grad_norm_l2"; None for any other column."""
    m = _LAYER_COLUMN.match(column)
    return (m.group(1), int(m.group(2))) if m else None


def metric_columns(n_layer: int = 0) -> list[str]:
    """metrics.csv's columns for a model of ``n_layer`` blocks: METRIC_COLUMNS, then the health columns."""
    return METRIC_COLUMNS + [layer_column(k, i) for i in range(n_layer) for k in LAYER_METRICS]


HEARTBEAT_TIMEOUT_S = 120.0  # a "running" run whose status was not refreshed for this long is dead

_MAX_JSON_BYTES = 20_000_000  # config/status/samples files are small; refuse anything absurd
_MAX_SAFETENSORS_HEADER = 100_000_000


def default_runs_dir() -> Path:
    """$TINYGPT_RUNS_DIR, else ./runs (relative to the working folder)."""
    env = os.environ.get("TINYGPT_RUNS_DIR")
    return Path(env).expanduser() if env else Path("runs")


# ---------------------------------------------------------------------------------------------
# Atomic writes


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _read_json(path: Path) -> Any:
    """Parse a small JSON file; RunError says which file is missing or broken."""
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise RunError(f"{path.name} is far too large to be a run file; the run folder is damaged.")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RunError(f"{path.name} is missing") from None
    except OSError as e:
        raise RunError(f"{path.name} cannot be read: {e.strerror or e}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RunError(f"{path.name} is not valid JSON") from None


# ---------------------------------------------------------------------------------------------
# What config.json, status.json and the runs table hold


@dataclass
class RunConfig:
    """Everything needed to rebuild a run's model and tokenizer, and to describe the run."""

    name: str
    model: ModelConfig
    train: TrainConfig
    tokenizer: dict  # {"kind": "char"|"word"|"bpe", "vocab_size": int}
    corpus: dict  # {"name", "source", "sha256", "chars"}
    preset: str | None = None
    created_at: str = ""  # ISO-8601 UTC
    version: int = RUN_CONFIG_VERSION
    chat: dict | None = None  # a chat fine-tune: {"parent", "parent_name", "source", ...} (finetune.py)

    def to_dict(self) -> dict:
        return {
            **({"chat": dict(self.chat)} if self.chat is not None else {}),
            "version": self.version,
            "name": self.name,
            "preset": self.preset,
            "created_at": self.created_at,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "tokenizer": dict(self.tokenizer),
            "corpus": dict(self.corpus),
        }

    @classmethod
    def from_dict(cls, d: Any) -> RunConfig:
        """Validate an untrusted dict (config.json); RunError says what is wrong."""
        if not isinstance(d, dict):
            raise RunError("config.json must hold a JSON object")
        version = d.get("version", RUN_CONFIG_VERSION)
        if type(version) is not int or version < 1:
            raise RunError(f"config.json has an invalid version {version!r}")
        if version > RUN_CONFIG_VERSION:
            raise RunError(
                f"config.json has version {version}, written by a newer TinyGPT Lab; update this one to open it"
            )
        for key in ("model", "train", "tokenizer", "corpus"):
            if not isinstance(d.get(key), dict):
                raise RunError(f"config.json is invalid: '{key}' must be an object")
        try:
            model = ModelConfig.from_dict(d["model"])
            train = TrainConfig.from_dict(d["train"])
        except ConfigError as e:
            raise RunError(f"config.json is invalid: {e}") from None
        tok = d["tokenizer"]
        if tok.get("kind") not in TOKENIZER_KINDS:
            raise RunError(f"config.json is invalid: unknown tokenizer kind {tok.get('kind')!r}")
        vs = tok.get("vocab_size")
        if type(vs) is not int or vs < 1:
            raise RunError(f"config.json is invalid: tokenizer vocab_size must be a positive integer, got {vs!r}")
        chat = d.get("chat")
        if chat is not None and not isinstance(chat, dict):
            raise RunError("config.json is invalid: 'chat' must be an object")
        name, preset, created = d.get("name", ""), d.get("preset"), d.get("created_at", "")
        if not isinstance(name, str) or not isinstance(created, str) or not (preset is None or isinstance(preset, str)):
            raise RunError("config.json is invalid: name, preset and created_at must be strings")
        return cls(
            name=name,
            model=model,
            train=train,
            tokenizer=dict(tok),
            corpus=dict(d["corpus"]),
            preset=preset,
            created_at=created,
            version=version,
            chat=chat,
        )


@dataclass
class RunStatus:
    status: str
    message: str = ""
    step: int = 0
    pid: int | None = None
    updated_at: float = 0.0  # time.time() of the last write (the heartbeat)


@dataclass
class RunSummary:
    """One row of the runs table. Broken runs are included, with status "broken" and a reason."""

    id: str
    path: Path
    name: str
    status: str
    message: str
    created_at: str
    preset: str | None
    ablations: list[str]
    params: int | None
    corpus: str | None
    tokenizer: str | None
    steps: int
    max_iters: int | None
    best_val_loss: float | None
    best_step: int | None
    final_train_loss: float | None
    final_val_loss: float | None
    elapsed_s: float | None
    broken_reason: str | None = None


@dataclass
class LoadedRun:
    """A run opened for use: the model (eval mode), its tokenizer, config and curves."""

    path: Path
    config: RunConfig
    model: GPT
    tokenizer: Any  # tokenizers.Tokenizer
    metrics: pd.DataFrame
    status: RunStatus
    samples: list[dict] = field(default_factory=list)
    checkpoint: str = "best"  # "best" or "last"; with ``step``, the weights kept at that step
    step: int | None = None
    checkpoint_steps: list[int] = field(default_factory=list)  # the steps load_run(step=K) can open


# ---------------------------------------------------------------------------------------------
# Reading a run folder


def read_metrics(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """metrics.csv as a DataFrame with METRIC_COLUMNS (NaN where a value is empty). RunError if absent."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise RunError("metrics.csv is missing")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame(columns=METRIC_COLUMNS)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as e:
        raise RunError(f"metrics.csv cannot be read: {e}") from None
    for c in LATER_METRIC_COLUMNS:
        if c not in df.columns:
            df[c] = math.nan
    missing = [c for c in METRIC_COLUMNS if c not in df.columns]
    if missing:
        raise RunError(f"metrics.csv is missing the column(s) {', '.join(missing)}")
    health = [c for c in df.columns if parse_layer_column(str(c))]
    df = df[METRIC_COLUMNS + health].apply(pd.to_numeric, errors="coerce")
    df = df.dropna(subset=["step"])  # a row cut short by a crash mid-write has no usable step
    df["step"] = df["step"].astype("int64")
    return df.reset_index(drop=True)


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None off Linux.

    A pid alone is not an identity: after a restart (a container's server is pid 1 every time) the
    new process may have the old one's pid. The pair (pid, start) is unique while the machine is up.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, started: int | None = None) -> bool:
    if started is not None:
        now = _process_start(pid)
        if now is not None and now != started:
            return False  # the pid now belongs to another process
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OSError, OverflowError, ValueError):
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Exited but not yet reaped: a training process whose server died waits for pid 1 to reap it,
    and a container's pid 1 may never do so (Linux; False elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def read_status(run_dir: str | os.PathLike[str]) -> RunStatus:
    """status.json; a "running" run whose process is gone (or silent for 120 s) reads as "interrupted",
    and so does a "queued" one whose process is gone.

    Never raises: a missing or unreadable status file reads as "interrupted" with the reason.
    """
    try:
        d = _read_json(Path(run_dir) / "status.json")
    except RunError as e:
        return RunStatus("interrupted", str(e))
    if not isinstance(d, dict) or d.get("status") not in RUN_STATUSES:
        return RunStatus("interrupted", "status.json is not a valid status")
    pid = d.get("pid")
    pid = pid if type(pid) is int else None
    started = d.get("pid_start") if type(d.get("pid_start")) is int else None
    updated = d.get("updated_at")
    updated = float(updated) if isinstance(updated, (int, float)) and not isinstance(updated, bool) else 0.0
    step = d.get("step")
    st = RunStatus(
        status=d["status"],
        message=d.get("message") if isinstance(d.get("message"), str) else "",
        step=step if type(step) is int else 0,
        pid=pid,
        updated_at=updated,
    )
    if st.status == "queued" and pid is not None and not _pid_alive(pid, started):
        return RunStatus(
            "interrupted", "The job was queued by a process that has ended; train it again.", st.step, pid, updated
        )
    if st.status == "running":
        if pid is None or not _pid_alive(pid, started):
            return RunStatus(
                "interrupted",
                f"The training process ended unexpectedly at step {st.step}; resume the run to continue.",
                st.step,
                pid,
                updated,
            )
        if time.time() - updated > HEARTBEAT_TIMEOUT_S:
            return RunStatus(
                "interrupted",
                f"No progress reported for over {HEARTBEAT_TIMEOUT_S:.0f} s at step "
                f"{st.step}; resume the run to continue.",
                st.step,
                pid,
                updated,
            )
    return st


def read_samples(run_dir: str | os.PathLike[str]) -> list[dict]:
    """[{"step": int, "text": str}]; a missing or damaged samples.json gives []."""
    try:
        d = _read_json(Path(run_dir) / "samples.json")
    except RunError:
        return []
    if not isinstance(d, list):
        return []
    return [
        {"step": s["step"], "text": s["text"]}
        for s in d
        if isinstance(s, dict) and type(s.get("step")) is int and isinstance(s.get("text"), str)
    ]


def read_config(run_dir: str | os.PathLike[str]) -> RunConfig:
    return RunConfig.from_dict(_read_json(Path(run_dir) / "config.json"))


def load_run(
    run_dir: str | os.PathLike[str], checkpoint: str = "best", device: str = "cpu", *, step: int | None = None
) -> LoadedRun:
    """Open a run folder: model (eval mode, on ``device``), tokenizer, config, metrics, status, samples.

    ``checkpoint`` is "best" (model.safetensors, lowest val loss) or "last" (the last checkpoint);
    ``step`` opens the checkpoint kept at that step instead (``.checkpoint_steps`` lists them).
    Any problem raises RunError naming the file and what is wrong. Nothing is unpickled.
    """
    from .tokenizers import load_tokenizer  # imported lazily: a sibling module written in parallel

    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"Run folder {path} does not exist. Check the path, or pick a run from the runs list.")
    if checkpoint not in checkpoints.CHECKPOINT_KINDS:
        raise RunError(f"Unknown checkpoint {checkpoint!r}: use 'best' or 'last'.")
    try:
        cfg = read_config(path)
        if not (path / "tokenizer.json").is_file():
            raise RunError("tokenizer.json is missing")
        try:
            tokenizer = load_tokenizer(path / "tokenizer.json")
        except TokenizerError as e:
            raise RunError(f"tokenizer.json is invalid: {e}") from None
        if tokenizer.vocab_size != cfg.model.vocab_size:
            raise RunError(
                f"tokenizer.json has {tokenizer.vocab_size} tokens but the model expects {cfg.model.vocab_size}"
            )
        metrics = read_metrics(path)
        tensors = checkpoints.read_weights(path, checkpoint, step)
        model = GPT(cfg.model)
        checkpoints.load_model_state(model, tensors)
    except RunError as e:
        raise RunError(f"Cannot open run {path.name}: {e}.") from None
    model.to(device).eval()
    return LoadedRun(
        path=path,
        config=cfg,
        model=model,
        tokenizer=tokenizer,
        metrics=metrics,
        status=read_status(path),
        samples=read_samples(path),
        checkpoint=checkpoint,
        step=step,
        checkpoint_steps=checkpoints.checkpoint_steps(path),
    )


# ---------------------------------------------------------------------------------------------
# Writing a run folder


def _fmt(v: Any) -> str:
    """CSV cell: empty for None/NaN, integers as is, floats with 7 significant digits (float32 precision)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return ""
    return f"{v:.7g}"


def _header(path: Path) -> list[str]:
    """The columns named by the first line of a metrics.csv (METRIC_COLUMNS if it has none)."""
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline().strip()
    return first.split(",") if first else METRIC_COLUMNS


class RunWriter:
    """Writes one run folder. Training is its only user; every file but metrics.csv is replaced atomically."""

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._samples = read_samples(self.run_dir)  # kept in memory so each add rewrites one small file
        self._columns: list[str] | None = None  # metrics.csv's header, once known

    def write_config(self, cfg: RunConfig) -> None:
        write_json_atomic(self.run_dir / "config.json", cfg.to_dict())

    def write_tokenizer(self, tok: Any) -> None:
        write_json_atomic(self.run_dir / "tokenizer.json", tok.to_dict())

    def append_metrics(self, row: dict) -> None:
        """Append one row to metrics.csv (the header on first write) and flush."""
        self.append_metrics_rows([row])

    def append_metrics_rows(self, rows: list[dict], n_layer: int | None = None) -> None:
        """Append several rows in one write (training buffers rows to keep I/O cheap).

        With no rows it still creates the file with its header, so a fresh run has a readable metrics.csv;
        ``n_layer`` gives a new file the health columns of that many blocks. Rows go under the file's own
        header (a run from before the health columns keeps its layout when resumed).
        """
        path = self.run_dir / "metrics.csv"
        new = not path.exists()
        buf = io.StringIO()
        columns = METRIC_COLUMNS if new else _header(path)  # a resumed older run keeps its own columns
        if new:
            self._columns = metric_columns(n_layer or 0)
            buf.write(",".join(self._columns) + "\n")
        columns = self._metric_columns(path)
        for row in rows:
            buf.write(",".join(_fmt(row.get(c)) for c in columns) + "\n")
        if not buf.getvalue():
            return
        with open(path, "a", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
            f.flush()

    def _metric_columns(self, path: Path) -> list[str]:
        """The header of an existing metrics.csv, read once per writer (an older run's lacks later columns)."""
        if self._columns is None:
            with open(path, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), None)
            self._columns = header if header and header[0] == "step" else list(METRIC_COLUMNS)
        return self._columns

    def truncate_after(self, step: int) -> None:
        """Drop metrics rows and samples past ``step`` (a resumed run continues from its last checkpoint)."""
        path = self.run_dir / "metrics.csv"
        if path.exists():
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
            kept = [rows[0]] if rows else [METRIC_COLUMNS]
            for r in rows[1:]:
                try:
                    if r and int(float(r[0])) <= step:
                        kept.append(r)
                except ValueError:
                    continue  # a row cut short by a crash
            write_bytes_atomic(path, "".join(",".join(r) + "\n" for r in kept).encode("utf-8"))
        before = len(self._samples)
        self._samples = [s for s in self._samples if s["step"] <= step]
        if len(self._samples) != before:
            write_json_atomic(self.run_dir / "samples.json", self._samples)

    def write_status(self, status: str, message: str = "", step: int = 0) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        write_json_atomic(
            self.run_dir / "status.json",
            {
                "status": status,
                "message": message,
                "step": int(step),
                "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()),
                "updated_at": time.time(),
            },
        )

    def add_sample(self, step: int, text: str) -> None:
        self._samples.append({"step": int(step), "text": text})
        write_json_atomic(self.run_dir / "samples.json", self._samples)

    def write_text(self, name: str, text: str) -> None:
        """An auxiliary text file (e.g. corpus.txt for uploads, so a run can resume without the upload)."""
        write_bytes_atomic(self.run_dir / name, text.encode("utf-8"))

    def save_checkpoint(
        self,
        which: str,
        model: torch.nn.Module,
        optimizer: Any = None,
        extra: dict | None = None,
        keep_steps: Any = (),
    ) -> None:
        """Save weights: "best" -> model.safetensors; "last" -> a new checkpoint folder (checkpoints.py);
        "history" -> a weights-only checkpoint folder kept beside the others.

        "last" holds the weights and, with an optimizer (anything with ``state_dict()``), its state and
        ``extra`` (step, RNG states, counters; tensors allowed), written as one atomic folder; older
        folders are removed except ``keep_steps`` (the history plan). "best" keeps the JSON-able part
        of ``extra`` in the weights' metadata.
        """
        step = int((extra or {}).get("step", 0))
        if which == "best":
            checkpoints.save_best(self.run_dir, model, extra)
        elif which == "last":
            checkpoints.save_checkpoint(self.run_dir, step, model, optimizer, extra, keep_steps=keep_steps)
        elif which == "history":
            checkpoints.save_checkpoint(self.run_dir, step, model, None, extra, keep_older=True)
        else:
            raise ValueError(f"unknown checkpoint {which!r}")


# ---------------------------------------------------------------------------------------------
# The store


_SLUG_OK = re.compile(r"[^a-z0-9._-]+")
_GRID_NAME = re.compile(r"^grid-[A-Za-z0-9_-]+/[A-Za-z0-9_-]+$")  # ablations.grid_run_name: one "/", no dots


def _slug(name: str | None) -> str:
    """A folder-safe version of a run name: [a-z0-9-_.], at most 60 chars; "run" when nothing is left.

    A grid member's name "grid-<id>/<label>" becomes "grid-<id>-<label>", so its folder says which grid
    and which ablation it is. Anything else that looks like a path ("/", "\\", "..") is not trusted at
    all and becomes "run".
    """
    if isinstance(name, str) and _GRID_NAME.match(name):
        name = name.replace("/", "-")
    if not isinstance(name, str) or "/" in name or "\\" in name or ".." in name:
        return "run"
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").lower()
    slug = _SLUG_OK.sub("-", ascii_name).strip("-._")[:60].strip("-._")
    return slug or "run"


class RunStore:
    """The folder of runs: create, list, open and delete them."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root).expanduser() if root is not None else default_runs_dir()

    def create(self, name: str | None = None) -> Path:
        """A new, empty, uniquely named run folder root/<slug>-<yyyymmdd-hhmmss>[-n]."""
        base = f"{_slug(name)}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for n in range(1, 10_000):
                run_id = base if n == 1 else f"{base}-{n}"
                path = self.root / run_id
                try:
                    path.mkdir()  # exist_ok=False: two threads creating at once get different folders
                except FileExistsError:
                    continue
                return path
        except OSError as e:  # a full disk, a read-only mount, no permission: say so, not a traceback
            raise RunError(f"Cannot create a run folder in {self.root}: {os_reason(e)}") from None
        raise RunError(f"Could not create a new run folder in {self.root}; too many runs named {base}.")

    def path(self, run_id: str) -> Path:
        """The folder of an existing run; RunError for an unknown id or one pointing outside the store."""
        if (
            not isinstance(run_id, str)
            or not run_id
            or run_id in (".", "..")
            or "/" in run_id
            or "\\" in run_id
            or "\x00" in run_id
            or run_id.startswith(".")
        ):
            raise RunError(f"{run_id!r} is not a valid run id.")
        path = self.root / run_id
        if path.resolve().parent != self.root.resolve():
            raise RunError(f"{run_id!r} is not a valid run id.")
        if not path.is_dir():
            raise RunError(f"There is no run {run_id!r} in {self.root}.")
        return path

    def list(self) -> list[RunSummary]:
        """Every run folder, newest first; runs that cannot be opened are listed as "broken"."""
        if not self.root.is_dir():
            return []
        try:
            folders = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError as e:
            raise RunError(f"Cannot list the runs in {self.root}: {os_reason(e)}") from None
        out = [self._summarise(p) for p in folders]

        # ISO timestamps sort chronologically; folders without a config fall back to their mtime.
        def key(s: RunSummary) -> str:
            if s.created_at:
                return s.created_at
            try:
                return datetime.fromtimestamp(s.path.stat().st_mtime, UTC).isoformat()
            except OSError:
                return ""

        return sorted(out, key=key, reverse=True)

    def summary(self, run_id: str) -> RunSummary:
        return self._summarise(self.path(run_id))

    def load(self, run_id: str, checkpoint: str = "best", device: str = "cpu") -> LoadedRun:
        return load_run(self.path(run_id), checkpoint=checkpoint, device=device)

    def delete(self, run_id: str) -> None:
        path = self.path(run_id)
        limits.check_writable("deleting runs")
        if read_status(path).status == "running":  # read_status already maps a dead pid to "interrupted"
            raise RunError(f"Run {run_id} is still training; stop it first, then delete it.")
        try:
            shutil.rmtree(path)
        except OSError as e:
            raise RunError(f"Could not delete run {run_id}: {os_reason(e)}") from None

    def _summarise(self, path: Path) -> RunSummary:
        status = read_status(path)
        empty = dict(
            id=path.name,
            path=path,
            name=path.name,
            status=status.status,
            message=status.message,
            created_at="",
            preset=None,
            ablations=[],
            params=None,
            corpus=None,
            tokenizer=None,
            steps=status.step,
            max_iters=None,
            best_val_loss=None,
            best_step=None,
            final_train_loss=None,
            final_val_loss=None,
            elapsed_s=None,
            broken_reason=None,
        )
        in_progress = status.status in ACTIVE_STATUSES
        try:
            cfg = read_config(path)
        except RunError as e:
            if in_progress and not (path / "config.json").exists():
                return RunSummary(**empty)  # a job that has not written its config yet
            return RunSummary(**{**empty, "status": BROKEN, "message": str(e), "broken_reason": str(e)})
        info = dict(
            empty,
            name=cfg.name or path.name,
            created_at=cfg.created_at,
            preset=cfg.preset,
            ablations=cfg.model.ablations(),
            corpus=cfg.corpus.get("name"),
            tokenizer=cfg.tokenizer.get("kind"),
            max_iters=cfg.train.max_iters,
        )
        reason = None
        weights = path / checkpoints.BEST_FILE
        if not (in_progress and not weights.exists()):
            reason = checkpoints.safetensors_problem(weights)
        if reason is None and not (path / "tokenizer.json").is_file():
            reason = "tokenizer.json is missing"
        try:
            m = read_metrics(path)
        except RunError as e:
            m = None
            if not in_progress:
                reason = reason or str(e)
        if reason is None and weights.exists():
            info["params"] = checkpoints.param_count(weights)
        if info["params"] is None:
            try:
                info["params"] = count_params(cfg.model)
            except Exception:  # noqa: BLE001 - only an informative column
                pass
        if m is not None and len(m):
            info["steps"] = int(m["step"].iloc[-1])
            el = m["elapsed_s"].dropna()
            info["elapsed_s"] = float(el.iloc[-1]) if len(el) else None
            val = m.dropna(subset=["val_loss"])
            if len(val):
                best = val.loc[val["val_loss"].idxmin()]
                info["best_val_loss"], info["best_step"] = float(best["val_loss"]), int(best["step"])
                info["final_val_loss"] = float(val["val_loss"].iloc[-1])
            tr = m["train_loss"].dropna()
            info["final_train_loss"] = float(tr.iloc[-1]) if len(tr) else None
        if reason:
            info.update(status=BROKEN, message=reason, broken_reason=reason)
        return RunSummary(**info)


def os_reason(e: OSError) -> str:
    """An OSError as a sentence with what to do (a full disk and a read-only store are the usual ones)."""
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        return f"{what}. Free some disk space (or delete old runs), then try again."
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            f"{what}. The run store is not writable: fix its permissions or set TINYGPT_RUNS_DIR to a writable folder."
        )
    return f"{what}."


# The checkpoint reader, still importable from here (the run store's callers used it from runs).
load_checkpoint_state = checkpoints.load_checkpoint_state


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


__all__ = [
    "RUN_STATUSES",
    "ACTIVE_STATUSES",
    "FINISHED_STATUSES",
    "BROKEN",
    "LAYER_METRICS",
    "METRIC_COLUMNS",
    "EVAL_METRIC_COLUMNS",
    "LATER_METRIC_COLUMNS",
    "layer_column",
    "metric_columns",
    "parse_layer_column",
    "RunConfig",
    "RunStatus",
    "RunSummary",
    "LoadedRun",
    "RunStore",
    "RunWriter",
    "default_runs_dir",
    "load_run",
    "read_metrics",
    "read_status",
    "read_samples",
    "read_config",
    "load_checkpoint_state",
    "os_reason",
    "write_json_atomic",
    "write_bytes_atomic",
]
