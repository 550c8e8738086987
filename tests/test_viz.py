"""Plotly figures and token HTML: structure checked without a browser."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from tinygpt_core import viz
from tinygpt_core.config import ModelConfig
from tinygpt_core.inspection import AttentionMaps, attention_maps
from tinygpt_core.model import GPT
from tinygpt_core.tokenizers import train_tokenizer

# ---- fixtures -----------------------------------------------------------------------------------


def _metrics() -> pd.DataFrame:
    """Step rows every 10 steps, eval rows every 50, val loss bottoming out at step 150 (overfitting after)."""
    rows = [{"step": s, "loss": 3.0 - 0.01 * s} for s in range(0, 251, 10)]
    val = {0: 3.1, 50: 2.6, 100: 2.2, 150: 2.05, 200: 2.1, 250: 2.3}
    for s, v in val.items():
        rows.append({"step": s, "train_loss": 3.0 - 0.01 * s, "val_loss": v})
    return pd.DataFrame(rows, columns=["step", "loss", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"])


def _trace(fig: go.Figure, name: str):
    found = [t for t in fig.data if t.name == name]
    assert found, f"no trace {name!r} in {[t.name for t in fig.data]}"
    return found[0]


def _maps(T: int = 8, n_layer: int = 2, n_head: int = 3, tokens: list[str] | None = None) -> AttentionMaps:
    rng = np.random.default_rng(0)
    w = np.tril(rng.random((n_layer, n_head, T, T))).astype(np.float32) + np.eye(T, dtype=np.float32)
    w /= w.sum(-1, keepdims=True)
    tokens = tokens or [chr(ord("a") + i % 3) for i in range(T)]  # repeated tokens on purpose
    return AttentionMaps(tokens=tokens, token_ids=list(range(T)), weights=w, cropped=False)


# ---- loss curves --------------------------------------------------------------------------------


def test_overlay_figure_emphasises_baseline() -> None:
    df = _metrics()
    runs = {"base": df, "relu": df.assign(val_loss=df["val_loss"] + 0.1), "fresh": pd.DataFrame()}
    fig = viz.overlay_figure(runs, baseline="base", show_train=True)
    base, relu = _trace(fig, "base (baseline)"), _trace(fig, "relu")
    assert base.line.width > relu.line.width
    assert _trace(fig, "relu · train").line.dash == "dash"
    assert len(fig.data) == 4  # the run without metrics is skipped, not crashed on
    np.testing.assert_allclose(relu.y, df["val_loss"].dropna() + 0.1)
    assert "relu" in relu.hovertemplate and "step %{x}" in relu.hovertemplate

    empty = viz.overlay_figure({})
    assert len(empty.data) == 0 and empty.layout.annotations


# ---- attention ----------------------------------------------------------------------------------


def test_attention_grid_one_heatmap_per_head_with_masked_future() -> None:
    maps = _maps(T=8, n_head=3)
    fig = viz.attention_grid_figure(maps, layer=1)
    heatmaps = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(heatmaps) == 3
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 1
    assert all(h.coloraxis == "coloraxis" for h in heatmaps)
    upper = np.triu(np.ones((8, 8), dtype=bool), k=1)
    for h, hm in enumerate(heatmaps):
        z = np.asarray(hm.z, dtype=float)
        assert np.isnan(z[upper]).all()  # future keys are blank
        np.testing.assert_allclose(z[~upper], maps.weights[1, h][~upper], rtol=1e-6)
        assert "query %{y} → key %{x}: %{z:.2f}" in hm.hovertemplate
        assert len(set(hm.x)) == 8  # repeated tokens still get their own column
        assert hm.x[3] == "'a' (3)"
    assert len(fig.layout.shapes) == 0


def test_attention_grid_window_band() -> None:
    maps = _maps(T=10, n_head=4)
    fig = viz.attention_grid_figure(maps, layer=0, window=3)
    assert len(fig.layout.shapes) == 4  # one band outline per head
    assert all(s.type == "path" and s.path.startswith("M ") for s in fig.layout.shapes)
    z = np.asarray(fig.data[0].z, dtype=float)
    i, j = np.indices(z.shape)
    assert np.isnan(z[(i - j) >= 3]).all()  # outside the window: masked too
    assert not np.isnan(z[(j <= i) & (i - j < 3)]).any()
    with pytest.raises(ValueError, match="layers 0..1"):
        viz.attention_grid_figure(maps, layer=2)


def test_attention_labels_are_escaped() -> None:
    maps = _maps(T=4, tokens=["<script>", "&", " ", "\n"])
    fig = viz.attention_head_figure(maps, 0, 1)
    hm = fig.data[0]
    assert hm.zmin == 0 and hm.zmax == 1
    text = " ".join(list(hm.x) + list(fig.layout.xaxis.ticktext))
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "&amp;" in text and "␣" in text and "↵" in text
    np.testing.assert_allclose(np.nan_to_num(np.asarray(hm.z, dtype=float)), maps.weights[0, 1], rtol=1e-6)
    with pytest.raises(ValueError, match="heads 0..2"):
        viz.attention_head_figure(maps, 0, 3)


def test_attention_grid_from_real_model() -> None:
    tok = train_tokenizer("char", "abcabcabc hello")
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16, attn_window=4)
    ).eval()
    maps = attention_maps(model, tok, "abc hello")
    fig = viz.attention_grid_figure(maps, 1, window=4)
    assert sum(isinstance(t, go.Heatmap) for t in fig.data) == 2
    z = np.asarray(fig.data[0].z, dtype=float)
    np.testing.assert_allclose(np.nansum(z, axis=-1), 1.0, atol=1e-5)  # nothing the model attends to is hidden


def test_head_stats_figure() -> None:
    stats = {"entropy": np.array([[0.5, 1.5], [2.0, 0.1]]), "prev_token": np.array([[0.9, 0.1], [0.2, 0.3]])}
    fig = viz.head_stats_figure(stats, "prev_token")
    hm = fig.data[0]
    np.testing.assert_allclose(hm.z, stats["prev_token"])
    assert hm.texttemplate == "%{z:.2f}"  # values written in the cells
    assert (hm.zmin, hm.zmax) == (0.0, 1.0)
    assert list(hm.y) == ["layer 0", "layer 1"] and list(hm.x) == ["head 0", "head 1"]
    assert viz.head_stats_figure(stats, "entropy").data[0].zmax is None  # unbounded stat: own scale
    with pytest.raises(ValueError, match="available: entropy, prev_token"):
        viz.head_stats_figure(stats, "nope")


# ---- sampling -----------------------------------------------------------------------------------


def test_distribution_figure_shows_kept_and_cut() -> None:
    V = 40
    probs = np.random.default_rng(0).dirichlet(np.ones(V))
    tokens = [f"t{i}" for i in range(V)]
    tokens[int(np.argmax(probs))] = "<b>"
    rank = np.argsort(-probs)
    top5 = np.zeros(V, dtype=bool)
    top5[rank[:5]] = True
    kept = {"greedy": probs == probs.max(), "top-k 5": top5}
    fig = viz.distribution_figure(tokens, probs, kept, top_n=12)

    bars = _trace(fig, "raw probability")
    np.testing.assert_allclose(bars.y, probs[rank[:12]])  # most likely first
    assert "&lt;b&gt;" in bars.x[0] and "<b>" not in " ".join(bars.x)
    topk = _trace(fig, "top-k 5")
    assert list(topk.customdata) == ["kept"] * 5 + ["cut"] * 7
    assert list(topk.marker.symbol[:6]) == ["circle"] * 5 + ["x-thin-open"]
    assert topk.y[0].startswith("top-k 5 · 5 kept")
    assert _trace(fig, "greedy").y[0].startswith("greedy · 1 kept")
    with pytest.raises(ValueError, match="one per vocabulary id"):
        viz.distribution_figure(tokens, probs, {"bad": np.ones(3, dtype=bool)})


# ---- token HTML ---------------------------------------------------------------------------------


def test_token_html_escapes_and_colours() -> None:
    out = viz.token_html(
        ["<script>alert(1)</script>", " ", "\n", "ok"],
        [0.0, 0.5, None, 1.0],
        ['"><img src=x onerror=alert(1)>', "b", "c", "p=0.99"],
    )
    assert "<script" not in out and "<img" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert 'title="&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"' in out  # cannot break out of the attribute
    assert "␣" in out and "↵</span><br>" in out
    spans = out.split("<span")[1:]
    assert len(spans) == 4
    assert "background:#f3f4f6" in spans[2]  # no value: neutral
    low, high = viz._scale_color(0.0), viz._scale_color(1.0)
    assert low != high and low in spans[0] and high in spans[3]
    assert 'title="p=0.99"' in spans[3]


def test_token_html_without_values_or_titles() -> None:
    out = viz.token_html(["a", "b"], None, None)
    assert out.count("<span") == 2 and "title=" not in out
    with pytest.raises(ValueError, match="one value per token"):
        viz.token_html(["a", "b"], [0.1], None)


# ---- downloads ----------------------------------------------------------------------------------


def test_figure_to_html_is_self_contained() -> None:
    page = viz.figure_to_html(viz.overlay_figure({"run": _metrics()}))
    assert "<html>" in page[:200] and page.rstrip().endswith("</html>")
    assert not re.search(r"<script[^>]*\bsrc=", page)  # plotly.js is inlined, nothing fetched: opens offline
    assert len(page) > 1_000_000


def test_figure_to_png_returns_none_when_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(viz, "_png_unavailable", None)
    monkeypatch.setattr(viz, "_find_browser", lambda: "/usr/bin/chromium")

    def broken(*args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed. E2BIG /tmp/xyz")

    fig = viz.overlay_figure({"run": _metrics()})
    monkeypatch.setattr(fig, "to_image", broken)
    assert viz.figure_to_png(fig) is None
    # A sentence for the user, never the exception's own text (that goes to the server log).
    reason = viz.png_unavailable_reason()
    assert reason == viz.PNG_FAILED == viz.png_export_problem()
    assert "Kaleido" not in reason and "Error" not in reason and "HTML" in reason
    assert viz.figure_to_png(viz.overlay_figure({})) is None  # not retried after a failure


def test_figure_to_png_never_returns_an_empty_or_foreign_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(viz, "_png_unavailable", None)
    monkeypatch.setattr(viz, "_find_browser", lambda: "/usr/bin/chromium")
    fig = viz.overlay_figure({"run": _metrics()})
    monkeypatch.setattr(fig, "to_image", lambda *a, **k: b"")
    assert viz.figure_to_png(fig) is None and viz.png_unavailable_reason() == viz.PNG_FAILED


def test_png_export_problem_says_what_is_missing_without_starting_a_browser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(viz, "_png_unavailable", None)
    monkeypatch.setattr(viz, "_find_browser", lambda: None)
    assert viz.png_export_problem() == viz.PNG_NO_BROWSER and "Chromium" in viz.PNG_NO_BROWSER
    assert viz.figure_to_png(viz.overlay_figure({})) is None  # refused at once, without trying kaleido

    monkeypatch.setattr(viz, "_png_unavailable", None)
    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido -> ImportError
    assert viz.png_export_problem() == viz.PNG_NO_KALEIDO and "kaleido" in viz.PNG_NO_KALEIDO

    monkeypatch.setattr(viz, "_png_unavailable", None)
    monkeypatch.delitem(sys.modules, "kaleido")
    monkeypatch.setattr(viz, "_find_browser", lambda: "/usr/bin/chromium")
    assert viz.png_export_problem() is None


@pytest.mark.skipif(
    not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
    reason="PNG export needs a local Chrome/Chromium for kaleido",
)
def test_figure_to_png_with_local_chromium(monkeypatch: pytest.MonkeyPatch) -> None:
    fig = viz.head_stats_figure({"entropy": np.ones((2, 2))}, "entropy")
    for _ in range(3):  # a real browser start: on a machine busy with other browser tests it may time out once
        monkeypatch.setattr(viz, "_png_unavailable", None)
        png = viz.figure_to_png(fig, scale=1)
        if png is not None:
            break
    assert png is not None, viz.png_unavailable_reason()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("T", [5, 20, 24])
def test_attention_grid_labels_every_token_of_a_short_prompt(T: int) -> None:
    fig = viz.attention_grid_figure(_maps(T=T, n_head=4), 0)
    for axis in ("xaxis", "yaxis", "xaxis4", "yaxis4"):
        assert len(fig.layout[axis].ticktext) == T, f"{axis} labels only some of the {T} tokens"


def test_attention_grid_thins_labels_of_a_long_prompt() -> None:
    fig = viz.attention_grid_figure(_maps(T=60, n_head=2), 0)
    assert 12 <= len(fig.layout.xaxis.ticktext) <= viz.MAX_TICKS


def test_counts_read_in_the_singular_and_the_plural() -> None:
    assert viz.plural(1, "layer") == "1 layer" and viz.plural(2, "layer") == "2 layers"
    assert viz.plural(1_000, "token") == "1,000 tokens" and viz.plural(0, "head") == "0 heads"
    assert "1 head" in viz.attention_grid_figure(_maps(n_head=1), 0).layout.title.text


def test_head_stats_titles_put_their_qualifier_on_a_second_line() -> None:
    fig = viz.head_stats_figure({"mean_distance": np.ones((1, 2))}, "mean_distance")
    first, _, second = fig.layout.title.text.partition("<br>")
    assert first == "mean distance attended" and "(tokens)" in second


# ---- the live loss chart's data -------------------------------------------------------------------


def test_loss_chart_data_series_band_and_best() -> None:
    data = viz.loss_chart_data(_metrics(), marks=[(40, "induction head forms")])
    names = [s["name"] for s in data["series"]]
    assert names == ["batch loss", "train loss", "val loss"]
    val = data["series"][2]
    assert data["best"]["x"] == val["x"][val["y"].index(min(val["y"]))] and data["best"]["y"] == min(val["y"])
    assert data["band"]["x"] == val["x"] and data["band"]["hi"] == val["y"]
    assert data["marks"] == [{"x": 40, "label": "induction head forms"}]
    json.dumps(data, allow_nan=False)  # plain JSON: no NaN, no numpy types


def test_loss_chart_data_thins_long_runs_and_keeps_the_last_step() -> None:
    n = 10_000
    df = pd.DataFrame({"step": range(1, n + 1), "loss": np.linspace(4, 1, n)})
    batch = viz.loss_chart_data(df, max_points=1_000)["series"][0]
    assert len(batch["x"]) <= 1_001 and batch["x"][0] == 1 and batch["x"][-1] == n
    assert viz.loss_chart_data(df)["note"]  # no evaluation yet: the chart says when train/val appear


def test_loss_chart_data_perplexity_nan_and_empty() -> None:
    df = pd.DataFrame({"step": [1, 2, 3], "loss": [1.0, float("nan"), float("inf")]})
    batch = viz.loss_chart_data(df, perplexity=True)["series"][0]
    assert batch["x"] == [1] and batch["y"] == [pytest.approx(math.e, abs=1e-4)]  # NaN/inf steps are left out
    for empty in (None, pd.DataFrame()):
        data = viz.loss_chart_data(empty, log_y=True)
        assert data["series"] == [] and data["log"] and "No metrics yet" in data["empty"]
