"""Network health (tinygpt_core.health): per-layer gradient norm, update-to-weight ratio and activation RMS,
checked by hand on a small model; their way into metrics.csv, the live job and back; and the sentences
that flag a gradient spike or a collapsing layer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_spec

from tinygpt_core import health
from tinygpt_core.config import ModelConfig
from tinygpt_core.hooks import run_with_hooks
from tinygpt_core.model import GPT
from tinygpt_core.runs import METRIC_COLUMNS, RunWriter, layer_column, metric_columns, read_metrics
from tinygpt_core.training import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=16, block_size=8, dropout=0.0))


def test_probe_measures_each_blocks_gradient_norm_and_relative_update():
    m = small_model()
    x = torch.randint(11, (3, 8), generator=torch.Generator().manual_seed(1))
    m(x, x).loss.backward()
    probe = health.StepProbe(m)
    probe.before_update()
    with torch.no_grad():
        for p in m.parameters():
            p -= 0.1 * p.grad  # plain SGD: each block moves by exactly 0.1 x its gradient
    probe.after_update()
    for i, block in enumerate(m.blocks):
        grads = torch.cat([p.grad.reshape(-1) for p in block.parameters()])
        after = torch.cat([p.detach().reshape(-1) for p in block.parameters()])
        before = after + 0.1 * grads
        assert probe.grad_norm[i] == pytest.approx(grads.norm().item(), rel=1e-5)
        assert probe.update_ratio[i] == pytest.approx((0.1 * grads.norm() / before.norm()).item(), rel=1e-4)


def test_activation_rms_is_the_root_mean_square_of_each_blocks_output():
    m = small_model().eval()
    xs = [torch.randint(11, (2, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    seen = []
    with run_with_hooks(m, {"blocks.1.hook_resid_post": lambda r: seen.append(r.pow(2).mean().item())}):
        with health.activation_rms(m) as rms:
            for x in xs:
                m(x)
    assert rms[1] == pytest.approx(math.sqrt(sum(seen) / 2), rel=1e-6)  # the mean square over both passes
    assert all(math.isfinite(v) and v > 0 for v in rms)


def test_training_logs_health_at_each_evaluation_into_metrics_csv_and_the_live_job(store, runner):
    result = train(tiny_spec(max_iters=12, eval_interval=6), store=store)
    assert result.status == "done", result.message
    df = read_metrics(result.run_dir)
    assert list(df.columns) == metric_columns(1)  # tiny_spec has one layer
    evals = df.dropna(subset=["val_loss"])
    assert evals["step"].tolist() == [6, 12]
    for k in ("grad_norm", "update_ratio", "act_rms"):
        col = layer_column(k, 0)
        assert (evals[col] > 0).all(), col
        assert df.loc[df["val_loss"].isna(), col].isna().all()  # only evaluation rows carry health
    # The same columns reach the live job's snapshot (what the Train page draws while it trains).
    job = runner.submit(tiny_spec(max_iters=6, eval_interval=3))
    runner.wait(job, timeout=60)
    frame = runner.state(job).metrics_frame()
    assert layer_column("act_rms", 0) in frame.columns
    assert frame.dropna(subset=["val_loss"])[layer_column("grad_norm", 0)].notna().all()


def test_metrics_without_health_columns_still_read_and_keep_their_layout(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.csv").write_text(",".join(METRIC_COLUMNS) + "\n1,2.5,,,0.001,100,0.1\n")
    assert list(read_metrics(run).columns) == METRIC_COLUMNS
    RunWriter(run).append_metrics_rows([{"step": 2, "loss": 2.4, "grad_norm_l0": 1.0}])  # a resumed old run
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(METRIC_COLUMNS) and lines[-1].count(",") == len(METRIC_COLUMNS) - 1


def _history(metric: str, values: list[float], layers: int = 2) -> pd.DataFrame:
    rows = []
    for k, v in enumerate(values):
        row = {"step": 100 * (k + 1), "val_loss": 2.0}
        for i in range(layers):
            for name in ("grad_norm", "update_ratio", "act_rms"):
                row[layer_column(name, i)] = 1e-3 if name == "update_ratio" else 1.0
        row[layer_column(metric, 1)] = v
        rows.append(row)
    return pd.DataFrame(rows)


def test_a_healthy_history_has_nothing_to_say():
    assert health.diagnose(_history("grad_norm", [1.0, 1.2, 0.9, 1.1])) == []
    assert health.diagnose(pd.DataFrame(columns=METRIC_COLUMNS)) == []  # a run from before health logging


def test_a_gradient_spike_is_named_with_its_layer_step_and_size():
    notes = health.diagnose(_history("grad_norm", [1.0, 1.2, 0.8, 30.0]))
    assert len(notes) == 1
    assert notes[0].startswith("Gradient spike in layer 1 at step 400") and "30×" in notes[0]


def test_a_collapsing_layer_is_flagged():
    notes = health.diagnose(_history("act_rms", [1.0, 0.6, 0.2, 0.01]))
    assert len(notes) == 1 and "layer 1" in notes[0] and "collapsing" in notes[0] and "1%" in notes[0]


def test_updates_too_large_or_frozen_are_flagged():
    assert "Lower the learning rate" in health.diagnose(_history("update_ratio", [1e-3, 0.3]))[0]
    assert "not changing" in health.diagnose(_history("update_ratio", [1e-3, 0.0]))[0]


def test_health_frame_is_long_form_per_layer():
    long = health.health_frame(_history("grad_norm", [1.0, 2.0]))
    assert set(long["metric"]) == {"grad_norm", "update_ratio", "act_rms"}
    g = long[(long["metric"] == "grad_norm") & (long["layer"] == 1)]
    assert g["step"].tolist() == [100, 200] and np.allclose(g["value"], [1.0, 2.0])
