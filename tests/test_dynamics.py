"""Training dynamics: the checkpoint history (--keep-checkpoints), the per-eval induction and ICL scores,
and the views over kept steps, each checked against a hand-worked answer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import tiny_spec
from tinygpt_core import checkpoints, cli, dynamics
from tinygpt_core.checkpoints import history, history_plan, history_steps
from tinygpt_core.config import ModelConfig
from tinygpt_core.errors import RunError
from tinygpt_core.inspection import attention_maps, head_stats
from tinygpt_core.model import GPT
from tinygpt_core.runs import RunStore, load_run, read_metrics
from tinygpt_core.tokenizers import CharTokenizer
from tinygpt_core.training import TrainSpec, resume, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# --- hand-worked scores ------------------------------------------------------------------------------


def previous_token_model(T: int = 8, vocab: int = 5, scale: float = 60.0) -> GPT:
    """One layer, one head, built by hand to copy the previous token.

    The residual stream is a one-hot of the position (learned position table = identity, token
    embeddings zero, no LayerNorm). The query of position i is e_{i-1} (a shift matrix), the key of j
    is e_j, so q·k is large exactly at j = i - 1; the value is the stream itself, so the head's
    output at i is the previous position's vector: it copies the previous token.
    """
    cfg = ModelConfig(vocab_size=vocab, block_size=T, n_layer=1, n_head=1, n_embd=T, use_layernorm=False, bias=False)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.wte.weight.zero_()
        model.wpe.weight.copy_(torch.eye(T))
        shift = torch.zeros(T, T)
        for i in range(1, T):
            shift[i - 1, i] = scale  # q_i = scale * e_{i-1}
        model.blocks[0].attn.c_attn.weight.copy_(torch.cat([shift, torch.eye(T), torch.eye(T)]))
    return model


def test_a_head_that_copies_the_previous_token_scores_one():
    model = previous_token_model()
    tok = CharTokenizer.train("abcde")
    maps = attention_maps(model, tok, "abcdeab")
    w = maps.weights[0, 0]
    assert np.allclose(np.diag(w, k=-1), 1.0, atol=1e-6)  # every query i >= 1 reads key i - 1
    stats = head_stats(maps)
    assert stats["prev_token"][0, 0] == pytest.approx(1.0, abs=1e-6)
    assert stats["mean_distance"][0, 0] == pytest.approx(6 / 7, abs=1e-5)  # query 0 looks 0 back, the rest 1
    # the head's output at position i is the previous position's one-hot (value = identity): a copy
    x = model.wpe.weight[:7]
    out = model.blocks[0].attn(x[None])[0][0]
    proj = model.blocks[0].attn.c_proj.weight
    expected = torch.cat([x[:1], x[:-1]]) @ proj.T
    assert torch.allclose(out, expected, atol=1e-5)


def test_best_induction_score_of_a_constructed_induction_head_is_one():
    from tests.test_inspection import InductionModel  # layer 1, head 0 attends like a perfect induction head

    # 40 tokens: the probe's 32 random ones then never repeat within a copy, so the earlier copy is unambiguous
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN")
    assert dynamics.best_induction_score(InductionModel(vocab=40, block=64), tok) == pytest.approx(1.0)


def test_icl_score_hand_worked():
    per_position = np.arange(20, dtype=float)  # loss = position: late positions cost more
    # early = positions [1, 3) (5%..15% of 20), late = [18, 20): 18.5 - 1.5
    assert dynamics.icl_score(per_position) == pytest.approx(17.0)
    assert dynamics.icl_score(per_position[::-1].copy()) == pytest.approx(-17.0)  # context helps: negative
    assert math.isnan(dynamics.icl_score(np.ones(3)))


def test_induction_jump_finds_the_middle_of_the_rise():
    evals = pd.DataFrame({"step": [10, 20, 30, 40, 50], "induction_score": [0.02, 0.03, 0.05, 0.62, 0.7]})
    steps = pd.DataFrame({"step": [11, 12], "induction_score": [np.nan, np.nan]})  # rows between evals
    metrics = pd.concat([evals, steps]).sort_values("step")
    assert dynamics.induction_jump(metrics) == 40
    # the middle of the jump: the first score past halfway from 0.02 to 0.7 (0.36), not a later wobble
    wobbly = evals.assign(induction_score=[0.02, 0.03, 0.3, 0.5, 0.4]).assign(step=[10, 20, 30, 40, 50])
    wobbly = pd.concat([wobbly, pd.DataFrame({"step": [60], "induction_score": [0.7]})])
    assert dynamics.induction_jump(wobbly) == 40
    flat = evals.assign(induction_score=[0.02, 0.05, 0.08, 0.12, 0.15])
    assert dynamics.induction_jump(flat) is None  # a rise of 0.13 over the run: no phase change
    assert dynamics.induction_jump(pd.DataFrame({"step": [1, 2], "val_loss": [1.0, 0.9]})) is None  # an old run
    # a fall: the loss from 3.0 to a lowest 1.0 is past halfway (2.0) first at step 30
    loss = pd.DataFrame({"step": [10, 20, 30, 40], "val_loss": [3.0, 2.5, 1.5, 1.0]})
    assert dynamics.halfway_step(loss, "val_loss", rising=False) == 30


def test_history_steps_and_budget_hand_worked():
    assert history_steps("log", 100, 25) == [0, 1, 2, 4, 8, 16, 25, 32, 50, 64, 75, 100]
    assert history_steps("evals", 100, 30) == [30, 60, 90, 100]
    assert history_steps("last", 100, 25) == []
    plan = history_plan("log", 100, 25, params=1000, budget_bytes=3 * 4000)  # 3 weights files of 4 kB fit
    assert plan.steps == (0, 25, 100) and plan.wanted == 12 and plan.checkpoint_bytes == 4000
    assert history_plan("log", 100, 25, params=1000, budget_bytes=4000).steps == (100,)
    assert history_plan("log", 100, 25, params=1000, budget_bytes=3999).steps == ()


# --- the contract: train --keep-checkpoints, load_run(step=K), delete ---------------------------------

TINY = ["--corpus", "builtin:tiny", "--preset", "tiny", "--n-layer", "1", "--n-embd", "32", "--block-size", "16"]
TINY += ["--batch-size", "4", "--eval-iters", "1", "--max-iters", "20", "--eval-interval", "10", "--no-progress"]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("log", [0, 1, 2, 4, 8, 10, 16, 20]), ("evals", [10, 20]), ("last", [20])],
)
def test_keep_checkpoints_contract(tmp_path, capsys, policy, expected):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--keep-checkpoints", policy, "--out", str(out)]) == 0
    assert f"Kept {len(expected)} checkpoint" in capsys.readouterr().out  # the run says what it kept
    run = load_run(out)
    assert run.checkpoint_steps == expected
    # only the newest holds optimizer state (what resume needs); the history is weights only
    with_optimizer = [s for s in expected if (out / "checkpoints" / f"step-{s:06d}" / "optimizer.safetensors").exists()]
    assert with_optimizer == [20] and checkpoints.can_resume(out)
    kept = history(out)
    assert kept.steps == expected and kept.policy == policy
    assert kept.bytes == sum(f.stat().st_size for f in (out / "checkpoints").glob("step-*/*"))
    assert kept.scrubbable == (len(expected) >= 2)
    if policy == "log":
        # step 0 is the seeded initialisation, exactly
        torch.manual_seed(run.config.train.seed)
        init = GPT(run.config.model)
        at0 = load_run(out, step=0).model
        assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(), at0.state_dict().values()))
        assert not torch.equal(at0.lm_head.weight, run.model.lm_head.weight)
    else:
        assert "last" in (kept.why_not_scrubbable() or "") if policy == "last" else kept.why_not_scrubbable() is None
    with pytest.raises(RunError, match="kept steps"):
        load_run(out, step=3)


def test_budget_thins_the_history_and_deleting_a_run_deletes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CHECKPOINT_BUDGET_MB", "1")
    store = RunStore(tmp_path / "runs")
    spec = tiny_spec(max_iters=40, eval_interval=10, n_embd=64)
    result = train(spec, store=store)
    kept = history(result.run_dir)
    fit = 1_000_000 // (4 * load_run(result.run_dir).model.num_params())  # weights files the budget holds
    assert 2 <= fit < 11 and kept.wanted == 11  # {0, 1, 2, 4, 8, 16, 32} and the evals {10, 20, 30, 40}
    assert len(kept.steps) == fit and kept.steps[0] == 0 and kept.steps[-1] == 40
    assert kept.bytes <= 1_000_000 + 2 * 4 * load_run(result.run_dir).model.num_params()  # + the last's optimizer
    assert "thinned to fit the budget" in kept.summary() and "1 MB budget" in kept.summary()
    store.delete(result.run_dir.name)
    assert not result.run_dir.exists()


def test_old_run_without_history_still_opens_with_a_reason(tmp_path):
    result = train(tiny_spec(keep_checkpoints="last"), tmp_path / "run")
    (result.run_dir / "checkpoints" / "history.json").unlink()  # what a run from before histories looks like
    metrics = result.run_dir / "metrics.csv"
    old = read_metrics(result.run_dir).drop(columns=["induction_score", "icl_score"])
    old.to_csv(metrics, index=False)
    run = load_run(result.run_dir)
    assert run.checkpoint_steps == [12] and run.metrics["induction_score"].isna().all()
    why = history(result.run_dir).why_not_scrubbable()
    assert why and "before runs kept a checkpoint history" in why
    # resuming the old run appends under its own (older) header: the file stays readable
    assert resume(result.run_dir, max_iters=18).status == "done"
    assert list(pd.read_csv(metrics).columns) == list(old.columns)
    assert not {"induction_score", "icl_score"} & set(old.columns)
    assert read_metrics(result.run_dir)["step"].iloc[-1] == 18


def test_resume_keeps_the_history_and_rewrites_steps_past_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(tiny_spec(max_iters=12, eval_interval=6), out)
    assert checkpoints.checkpoint_steps(out) == [0, 1, 2, 4, 6, 8, 12]
    # a weights-only step past the last resumable one, as an interrupted process leaves it
    stray = out / "checkpoints" / "step-000016"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes((out / "checkpoints" / "step-000008" / "model.safetensors").read_bytes())
    assert checkpoints.last_checkpoint(out).step == 12  # "last" is the newest one that can resume
    assert resume(out, max_iters=24).status == "done"
    assert checkpoints.checkpoint_steps(out) == [0, 1, 2, 4, 6, 8, 12, 16, 18, 24]
    assert load_run(out, step=16).step == 16  # rewritten by the resumed run, a complete checkpoint


# --- per-eval columns and views over kept steps ---------------------------------------------------------


def test_every_eval_logs_induction_and_icl_scores(tmp_path):
    result = train(tiny_spec(), tmp_path / "run")
    m = read_metrics(result.run_dir)
    evals = m.dropna(subset=["val_loss"])
    assert list(evals["step"]) == [6, 12]
    assert evals["induction_score"].between(0, 1).all() and evals["icl_score"].notna().all()
    assert m.dropna(subset=["induction_score"])["step"].tolist() == [6, 12]  # eval rows only
    # the logged score is the best head's on the Attention page's probe, from the same weights
    run = load_run(result.run_dir, step=12)
    assert evals["induction_score"].iloc[-1] == pytest.approx(
        dynamics.best_induction_score(run.model, run.tokenizer), abs=1e-6
    )


def test_views_over_kept_steps(tmp_path):
    result = train(tiny_spec(), tmp_path / "run")
    run = load_run(result.run_dir)
    steps = checkpoints.checkpoint_steps(result.run_dir)
    m0 = dynamics.model_at(result.run_dir, 0)
    assert dynamics.model_at(result.run_dir, 0) is m0  # cached: scrubbing back is instant
    assert dynamics.model_at(result.run_dir, 12) is not m0
    scores = dynamics.head_scores_over_steps(result.run_dir, run.tokenizer, "the light held")
    assert len(scores) == len(steps) * 1 * 2  # one row per kept step, layer and head
    assert scores["prev_token"].between(0, 1).all() and (scores["entropy"] >= 0).all()
    val = dynamics.validation_ids(result.run_dir, run.tokenizer)
    got_steps, grid = dynamics.position_loss_over_steps(result.run_dir, val)
    assert got_steps == steps and grid.shape == (len(steps), 16)
    # the last row is the model's own mean loss on those windows, position by position
    x, y = dynamics.val_windows(val, 16)
    with torch.no_grad():
        logits = dynamics.model_at(result.run_dir, 12)(x).logits
    own = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(0)
    np.testing.assert_allclose(grid[-1], own.numpy(), rtol=1e-5)


# --- the induction preset: the phase change, in steps ------------------------------------------------


@pytest.mark.heavy
def test_induction_preset_shows_the_phase_change_at_one_step(tmp_path):
    """The loss drop, the induction score's jump and the ICL score's fall happen together, in steps."""
    spec = TrainSpec.from_preset("induction", "builtin:induction", device="cpu", precision="fp32")
    result = train(spec, tmp_path / "run")
    assert result.status == "done", result.message
    m = read_metrics(result.run_dir)
    ev = m.dropna(subset=["val_loss"]).reset_index(drop=True)
    jump = dynamics.induction_jump(m)
    assert jump is not None, ev[["step", "val_loss", "induction_score", "icl_score"]].to_string()
    interval = spec.train.eval_interval
    # before the jump: a plateau with no induction head and no in-context learning; after: both
    before, after = ev[ev["step"] < jump - interval], ev[ev["step"] >= jump + 2 * interval]
    table = ev[["step", "val_loss", "induction_score", "icl_score"]].to_string()
    assert before["induction_score"].max() < 0.2 and after["induction_score"].min() > 0.3, table
    assert after["icl_score"].max() < before["icl_score"].min() - 0.3, table
    assert after["val_loss"].max() < before["val_loss"].min() - 0.3, table
    # the middles of the val loss's fall and of the ICL score's fall are within two evaluations of the
    # middle of the induction score's jump (the whole change takes about three evaluations)
    for column in ("val_loss", "icl_score"):
        fall = dynamics.halfway_step(m, column, rising=False)
        assert abs(fall - jump) <= 2 * interval, (column, fall, jump, table)
