"""Shipping a run folder (tinygpt_core.shipping): what a remote worker sends and how the owner applies it.

No Ray here: the watcher and the mirror are plain file code, tested on two temporary folders."""

from __future__ import annotations

import json

import pytest

from tinygpt_core.errors import RunError
from tinygpt_core.fileio import write_bytes_atomic
from tinygpt_core.shipping import FileChange, FolderMirror, FolderWatcher, pack_folder, write_changes


def test_changes_ship_new_appended_replaced_and_deleted_files_only_once(tmp_path):
    worker, owner = tmp_path / "worker", tmp_path / "owner"
    worker.mkdir()
    statuses = []
    watcher = FolderWatcher(worker)
    mirror = FolderMirror(owner, on_status=lambda *a: statuses.append(a))

    (worker / "metrics.csv").write_text("step,loss\n1,3.0\n")
    write_bytes_atomic(worker / "checkpoints" / "last.safetensors", b"A" * 100)  # any layout travels
    (worker / ".model.safetensors.x.tmp").write_bytes(b"half")  # an atomic write in progress: skipped
    status = {"status": "running", "message": "Step 1", "step": 1}
    write_bytes_atomic(worker / "status.json", json.dumps(status).encode())
    first = watcher.changes()
    assert {c.path for c in first} == {"metrics.csv", "checkpoints/last.safetensors", "status.json"}
    mirror.apply(first)
    assert watcher.changes() == []  # nothing changed: nothing sent

    with open(worker / "metrics.csv", "a") as f:
        f.write("2,2.5\n")
    write_bytes_atomic(worker / "checkpoints" / "last.safetensors", b"B" * 100)
    (worker / "checkpoints" / "step-1.safetensors").write_bytes(b"old")
    second = watcher.changes()
    appended = next(c for c in second if c.path == "metrics.csv")
    assert appended.offset == len("step,loss\n1,3.0\n") and appended.data == b"2,2.5\n"  # only the tail
    mirror.apply(second)
    (worker / "checkpoints" / "step-1.safetensors").unlink()
    third = watcher.changes()
    assert third == [FileChange("checkpoints/step-1.safetensors", None)]
    mirror.apply(third)

    assert (owner / "metrics.csv").read_text() == (worker / "metrics.csv").read_text()
    assert (owner / "checkpoints" / "last.safetensors").read_bytes() == b"B" * 100
    assert not (owner / "checkpoints" / "step-1.safetensors").exists()
    # status.json is the owner's to write (with its own pid): handed over, never copied.
    assert not (owner / "status.json").exists() and statuses == [("running", "Step 1", 1)]


def test_a_rewritten_file_is_sent_whole_and_a_new_owner_gets_everything(tmp_path):
    worker = tmp_path / "w"
    worker.mkdir()
    watcher = FolderWatcher(worker)
    (worker / "metrics.csv").write_text("step\n1\n2\n3\n")
    watcher.changes()
    (worker / "metrics.csv").write_text("step\n1\n2\n3\n4\n5\n".replace("3\n", "9\n"))  # truncated then regrown
    (change,) = watcher.changes()
    assert change.offset is None and change.data == b"step\n1\n2\n9\n4\n5\n"
    watcher.forget()
    assert [c.path for c in watcher.changes()] == ["metrics.csv"]


def test_resume_ships_the_folder_and_the_worker_sends_back_only_what_it_changes(tmp_path):
    owner, worker = tmp_path / "owner", tmp_path / "worker"
    owner.mkdir()
    (owner / "config.json").write_text("{}")
    (owner / "corpus.txt").write_text("hello")
    (owner / "status.json").write_text("{}")
    files = pack_folder(owner, skip=("status.json",))
    assert [f.path for f in files] == ["config.json", "corpus.txt"]
    write_changes(worker, files)
    watcher = FolderWatcher(worker)
    watcher.mark_known()
    assert watcher.changes() == []
    (worker / "config.json").write_text('{"max_iters": 10}')
    assert [c.path for c in watcher.changes()] == ["config.json"]


@pytest.mark.parametrize("bad", ["../escape.txt", "/etc/passwd", "a/../../b", ""])
def test_a_path_outside_the_run_folder_is_refused(tmp_path, bad):
    with pytest.raises(RunError, match="outside its run folder"):
        FolderMirror(tmp_path / "run").apply([FileChange(bad, b"x")])
    assert not (tmp_path / "escape.txt").exists()
