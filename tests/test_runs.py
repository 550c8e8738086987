"""The run store: safe names, atomic writes, the load_run contract, broken folders, statuses."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from tinygpt_core.config import ModelConfig, TrainConfig
from tinygpt_core.errors import RunError
from tinygpt_core.model import GPT
from tinygpt_core.runs import (
    METRIC_COLUMNS,
    RunStore,
    RunWriter,
    load_checkpoint_state,
    load_run,
    metric_columns,
    read_metrics,
    read_status,
    write_json_atomic,
)
from tinygpt_core.training import TrainSpec, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small finished run, trained once; tests copy it before damaging it."""
    spec = TrainSpec(
        corpus="builtin:tiny",
        model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16),
        train=TrainConfig(
            batch_size=8,
            max_iters=20,
            eval_interval=10,
            eval_iters=2,
            sample_tokens=8,
            warmup_iters=2,
            seed=3,
            device="cpu",
            precision="fp32",
        ),
        name="fixture run",
    )
    result = train(spec, store=RunStore(tmp_path_factory.mktemp("runs")))
    assert result.status == "done", result.message
    return result.run_dir


@pytest.fixture
def copy(trained, tmp_path):
    """A fresh copy of the trained run inside a store of its own: (store, run_id, path)."""
    store = RunStore(tmp_path / "store")
    store.root.mkdir()
    dst = store.root / trained.name
    shutil.copytree(trained, dst)
    return store, dst.name, dst


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc", "/abs", "a/b", "..", "", "a\\b", None, "...", "\x00"])
def test_create_never_escapes_the_store(tmp_path, name):
    store = RunStore(tmp_path / "runs")
    path = store.create(name)
    assert path.parent.resolve() == store.root.resolve()
    assert path.is_dir()
    assert path.name.startswith("run-")


def test_create_slugs_names(tmp_path):
    store = RunStore(tmp_path)
    assert store.create("My Run: v2!").name.startswith("my-run-v2-")
    assert store.create("Café 模型").name.startswith("cafe-")
    long = store.create("x" * 200).name
    assert long.startswith("x" * 60 + "-") and "x" * 61 not in long
    a, b = store.create("same"), store.create("same")  # same second: still two folders
    assert a != b and a.is_dir() and b.is_dir()


def test_grid_members_get_folders_named_after_their_grid_and_ablation(tmp_path):
    from tinygpt_core.ablations import grid_run_name

    store = RunStore(tmp_path)
    for label in ("baseline", "no-layernorm", "window-8"):
        path = store.create(grid_run_name("241201-101500-ab12", label))
        assert path.name.startswith(f"grid-241201-101500-ab12-{label}-"), path.name
    # Only the grid shape is trusted: any other slash or dot-dot still gives a plain "run".
    for name in ("grid-x/../../etc", "grid-x/a/b", "other/thing"):
        assert store.create(name).name.startswith("run-")


@pytest.mark.parametrize("run_id", ["..", ".", "", "../x", "/etc", "a/b", "missing-run"])
def test_path_rejects_bad_or_unknown_ids(tmp_path, run_id):
    (tmp_path / "x").mkdir()
    store = RunStore(tmp_path / "store")
    store.root.mkdir()
    with pytest.raises(RunError):
        store.path(run_id)


# --- atomic writes -----------------------------------------------------------------------------


def test_write_json_atomic_replaces_whole_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "x.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"b": "ü"})
    assert json.loads(p.read_text("utf-8")) == {"b": "ü"}
    with pytest.raises(TypeError):
        write_json_atomic(p, {"bad": object()})  # fails while serialising: the old file must survive
    assert json.loads(p.read_text("utf-8")) == {"b": "ü"}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


# --- load_run ----------------------------------------------------------------------------------


def test_load_run_contract(trained):
    run = load_run(trained)
    assert isinstance(run.model, torch.nn.Module) and not run.model.training
    assert run.config.model.n_embd == 32 and run.config.name == "fixture run"
    assert run.tokenizer.vocab_size == run.config.model.vocab_size
    assert isinstance(run.metrics, pd.DataFrame)
    assert list(run.metrics.columns) == metric_columns(run.config.model.n_layer)  # health columns per layer
    assert list(run.metrics["step"]) == list(range(1, 21))
    assert run.status.status == "done"
    assert [s["step"] for s in run.samples] == [10, 20]
    ids = torch.tensor([run.tokenizer.encode("The light")])
    out = run.model(ids)
    assert out.logits.shape == (1, ids.shape[1], run.tokenizer.vocab_size)
    last = load_run(trained, checkpoint="last")
    assert last.checkpoint == "last"


def test_tied_weights_stored_once_and_restored_tied(trained):
    state, _, _ = load_checkpoint_state(trained, "best")
    assert "lm_head.weight" not in state and "wte.weight" in state
    run = load_run(trained)
    assert run.model.lm_head.weight is run.model.wte.weight


