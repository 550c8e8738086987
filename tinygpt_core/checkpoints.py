"""The checkpoint format: weights, optimizer state and training metadata, atomic as a whole.

In a run folder:

    model.safetensors              the weights with the best validation loss so far (what load_run,
                                   export and the app open by default)
    checkpoints/step-000120/       one complete checkpoint: the training state at step 120
        model.safetensors          its weights (metadata: the JSON-able part of ``extra``)
        optimizer.safetensors      optimizer state + ``extra`` (step, RNG states, counters; tensors allowed)

A checkpoint is written into a hidden folder ``checkpoints/.tmp-…``, its files flushed to disk, and
the folder is then renamed to ``step-NNNNNN`` in one ``rename``: a folder named ``step-*`` is always
complete, so a process killed at any instant leaves the previous checkpoint or the new one, never a
weights file from one step beside an optimizer state from another. Older step folders are removed
only after the new one is in place (renamed aside first, so none is ever seen half-deleted), and
the last checkpoint is simply the highest-numbered one. Keeping several (a history of steps) is the
same layout with older folders left in place.

Runs written before this layout keep ``last.safetensors`` + ``optimizer.safetensors`` in the run
folder; they are read as the last checkpoint while no ``checkpoints/step-*`` exists, and removed once
a resumed run has written one.

Weights are only ever read with safetensors, headers checked first: a file handed to us by someone
else cannot run code, and a truncated or pickled file gets a precise reason. One subject, the
checkpoint format (finding, reading, writing), hence a little over 400 lines.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import RunError
from .fileio import write_bytes_atomic

BEST_FILE = "model.safetensors"
CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_FILE = "model.safetensors"  # inside a step folder
OPTIMIZER_FILE = "optimizer.safetensors"  # inside a step folder (and, in old runs, in the run folder)
LEGACY_LAST_FILE = "last.safetensors"
CHECKPOINT_KINDS = ("best", "last")

_STEP_DIR = re.compile(r"^step-(\d+)$")
_MAX_SAFETENSORS_HEADER = 100_000_000


@dataclass(frozen=True)
class Checkpoint:
    """Where one checkpoint's files are. ``step`` is None for a legacy or best checkpoint not yet read."""

    step: int | None
    weights: Path
    optimizer: Path | None  # None: weights only (the best checkpoint)

    @property
    def label(self) -> str:
        """The weights file as a user should see it in a message: relative to the run folder."""
        return _label(self.weights)


def _label(path: Path) -> str:
    parent = path.parent
    return f"{CHECKPOINTS_DIR}/{parent.name}/{path.name}" if _STEP_DIR.match(parent.name) else path.name


