"""Atomic writes give files the mode a plain open() would: 0666 less the umask (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from tinygpt_core.fileio import current_umask, write_bytes_atomic, write_text_atomic


@pytest.fixture
def umask():
    """Set a umask for one test and restore the previous one afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(saved)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    write_bytes_atomic(tmp_path / "a.bin", b"x")
    write_text_atomic(tmp_path / "sub" / "b.txt", "y")
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "sub" / "b.txt").stat().st_mode) == mode


def test_a_replaced_file_keeps_no_temporary_beside_it(tmp_path, umask):
    umask(0o022)
    for text in ("one", "two"):
        write_text_atomic(tmp_path / "f.txt", text)
    assert (tmp_path / "f.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_trained_run_folder_is_readable_by_others_under_umask_022(tmp_path, umask):
    from tinygpt_core.training import TrainSpec, train

    umask(0o022)
    spec = TrainSpec.from_preset("tiny", "builtin:tiny", max_iters=2, eval_interval=2, eval_iters=1, sample_tokens=4)
    result = train(spec, tmp_path / "run")
    files = [p for p in result.run_dir.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "metrics.csv", "status.json"}
    # and its export (issue 12 item 14: "run folders and exports")
    from tinygpt_core.export import export_hf

    exported = [p for p in export_hf(result.run_dir, tmp_path / "export", checkpoint="last").iterdir()]
    assert {p.name for p in exported} >= {"config.json", "model.safetensors"}
    for p in files + exported:
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, f"{p.name} is {oct(p.stat().st_mode)}"
