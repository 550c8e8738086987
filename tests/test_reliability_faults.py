"""Faults the lab must survive without losing work: a training process killed with SIGKILL, broken
and half-written run folders, a loss that turns NaN, a (simulated) CUDA out-of-memory error, and a
run store that is full or read-only.

Each test injects the fault the way it happens in real life (a real SIGKILL of a real process,
bytes cut off a real file, an OSError from the file system) and checks what the user is told and
what is left on disk. The browser-driven variant (SIGKILL of the app server itself) is in
tests/test_reliability_server.py. Figures for docs/RELIABILITY.md are printed with -s.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_spec

from tinygpt_core import checkpoints, jobs, runs, training
from tinygpt_core.cli import main
from tinygpt_core.errors import RunError
from tinygpt_core.jobs import LocalJobRunner
from tinygpt_core.model import GPT, ModelOutput
from tinygpt_core.runs import RunStore, load_checkpoint_state, load_run, read_metrics, read_status
from tinygpt_core.training import TrainSpec, resume, train

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py (also: tiny_spec, store, runner)


def folder_digest(path: Path) -> dict[str, str]:
    """sha256 of every file in a run folder: "loses no finished run" means these do not change."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


# --- SIGKILL of a training process -----------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_training_leaves_an_interrupted_run_that_resumes_from_its_last_checkpoint(tmp_path):
    """A real `python -m tinygpt_core train` process killed with SIGKILL after its second checkpoint."""
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "tinygpt_core",
        "train",
        "--corpus",
        "builtin:tiny",
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--block-size",
        "16",
        "--batch-size",
        "4",
        "--max-iters",
        "100000",
        "--eval-interval",
        "5",
        "--eval-iters",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
        "--seed",
        "3",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no second checkpoint within 120 s"
            try:
                if load_checkpoint_state(out, "last")[2].get("step", 0) >= 10:
                    break
            except RunError:
                pass  # not written yet (never half-written: the writes are atomic)
            time.sleep(0.2)
        time.sleep(0.3)  # let it log a few steps past the checkpoint, so there is something to drop on resume
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)  # reap it: a zombie still answers kill(pid, 0)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    status = read_status(out)
    assert status.status == "interrupted" and "resume" in status.message
    summary = RunStore(out.parent).summary(out.name)
    assert summary.status == "interrupted" and summary.broken_reason is None
    ckpt_step = int(load_checkpoint_state(out, "last")[2]["step"])
    metrics = read_metrics(out)
    logged = int(metrics["step"].iloc[-1])
    assert logged >= ckpt_step >= 10
    assert load_run(out).model is not None  # the best weights open as they are
    print(f"\nSIGKILL (CLI): checkpoint at step {ckpt_step}, {logged} steps logged, status {status.status!r}")

    # Resume through the CLI, as a user would, to a few steps past the checkpoint.
    target = ckpt_step + 7
    assert main(["resume", str(out), "--max-iters", str(target), "--no-progress", "--threads", "1"]) == 0
    after = read_metrics(out)
    steps = list(after["step"])
    assert steps == list(range(1, target + 1)), "rows past the checkpoint are dropped, then training continues"
    assert read_status(out).status == "done"
    # The rows up to the checkpoint are the ones written before the kill, unchanged.
    before = metrics[metrics["step"] <= ckpt_step].reset_index(drop=True)
    assert after.iloc[: len(before)].equals(before)


KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import torch
from tinygpt_core import runs
from tinygpt_core.runs import RunStore
from tinygpt_core.training import TrainSpec, train

torch.set_num_threads(1)
real, seen = runs.RunWriter.save_checkpoint, []

def save_then_die(self, which, *a, **kw):
    real(self, which, *a, **kw)
    seen.append(which)
    if seen.count("last") == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the worst moment: right after a checkpoint