def _read_labelled(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """read_safetensors, with a step folder's file named by its path in the run folder."""
    try:
        return read_safetensors(path)
    except RunError as e:
        label = _label(path)
        raise RunError(str(e).replace(path.name, label, 1) if label != path.name else str(e)) from None


def step_dir_name(step: int) -> str:
    return f"step-{int(step):06d}"


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def checkpoint_steps(run_dir: str | os.PathLike[str]) -> list[int]:
    """Steps of the complete checkpoints kept in ``checkpoints/``, oldest first (a legacy run: [])."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    try:
        names = [p.name for p in root.iterdir() if p.is_dir()]
    except OSError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _STEP_DIR.match(n)))


def last_checkpoint(run_dir: str | os.PathLike[str]) -> Checkpoint | None:
    """The newest complete checkpoint (step folder, else the legacy pair); None when there is none.

    With a history, newer weights-only folders (log-spaced steps between evaluations) may sit above
    the newest folder holding optimizer state; "last" is the newest one that can be resumed from.
    """
    path = Path(run_dir)
    steps = checkpoint_steps(path)
    if steps:
        folders = [path / CHECKPOINTS_DIR / step_dir_name(s) for s in steps]
        resumable = [i for i, f in enumerate(folders) if (f / OPTIMIZER_FILE).exists()]
        i = resumable[-1] if resumable else len(steps) - 1
        opt = folders[i] / OPTIMIZER_FILE
        return Checkpoint(steps[i], folders[i] / WEIGHTS_FILE, opt if opt.exists() else None)
    legacy = path / LEGACY_LAST_FILE
    if legacy.exists():
        opt = path / OPTIMIZER_FILE
        return Checkpoint(None, legacy, opt if opt.exists() else None)
    return None


def find_checkpoint(run_dir: str | os.PathLike[str], which: str = "best", step: int | None = None) -> Checkpoint:
    """The checkpoint ``which`` ("best" or "last") or, given ``step``, the one kept at that step.

    RunError when there is no such checkpoint (the message says which steps there are).
    """
    path = Path(run_dir)
    if step is not None:
        folder = path / CHECKPOINTS_DIR / step_dir_name(step)
        if not folder.is_dir():
            kept = checkpoint_steps(path)
            raise RunError(f"There is no checkpoint at step {step}; kept steps: {', '.join(map(str, kept)) or 'none'}")
        opt = folder / OPTIMIZER_FILE
        return Checkpoint(int(step), folder / WEIGHTS_FILE, opt if opt.exists() else None)
    if which == "best":
        return Checkpoint(None, path / BEST_FILE, None)
    if which == "last":
        ckpt = last_checkpoint(path)
        if ckpt is None:
            raise RunError("there is no last checkpoint yet (no checkpoints/step-* folder)")
        return ckpt
    raise RunError(f"Unknown checkpoint {which!r}: use 'best' or 'last'.")


def weights_path(run_dir: str | os.PathLike[str], which: str = "best", step: int | None = None) -> Path | None:
    """The weights file of a checkpoint (its mtime tells when it changed); None when there is none."""
    try:
        return find_checkpoint(run_dir, which, step).weights
    except RunError:
        return None


def can_resume(run_dir: str | os.PathLike[str]) -> bool:
    """True when the last checkpoint holds optimizer state (what ``training.resume`` needs). Reads no weights."""
    ckpt = last_checkpoint(run_dir)
    return ckpt is not None and ckpt.optimizer is not None


# ---------------------------------------------------------------------------------------------
# safetensors files, read safely


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None. Reads only the header.

    Checking the header first gives a precise reason (missing, pickle, truncated) without reading
    megabytes of weights; it is also what lets the runs table spot broken runs cheaply.
    """
    problem = _header_problem(path)
    if problem and problem.endswith("not a safetensors file"):
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            return problem
        # Only now look for pickle signatures: a valid header length may begin with the same bytes.
        # Pickle protocol 2-5 starts with 0x80 and the protocol number; torch.save's zip with "PK\3\4".
        if head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
            return (
                f"{path.name} is a pickle/PyTorch file, not safetensors; it was refused because pickles "
                "can run code. Re-save the weights with safetensors"
            )
    return problem


def _header_problem(path: Path) -> str | None:
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{name} is truncated or not a safetensors file"
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
                return f"{name} is truncated or not a safetensors file"
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as e:
        return f"{name} cannot be read: {e.strerror or e}"
    except (ValueError, UnicodeDecodeError, RecursionError):
        return f"{name} is truncated or not a safetensors file"
    if not isinstance(header, dict):
        return f"{name} is truncated or not a safetensors file"
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return f"{name} is truncated or not a safetensors file"
        end = max(end, offsets[1])
    if 8 + n + end != size:
        return f"{name} is truncated or not a safetensors file"
    return None


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checked safetensors file (never unpickles); RunError on any damage."""
    problem = safetensors_problem(path)
    if problem:
        raise RunError(problem)
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        meta = _metadata(data)
    except Exception as e:  # noqa: BLE001 - any decoding failure means a damaged file
        raise RunError(f"{path.name} is truncated or not a safetensors file ({e})") from None
    return tensors, meta


def _metadata(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def param_count(path: Path) -> int | None:
    """Number of parameters in a weights file, from its header (tied weights are stored once)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n).decode("utf-8"))
        return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    except Exception:  # noqa: BLE001 - only an informative column
        return None


