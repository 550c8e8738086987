"""Atomic file writes: the one way the package puts a file on disk.

Write to a temporary file beside the target, then rename it over the target (atomic on POSIX), so a
reader — another page, the CLI, a restarted server — sees the old file or the new one, never half.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically; parents are created.

    ``fsync`` also makes the bytes durable across a power loss (milliseconds per call): worth it for a
    cached corpus or a saved tokenizer, not for metrics rewritten every few steps.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 less the umask), so a run
        # folder on a shared volume stays readable by the group and others when the umask says so.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask both sets and gets)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back at once
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)