runs.RunWriter.save_checkpoint = save_then_die
spec = TrainSpec.from_preset("tiny", "builtin:tiny", n_layer=1, n_embd=32, block_size=16, batch_size=4,
                             max_iters=100, eval_interval=5, eval_iters=1, device="cpu", sample_tokens=0)
train(spec, sys.argv[1])
"""


def test_a_kill_right_after_a_checkpoint_leaves_metrics_up_to_that_checkpoint(tmp_path):
    """Found by the SIGKILL test (1 run in 6): the checkpoint was written before the buffered metric rows,
    so a kill in between left a gap in the curve after resuming. Checkpoints now flush the rows first."""
    out = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_CHECKPOINT, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    ckpt = int(load_checkpoint_state(out, "last")[2]["step"])
    assert ckpt == 10
    assert list(read_metrics(out)["step"]) == list(range(1, 11))
    assert resume(out, max_iters=14).status == "done"
    assert list(read_metrics(out)["step"]) == list(range(1, 15))


# --- a checkpoint is atomic as a whole ---------------------------------------------------------------

KILL_INSIDE_CHECKPOINT = """
import os, signal, sys
import torch
from tinygpt_core import checkpoints
from tinygpt_core.training import TrainSpec, train

torch.set_num_threads(1)
where, calls = sys.argv[2], []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where == "between-files":  # the weights of step 10 are on disk, its optimizer state is not
    real_write = checkpoints._write_synced
    def write(path, data):
        real_write(path, data)
        calls.append(path.name)
        if path.name == "model.safetensors" and len(calls) == 3:  # step 5: 2 files; step 10: the 1st
            die()
    checkpoints._write_synced = write
elif where == "before-cleanup":  # step 10 is complete, step 5 not yet removed
    def remove(folder):
        die()
    checkpoints._remove_folder = remove