# ---------------------------------------------------------------------------------------------
# Model weights <-> state dicts


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to store: CPU, contiguous, float32; a tied lm_head.weight is dropped (it is wte.weight)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: save the real module
    state = model.state_dict()
    if getattr(getattr(model, "config", None), "tie_weights", False):
        state.pop("lm_head.weight", None)
    out = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        out[k] = (v.float() if v.is_floating_point() else v).contiguous().clone()
    return out


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into a GPT strictly; RunError "weights don't match config: ..." otherwise."""
    expected = model.state_dict()
    if model.config.tie_weights:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
        raise RunError(f"weights don't match config: {'; '.join(parts)}")
    for k, ref in expected.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise RunError(
                f"weights don't match config: {k} has shape {tuple(state[k].shape)}, "
                f"the config needs {tuple(ref.shape)}"
            )
        if not state[k].is_floating_point():
            raise RunError(f"weights don't match config: {k} is not a floating-point tensor")
    full = {k: v.to(ref.dtype) for k, v in state.items() for ref in (expected[k],)}
    if model.config.tie_weights:
        full["lm_head.weight"] = full["wte.weight"]  # the same Parameter in the model; loading once is enough
    model.load_state_dict(full, strict=True)


def read_weights(run_dir: str | os.PathLike[str], which: str = "best", step: int | None = None) -> dict:
    """The stored weights of a checkpoint (tied lm_head dropped); RunError names the damaged file."""
    return _while_training(run_dir, which, step, lambda ckpt: _read_labelled(ckpt.weights)[0])


def _while_training(run_dir: Any, which: str, step: int | None, read: Any) -> Any:
    """``read(checkpoint)``, found again if a run training meanwhile replaced its last checkpoint.

    A reader that found step-N just before the writer removed it (a newer step-M is then in
    place) would otherwise report a missing file; it reads step-M instead. Other errors stand.
    """
    for attempt in range(3):
        ckpt = find_checkpoint(run_dir, which, step)
        try:
            return read(ckpt)
        except RunError:
            if attempt == 2 or which != "last" or step is not None or ckpt.weights.parent.is_dir():
                raise
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Nested state (optimizer state dicts, RNG states) <-> safetensors + JSON


def _encode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of a nested state (dicts, lists, scalars) with tensors moved into ``tensors``.

    Dict keys may be ints (optimizer state is keyed by parameter index), so dicts are stored as
    key/value pair lists; tuples are marked so they come back as tuples (betas).
    """
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode_state(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode_state(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode_state(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise RunError(f"{OPTIMIZER_FILE} is inconsistent: tensor {key} is missing")
            return tensors[key]
        if "__dict__" in obj:
            return {k: _decode_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode_state(v, tensors) for v in obj["__tuple__"])
        raise RunError(f"{OPTIMIZER_FILE} is inconsistent: unknown entry")
    if isinstance(obj, list):
        return [_decode_state(v, tensors) for v in obj]
    return obj


def _weights_bytes(model: torch.nn.Module, extra: dict) -> bytes:
    plain = {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}
    meta = {"format": "pt", "tinygpt_extra": json.dumps(_encode_state(plain, {}))}
    return st_save(model_state(model), metadata=meta)


def _optimizer_bytes(optimizer: Any, extra: dict) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    meta = {
        "format": "pt",
        "optimizer": json.dumps(_encode_state(optimizer.state_dict(), tensors)),
        "extra": json.dumps(_encode_state(extra, tensors)),
    }
    return st_save(tensors, metadata=meta)


def load_checkpoint_state(
    run_dir: str | os.PathLike[str], which: str = "last", step: int | None = None
) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """(model state, optimizer state or None, extra metadata) of a checkpoint.

    The model state has the tied ``lm_head.weight`` dropped, as stored. The optimizer state (None for
    "best" and for weights-only checkpoints) is the structure ``optimizer.state_dict()`` returned when
    it was saved; ``extra`` is what training passed to ``save_checkpoint`` (tensors included). The
    weights and the optimizer state always come from one checkpoint. RunError on any damage.
    """
    return _while_training(run_dir, which, step, _load_state)


def _load_state(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    model, meta = _read_labelled(ckpt.weights)
    try:
        extra = _decode_state(json.loads(meta.get("tinygpt_extra", "null")), {}) or {}
    except (ValueError, RunError):
        raise RunError(f"{ckpt.label} has damaged metadata") from None
    optim_state = None
    if ckpt.optimizer is not None:
        tensors, ometa = _read_labelled(ckpt.optimizer)
        try:
            optim_state = _decode_state(json.loads(ometa["optimizer"]), tensors)
            extra.update(_decode_state(json.loads(ometa.get("extra", "null")), tensors) or {})
        except (KeyError, ValueError, TypeError):
            raise RunError(f"{_label(ckpt.optimizer)} has damaged metadata") from None
    if ckpt.step is not None and extra.get("step", ckpt.step) != ckpt.step:
        raise RunError(f"{ckpt.label} holds step {extra.get('step')!r}, not {ckpt.step}; the checkpoint is damaged")
    return model, optim_state, extra


# ---------------------------------------------------------------------------------------------
# Writing


def save_best(run_dir: str | os.PathLike[str], model: torch.nn.Module, extra: dict | None = None) -> None:
    """Replace model.safetensors (the best weights) atomically; the JSON-able part of ``extra`` goes in its metadata."""
    write_bytes_atomic(Path(run_dir) / BEST_FILE, _weights_bytes(model, extra or {}))


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    optimizer: Any = None,
    extra: dict | None = None,
    *,
    keep_older: bool = False,
    keep_steps: Collection[int] = (),
) -> Path:
    """Write the checkpoint of ``step`` as one atomic folder; returns it. Older ones are removed unless ``keep_older``.

    ``keep_steps`` (the run's history plan) are older steps kept as weights-only checkpoints: only
    their optimizer state, which nothing but resuming from them needs, is removed.

    With an optimizer (anything with ``state_dict()``) the folder also holds optimizer.safetensors:
    its tensors, the JSON skeleton of the state, and ``extra`` (tensors allowed). A checkpoint
    already complete at this step is kept as it is: in a seeded run the state at a step is unique
    (this happens when a run is stopped right at an eval step, or stopped again just after resuming).
    """
    step = int(step)
    extra = {**(extra or {}), "step": step}
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    final = root / step_dir_name(step)
    if not final.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
        try:
            _write_synced(tmp / WEIGHTS_FILE, _weights_bytes(model, extra))
            if optimizer is not None:
                _write_synced(tmp / OPTIMIZER_FILE, _optimizer_bytes(optimizer, extra))
            _fsync_dir(tmp)
            os.rename(tmp, final)  # the one step that makes the checkpoint exist, whole
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(root)
    elif optimizer is not None and not (final / OPTIMIZER_FILE).exists():
        # A history checkpoint of this step (weights only) is already there, and a run stopped right at
        # it: add the optimizer state (one atomic file), so this step is also the one resume continues from.
        write_bytes_atomic(final / OPTIMIZER_FILE, _optimizer_bytes(optimizer, extra))
    if not keep_older:
        keep = set(keep_steps)
        for old in checkpoint_steps(run_dir):
            if old < step and old in keep:
                (root / step_dir_name(old) / OPTIMIZER_FILE).unlink(missing_ok=True)  # weights stay whole
            elif old < step:
                _remove_folder(root / step_dir_name(old))
        for name in (LEGACY_LAST_FILE, OPTIMIZER_FILE):  # an old run resumed: its legacy pair is now stale
            try:
                (Path(run_dir) / name).unlink()
            except FileNotFoundError:
                pass
    return final


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a folder; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_folder(folder: Path) -> None:
    """Remove a step folder: renamed aside first, so a kill mid-delete never leaves a partial ``step-*``."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    try:
        os.rename(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale(root: Path) -> None:
    """Temporary and half-deleted folders left by a process killed while checkpointing."""
    try:
        stale = [p for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    except OSError:
        return
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# History: the checkpoints a run keeps to be looked at later (the Attention page's step slider)
#
# Besides the last checkpoint (weights + optimizer state, for resuming) a run keeps weights-only
# checkpoints at the steps of its plan: "log" keeps steps 0, 1, 2, 4, 8, … and every evaluation
# (early training changes fastest, so log spacing sees it), "evals" every evaluation, "last" none.
# The plan is thinned evenly to fit the disk budget (limits.checkpoint_budget_bytes) and written to
# checkpoints/history.json, so the run can say later what it meant to keep and why it kept less.

HISTORY_FILE = "history.json"  # inside checkpoints/


@dataclass(frozen=True)
class HistoryPlan:
    policy: str  # config.KEEP_CHECKPOINTS
    steps: tuple[int, ...]  # the steps to keep, ascending
    wanted: int  # how many the policy asked for before the budget
    checkpoint_bytes: int  # one weights file, estimated from the parameter count
    budget_bytes: int


def history_steps(policy: str, max_iters: int, eval_interval: int) -> list[int]:
    """The steps ``policy`` keeps in a run of ``max_iters`` steps evaluated every ``eval_interval`` (and at the end)."""
    if policy == "last":
        return []
    evals = set(range(eval_interval, max_iters + 1, eval_interval)) | {max_iters}
    if policy == "evals":
        return sorted(evals)
    powers = {1 << k for k in range(max_iters.bit_length()) if 1 << k <= max_iters}
    return sorted({0} | powers | evals)


def history_plan(policy: str, max_iters: int, eval_interval: int, params: int, budget_bytes: int) -> HistoryPlan:
    """The steps to keep, thinned evenly (first and last kept) so their weights fit ``budget_bytes``."""
    wanted = history_steps(policy, max_iters, eval_interval)
    size = 4 * max(1, int(params))  # float32 weights, tied ones once: what model_state stores
    fit = max(0, budget_bytes // size)
    steps = wanted
    if len(wanted) > fit:
        if fit == 0:
            steps = []
        elif fit == 1:
            steps = [wanted[-1]]
        else:
            steps = sorted({wanted[round(i * (len(wanted) - 1) / (fit - 1))] for i in range(fit)})
    return HistoryPlan(policy, tuple(steps), len(wanted), size, int(budget_bytes))


def write_history_plan(run_dir: str | os.PathLike[str], plan: HistoryPlan) -> None:
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    body = {
        "policy": plan.policy,
        "steps": list(plan.steps),
        "wanted": plan.wanted,
        "checkpoint_bytes": plan.checkpoint_bytes,
        "budget_bytes": plan.budget_bytes,
    }
    write_bytes_atomic(root / HISTORY_FILE, (json.dumps(body) + "\n").encode("utf-8"))


def drop_after(run_dir: str | os.PathLike[str], step: int) -> None:
    """Remove checkpoints past ``step``: a run resumed from ``step`` (perhaps with a new schedule) rewrites them."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    for s in checkpoint_steps(run_dir):
        if s > step:
            _remove_folder(root / step_dir_name(s))


@dataclass(frozen=True)
class History:
    """What a run kept: the steps load_run(step=K) opens, their size on disk, and why there are not more."""

    steps: list[int]
    bytes: int
    policy: str | None  # None: the run was trained before checkpoint histories existed
    wanted: int | None
    budget_bytes: int | None

    @property
    def scrubbable(self) -> bool:
        return len(self.steps) >= 2

    def summary(self) -> str:
        """One line: how many checkpoints, their size, and the budget or the reason there are few."""
        n = len(self.steps)
        text = f"Kept {n} checkpoint{'s' if n != 1 else ''} ({self.bytes / 1e6:.1f} MB"
        text += f" of a {self.budget_bytes / 1e6:.0f} MB budget)." if self.budget_bytes else ")."
        if self.wanted is not None and self.policy != "last" and self.wanted > n:
            text += f" The '{self.policy}' history wanted {self.wanted}; it was thinned to fit the budget."
        return text

    def why_not_scrubbable(self) -> str | None:
        """None when the step slider can be shown; else one line saying why it is hidden."""
        if self.scrubbable:
            return None
        if self.policy is None:
            return (
                "This run was trained before runs kept a checkpoint history, so there are no earlier "
                "steps to scrub through."
            )
        if self.policy == "last":
            return "This run kept only its last checkpoint (--keep-checkpoints last), so there is no history to scrub."
        return (
            f"This run kept {len(self.steps)} checkpoint(s): its weights do not fit the checkpoint budget "
            "(TINYGPT_CHECKPOINT_BUDGET_MB) more than once."
        )


def history(run_dir: str | os.PathLike[str]) -> History:
    """The checkpoint history of a run (reads folder sizes and history.json, no weights)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    steps = checkpoint_steps(run_dir)
    size = 0
    for s in steps:
        try:
            size += sum(f.stat().st_size for f in (root / step_dir_name(s)).iterdir() if f.is_file())
        except OSError:
            pass  # removed while we counted (a run training meanwhile)
    policy = wanted = budget = None
    try:
        plan = json.loads((root / HISTORY_FILE).read_text(encoding="utf-8"))
        if isinstance(plan, dict):
            policy = plan.get("policy") if isinstance(plan.get("policy"), str) else None
            wanted = plan.get("wanted") if type(plan.get("wanted")) is int else None
            budget = plan.get("budget_bytes") if type(plan.get("budget_bytes")) is int else None
    except (OSError, ValueError, UnicodeDecodeError):
        pass  # an old run (no plan) or a damaged plan: the steps on disk are still the truth
    return History(steps, size, policy, wanted, budget)


__all__ = [
    "BEST_FILE",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_KINDS",
    "Checkpoint",
    "History",
    "HistoryPlan",
    "drop_after",
    "history",
    "history_plan",
    "history_steps",
    "write_history_plan",
    "can_resume",
    "checkpoint_steps",
    "find_checkpoint",
    "last_checkpoint",
    "load_checkpoint_state",
    "load_model_state",
    "model_state",
    "param_count",
    "read_safetensors",
    "read_weights",
    "safetensors_problem",
    "save_best",
    "save_checkpoint",
    "step_dir_name",
    "weights_path",
]
