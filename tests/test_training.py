"""The training loop: learning, determinism, resume, failure statuses, cancel, early stops, events."""

from __future__ import annotations

import math
import threading

import pandas as pd
import pytest
import torch

import tinygpt_core.training as training
import tinygpt_core.trainstate as trainstate
from tinygpt_core import checkpoints
from tinygpt_core.config import ModelConfig, TrainConfig
from tinygpt_core.data import Corpus
from tinygpt_core.errors import ConfigError, DataError, RunError
from tinygpt_core.model import GPT, ModelOutput
from tinygpt_core.runs import RunStore, load_run, read_config, read_metrics, read_samples, read_status
from tinygpt_core.training import TrainSpec, estimate_step_time, lr_at, resume, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def spec(**train_overrides) -> TrainSpec:
    model_overrides = {
        k: train_overrides.pop(k) for k in list(train_overrides) if k in ModelConfig.__dataclass_fields__
    }
    train_cfg = dict(
        batch_size=8,
        max_iters=40,
        eval_interval=10,
        eval_iters=2,
        lr=3e-3,
        min_lr=3e-4,
        warmup_iters=5,
        weight_decay=0.0,
        sample_tokens=8,
        seed=7,
        device="cpu",
        precision="fp32",
    )
    train_cfg.update(train_overrides)
    model = ModelConfig(**{**dict(n_layer=1, n_head=2, n_embd=32, block_size=16), **model_overrides})
    return TrainSpec(corpus="builtin:tiny", model=model, train=TrainConfig(**train_cfg))


def run(tmp_path, s: TrainSpec, **kw):
    events = []
    result = train(s, store=RunStore(tmp_path / "runs"), callbacks=[events.append], **kw)
    return result, events


def step_losses(events) -> list[float]:
    return [e.data["loss"] for e in events if e.kind == "step"]


def test_loss_falls_and_run_folder_is_complete(tmp_path):
    result, events = run(tmp_path, spec(max_iters=60, eval_interval=20, lr=1e-2, min_lr=1e-3))
    assert result.status == "done", result.message
    assert result.steps == 60
    losses = step_losses(events)
    # A char model starts near ln(vocab) and must do clearly better after 60 steps.
    assert losses[0] > 3.0
    assert sum(losses[-10:]) / 10 < losses[0] - 0.6
    for name in (
        "config.json",
        "metrics.csv",
        "model.safetensors",
        "checkpoints/step-000060/model.safetensors",
        "checkpoints/step-000060/optimizer.safetensors",
        "tokenizer.json",
        "status.json",
        "samples.json",
    ):
        assert (result.run_dir / name).is_file(), name
    m = read_metrics(result.run_dir)
    assert list(m["step"]) == list(range(1, 61))
    evals = m.dropna(subset=["val_loss"])
    assert list(evals["step"]) == [20, 40, 60]  # train/val only on eval steps, empty elsewhere
    assert m["train_loss"].notna().sum() == 3
    assert evals["val_loss"].iloc[-1] < evals["val_loss"].iloc[0]
    assert result.best_val_loss == pytest.approx(evals["val_loss"].min(), rel=1e-5)
    assert [s["step"] for s in read_samples(result.run_dir)] == [20, 40, 60]
    status = read_status(result.run_dir)
    assert status.status == "done" and status.step == 60 and "Finished 60 steps" in status.message


def test_same_seed_same_curve_and_other_seed_differs(tmp_path):
    a, ev_a = run(tmp_path / "a", spec(max_iters=15))
    b, ev_b = run(tmp_path / "b", spec(max_iters=15))
    c, ev_c = run(tmp_path / "c", spec(max_iters=15, seed=8))
    assert step_losses(ev_a) == step_losses(ev_b)
    assert step_losses(ev_a) != step_losses(ev_c)
    assert read_samples(a.run_dir) == read_samples(b.run_dir)


def test_resume_continues_the_curve_exactly(tmp_path):
    full, ev_full = run(tmp_path / "full", spec(max_iters=40, dropout=0.1))

    stop = threading.Event()

    def stop_at_20(e):
        if e.kind == "step" and e.step == 20:
            stop.set()

    first_events = []
    first = train(
        spec(max_iters=40, dropout=0.1),
        store=RunStore(tmp_path / "part2"),
        callbacks=[first_events.append, stop_at_20],
        stop_event=stop,
    )
    assert first.status == "stopped" and first.steps == 20
    assert "resume" in first.message
    assert read_status(first.run_dir).status == "stopped"
    assert load_run(first.run_dir).model is not None

    second_events = []
    second = resume(first.run_dir, callbacks=[second_events.append])
    assert second.status == "done", second.message
    assert second_events[0].kind == "start" and second_events[0].step == 20
    m = read_metrics(first.run_dir)
    assert list(m["step"]) == list(range(1, 41))  # contiguous, no duplicated or missing steps
    # Optimizer state, data generator and dropout RNG are restored: the curve is the same one.
    assert step_losses(first_events) + step_losses(second_events) == step_losses(ev_full)
    assert second.final_val_loss == full.final_val_loss
    with pytest.raises(RunError, match="already at step 40"):
        resume(first.run_dir)