def test_untied_model_round_trips(tmp_path):
    cfg = ModelConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=16, block_size=8, tie_weights=False)
    model = GPT(cfg)
    w = RunWriter(tmp_path)
    w.save_checkpoint("best", model)
    state, _, _ = load_checkpoint_state(tmp_path, "best")
    assert "lm_head.weight" in state
    other = GPT(cfg)
    from tinygpt_core.checkpoints import load_model_state

    load_model_state(other, state)
    x = torch.randint(11, (2, 8))
    assert torch.equal(model.eval()(x).logits, other.eval()(x).logits)


def test_optimizer_state_and_extra_round_trip(tmp_path):
    model = GPT(ModelConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=16, block_size=8))
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randint(11, (2, 8)), torch.randint(11, (2, 8))).loss.backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    RunWriter(tmp_path).save_checkpoint("last", model, opt, {"step": 7, "best": None, "rng": gen.get_state()})
    _, ostate, extra = load_checkpoint_state(tmp_path, "last")
    assert extra["step"] == 7 and extra["best"] is None and torch.equal(extra["rng"], gen.get_state())
    fresh = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3)
    fresh.load_state_dict(ostate)
    assert fresh.param_groups[0]["betas"] == (0.9, 0.95)
    for k, s in opt.state_dict()["state"].items():
        for name, v in s.items():
            assert torch.equal(v, fresh.state_dict()["state"][k][name])


# --- broken folders ------------------------------------------------------------------------------


def _broken_reason(store, run_id):
    [summary] = [s for s in store.list() if s.id == run_id]
    assert summary.status == "broken"
    return summary.broken_reason


def test_missing_config(copy):
    store, run_id, path = copy
    (path / "config.json").unlink()
    with pytest.raises(RunError, match="config.json is missing"):
        load_run(path)
    assert "config.json is missing" in _broken_reason(store, run_id)


def test_malformed_config_json(copy):
    store, run_id, path = copy
    (path / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="config.json is not valid JSON"):
        load_run(path)
    assert "not valid JSON" in _broken_reason(store, run_id)


def test_invalid_config_values(copy):
    store, run_id, path = copy
    d = json.loads((path / "config.json").read_text())
    d["model"]["n_head"] = 3  # 32 is not divisible by 3
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(RunError, match="config.json is invalid"):
        load_run(path)


def test_weights_not_matching_config(copy):
    _, _, path = copy
    d = json.loads((path / "config.json").read_text())
    d["model"]["n_layer"] = 2
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(RunError, match="weights don't match config"):
        load_run(path)


def test_truncated_safetensors(copy):
    store, run_id, path = copy
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match="model.safetensors is truncated or not a safetensors file"):
        load_run(path)
    assert "truncated" in _broken_reason(store, run_id)


def test_missing_safetensors(copy):
    store, run_id, path = copy
    (path / "model.safetensors").unlink()
    with pytest.raises(RunError, match="model.safetensors is missing"):
        load_run(path)
    assert "model.safetensors is missing" in _broken_reason(store, run_id)


