"""Shipping a run folder between machines: the messages a remote training worker sends back.

A runner that trains a job somewhere without the run store (a Ray worker on another node, no shared
filesystem) trains into a private folder there and streams two things back to the process that owns
the store: the training events (``training.TrainEvent``) and the files of its folder as they change.
This module is that protocol, with no dependency on how the bytes travel (Ray today; a pipe or a
socket would do): the worker side (``FolderWatcher``) and the owner side (``FolderMirror``).

Messages are plain tuples, the same shape as the local child-process backend's pipe messages:

``("events", [TrainEvent, ...])``
    training events, in order (start, step, eval, sample, end).
``("files", [FileChange, ...])``
    what changed in the worker's run folder since the last ``files`` message: whole files,
    appended tails of files that only grew (metrics.csv), and deletions.
``("alive",)``
    nothing new, the worker is still there (a long eval); lets the owner refresh the run's heartbeat.
``("result", status, message)``
    how the run ended (``training.TrainResult``'s status and message); the last message.
``("failed", message)``
    the job could not record its own end (it raised before or outside training); the last message.

(Where the job trains — node, host, pid, GPUs — is the answer to the call that starts it, not a message.)

What is shipped is never a fixed list of names: every regular file under the folder whose size or
modification time changed (temporary ``.*.tmp`` files of atomic writes aside), so a change of the run
folder's layout (say, a ``checkpoints/`` folder) needs no change here. The watcher is meant to be
called from the training thread itself, between steps (from a training callback), so it never reads
a checkpoint while the trainer is writing the next one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import RunError

# The owner writes status.json itself (with its own pid, so a reader can tell whether the job is
# still followed): the worker's copy is turned into a write_status call, never copied as it is.
STATUS_FILE = "status.json"
MAX_FILE_BYTES = 512 * 1024 * 1024  # a run folder of tiny models; refuse anything absurd


@dataclass(frozen=True)
class FileChange:
    """One change of one file, by its path relative to the run folder (POSIX separators).

    ``data`` None: the file was deleted. ``offset`` None: ``data`` is the whole file; else ``data``
    is to be written at ``offset`` (the file grew by appending; everything before is unchanged)."""

    path: str
    data: bytes | None
    offset: int | None = None

    @property
    def deleted(self) -> bool:
        return self.data is None


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    digest: str  # sha256 of the bytes the owner has


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _scan(root: Path) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if _is_temporary(name):
                continue
            full = Path(dirpath) / name
            try:
                st = full.stat()
            except OSError:  # replaced or deleted between the listing and the stat
                continue
            rel = full.relative_to(root).as_posix()
            out[rel] = st
    return out


class FolderWatcher:
    """The worker's side: what changed in ``root`` since the last call of ``changes``."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self._seen: dict[str, _Seen] = {}

    def mark_known(self) -> None:
        """Everything now in the folder is what the owner has (e.g. the files it shipped for a resume)."""
        self._seen = {}
        for rel, st in _scan(self.root).items():
            data = self._read(rel)
            if data is not None:
                self._seen[rel] = _Seen(st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest())

    def forget(self) -> None:
        """The owner has nothing (a new owner took over): the next ``changes`` ships every file."""
        self._seen = {}

    def changes(self) -> list[FileChange]:
        out: list[FileChange] = []
        now = _scan(self.root)
        for rel, st in sorted(now.items()):
            seen = self._seen.get(rel)
            if seen is not None and seen.size == st.st_size and seen.mtime_ns == st.st_mtime_ns:
                continue
            data = self._read(rel)
            if data is None:
                continue
            digest = hashlib.sha256(data).hexdigest()
            if seen is not None and digest == seen.digest:
                self._seen[rel] = _Seen(len(data), st.st_mtime_ns, digest)
                continue
            if (
                seen is not None
                and len(data) > seen.size
                and hashlib.sha256(data[: seen.size]).hexdigest() == seen.digest
            ):
                out.append(FileChange(rel, data[seen.size :], offset=seen.size))  # appended (metrics.csv)
            else:
                out.append(FileChange(rel, data))
            self._seen[rel] = _Seen(len(data), st.st_mtime_ns, digest)
        for rel in sorted(set(self._seen) - set(now)):
            out.append(FileChange(rel, None))
            del self._seen[rel]
        return out

    def _read(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except OSError:
            return None


def pack_folder(root: str | os.PathLike[str], skip: tuple[str, ...] = ()) -> list[FileChange]:
    """Every file of a run folder as whole-file changes (what a resume ships to the worker)."""
    root = Path(root)
    out = []
    for rel in sorted(_scan(root)):
        if rel in skip:
            continue
        try:
            out.append(FileChange(rel, (root / rel).read_bytes()))
        except OSError:
            continue
    return out


def _safe_path(root: Path, rel: str) -> Path:
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts):
        raise RunError(f"A training worker sent a file outside its run folder ({rel!r}); it was ignored.")
    return root.joinpath(*p.parts)


def write_changes(root: str | os.PathLike[str], changes: list[FileChange]) -> None:
    """Apply changes to a folder as they are (the worker unpacking what a resume shipped)."""
    from .fileio import write_bytes_atomic

    root = Path(root)
    for ch in changes:
        path = _safe_path(root, ch.path)
        if ch.deleted:
            path.unlink(missing_ok=True)
        elif ch.offset is None:
            write_bytes_atomic(path, ch.data)
        else:
            _write_at(path, ch.offset, ch.data)


def _write_at(path: Path, offset: int, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "r+b" if path.exists() else "wb"
    with open(path, mode) as f:
        f.truncate(offset)  # drop whatever a previous (partial) copy held past the shipped prefix
        f.seek(offset)
        f.write(data)


class FolderMirror:
    """The owner's side: apply a worker's changes to the run folder in the store.

    status.json is the exception: it is handed to ``on_status(status, message, step)`` (the owner
    writes its own, see STATUS_FILE). Files are replaced atomically, appends are appended, and only
    files the worker itself shipped are ever deleted."""

    def __init__(self, run_dir: str | os.PathLike[str], on_status=None):
        self.run_dir = Path(run_dir)
        self.on_status = on_status
        self.shipped: set[str] = set()
        self.bytes_received = 0

    def apply(self, changes: list[FileChange]) -> None:
        import json

        from .fileio import write_bytes_atomic

        for ch in changes:
            path = _safe_path(self.run_dir, ch.path)
            if ch.path == STATUS_FILE:
                if ch.data is not None and ch.offset is None and self.on_status is not None:
                    try:
                        d = json.loads(ch.data)
                        self.on_status(str(d.get("status")), str(d.get("message") or ""), int(d.get("step") or 0))
                    except (ValueError, TypeError, AttributeError):
                        pass
                continue
            if ch.deleted:
                if ch.path in self.shipped:
                    path.unlink(missing_ok=True)
                    self.shipped.discard(ch.path)
                continue
            if len(ch.data) + (ch.offset or 0) > MAX_FILE_BYTES:
                raise RunError(f"A training worker sent {ch.path} larger than {MAX_FILE_BYTES >> 20} MiB.")
            self.bytes_received += len(ch.data)
            if ch.offset is None:
                write_bytes_atomic(path, ch.data)
            else:
                _write_at(path, ch.offset, ch.data)
            self.shipped.add(ch.path)


__all__ = ["FileChange", "FolderWatcher", "FolderMirror", "pack_folder", "write_changes", "STATUS_FILE"]