def test_resume_can_extend_a_finished_run(tmp_path):
    done, _ = run(tmp_path, spec(max_iters=10))
    more = resume(done.run_dir, max_iters=15)
    assert more.status == "done" and more.steps == 15
    assert list(read_metrics(done.run_dir)["step"]) == list(range(1, 16))
    assert load_run(done.run_dir).config.train.max_iters == 15


def _patch_forward(monkeypatch, fail):
    """Make GPT.forward call ``fail(call_number, output)`` on training calls (model.training is True)."""
    original = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        out = original(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            return fail(calls["n"], out)
        return out

    monkeypatch.setattr(GPT, "forward", forward)


def test_nan_loss_ends_as_diverged_with_advice(tmp_path, monkeypatch):
    def nan_from_5(n, out):
        return ModelOutput(out.logits, out.loss * float("nan")) if n >= 5 else out

    _patch_forward(monkeypatch, nan_from_5)
    result, events = run(tmp_path, spec(max_iters=40, grad_clip=0.0))
    assert result.status == "diverged"
    assert result.steps == 4  # the NaN step is not applied
    # The NaN step is not applied: the message names it and the step the run stopped at (its Step count).
    assert result.message.startswith("Loss became NaN in step 5, so the run stopped at step 4: lower the learning rate")
    assert "gradient clipping" in result.message
    assert events[-1].kind == "end" and events[-1].data["status"] == "diverged"
    assert read_status(result.run_dir).status == "diverged"
    assert list(read_metrics(result.run_dir)["step"]) == [1, 2, 3, 4]
    # Ended before the first eval, but the last finite weights can still be opened.
    assert load_run(result.run_dir).model is not None


def test_out_of_memory_ends_as_error_with_advice(tmp_path, monkeypatch):
    def oom(n, out):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _patch_forward(monkeypatch, oom)
    result, events = run(tmp_path, spec())
    assert result.status == "error"
    assert "Out of" in result.message and "reduce batch size (8), block size (16)" in result.message
    assert read_status(result.run_dir).status == "error"
    assert events[-1].data == {"status": "error", "message": result.message, "elapsed_s": events[-1].data["elapsed_s"]}


def test_other_exceptions_end_as_error_not_crash(tmp_path, monkeypatch):
    def boom(n, out):
        raise RuntimeError("something odd")

    _patch_forward(monkeypatch, boom)
    result, _ = run(tmp_path, spec())
    assert result.status == "error" and "something odd" in result.message


def test_cancel_from_another_thread_within_one_step(tmp_path):
    stop, seen = threading.Event(), threading.Event()
    last = {"step": 0}

    def cb(e):
        if e.kind == "step":
            last["step"] = e.step
            if e.step >= 3:
                seen.set()

    box = {}
    s = spec(max_iters=100_000, eval_interval=100_000)
    t = threading.Thread(
        target=lambda: box.update(r=train(s, store=RunStore(tmp_path), callbacks=[cb], stop_event=stop))
    )
    t.start()
    assert seen.wait(60)
    at_stop = last["step"]
    stop.set()
    t.join(60)
    assert not t.is_alive()
    r = box["r"]
    assert r.status == "stopped"
    assert at_stop <= r.steps <= at_stop + 1  # the step in flight finishes, no further one starts
    assert checkpoints.last_checkpoint(r.run_dir).step == r.steps and checkpoints.can_resume(r.run_dir)


def test_early_stopping_on_patience(tmp_path, monkeypatch):
    script = iter([(3.0, 3.0), (2.5, 2.0), (2.4, 2.2), (2.3, 2.1), (2.2, 2.05), (2.1, 1.0)])
    monkeypatch.setattr(training._Session, "_estimate", lambda self: next(script))
    result, events = run(tmp_path, spec(max_iters=60, eval_interval=5, early_stop_patience=2))
    assert result.status == "done"
    assert result.steps == 20  # evals at 5, 10 (best), 15, 20: two without improvement
    assert "Early stop at step 20" in result.message and "best 2.0000 at step 10" in result.message
    assert result.best_val_loss == 2.0
    assert [e.data["best_step"] for e in events if e.kind == "eval"] == [5, 10, 10, 10]


def test_stop_at_val_loss(tmp_path):
    result, _ = run(tmp_path, spec(max_iters=40, eval_interval=10, stop_at_val_loss=50.0))
    assert result.status == "done" and result.steps == 10
    assert "Reached val loss" in result.message


def test_grad_accumulation_draws_accum_batches_per_step(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = trainstate.get_batch

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(trainstate, "get_batch", counting)
    result, events = run(tmp_path, spec(max_iters=5, grad_accum=3, eval_interval=100, eval_iters=2))
    assert result.status == "done"
    assert calls["n"] == 5 * 3 + 2 * 2  # 3 micro-batches per step + one final eval of 2 batches per split
    assert all(math.isfinite(x) for x in step_losses(events))


def test_bf16_autocast_on_cpu_runs_a_step(tmp_path):
    result, events = run(tmp_path, spec(max_iters=1, precision="bf16"))
    assert result.status == "done", result.message
    start = events[0]
    assert start.data["precision"] == "bf16"
    assert math.isfinite(step_losses(events)[0])


def test_muon_optimizer_trains(tmp_path):
    result, events = run(tmp_path, spec(max_iters=20, optimizer="muon"))
    assert result.status == "done", result.message
    losses = step_losses(events)
    assert losses[-1] < losses[0]


def test_compile_failure_falls_back_with_a_note(tmp_path, monkeypatch):
    class Broken(torch.nn.Module):  # what a compile that only fails at the first call looks like
        def forward(self, *a, **kw):
            raise RuntimeError("backend compiler failed")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken())
    compiled, ev = run(tmp_path / "c", spec(max_iters=5, compile=True))
    plain, ev_plain = run(tmp_path / "p", spec(max_iters=5))
    assert compiled.status == "done"
    assert "torch.compile was skipped" in compiled.message
    assert step_losses(ev) == step_losses(ev_plain)  # the failed first step was redone on the same batch


def test_too_short_corpus_raises_before_any_folder(tmp_path):
    root = tmp_path / "runs"
    s = TrainSpec(
        corpus=Corpus("short", "hello world " * 2, "upload:short.txt"),
        model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16),
        train=TrainConfig(max_iters=5, device="cpu"),
    )
    with pytest.raises(DataError, match="context"):
        train(s, store=RunStore(root))
    assert not root.exists() or not any(root.iterdir())