train(TrainSpec.from_preset("tiny", "builtin:tiny", **eval(sys.argv[3])), sys.argv[1])
"""

ATOMIC_SPEC = dict(
    n_layer=1, n_embd=32, block_size=16, batch_size=4, max_iters=20, eval_interval=5, eval_iters=1,
    device="cpu", sample_tokens=6, dropout=0.1, keep_checkpoints="last",  # the last checkpoint alone
)  # fmt: skip


def _run_state(run_dir: Path) -> tuple[dict, dict, list, object]:
    """What "bit-exactly the same run" means: last and best weights, the curves, the samples."""
    last, _, _ = load_checkpoint_state(run_dir, "last")
    best, _, _ = load_checkpoint_state(run_dir, "best")
    m = read_metrics(run_dir)[["step", "loss", "train_loss", "val_loss", "lr"]]
    return last, best, runs.read_samples(run_dir), m


def _assert_same_run(a: Path, b: Path) -> None:
    la, ba, sa, ma = _run_state(a)
    lb, bb, sb, mb = _run_state(b)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    assert sa == sb
    pd_equal = ma.reset_index(drop=True).equals(mb.reset_index(drop=True))
    assert pd_equal, f"curves differ:\n{ma}\n{mb}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train(TrainSpec.from_preset("tiny", "builtin:tiny", **ATOMIC_SPEC), out).status == "done"
    return out


@pytest.mark.parametrize("where", ["between-files", "before-cleanup"])
def test_a_kill_inside_a_checkpoint_resumes_bit_exactly_from_the_last_complete_one(tmp_path, uninterrupted, where):
    """Issue 11: a SIGKILL between the checkpoint's files (or before the old one is removed) must
    leave the last complete checkpoint, and resuming from it must give the uninterrupted run."""
    out = tmp_path / "run"
    _kill_inside_checkpoint(out, where)
    expected = 5 if where == "between-files" else 10
    assert checkpoints.last_checkpoint(out).step == expected
    assert int(load_checkpoint_state(out, "last")[2]["step"]) == expected
    if where == "before-cleanup":
        assert checkpoints.checkpoint_steps(out) == [5, 10]  # both complete; the newer one wins
    else:
        assert checkpoints.checkpoint_steps(out) == [5]  # the half-written step 10 is not a checkpoint
    assert resume(out).status == "done"
    _assert_same_run(out, uninterrupted)
    assert checkpoints.checkpoint_steps(out) == [20]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers


def _kill_inside_checkpoint(out: Path, where: str) -> None:
    p = subprocess.run(
        [sys.executable, "-c", KILL_INSIDE_CHECKPOINT, str(out), where, repr(ATOMIC_SPEC)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]


def test_a_run_in_the_old_two_file_layout_opens_and_resumes_exactly(tmp_path, uninterrupted):
    """Runs written before checkpoint folders (last.safetensors + optimizer.safetensors) open and resume."""
    out = tmp_path / "old"
    _kill_inside_checkpoint(out, "before-cleanup")  # a run interrupted at step 10 ...
    folder = checkpoints.find_checkpoint(out, "last").weights.parent
    os.replace(folder / "model.safetensors", out / "last.safetensors")  # ... in the old layout
    os.replace(folder / "optimizer.safetensors", out / "optimizer.safetensors")
    shutil.rmtree(out / "checkpoints")
    assert checkpoints.checkpoint_steps(out) == [] and checkpoints.can_resume(out)
    assert load_run(out, checkpoint="last").model is not None
    assert int(load_checkpoint_state(out, "last")[2]["step"]) == 10
    assert resume(out).status == "done"
    _assert_same_run(out, uninterrupted)
    assert not (out / "last.safetensors").exists() and not (out / "optimizer.safetensors").exists()
    assert checkpoints.checkpoint_steps(out) == [20]


# --- broken and half-written run folders ----------------------------------------------------------


class _Payload:
    """What a malicious pickle would do: run a function while it is being loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def damaged_store(tmp_path_factory) -> tuple[RunStore, str, dict[str, str], Path]:
    """One good run and one damaged copy of it per fault; returns (store, good id, {id: fault}, marker)."""
    root = tmp_path_factory.mktemp("damaged") / "runs"
    store = RunStore(root)
    good = train(tiny_spec(name="good"), store=store).run_dir
    marker = root.parent / "pickle-ran"
    faults = {
        "truncated-weights": lambda d: _cut(d / "model.safetensors", 0.5),
        "half-written-config": lambda d: _cut(d / "config.json", 0.5),
        "config-not-an-object": lambda d: (d / "config.json").write_text('["model", "train"]'),
        "missing-metrics": lambda d: (d / "metrics.csv").unlink(),
        "binary-metrics": lambda d: (d / "metrics.csv").write_bytes(os.urandom(512)),
        "missing-tokenizer": lambda d: (d / "tokenizer.json").unlink(),
        "pickle-weights": lambda d: torch.save({"w": _Payload(marker)}, d / "model.safetensors"),
        "raw-pickle-weights": lambda d: (d / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker))),
        "empty-folder": lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in d.iterdir()],
    }
    ids = {}
    for fault, damage in faults.items():
        d = root / f"{fault}-20200101-000000"
        shutil.copytree(good, d)
        damage(d)
        ids[d.name] = fault
    return store, good.name, ids, marker