class _Evil:
    """Unpickling this writes a marker file: proof that a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["pickle", "torch"])
def test_pickle_renamed_to_safetensors_is_refused_unread(copy, tmp_path, fmt):
    store, run_id, path = copy
    marker = tmp_path / "pwned"
    target = path / "model.safetensors"
    if fmt == "pickle":
        target.write_bytes(pickle.dumps({"x": _Evil(str(marker))}, protocol=4))
    else:
        torch.save({"x": _Evil(str(marker))}, target)
    with pytest.raises(RunError, match="pickle"):
        load_run(path)
    assert "pickle" in _broken_reason(store, run_id)
    assert not marker.exists()


def test_missing_metrics(copy):
    store, run_id, path = copy
    (path / "metrics.csv").unlink()
    with pytest.raises(RunError, match="metrics.csv is missing"):
        load_run(path)
    assert "metrics.csv is missing" in _broken_reason(store, run_id)


def test_list_reports_good_and_broken_runs_without_failing(copy, tmp_path):
    store, run_id, _ = copy
    (store.root / "junk-folder").mkdir()
    (store.root / "stray-file.txt").write_text("not a run")
    rows = {s.id: s for s in store.list()}
    assert set(rows) == {run_id, "junk-folder"}
    good = rows[run_id]
    assert good.status == "done" and good.broken_reason is None
    assert good.name == "fixture run" and good.steps == 20 and good.max_iters == 20
    m = read_metrics(good.path)
    assert good.best_val_loss == pytest.approx(m["val_loss"].min())
    assert good.best_step == int(m.loc[m["val_loss"].idxmin(), "step"])
    assert good.params == load_run(good.path).model.num_params()
    assert good.corpus == "builtin:tiny" and good.tokenizer == "char"
    assert rows["junk-folder"].status == "broken"


def test_summary_of_a_running_job_without_files_is_not_broken(tmp_path):
    store = RunStore(tmp_path)
    path = store.create("live")
    RunWriter(path).write_status("running", "Starting…")
    [row] = store.list()
    assert row.status == "running" and row.broken_reason is None


# --- status and delete ---------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_running_with_dead_pid_reads_as_interrupted(copy):
    store, run_id, path = copy
    write_json_atomic(
        path / "status.json",
        {"status": "running", "message": "", "step": 12, "pid": _dead_pid(), "updated_at": time.time()},
    )
    st = read_status(path)
    assert st.status == "interrupted" and st.step == 12 and "resume" in st.message
    store.delete(run_id)  # an interrupted run can be deleted
    assert not path.exists()


def test_running_with_stale_heartbeat_reads_as_interrupted(copy):
    _, _, path = copy
    write_json_atomic(
        path / "status.json",
        {"status": "running", "message": "", "step": 3, "pid": os.getpid(), "updated_at": time.time() - 500},
    )
    assert read_status(path).status == "interrupted"


def test_live_running_run_cannot_be_deleted(copy):
    store, run_id, path = copy
    RunWriter(path).write_status("running", "Step 5", 5)
    assert read_status(path).status == "running"
    with pytest.raises(RunError, match="still training"):
        store.delete(run_id)
    assert path.exists()
    RunWriter(path).write_status("done", "ok", 20)
    store.delete(run_id)
    assert not path.exists() and store.list() == []


def test_metrics_append_and_truncate(tmp_path):
    w = RunWriter(tmp_path)
    w.append_metrics_rows([])
    assert read_metrics(tmp_path).empty
    for s in range(1, 6):
        w.append_metrics({"step": s, "loss": 1.0 / s, "lr": 1e-3, "tokens_per_s": 10.0, "elapsed_s": s})
    w.append_metrics({"step": 6, "loss": float("nan"), "train_loss": 0.5, "val_loss": 0.6})
    m = read_metrics(tmp_path)
    assert list(m.columns) == METRIC_COLUMNS and list(m["step"]) == [1, 2, 3, 4, 5, 6]
    assert m["val_loss"].isna().sum() == 5 and m["val_loss"].iloc[-1] == pytest.approx(0.6)
    w.add_sample(3, "a")
    w.add_sample(6, "b")
    w.truncate_after(4)
    assert list(read_metrics(tmp_path)["step"]) == [1, 2, 3, 4]
    assert json.loads((tmp_path / "samples.json").read_text()) == [{"step": 3, "text": "a"}]


def test_valid_file_whose_header_looks_like_a_pickle_opcode_is_accepted(tmp_path):
    # The first byte of a safetensors file is the low byte of its header length: 0x80 is a valid
    # length byte and must not be mistaken for the pickle protocol marker.
    from safetensors.torch import save

    from tinygpt_core.checkpoints import safetensors_problem

    for pad in range(200):
        data = save({"w": torch.zeros(2)}, metadata={"pad": "x" * pad})
        if data[0] == 0x80:
            break
    assert data[0] == 0x80
    p = tmp_path / "model.safetensors"
    p.write_bytes(data)
    assert safetensors_problem(p) is None


def test_queued_by_a_dead_process_reads_as_interrupted(tmp_path):
    write_json_atomic(
        tmp_path / "status.json",
        {"status": "queued", "message": "", "step": 0, "pid": _dead_pid(), "updated_at": time.time()},
    )
    assert read_status(tmp_path).status == "interrupted"
    RunWriter(tmp_path).write_status("queued", "Waiting")
    assert read_status(tmp_path).status == "queued"


def test_a_reader_racing_a_new_checkpoint_reads_the_new_one(tmp_path, monkeypatch):
    """The writer removes the previous step folder once the new one is in place; a reader that had
    found the old folder just before then reads the new checkpoint instead of failing."""
    from tinygpt_core import checkpoints

    model = GPT(ModelConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=16, block_size=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpoints.save_checkpoint(tmp_path, 5, model, opt, {"note": "old"})
    real, raced = checkpoints._read_labelled, []

    def read_while_training(path):
        if not raced:  # the training thread checkpoints step 10 between find and read
            raced.append(path)
            checkpoints.save_checkpoint(tmp_path, 10, model, opt, {"note": "new"})
        return real(path)

    monkeypatch.setattr(checkpoints, "_read_labelled", read_while_training)
    _, ostate, extra = load_checkpoint_state(tmp_path, "last")
    assert raced and "step-000005" in str(raced[0]) and extra["step"] == 10 and extra["note"] == "new"
    assert checkpoints.checkpoint_steps(tmp_path) == [10] and ostate is not None
    with pytest.raises(RunError, match="no checkpoint at step 5"):
        load_checkpoint_state(tmp_path, "last", step=5)
