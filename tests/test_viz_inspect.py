"""The Inspect page's and the health block's figures (tinygpt_core.viz): what they plot, and that token
text stays text."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tinygpt_core import health, viz
from tinygpt_core.knockout import KnockoutGrid
from tinygpt_core.lens import LogitLens
from tinygpt_core.runs import layer_column


def _lens() -> LogitLens:
    return LogitLens(
        tokens=["<b>", "a", "\n"],
        ids=[0, 1, 2],
        layers=["embeddings", "layer 0"],
        top_ids=np.array([[1, 2, 0], [2, 2, 1]]),
        top_probs=np.array([[0.2, 0.3, 0.4], [0.9, 0.5, 0.6]]),
        next_probs=np.array([[0.1, 0.2, np.nan], [0.7, 0.8, np.nan]]),
    )


def test_logit_lens_figure_names_top_tokens_escaped_and_bounds_probabilities():
    names = ["<b>", "a", "\n"]
    top = viz.logit_lens_figure(_lens(), "top", names)
    heat = top.data[0]
    assert heat.zmin == 0 and heat.zmax == 1 and list(heat.y) == ["embeddings", "layer 0"]
    assert heat.text[1][0] == "↵" and heat.text[0][2] == "&lt;b&gt;"  # raw markup never reaches plotly
    assert "<b>" not in top.to_json()
    nxt = viz.logit_lens_figure(_lens(), "next", names).data[0]
    assert list(nxt.text[1][:2]) == ["0.70", "0.80"] and nxt.text[1][2] == ""


def test_knockout_figure_is_centred_on_no_change():
    grid = KnockoutGrid(base_loss=2.0, loss=np.array([[2.5, 2.0], [1.9, 2.1]]), method="zero", n_tokens=100)
    heat = viz.knockout_figure(grid).data[0]
    assert heat.zmid == 0 and heat.zmax == -heat.zmin == 0.5
    assert np.allclose(np.asarray(heat.z), [[0.5, 0.0], [-0.1, 0.1]])


def test_health_chart_data_has_a_line_per_layer_per_measure_or_a_note():
    cols = [(layer_column(k, i), i) for i in range(2) for k in health.LAYER_METRICS]
    rows = [{"step": s, "val_loss": 1.0, **{c: s * (i + 1) for c, i in cols}} for s in (10, 20)]
    long = health.health_frame(pd.DataFrame(rows))
    grad = viz.health_chart_data(long, "grad_norm")
    assert [t["name"] for t in grad["series"]] == ["layer 0", "layer 1"]
    assert grad["series"][1]["x"] == [10, 20] and grad["series"][1]["y"] == [20.0, 40.0]
    assert grad["log"] and not viz.health_chart_data(long, "act_rms")["log"]  # norms span decades, RMS does not
    empty = viz.health_chart_data(health.health_frame(None), "update_ratio")
    assert empty["series"] == [] and "first evaluation" in empty["empty"]
