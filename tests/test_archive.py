"""zip_run: a run folder as a downloadable zip that unpacks into an openable run."""

from __future__ import annotations

import io
import os
import zipfile

import pytest

from tinygpt_core.archive import zip_run
from tinygpt_core.errors import RunError


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "my-run-20240101-000000"
    d.mkdir()
    (d / "config.json").write_text('{"name": "my-run"}')
    (d / "metrics.csv").write_text("step,loss\n1,4.2\n")
    (d / "model.safetensors").write_bytes(os.urandom(2048))
    return d


def test_zip_holds_the_run_files_under_the_run_id(run_dir):
    data = zip_run(run_dir)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == [
            "my-run-20240101-000000/config.json",
            "my-run-20240101-000000/metrics.csv",
            "my-run-20240101-000000/model.safetensors",
        ]
        assert zf.read("my-run-20240101-000000/model.safetensors") == (run_dir / "model.safetensors").read_bytes()
        assert zf.testzip() is None


def test_zip_leaves_out_links_subfolders_and_temp_files(run_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the run")
    (run_dir / "leak.txt").symlink_to(secret)
    (run_dir / "sub").mkdir()
    (run_dir / "sub" / "x.txt").write_text("x")
    (run_dir / "status.json.tmp").write_text("{half")
    names = zipfile.ZipFile(io.BytesIO(zip_run(run_dir))).namelist()
    assert not any(n.endswith(("leak.txt", "x.txt", ".tmp")) for n in names)
    assert len(names) == 3


def test_zip_holds_the_checkpoint_folders_so_the_run_can_resume(run_dir):
    step = run_dir / "checkpoints" / "step-000020"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"w")
    (step / "optimizer.safetensors").write_bytes(b"o")
    (run_dir / "checkpoints" / ".tmp-step-000030-x").mkdir()  # a checkpoint being written: not one yet
    (run_dir / "checkpoints" / ".tmp-step-000030-x" / "model.safetensors").write_bytes(b"half")
    names = zipfile.ZipFile(io.BytesIO(zip_run(run_dir))).namelist()
    assert [n for n in names if "checkpoints" in n] == [
        "my-run-20240101-000000/checkpoints/step-000020/model.safetensors",
        "my-run-20240101-000000/checkpoints/step-000020/optimizer.safetensors",
    ]


def test_zip_is_deterministic(run_dir):
    assert zip_run(run_dir) == zip_run(run_dir)


def test_missing_or_non_run_folders_raise_run_error(tmp_path, run_dir):
    with pytest.raises(RunError, match="does not exist"):
        zip_run(tmp_path / "nope")
    (run_dir / "config.json").unlink()
    with pytest.raises(RunError, match="not a run"):
        zip_run(run_dir)


def test_size_cap(run_dir):
    with pytest.raises(RunError, match="download limit"):
        zip_run(run_dir, max_bytes=100)