def _cut(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_broken_run_folders_are_listed_with_a_reason_and_the_good_run_still_opens(damaged_store):
    store, good, ids, marker = damaged_store
    listed = {r.id: r for r in store.list()}
    assert set(listed) == {good, *ids}
    assert listed[good].status == "done" and listed[good].broken_reason is None
    expected = {  # fault -> words the reason must contain
        "truncated-weights": "model.safetensors is truncated",
        "half-written-config": "config.json is not valid JSON",
        "config-not-an-object": "config.json must hold a JSON object",
        "missing-metrics": "metrics.csv is missing",
        "binary-metrics": "metrics.csv",
        "missing-tokenizer": "tokenizer.json is missing",
        "pickle-weights": "pickle",
        "raw-pickle-weights": "pickle",
        "empty-folder": "missing",
    }
    for run_id, fault in ids.items():
        r = listed[run_id]
        assert r.status == "broken", (fault, r)
        assert expected[fault] in r.broken_reason, (fault, r.broken_reason)
        with pytest.raises(RunError):
            load_run(r.path)
    assert load_run(listed[good].path).model is not None
    assert not marker.exists(), "a pickle was unpickled"
    print(f"\nbroken folders: {len(ids)} faults, each listed as broken with its reason; the good run opens")


def test_the_cli_lists_broken_runs_with_reasons_and_refuses_to_open_them(damaged_store, capsys):
    store, good, ids, marker = damaged_store
    assert main(["runs", "list", "--runs-dir", str(store.root)]) == 0
    out = capsys.readouterr().out
    for run_id in ids:
        assert f"{run_id}: " in out  # one line per broken run with its reason
    pickled = next(i for i, f in ids.items() if f == "pickle-weights")
    code = main(["generate", str(store.root / pickled), "--prompt", "a", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "refused" in err and "pickle" in err and "Traceback" not in err
    assert (
        main(["generate", str(store.root / good), "--prompt", "a", "--max-new-tokens", "3", "--strategy", "greedy"])
        == 0
    )
    assert not marker.exists()


def test_a_truncated_last_checkpoint_refuses_to_resume_with_the_reason(tmp_path):
    run_dir = train(tiny_spec(max_iters=6, eval_interval=3), store=RunStore(tmp_path)).run_dir
    _cut(checkpoints.find_checkpoint(run_dir, "last").weights, 0.7)
    with pytest.raises(RunError, match="checkpoints/step-000006/model.safetensors is truncated"):
        resume(run_dir, max_iters=10)
    assert load_run(run_dir).model is not None  # the best weights are separate and intact


# --- NaN and out of memory through the job runner --------------------------------------------------


def _patch_forward(monkeypatch, fail):
    """GPT.forward, with ``fail(call_number, output)`` deciding what the n-th training forward returns."""
    original = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        out = original(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            return fail(calls["n"], out)
        return out

    monkeypatch.setattr(GPT, "forward", forward)


def test_a_nan_loss_ends_the_job_as_diverged_and_the_run_says_so(runner, store, monkeypatch):
    _patch_forward(monkeypatch, lambda n, out: ModelOutput(out.logits, out.loss * float("nan")) if n >= 4 else out)
    snap = runner.wait(runner.submit(tiny_spec(max_iters=30, grad_clip=0.0)), timeout=120)
    assert snap.status == "diverged"
    # Step 4's loss is NaN, so its update is skipped and the run's last applied step is 3: both named.
    assert snap.message.startswith("Loss became NaN in step 4, so the run stopped at step 3")
    assert "learning rate" in snap.message and snap.step == 3
    summary = store.summary(snap.run_id)
    assert summary.status == "diverged" and "NaN" in summary.message
    assert load_run(snap.run_dir).model is not None  # the last finite weights


@pytest.mark.parametrize(
    "error",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)"),
        lambda: RuntimeError("CUDA out of memory. Tried to allocate 512.00 MiB"),
    ],
    ids=["torch.OutOfMemoryError", "RuntimeError"],
)
def test_out_of_memory_ends_that_job_with_what_to_shrink_and_the_runner_keeps_serving(
    runner, store, monkeypatch, error
):
    def oom_at_3(n, out):
        if n == 3:
            raise error()
        return out

    _patch_forward(monkeypatch, oom_at_3)
    threads_before = {t.name for t in __import__("threading").enumerate()}
    first = runner.submit(tiny_spec(max_iters=30, batch_size=4, block_size=16))
    queued = runner.submit(tiny_spec(max_iters=6, eval_interval=3, name="after-oom"))
    snap = runner.wait(first, timeout=120)
    assert snap.status == "error"
    assert "Out of" in snap.message and "reduce batch size (4), block size (16) or model size" in snap.message
    assert read_status(snap.run_dir).status == "error"
    # The next job (queued behind it) starts and finishes normally: the server keeps serving.
    nxt = runner.wait(queued, timeout=120)
    assert nxt.status == "done", nxt.message
    assert load_run(nxt.run_dir).model is not None
    time.sleep(0.1)
    leftover = {t.name for t in __import__("threading").enumerate()} - threads_before
    assert not [n for n in leftover if n.startswith("tinygpt-job-")], "a job thread outlived its job"


# --- a full or read-only run store ----------------------------------------------------------------


class FailingDisk:
    """Makes writes under ``root`` fail with ``errno_`` once ``after`` of them have succeeded.

    Patches the two ways the run store writes: atomic replacement (temp file + rename) and the
    metrics.csv append. Everything else (reads, other folders) behaves normally.
    """

    def __init__(self, monkeypatch, root: Path, errno_: int, after: int = 0):
        self.root, self.errno, self.after, self.writes, self.failed = Path(root), errno_, after, 0, 0
        real_atomic, real_open, real_mkdir = runs.write_bytes_atomic, open, Path.mkdir

        def gate(path) -> None:
            if Path(path).resolve().is_relative_to(self.root.resolve()):
                self.writes += 1
                if self.writes > self.after:
                    self.failed += 1
                    raise OSError(self.errno, os.strerror(self.errno), str(path))

        def atomic(path, data):
            gate(path)
            return real_atomic(path, data)

        def append_open(path, mode="r", *a, **kw):
            if any(c in mode for c in "wax"):
                gate(path)
            return real_open(path, mode, *a, **kw)

        def mkdir(path, *a, **kw):
            if not path.exists():
                gate(path)
            return real_mkdir(path, *a, **kw)

        monkeypatch.setattr(runs, "write_bytes_atomic", atomic)
        monkeypatch.setattr(runs, "open", append_open, raising=False)
        monkeypatch.setattr(Path, "mkdir", mkdir)


def test_disk_full_mid_training_ends_the_job_with_a_clear_error_and_loses_no_finished_run(store, monkeypatch):
    finished = train(tiny_spec(name="finished"), store=store).run_dir
    before = folder_digest(finished)
    runner = LocalJobRunner(store, max_jobs_per_device=1, execution="thread")
    try:
        disk = FailingDisk(monkeypatch, store.root, errno.ENOSPC, after=8)  # fails during the first checkpoints
        snap = runner.wait(runner.submit(tiny_spec(max_iters=40, eval_interval=4, name="victim")), timeout=120)
        assert disk.failed >= 1
        assert snap.status == "error"
        assert "No space left on device" in snap.message and "Free some disk space" in snap.message
        monkeypatch.undo()  # the operator frees space
        assert folder_digest(finished) == before, "a finished run changed"
        assert load_run(finished).model is not None
        assert not temp_files(store.root), "half-written temp files were left behind"
        listed = {r.id: r for r in store.list()}
        assert listed[finished.name].status == "done"
        # The server keeps serving once there is room again.
        again = runner.wait(runner.submit(tiny_spec(max_iters=4, eval_interval=2)), timeout=120)
        assert again.status == "done", again.message
    finally:
        runner.shutdown()
    print(
        f"\ndisk full: {disk.failed} write(s) refused with ENOSPC after {disk.after} succeeded; "
        f"job ended {snap.status!r}; finished run unchanged ({len(before)} files)"
    )


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=["ENOSPC", "EROFS", "EACCES"])
def test_a_store_that_refuses_every_write_refuses_new_jobs_with_a_clear_error(store, monkeypatch, code):
    finished = train(tiny_spec(name="finished"), store=store).run_dir
    before = folder_digest(finished)
    runner = LocalJobRunner(store, max_jobs_per_device=1, execution="thread")
    try:
        FailingDisk(monkeypatch, store.root, code, after=0)
        with pytest.raises(RunError) as err:
            runner.submit(tiny_spec())
        assert os.strerror(code) in str(err.value) and str(store.root) in str(err.value)
        assert runner.list_jobs() == []
        with pytest.raises(RunError, match="Could not delete|Cannot"):
            _delete_with_failing_rmtree(store, finished.name, monkeypatch, code)
    finally:
        runner.shutdown()
    monkeypatch.undo()
    assert folder_digest(finished) == before
    assert [r.id for r in store.list()] == [finished.name]  # nothing half-created is left


def _delete_with_failing_rmtree(store, run_id, monkeypatch, code):
    def rmtree(path, *a, **kw):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(runs.shutil, "rmtree", rmtree)
    store.delete(run_id)


def test_the_cli_reports_an_unwritable_store_in_one_line(tmp_path, monkeypatch, capsys):
    root = tmp_path / "ro"
    FailingDisk(monkeypatch, root, errno.EROFS, after=0)
    code = main(
        [
            "train",
            "--corpus",
            "builtin:tiny",
            "--runs-dir",
            str(root),
            "--max-iters",
            "2",
            "--n-layer",
            "1",
            "--n-embd",
            "32",
            "--block-size",
            "16",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: Cannot create a run folder") and "Read-only file system" in err
    assert "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions; the monkeypatched tests cover it")
def test_a_real_read_only_folder(tmp_path, capsys):
    root = tmp_path / "runs"
    finished = train(tiny_spec(name="finished"), store=RunStore(root)).run_dir
    before = folder_digest(finished)
    os.chmod(root, 0o555)
    try:
        code = main(
            [
                "train",
                "--corpus",
                "builtin:tiny",
                "--runs-dir",
                str(root),
                "--max-iters",
                "2",
                "--n-layer",
                "1",
                "--n-embd",
                "32",
                "--block-size",
                "16",
                "--no-progress",
            ]
        )
        assert code == 2 and "Permission denied" in capsys.readouterr().err
    finally:
        os.chmod(root, 0o755)
    assert folder_digest(finished) == before


# --- resuming an interrupted run in the app's job runner -------------------------------------------


def interrupted_run(store: RunStore, steps: int = 6, max_iters: int = 12) -> Path:
    """A run as a killed server leaves it: checkpoint at ``steps``, status "running" with a dead pid."""
    stop = __import__("threading").Event()

    def stop_at(event):
        if event.kind == "step" and event.step >= steps:
            stop.set()

    result = train(
        tiny_spec(max_iters=max_iters, eval_interval=3, name="victim"),
        store=store,
        callbacks=[stop_at],
        stop_event=stop,
    )
    assert result.status == "stopped" and result.steps == steps
    status = json.loads((result.run_dir / "status.json").read_text())
    status.update(status="running", pid=4_194_303)  # above Linux's pid_max: no such process
    (result.run_dir / "status.json").write_text(json.dumps(status))
    assert read_status(result.run_dir).status == "interrupted"
    return result.run_dir


def test_the_runner_resumes_an_interrupted_run_once_and_refuses_a_duplicate(runner, store, monkeypatch):
    run_dir = interrupted_run(store)
    before = read_metrics(run_dir)
    gate = __import__("threading").Event()
    real_resume = training.resume

    def slow_resume(*a, **kw):  # hold the job at its start so the duplicate request arrives while it runs
        gate.wait(30)
        return real_resume(*a, **kw)

    monkeypatch.setattr(training, "resume", slow_resume)
    job_id = runner.resume(run_dir.name)
    with pytest.raises(jobs.JobError, match="already being resumed"):
        runner.resume(run_dir.name)
    gate.set()
    snap = runner.wait(job_id, timeout=120)
    assert snap.status == "done", snap.message
    after = read_metrics(run_dir)
    assert list(after["step"]) == list(range(1, 13))
    assert after.iloc[: len(before)].equals(before)  # the rows before the kill are kept as they were
    assert [r.id for r in store.list()] == [run_dir.name]  # resumed in place: no second run folder
    with pytest.raises(RunError, match="already at step 12"):
        runner.resume(run_dir.name)


def test_resume_refuses_runs_it_cannot_continue(runner, store, monkeypatch):
    run_dir = interrupted_run(store)
    checkpoints.last_checkpoint(run_dir).optimizer.unlink()
    with pytest.raises(RunError, match="no optimizer.safetensors"):
        runner.resume(run_dir.name)
    with pytest.raises(RunError, match="not a valid run id"):
        runner.resume("../" + run_dir.name)
    monkeypatch.setenv("TINYGPT_READ_ONLY", "1")
    with pytest.raises(Exception, match="read-only"):
        runner.resume(run_dir.name)
    assert runner.list_jobs() == []


def test_the_train_page_resumes_an_interrupted_run_from_its_checkpoint(tmp_path, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    runs_dir = tmp_path / "runs"
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "1")
    jobs.reset_runner()
    st.cache_resource.clear()
    try:
        run_dir = interrupted_run(RunStore(runs_dir), steps=6, max_iters=12)
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
        # This session's browser started the run (issue 11: only its owner, or the operator, may resume it).
        from tinygpt_core import owners

        token = owners.new_token()
        at.session_state["_tinygpt_owner_token"] = token
        owners.write_owner(run_dir, owners.visitor_owner(token))
        at.run()
        at.switch_page("app_pages/train.py")
        at.query_params["run"] = run_dir.name
        at.run()
        assert not at.exception
        assert "Interrupted" in "\n".join(w.value for w in at.warning)
        at.button(key="train_resume").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        job_id = at.query_params["job"]
        snap = jobs.get_runner().wait(job_id, timeout=120)
        assert snap.status == "done", snap.message
        assert list(read_metrics(run_dir)["step"]) == list(range(1, 13))
        at.run()
        assert "Done" in "\n".join(s.value for s in at.success)
        assert "train_resume" not in {b.key for b in at.button}  # nothing left to resume
    finally:
        jobs.reset_runner()
        st.cache_resource.clear()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc")
def test_a_recycled_pid_does_not_keep_a_killed_run_running(tmp_path):
    """In a container the restarted server gets the killed one's pid (often 1): the pid is alive, but it
    is another process. status.json records the process start time too, so the run reads as interrupted."""
    run_dir = tmp_path / "run"
    runs.RunWriter(run_dir).write_status("running", "Step 7 of 100", 7)
    recorded = json.loads((run_dir / "status.json").read_text())
    assert recorded["pid"] == os.getpid() and isinstance(recorded["pid_start"], int)
    assert read_status(run_dir).status == "running"  # this very process: alive
    recorded["pid_start"] -= 1  # same pid, different process
    (run_dir / "status.json").write_text(json.dumps(recorded))
    status = read_status(run_dir)
    assert status.status == "interrupted" and "step 7" in status.message


def test_the_app_lists_every_broken_folder_with_its_reason_and_opens_the_good_run(damaged_store, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    store, good, ids, marker = damaged_store
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(store.root))
    jobs.reset_runner()
    st.cache_resource.clear()
    st.cache_data.clear()
    try:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
        at.run()
        at.switch_page("app_pages/runs.py").run()
        assert not at.exception
        table = at.dataframe(key="runs_table").value
        rows = dict(zip(table["id"], zip(table["status"], table["message"])))
        assert rows[good][0] == "done"
        for run_id in ids:
            assert rows[run_id][0] == "broken" and rows[run_id][1], run_id
        for page in ("app_pages/attention.py", "app_pages/sampling.py"):
            at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
            at.query_params["run"] = good
            at.run()
            at.switch_page(page).run()
            assert not at.exception and not at.error, page
            assert at.get("plotly_chart") or at.get("html"), page  # heatmaps / generated text
        assert not marker.exists()
    finally:
        jobs.reset_runner()
        st.cache_resource.clear()
        st.cache_data.clear()
