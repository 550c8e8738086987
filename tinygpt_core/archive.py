"""Packing a run folder into a zip archive (for downloads and sharing).

The archive holds the run's regular files under a top folder named after the run, so unpacking it
into a runs directory gives a run the app and ``load_run`` open (and ``resume`` continues) as they
are: the top-level files and the complete checkpoint folders ``checkpoints/step-N/``. Symlinks, other
sub-folders and half-written temporary files are left out: an archive must never reach outside the run.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from .checkpoints import CHECKPOINTS_DIR, checkpoint_steps, step_dir_name
from .errors import RunError

# Atomic writes go through a temp file in the same folder; one may exist mid-write.
_TMP_SUFFIXES = (".tmp", ".partial")
# Who owns the run on this server (owners.py) is not part of the run: a download carries no owner.
_LEFT_OUT = frozenset({"owner.json"})
# Fixed timestamp so the same run folder always zips to the same bytes.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def zip_run(run_dir: str | Path, max_bytes: int | None = 2 * 1024**3) -> bytes:
    """The run folder's files as zip bytes: ``<run-id>/config.json``, ``<run-id>/metrics.csv``, ...

    Raises RunError when the folder does not exist, holds no config.json (not a run) or its files
    add up to more than ``max_bytes`` (None disables the cap).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"Run folder {run_dir} does not exist; pick a run from the runs table.")
    if not (run_dir / "config.json").is_file():
        raise RunError(f"{run_dir} is not a run (it has no config.json); nothing to download.")

    files = _regular_files(run_dir)
    ckpt_root = run_dir / CHECKPOINTS_DIR
    if ckpt_root.is_dir() and not ckpt_root.is_symlink():
        for step in checkpoint_steps(run_dir):
            folder = ckpt_root / step_dir_name(step)
            if not folder.is_symlink():
                files += _regular_files(folder)
    total = sum(p.stat().st_size for p in files)
    if max_bytes is not None and total > max_bytes:
        raise RunError(
            f"Run {run_dir.name} holds {total / 1e6:.0f} MB, more than the {max_bytes / 1e6:.0f} MB download limit; "
            f"copy the folder {run_dir} directly instead."
        )

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in files:
            info = zipfile.ZipInfo(f"{run_dir.name}/{p.relative_to(run_dir).as_posix()}", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16  # rw-r--r--: no executable bits from a download
            zf.writestr(info, p.read_bytes())
    return buf.getvalue()


def _regular_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.is_symlink()
        and not p.name.startswith(".")
        and not p.name.endswith(_TMP_SUFFIXES)
        and p.name not in _LEFT_OUT
    )