def test_bad_config_raises_before_any_folder(tmp_path):
    root = tmp_path / "runs"
    with pytest.raises(ConfigError):
        train(spec(lr=5.0), store=RunStore(root))
    with pytest.raises(ConfigError):
        TrainSpec.from_preset("tiny", "builtin:tiny", not_a_setting=1)
    assert not root.exists()


def test_events_arrive_in_order(tmp_path):
    result, events = run(tmp_path, spec(max_iters=10, eval_interval=5))
    kinds = [(e.kind, e.step) for e in events]
    expected = [("start", 0)]
    for step in range(1, 11):
        expected.append(("step", step))
        if step % 5 == 0:
            expected += [("eval", step), ("sample", step)]
    expected.append(("end", 10))
    assert kinds == expected
    assert set(events[0].data) == {
        "params",
        "device",
        "precision",
        "max_iters",
        "run_dir",
        "tokens_per_step",
        "elapsed_s",
    }
    assert set(events[1].data) == {"loss", "lr", "tokens_per_s", "elapsed_s"}
    assert set(next(e for e in events if e.kind == "eval").data) >= {"val_loss", "elapsed_s"}
    assert set(events[-1].data) == {"status", "message", "elapsed_s"}
    sample = next(e for e in events if e.kind == "sample")
    assert sample.data["text"].startswith("T")  # starts from the corpus's first token ("The lighthouse…")


def test_a_raising_callback_does_not_stop_training(tmp_path):
    def bad(e):
        raise ValueError("ui bug")

    result = train(spec(max_iters=3), store=RunStore(tmp_path), callbacks=[bad])
    assert result.status == "done" and result.steps == 3


def test_metrics_csv_rows(tmp_path):
    result, _ = run(tmp_path, spec(max_iters=12, eval_interval=6))
    df = pd.read_csv(result.run_dir / "metrics.csv")
    head = ["step", "loss", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s", "induction_score", "icl_score"]
    assert list(df.columns)[:10] == [*head, "chat_accuracy"]
    n_layer = read_config(result.run_dir).model.n_layer
    assert list(df.columns)[10:13] == ["grad_norm_l0", "update_ratio_l0", "act_rms_l0"]  # network health per layer
    assert len(df.columns) == 10 + 3 * n_layer
    assert df["loss"].notna().all() and (df["tokens_per_s"] > 0).all()
    assert df["elapsed_s"].is_monotonic_increasing
    assert df.loc[df["step"] == 6, "val_loss"].notna().all() and df.loc[df["step"] == 5, "val_loss"].isna().all()


def test_lr_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    assert lr_at(1, cfg) == pytest.approx(1e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    const = TrainConfig(lr=1e-3, warmup_iters=10, max_iters=110, lr_schedule="constant")
    assert lr_at(5, const) == pytest.approx(5e-4) and lr_at(100, const) == 1e-3


def test_from_preset_routes_overrides():
    s = TrainSpec.from_preset("tiny", "builtin:tiny", n_layer=1, lr=1e-3, tokenizer="word", name="x")
    assert s.model.n_layer == 1 and s.model.n_embd == 64
    assert s.train.lr == 1e-3 and s.train.max_iters == 400
    assert s.tokenizer == "word" and s.name == "x" and s.preset == "tiny"


def test_estimate_step_time_leaves_global_rng_alone():
    state = torch.get_rng_state()
    t = estimate_step_time(spec(), device="cpu", steps=2)
    assert t > 0
    assert torch.equal(state, torch.get_rng_state())


# --- validation is pure; preparing is one explicit step -------------------------------------------


def test_validate_reads_no_file_and_prepare_does_the_work(tmp_path, monkeypatch):
    import tinygpt_core.spec as spec_mod
    import tinygpt_core.tokenizers as tokenizers

    trained = []
    real = tokenizers.train_tokenizer
    monkeypatch.setattr(tokenizers, "train_tokenizer", lambda *a, **kw: trained.append(a[0]) or real(*a, **kw))
    missing = TrainSpec.from_preset("tiny", str(tmp_path / "missing.txt"), device="cpu")
    assert missing.validate() is missing  # a path is not opened by validation
    short = TrainSpec(
        corpus=Corpus("short", "hello world " * 2, "upload:short.txt"),
        model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16),
        train=TrainConfig(max_iters=5, device="cpu"),
    )
    short.validate()  # too short for the context, but only preparing can know
    assert trained == [] and not hasattr(short, "_prepared")
    with pytest.raises(ConfigError):
        TrainSpec.from_preset("tiny", "builtin:tiny", tokenizer="nope").validate()
    with pytest.raises(DataError):
        spec_mod.prepare(missing)
    with pytest.raises(DataError, match="context"):
        spec_mod.prepare(short)
    run = training.prepare(spec(max_iters=3, eval_interval=3))
    assert run.model_config.vocab_size == run.tokenizer.vocab_size
    assert run.device == torch.device("cpu") and run.precision == "fp32"
    assert len(run.train_ids) > len(run.val_ids) > 16


def test_a_prepared_run_is_trained_without_preparing_again(tmp_path, monkeypatch):
    from tinygpt_core import limits

    run = training.prepare(spec(max_iters=3, eval_interval=3))
    monkeypatch.setattr(training, "prepare", lambda s: pytest.fail("prepared twice"))
    monkeypatch.setenv("TINYGPT_MAX_PARAMS", "10000000")
    limits.check_spec(run)  # counts parameters with the tokenizer's real vocabulary
    monkeypatch.setenv("TINYGPT_MAX_PARAMS", "10")
    with pytest.raises(ConfigError, match="parameters"):
        limits.check_spec(run)
    result = train(run, store=RunStore(tmp_path))
    assert result.status == "done" and load_run(result.run_dir).config.model.vocab_size == run.tokenizer.vocab_size


def test_load_run_opens_a_kept_step_and_lists_the_steps(tmp_path):
    result, _ = run(tmp_path, spec(max_iters=6, eval_interval=3, keep_checkpoints="last"))
    loaded = load_run(result.run_dir, step=6)
    assert loaded.checkpoint_steps == [6] and loaded.step == 6
    last = load_run(result.run_dir, checkpoint="last")
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded.model(x).logits, last.model(x).logits)
    with pytest.raises(RunError, match="no checkpoint at step 3; kept steps: 6"):
        load_run(result.run_dir, step=3)


def test_samples_come_from_the_one_sampler(tmp_path, monkeypatch):
    import tinygpt_core.sampling as sampling

    calls = []
    real = sampling.generate_ids
    monkeypatch.setattr(
        sampling, "generate_ids", lambda *a, **kw: calls.append((a[3].strategy, a[3].context_slide)) or real(*a, **kw)
    )
    result, events = run(tmp_path, spec(max_iters=6, eval_interval=3))
    half = read_config(result.run_dir).model.block_size // 2  # past the context the preview's window jumps half of it
    assert calls == [("sample", half), ("sample", half)]
    assert [e.data["text"] for e in events if e.kind == "sample"] == [s["text"] for s in read_samples(result.run_dir)]
