"""Plotly figures built from core data, so pages only place them and tests can check them headless.

Every figure shares one look: the palette and template below, readable fonts, hover texts that name
what is under the cursor ("step 250<br>val loss 1.930"). Token text from users goes into figures and
HTML escaped: plotly renders a subset of HTML in labels and hovers, so a token such as ``<br>`` or
``<script>`` must show as text, never act as markup.

Also here: ``token_html`` (coloured token spans for ``st.html``) and the chart download helpers
``figure_to_html`` (self-contained, works offline) and ``figure_to_png`` (kaleido + a local Chromium;
``None`` when that is not available, and ``png_export_problem`` says why in a sentence).

One subject, every figure the app shows (loss curves, overlays, attention maps, head statistics,
distributions, token strips) and their export, built from core data so tests check them without a
browser; hence past 400 lines.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

log = logging.getLogger(__name__)

# ---- one look for every figure ------------------------------------------------------------------

TEMPLATE = "plotly_white"
FONT = dict(family="Inter, system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", size=13, color="#1f2937")
TRAIN_COLOR = "#2f6fdb"  # blue
VAL_COLOR = "#e4572e"  # orange-red
GAP_FILL = "rgba(228, 87, 46, 0.13)"  # faint val colour: the train→val gap
INDUCTION_COLOR = "#8e44ad"  # purple: the induction phase change
BASELINE_COLOR = "#111827"  # near-black, drawn thicker
RUN_COLORS = [
    "#2f6fdb",
    "#e4572e",
    "#17a398",
    "#8e44ad",
    "#f2b705",
    "#c2185b",
    "#5d6d7e",
    "#7cb342",
    "#0097a7",
    "#ff7f0e",
]
SETTING_COLORS = ["#2f6fdb", "#e4572e", "#17a398", "#8e44ad", "#c2185b", "#7cb342", "#0097a7", "#5d6d7e"]
RAW_COLOR = "#9ca3af"  # grey bars: the unprocessed distribution
ATTENTION_SCALE = "Blues"  # sequential, white at 0 so near-zero weights recede
STAT_SCALE = "Viridis"
# Token probability colours for token_html: low (red) -> middle (yellow) -> high (green), all light
# enough that dark text stays readable on them.
TOKEN_SCALE = ((0.0, (248, 180, 170)), (0.5, (253, 236, 160)), (1.0, (170, 222, 165)))

LOSS_HEIGHT = 380
GRID_CELL = 250  # px per attention subplot row
MAX_TICKS = 24  # beyond this many tokens an axis labels every k-th one (hover still names each cell)

METRIC_LABELS = {
    "val_loss": "val loss",
    "train_loss": "train loss",
    "loss": "batch loss",
    "entropy": "attention entropy (nats)",
    "mean_distance": "mean distance attended (tokens)",
    "prev_token": "previous-token score",
    "first_token": "first-token score",
    "induction": "induction score",
}
_UNIT_INTERVAL_STATS = {"prev_token", "first_token", "induction"}


def _style_layout(*, height: int, title: str | None = None, legend: bool = True) -> dict[str, Any]:
    """The layout every figure of the lab shares: template, font, title, margins, legend."""
    return dict(
        template=TEMPLATE,
        font=FONT,
        height=height,
        title=dict(text=title, x=0.0, xref="paper", xanchor="left", font=dict(size=16)) if title else None,
        margin=dict(l=60, r=20, t=70 if title else 40, b=50),
        hoverlabel=dict(font=dict(family=FONT["family"], size=12)),
        showlegend=legend,
        # "normal": plotly would otherwise reverse the legend of figures with filled traces.
        legend=dict(
            orientation="h",
            yanchor="bottom",
            y=1.02,
            xanchor="left",
            x=0.0,
            bgcolor="rgba(0,0,0,0)",
            traceorder="normal",
        ),
    )


def _style(fig: go.Figure, *, height: int, title: str | None = None, legend: bool = True) -> go.Figure:
    fig.update_layout(**_style_layout(height=height, title=title, legend=legend))
    return fig


def _empty(fig: go.Figure, message: str) -> go.Figure:
    fig.add_annotation(
        text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14, color="#6b7280")
    )
    return fig


# ---- token labels -------------------------------------------------------------------------------


def visible_token(tok: str) -> str:
    """Whitespace and control characters made visible: newline ↵, space ␣, tab ⇥, others as ␀-style pictures."""
    out = []
    for ch in tok:
        if ch == "\n":
            out.append("↵")
        elif ch == " ":
            out.append("␣")
        elif ch == "\t":
            out.append("⇥")
        elif ord(ch) < 32:
            out.append(chr(0x2400 + ord(ch)))
        elif ord(ch) == 127:
            out.append("␡")
        else:
            out.append(ch)
    return "".join(out)


def plural(n: int, word: str, many: str | None = None) -> str:
    """ "1 layer", "2 layers": a count with its noun (``many`` for irregular plurals)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def _two_line_title(label: str) -> str:
    """A metric label for a narrow chart: its qualifier "(…)" on a second, smaller line, so nothing is clipped."""
    head, sep, tail = label.partition(" (")
    return f"{head}<br><span style='font-size:12px'>({tail}</span>" if sep else label


def _label(tok: str, max_len: int = 12) -> str:
    """A token as plotly text: visible whitespace, shortened, HTML-escaped (plotly decodes &lt; &gt; &amp;)."""
    s = visible_token(tok)
    if len(s) > max_len:
        s = s[: max_len - 1] + "…"
    return html.escape(s, quote=False)


def _tick_values(categories: Sequence[str], labels: Sequence[str], max_ticks: int = MAX_TICKS) -> dict:
    step = max(1, math.ceil(len(categories) / max_ticks))
    return dict(tickmode="array", tickvals=list(categories[::step]), ticktext=list(labels[::step]))


# ---- loss curves --------------------------------------------------------------------------------


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    if name not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[name], errors="coerce").replace([np.inf, -np.inf], np.nan)


def _as_perplexity(values: np.ndarray) -> np.ndarray:
    return np.exp(np.minimum(values, 50.0))  # clip: a diverging loss must not overflow to inf


LIVE_MAX_POINTS = 1_500  # batch-loss points sent to the live chart; longer runs are thinned evenly


def _thin(df: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """Every k-th row (and always the last), so a long run sends at most ``max_points`` of them."""
    if len(df) <= max_points:
        return df
    k = math.ceil(len(df) / max_points)
    keep = np.zeros(len(df), dtype=bool)
    keep[::k] = True
    keep[-1] = True
    return df[keep]


def _floats(values) -> list[float | None]:
    return [None if not math.isfinite(v) else round(float(v), 5) for v in values]


def loss_chart_data(
    metrics: pd.DataFrame | None,
    *,
    perplexity: bool = False,
    log_y: bool = False,
    marks: Sequence[tuple[int, str]] = (),
    max_points: int = LIVE_MAX_POINTS,
) -> dict[str, Any]:
    """What the Train page's live chart draws, as plain JSON-ready data (no figure object to build):
    the per-step batch loss faint behind, train and val loss at each evaluation, the train→val gap
    shaded, the best val point starred, and ``marks`` ((step, label) vertical lines).

    Plain lists keep a refresh cheap on the server: every open tab asks for this about once a second
    while a run trains, so it must cost milliseconds, not the ~100 ms of building a plotly figure."""
    what = "perplexity" if perplexity else "loss"
    data: dict[str, Any] = {
        "series": [],
        "band": None,
        "best": None,
        "marks": [{"x": int(s), "label": str(label)} for s, label in marks],
        "ylabel": "perplexity" if perplexity else "loss (nats / token)",
        "log": bool(log_y),
        "digits": 2 if perplexity else 3,
        "height": LOSS_HEIGHT,
        "empty": "No metrics yet: the curve appears after the first training step.",
    }
    if metrics is None or len(metrics) == 0:
        return data
    df = pd.DataFrame({c: _column(metrics, c) for c in ("step", "loss", "train_loss", "val_loss")})
    df = df.dropna(subset=["step"]).sort_values("step", kind="stable")
    transform = _as_perplexity if perplexity else (lambda v: v)

    def series(frame: pd.DataFrame, col: str, **style) -> dict[str, Any]:
        return {"x": frame["step"].astype(int).tolist(), "y": _floats(transform(frame[col].to_numpy())), **style}

    steps = _thin(df.dropna(subset=["loss"]), max_points)
    train = df.dropna(subset=["train_loss"])
    val = df.dropna(subset=["val_loss"])
    both = df.dropna(subset=["train_loss", "val_loss"])
    if len(steps):
        data["series"].append(series(steps, "loss", name=f"batch {what}", color=TRAIN_COLOR, width=1, opacity=0.3))
    if len(train):
        data["series"].append(
            series(train, "train_loss", name=f"train {what}", color=TRAIN_COLOR, width=2.2, markers=True)
        )
    if len(val):
        data["series"].append(series(val, "val_loss", name=f"val {what}", color=VAL_COLOR, width=2.2, markers=True))
        best = val.loc[val["val_loss"].idxmin()]
        best_y = float(transform(np.array([best["val_loss"]]))[0])
        data["best"] = {
            "x": int(best["step"]),
            "y": _floats([best_y])[0],
            "label": f"best val {best_y:.{data['digits']}f} @ step {int(best['step']):,}",
        }
    if len(both) >= 2:
        data["band"] = {
            "x": both["step"].astype(int).tolist(),
            "lo": _floats(transform(both["train_loss"].to_numpy())),
            "hi": _floats(transform(both["val_loss"].to_numpy())),
            "color": GAP_FILL,
        }
    if len(steps) and not len(val):
        data["note"] = "train/val loss appear at the first evaluation"
    return data


def overlay_figure(
    runs: dict[str, pd.DataFrame],
    *,
    metric: str = "val_loss",
    baseline: str | None = None,
    show_train: bool = False,
) -> go.Figure:
    """Several runs' ``metric`` curves on one chart; ``baseline`` drawn thick and dark; ``show_train``
    adds each run's train loss dashed in the same colour."""
    fig = go.Figure()
    label = METRIC_LABELS.get(metric, metric)
    _style(fig, height=420)
    fig.update_xaxes(title_text="step", rangemode="tozero")
    fig.update_yaxes(title_text=label)
    plotted = 0
    for i, (name, metrics) in enumerate(runs.items()):
        if metrics is None or len(metrics) == 0:
            continue
        is_base = name == baseline
        color = BASELINE_COLOR if is_base else RUN_COLORS[i % len(RUN_COLORS)]
        safe = html.escape(name, quote=False)
        legend_name = f"{safe} (baseline)" if is_base else safe
        step = _column(metrics, "step")
        curves = [(metric, "solid", legend_name)]
        if show_train and metric != "train_loss":
            curves.append(("train_loss", "dash", f"{safe} · train"))
        for col, dash, trace_name in curves:
            y = _column(metrics, col)
            ok = step.notna() & y.notna()
            if not ok.any():
                continue
            fig.add_trace(
                go.Scatter(
                    x=step[ok],
                    y=y[ok],
                    mode="lines+markers" if ok.sum() <= 60 else "lines",
                    name=trace_name,
                    legendgroup=safe,
                    line=dict(
                        color=color, width=(3.5 if is_base else 1.8) * (1 if dash == "solid" else 0.7), dash=dash
                    ),
                    marker=dict(size=5 if is_base else 4),
                    opacity=1.0 if is_base or baseline is None else 0.85,
                    hovertemplate=f"{safe}<br>step %{{x}}<br>{METRIC_LABELS.get(col, col)} %{{y:.3f}}<extra></extra>",
                )
            )
            plotted += 1
    if plotted == 0:
        _empty(fig, f"No {label} to show yet: pick runs that have been evaluated.")
    return fig


def ladder_figure(table: pd.DataFrame) -> go.Figure:
    """The ladder (``ladder.ladder_table``): each rung's val loss as a bar, bottom rung first, labelled
    with its gain over the rung below (> 0: the addition helps)."""
    fig = go.Figure()
    _style(fig, height=380, legend=False)
    fig.update_yaxes(title_text=METRIC_LABELS["val_loss"])
    known = table[table["val_loss"].notna()] if len(table) else table
    if len(known) == 0:
        return _empty(fig, "No val loss yet: the rungs have not been evaluated.")
    gains = ["" if pd.isna(g) else f"{g:+.3f}" for g in known["gain"]]
    fig.add_trace(
        go.Bar(
            x=[html.escape(str(r), quote=False) for r in known["rung"]],
            y=known["val_loss"],
            text=gains,
            textposition="outside",
            marker_color=[VAL_COLOR if pd.isna(g) or g > 0 else RAW_COLOR for g in known["gain"]],
            customdata=[html.escape(str(a), quote=False) for a in known["adds"]],
            hovertemplate="%{x}: val loss %{y:.3f}<br>gain over the rung below %{text}<br>%{customdata}<extra></extra>",
        )
    )
    fig.update_yaxes(range=[0, float(known["val_loss"].max()) * 1.15])
    return fig


# ---- attention ----------------------------------------------------------------------------------


def _masked_weights(w: np.ndarray, window: int | None) -> np.ndarray:
    """(T, T) weights as float with masked cells (future keys, keys outside the window) set to NaN."""
    T = w.shape[-1]
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    z = w.astype(float).copy()
    z[..., ~allowed] = np.nan  # plotly leaves NaN cells blank
    return z


def _window_path(T: int, window: int) -> str:
    """SVG path (cell coordinates) around the cells a windowed query may see: a staircase band."""
    right = [(i + 0.5, y) for i in range(T) for y in (i - 0.5, i + 0.5)]  # the diagonal, top to bottom
    left = []
    for i in reversed(range(T)):  # back up along the window's far edge
        x = max(0, i - window + 1) - 0.5
        left += [(x, i + 0.5), (x, i - 0.5)]
    points = right + left
    return "M " + " L ".join(f"{x},{y}" for x, y in points) + " Z"


def _attention_axes(maps: Any) -> tuple[list[str], list[str]]:
    """Unique category names "'tok' (i)" (what the hover shows) and short tick labels per position."""
    cats = [f"'{_label(t, 16)}' ({i})" for i, t in enumerate(maps.tokens)]
    ticks = [_label(t, 8) for t in maps.tokens]
    return cats, ticks


def _check_layer_head(maps: Any, layer: int, head: int | None = None) -> None:
    n_layer, n_head = maps.weights.shape[:2]
    if not 0 <= layer < n_layer:
        raise ValueError(f"layer {layer} does not exist: this model has layers 0..{n_layer - 1}.")
    if head is not None and not 0 <= head < n_head:
        raise ValueError(f"head {head} does not exist: this model has heads 0..{n_head - 1}.")


_ATTN_HOVER = "query %{y} → key %{x}: %{z:.2f}<extra>%{fullData.name}</extra>"


def _grid_domains(n: int, spacing: float) -> list[list[float]]:
    """``n`` equal [start, end] paper intervals with ``spacing`` between them, left to right."""
    size = (1.0 - spacing * (n - 1)) / n
    return [[i * (size + spacing), i * (size + spacing) + size] for i in range(n)]


def attention_grid_figure(maps: Any, layer: int, *, window: int | None = None, cols: int = 4) -> go.Figure:
    """One heatmap per head of ``layer`` on a shared 0..1 colour scale; rows are queries, columns keys.

    Masked cells (future keys, and keys outside ``window``) are blank; with ``window`` each map
    also outlines the band a query may attend to.
    """
    _check_layer_head(maps, layer)
    n_head, T = maps.weights.shape[1], maps.weights.shape[-1]
    cols = max(1, min(cols, n_head))
    rows = math.ceil(n_head / cols)
    tick_size = 9 if T <= 16 else 8  # every label must fit its cell, or plotly would skip some
    cats, ticks = _attention_axes(maps)
    axis_ticks = _tick_values(cats, ticks)  # every token up to MAX_TICKS; beyond that every k-th
    x_domains = _grid_domains(cols, 0.06 if T <= MAX_TICKS else 0.03)
    y_domains = _grid_domains(rows, 0.12 / rows)[::-1]  # row 0 at the top
    title = f"Layer {layer} attention · {plural(n_head, 'head')}"
    if getattr(maps, "cropped", False):
        title += f" · last {T} tokens"
    if window is not None:
        title += f" · window {window}"
    # The figure is written as one dict and validated once: a scrub through training redraws every
    # layer's grid, and make_subplots plus per-axis updates cost ~90 ms a grid (bench/dynamics.py).
    data, annotations, shapes = [], [], []
    layout: dict[str, Any] = dict(
        coloraxis=dict(
            colorscale=ATTENTION_SCALE, cmin=0.0, cmax=1.0, colorbar=dict(title=dict(text="weight"), thickness=12)
        ),
        plot_bgcolor="white",
    )
    for h in range(n_head):
        r, c = divmod(h, cols)
        suffix = str(h + 1) if h else ""
        data.append(
            dict(
                type="heatmap",
                z=_masked_weights(maps.weights[layer, h], window),
                x=cats,
                y=cats,
                xaxis=f"x{suffix}",
                yaxis=f"y{suffix}",
                coloraxis="coloraxis",
                name=f"head {h}",
                hoverongaps=False,
                hovertemplate=_ATTN_HOVER,
                xgap=0,
                ygap=0,
            )
        )
        # Square cells; "domain" shrinks the plot area rather than padding the axis range with blank space.
        layout[f"xaxis{suffix}"] = dict(
            domain=x_domains[c],
            anchor=f"y{suffix}",
            tickangle=-90 if T > 8 else 0,
            tickfont=dict(size=tick_size),
            showgrid=False,
            constrain="domain",
            **axis_ticks,
        )
        layout[f"yaxis{suffix}"] = dict(
            domain=y_domains[r],
            anchor=f"x{suffix}",
            autorange="reversed",
            tickfont=dict(size=tick_size),
            showgrid=False,
            scaleanchor=f"x{suffix}",
            constrain="domain",
            **axis_ticks,
        )
        annotations.append(
            dict(
                text=f"head {h}",
                x=sum(x_domains[c]) / 2,
                y=y_domains[r][1],
                xref="paper",
                yref="paper",
                xanchor="center",
                yanchor="bottom",
                showarrow=False,
                font=dict(size=16),
            )
        )
        if window is not None:
            shapes.append(
                dict(
                    type="path",
                    path=_window_path(T, window),
                    xref=f"x{suffix}",
                    yref=f"y{suffix}",
                    line=dict(color=VAL_COLOR, width=1.5),
                    fillcolor="rgba(0,0,0,0)",
                )
            )
    style = _style_layout(height=90 + rows * GRID_CELL, title=title, legend=False)
    style.update(layout, annotations=annotations, shapes=shapes, margin=dict(l=50, r=20, t=80, b=40))
    return go.Figure(data=data, layout=style)


def attention_head_figure(maps: Any, layer: int, head: int, *, window: int | None = None) -> go.Figure:
    """One head's attention as a large heatmap (queries down, keys across), blank where masked."""
    _check_layer_head(maps, layer, head)
    T = maps.weights.shape[-1]
    cats, ticks = _attention_axes(maps)
    axis_ticks = _tick_values(cats, ticks, max_ticks=48)
    fig = go.Figure(
        go.Heatmap(
            z=_masked_weights(maps.weights[layer, head], window),
            x=cats,
            y=cats,
            zmin=0.0,
            zmax=1.0,
            colorscale=ATTENTION_SCALE,
            name=f"layer {layer} · head {head}",
            hoverongaps=False,
            hovertemplate=_ATTN_HOVER,
            colorbar=dict(title=dict(text="weight"), thickness=12),
        )
    )
    if window is not None:
        fig.add_shape(
            type="path", path=_window_path(T, window), line=dict(color=VAL_COLOR, width=2), fillcolor="rgba(0,0,0,0)"
        )
    title = f"Layer {layer} · head {head}"
    if getattr(maps, "cropped", False):
        title += f" · last {T} tokens"
    _style(fig, height=600, title=title, legend=False)
    fig.update_xaxes(
        title_text="key (attended to)", tickangle=-90 if T > 8 else 0, showgrid=False, constrain="domain", **axis_ticks
    )
    fig.update_yaxes(
        title_text="query (attending)",
        autorange="reversed",
        showgrid=False,
        scaleanchor="x",
        constrain="domain",
        **axis_ticks,
    )
    fig.update_layout(plot_bgcolor="white", margin=dict(l=90, r=20, t=70, b=90))
    return fig


def head_stats_figure(stats: dict[str, np.ndarray], metric: str) -> go.Figure:
    """A layer × head heatmap of one statistic (from inspection.head_stats or induction_scores), values written in."""
    if metric not in stats:
        raise ValueError(f"No statistic {metric!r}; available: {', '.join(sorted(stats))}.")
    z = np.asarray(stats[metric], dtype=float)
    if z.ndim != 2:
        raise ValueError(f"Statistic {metric!r} must be a (n_layer, n_head) array, got shape {z.shape}.")
    n_layer, n_head = z.shape
    label = METRIC_LABELS.get(metric, metric)
    bounds = dict(zmin=0.0, zmax=1.0) if metric in _UNIT_INTERVAL_STATS else {}
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"head {h}" for h in range(n_head)],
            y=[f"layer {layer}" for layer in range(n_layer)],
            colorscale=STAT_SCALE,
            texttemplate="%{z:.2f}",
            textfont=dict(size=12),
            name=label,
            hovertemplate=f"%{{y}} · %{{x}}<br>{label} %{{z:.3f}}<extra></extra>",
            colorbar=dict(title=dict(text=label.split(" (")[0]), thickness=12),
            xgap=2,
            ygap=2,
            **bounds,
        )
    )
    _style(fig, height=min(140 + 56 * n_layer, 700), title=_two_line_title(label), legend=False)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_xaxes(showgrid=False, side="top")
    fig.update_layout(margin=dict(l=70, r=20, t=90, b=20))
    return fig


# ---- training dynamics (dynamics.py) --------------------------------------------------------------

DYNAMICS_SCORES = {
    "induction": "induction score",
    "prev_token": "previous-token score",
    "entropy": "entropy (nats)",
}


def head_scores_over_steps_figure(
    scores: pd.DataFrame, metric: str, *, current_step: int | None = None, induction_step: int | None = None
) -> go.Figure:
    """One line per head (dynamics.head_scores_over_steps) of ``metric`` over the kept steps.

    The x axis is symmetric-log-like (log of step + 1), since the kept steps are log-spaced; the
    step the slider shows and the induction jump are marked.
    """
    if metric not in DYNAMICS_SCORES:
        raise ValueError(f"No score {metric!r}; available: {', '.join(DYNAMICS_SCORES)}.")
    label = DYNAMICS_SCORES[metric]
    fig = go.Figure()
    _style(fig, height=320, title=f"{label[0].upper()}{label[1:]} of each head over training")
    fig.update_xaxes(title_text="step (log scale)", type="log")
    fig.update_yaxes(title_text=label)
    if scores is None or len(scores) == 0:
        return _empty(fig, "No kept checkpoints to score.")
    n_heads = scores[["layer", "head"]].drop_duplicates()
    for i, (layer, head) in enumerate(n_heads.itertuples(index=False)):
        one = scores[(scores["layer"] == layer) & (scores["head"] == head)].sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=one["step"] + 1,  # +1: step 0 (the initial weights) on a log axis
                y=one[metric],
                customdata=one["step"],
                mode="lines+markers",
                name=f"L{layer} H{head}",
                line=dict(color=RUN_COLORS[i % len(RUN_COLORS)], width=2),
                marker=dict(size=5),
                hovertemplate=f"layer {layer} head {head}<br>step %{{customdata}}<br>{label} %{{y:.3f}}<extra></extra>",
            )
        )
    if metric in _UNIT_INTERVAL_STATS:
        fig.update_yaxes(range=[0, 1.02])
    if current_step is not None:
        fig.add_vline(x=current_step + 1, line=dict(color="#6b7280", width=1))
    if induction_step is not None:
        fig.add_vline(x=induction_step + 1, line=dict(color=INDUCTION_COLOR, width=1.5, dash="dash"))
    return fig


def position_loss_figure(steps: Sequence[int], loss: np.ndarray, *, induction_step: int | None = None) -> go.Figure:
    """Validation loss per context position (x) at each kept step (y), as a heatmap (Olsson et al.'s
    picture: once induction heads form, late positions get cheaper than early ones)."""
    fig = go.Figure()
    _style(fig, height=420, title="Loss per token position over training", legend=False)
    if len(steps) == 0:
        return _empty(fig, "No kept checkpoints: train with --keep-checkpoints log or evals.")
    z = np.asarray(loss, dtype=float)
    labels = [str(s) for s in steps]
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=list(range(z.shape[1])),
            y=labels,
            colorscale="Magma_r",
            colorbar=dict(title=dict(text="loss"), thickness=12),
            hovertemplate="step %{y}<br>position %{x}<br>loss %{z:.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="position in the context (token)", showgrid=False)
    fig.update_yaxes(title_text="step", type="category", showgrid=False)
    if induction_step is not None and str(induction_step) in labels:
        fig.add_hline(y=labels.index(str(induction_step)), line=dict(color=INDUCTION_COLOR, width=2, dash="dash"))
    return fig


# ---- sampling -----------------------------------------------------------------------------------


def distribution_figure(
    tokens: list[str], probs: np.ndarray, kept: dict[str, np.ndarray], top_n: int = 30
) -> go.Figure:
    """The ``top_n`` most likely next tokens (raw probabilities) as bars, and below them one row per
    setting: a filled dot where the setting keeps the token, a faint cross where it cuts it.

    ``tokens`` labels every vocabulary id; ``probs`` is (vocab,); ``kept`` maps a setting's name to a
    (vocab,) boolean mask of the tokens it keeps.
    """
    p = np.asarray(probs, dtype=float).reshape(-1)
    if len(tokens) != len(p):
        raise ValueError(f"{len(tokens)} token labels for {len(p)} probabilities; pass one label per vocabulary id.")
    order = np.argsort(-p, kind="stable")[: max(1, min(top_n, len(p)))]  # most likely first
    cats = [f"'{_label(tokens[i], 16)}' (id {i})" for i in order]
    ticks = [_label(tokens[i], 8) for i in order]
    n_set = len(kept)

    if n_set:
        fig = make_subplots(
            rows=2,
            cols=1,
            shared_xaxes=True,
            vertical_spacing=0.04,
            row_heights=[0.62, 0.38] if n_set > 2 else [0.75, 0.25],
        )
    else:
        fig = make_subplots(rows=1, cols=1)
    fig.add_trace(
        go.Bar(
            x=cats,
            y=p[order],
            name="raw probability",
            marker=dict(color=RAW_COLOR),
            customdata=np.arange(1, len(order) + 1),
            hovertemplate="%{x}<br>raw probability %{y:.3f}<br>rank %{customdata}<extra></extra>",
        ),
        row=1,
        col=1,
    )

    row_names = []
    for k, (name, mask) in enumerate(kept.items()):
        m = np.asarray(mask, dtype=bool).reshape(-1)
        if m.shape != p.shape:
            raise ValueError(f"Mask for {name!r} has {m.size} entries; expected one per vocabulary id ({p.size}).")
        color = SETTING_COLORS[k % len(SETTING_COLORS)]
        mass = float(p[m].sum())
        row_name = f"{html.escape(name, quote=False)} · {int(m.sum())} kept · {mass:.0%} mass"
        row_names.append(row_name)
        sel = m[order]
        fig.add_trace(
            go.Scatter(
                x=cats,
                y=[row_name] * len(order),
                mode="markers",
                name=html.escape(name, quote=False),
                marker=dict(
                    symbol=np.where(sel, "circle", "x-thin-open").tolist(),
                    size=np.where(sel, 11, 8).tolist(),
                    color=[color if s else "rgba(156,163,175,0.6)" for s in sel],
                    line=dict(width=1.2, color=[color if s else "rgba(156,163,175,0.6)" for s in sel]),
                ),
                customdata=np.where(sel, "kept", "cut"),
                hovertemplate=f"%{{x}}<br>{html.escape(name, quote=False)}: %{{customdata}}<extra></extra>",
            ),
            row=2,
            col=1,
        )

    height = 340 + 34 * n_set
    _style(fig, height=height, title=f"Next-token distribution · top {len(order)}", legend=False)
    fig.update_yaxes(title_text="probability", row=1, col=1, rangemode="tozero")
    tick_args = _tick_values(cats, ticks, max_ticks=len(cats))
    fig.update_xaxes(tickangle=-60 if len(order) > 12 else 0, **tick_args, row=2 if n_set else 1, col=1)
    if n_set:
        fig.update_xaxes(showticklabels=False, row=1, col=1)
        fig.update_yaxes(
            autorange="reversed",
            categoryorder="array",
            categoryarray=row_names,
            showgrid=False,
            tickfont=dict(size=11),
            row=2,
            col=1,
        )
    fig.update_layout(bargap=0.25, margin=dict(l=220 if n_set else 60, r=20, t=60, b=70))
    return fig


# ---- token colouring (HTML) ---------------------------------------------------------------------


def _scale_color(value: float) -> str:
    v = min(1.0, max(0.0, value))
    for (x0, c0), (x1, c1) in zip(TOKEN_SCALE, TOKEN_SCALE[1:]):
        if v <= x1:
            t = (v - x0) / (x1 - x0)
            rgb = tuple(round(a + (b - a) * t) for a, b in zip(c0, c1))
            return f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})"
    return f"rgb{TOKEN_SCALE[-1][1]}"


def token_html(tokens: list[str], values: list[float] | None = None, titles: list[str] | None = None) -> str:
    """Tokens as coloured spans (value 0..1 -> red..yellow..green), escaped, with hover titles.

    Newlines show as ↵ (followed by a real line break), spaces as ␣ and tabs as ⇥, so token
    boundaries are visible. Returns one HTML string for ``st.html`` / ``st.markdown(unsafe_allow_html)``.
    """
    if values is not None and len(values) != len(tokens):
        raise ValueError(f"{len(values)} values for {len(tokens)} tokens; pass one value per token.")
    if titles is not None and len(titles) != len(tokens):
        raise ValueError(f"{len(titles)} titles for {len(tokens)} tokens; pass one title per token.")
    spans = []
    for k, tok in enumerate(tokens):
        style = (
            "display:inline-block;padding:1px 2px;margin:1px 1px;border-radius:4px;border:1px solid rgba(0,0,0,0.08);"
        )
        v = None if values is None else values[k]
        if v is not None and np.isfinite(v):
            style += f"background:{_scale_color(float(v))};"
        else:
            style += "background:#f3f4f6;"
        title = f' title="{html.escape(str(titles[k]), quote=True)}"' if titles is not None else ""
        text = html.escape(visible_token(tok), quote=False)
        spans.append(f'<span style="{style}"{title}>{text}</span>')
        if "\n" in tok:
            spans.append("<br>")  # keep the text's own line structure readable
    return (
        '<div class="tinygpt-tokens" style="font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;'
        'font-size:14px;line-height:1.9;color:#111827;word-break:break-word;">' + "".join(spans) + "</div>"
    )


# ---- downloads ----------------------------------------------------------------------------------


def figure_to_html(fig: go.Figure) -> str:
    """A self-contained HTML page of the figure; plotly.js is inlined (~4.5 MB) so it opens offline."""
    return fig.to_html(full_html=True, include_plotlyjs=True)


_png_unavailable: str | None = None  # why making a PNG failed once (a sentence); not retried in this process

PNG_NO_KALEIDO = (
    "PNG export is not installed on this server (the kaleido package is missing). "
    "Download the chart as HTML, or use the camera icon on the chart."
)
PNG_NO_BROWSER = (
    "PNG export needs Chrome or Chromium on this server, and none was found (install chromium, or set "
    "BROWSER_PATH). Download the chart as HTML, or use the camera icon on the chart."
)
PNG_FAILED = (
    "Making a PNG failed on this server (the browser that draws it did not start or answer; the server log "
    "says why). Download the chart as HTML, or use the camera icon on the chart."
)


def _find_browser() -> str | None:
    """The Chrome/Chromium kaleido would drive (BROWSER_PATH, PATH, usual places), found the way kaleido does."""
    from choreographer.browsers.chromium import Chromium

    return Chromium.find_browser(skip_local=False)


def png_export_problem() -> str | None:
    """Why chart PNGs cannot be made on this server, as a sentence for the user; None when they can.

    Cheap (no browser is started): checks that kaleido is installed and finds the browser it drives,
    and remembers a failure of ``figure_to_png``. Pages call it on every run to offer or explain the
    PNG download; the PNG itself is made only when asked for."""
    if _png_unavailable is not None:
        return _png_unavailable
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return PNG_NO_KALEIDO
    try:
        browser = _find_browser()
    except Exception:  # noqa: BLE001 - an unexpected layout of kaleido's helper: PNG export cannot be relied on
        log.exception("could not look for the browser kaleido drives")
        browser = None
    return None if browser else PNG_NO_BROWSER


def figure_to_png(fig: go.Figure, *, scale: float = 2.0) -> bytes | None:
    """PNG bytes of the figure through kaleido, or None when it cannot make one here (see ``png_export_problem``).

    kaleido 1.x drives a local Chrome/Chromium (found on PATH, or BROWSER_PATH; Debian's
    /usr/bin/chromium works) and uses plotly's bundled plotly.js, so it works offline. Each call
    starts a browser (a few seconds): call it on demand (a click), never on every page rerun. After
    one failure it returns None at once for the rest of the process, and ``png_export_problem`` says
    why in a sentence (the exception itself goes to the log, not to the user).
    """
    global _png_unavailable
    problem = png_export_problem()
    if problem is not None:
        _png_unavailable = problem
        return None
    try:
        data = fig.to_image(format="png", scale=scale)
    except Exception:  # noqa: BLE001 - the browser failed to start or answer: PNG is optional
        log.exception("chart PNG export failed")
        _png_unavailable = PNG_FAILED
        return None
    if not (isinstance(data, bytes) and data[:8] == b"\x89PNG\r\n\x1a\n"):
        log.error("chart PNG export returned %r, not a PNG", bytes(data[:16]) if data else data)
        _png_unavailable = PNG_FAILED
        return None
    return data


def png_unavailable_reason() -> str | None:
    """Why ``figure_to_png`` returned None, as a sentence (None while it works or has not been tried)."""
    return _png_unavailable


# ---- inside a model: logit lens, head knockout, network health ----------------------------------

KNOCKOUT_SCALE = "RdBu_r"  # diverging: red = the loss rises without the head, blue = it falls
LENS_SCALE = "Viridis"
HEALTH_TITLES = {
    "grad_norm": "gradient norm",
    "update_ratio": "update / weight",
    "act_rms": "activation RMS",
}


def _position_labels(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """Unique category names per position ("3·a") and short tick labels."""
    cats = [f"{i}·{_label(t, 10)}" for i, t in enumerate(tokens)]
    return cats, [_label(t, 6) for t in tokens]


def logit_lens_figure(lens: Any, value: str = "top", token_names: Sequence[str] | None = None) -> go.Figure:
    """Layers (rows, last on top) × positions (columns) of a ``lens.LogitLens``.

    value "top": each cell names the layer's most likely next token, coloured by its probability;
    value "next": each cell is the probability the layer gives the token that actually comes next.
    ``token_names`` labels vocabulary ids (the tokenizer's token_strings of range(vocab)).
    """
    if value not in ("top", "next"):
        raise ValueError(f"value must be 'top' or 'next', got {value!r}.")
    rows, T = lens.top_ids.shape
    cats, ticks = _position_labels(lens.tokens)
    names = list(token_names) if token_names is not None else None
    top_text = [[_label(names[i], 6) if names else str(int(i)) for i in r] for r in lens.top_ids]
    nxt = [_label(lens.tokens[t + 1], 10) if t + 1 < T else "–" for t in range(T)]
    custom = np.empty((rows, T, 3), dtype=object)
    for r in range(rows):
        for t in range(T):
            p = lens.next_probs[r, t]
            custom[r, t] = (top_text[r][t], nxt[t], "–" if not np.isfinite(p) else f"{p:.3f}")
    z = lens.top_probs if value == "top" else lens.next_probs
    title = "Top next token at each layer" if value == "top" else "Probability of the actual next token"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=cats,
            y=list(lens.layers),
            zmin=0.0,
            zmax=1.0,
            colorscale=LENS_SCALE,
            text=top_text if value == "top" else [[f"{v:.2f}" if np.isfinite(v) else "" for v in r] for r in z],
            texttemplate="%{text}",
            textfont=dict(size=11),
            customdata=custom,
            hovertemplate=(
                "%{y} · position %{x}<br>predicts '%{customdata[0]}' (p %{z:.3f})"
                if value == "top"
                else "%{y} · position %{x}"
            )
            + "<br>actual next '%{customdata[1]}': p %{customdata[2]}<extra></extra>",
            colorbar=dict(title=dict(text="p"), thickness=12),
            xgap=1,
            ygap=1,
        )
    )
    _style(fig, height=min(140 + 44 * rows, 640), title=title, legend=False)
    fig.update_xaxes(showgrid=False, tickangle=0, **_tick_values(cats, ticks, max_ticks=48))
    fig.update_yaxes(showgrid=False)
    fig.update_layout(margin=dict(l=100, r=20, t=60, b=40))
    return fig


def knockout_figure(grid: Any) -> go.Figure:
    """A layer × head grid of a ``knockout.KnockoutGrid``: the validation loss change with each head removed."""
    d = np.asarray(grid.delta, dtype=float)
    n_layer, n_head = d.shape
    bound = float(np.nanmax(np.abs(d))) if np.isfinite(d).any() else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=d,
            x=[f"head {h}" for h in range(n_head)],
            y=[f"layer {layer}" for layer in range(n_layer)],
            zmid=0.0,
            zmin=-bound or -1.0,
            zmax=bound or 1.0,
            colorscale=KNOCKOUT_SCALE,
            texttemplate="%{z:+.3f}",
            textfont=dict(size=12),
            customdata=np.asarray(grid.loss, dtype=float),
            hovertemplate=("%{y} · %{x} knocked out<br>val loss %{customdata:.4f} (%{z:+.4f} nats)<extra></extra>"),
            colorbar=dict(title=dict(text="Δ loss"), thickness=12),
            xgap=2,
            ygap=2,
        )
    )
    title = f"Val loss change per head ({grid.method} ablation, base {grid.base_loss:.3f})"
    _style(fig, height=min(140 + 56 * n_layer, 700), title=title, legend=False)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_xaxes(showgrid=False, side="top")
    fig.update_layout(margin=dict(l=70, r=20, t=90, b=20))
    return fig


def health_chart_data(long: pd.DataFrame, metric: str) -> dict[str, Any]:
    """One health measure per layer over training, as data for the Train page's live chart (the same
    in-place chart as the loss curve, so a refresh while training neither rebuilds a figure nor resets
    zoom). ``long`` is ``health.health_frame(metrics)``; ``metric`` a key of HEALTH_TITLES. Norms and
    ratios span decades, so they are drawn on a log scale; activation RMS on a linear one."""
    part = long[long["metric"] == metric].dropna(subset=["value"]) if long is not None and len(long) else long
    series = []
    if part is not None and len(part):
        for k, layer in enumerate(sorted(int(v) for v in part["layer"].unique())):
            s = part[part["layer"] == layer]
            series.append(
                {
                    "name": f"layer {layer}",
                    "color": RUN_COLORS[k % len(RUN_COLORS)],
                    "width": 2,
                    "markers": True,
                    "x": s["step"].astype(int).tolist(),
                    "y": _floats(s["value"].to_numpy(dtype=float)),
                }
            )
    return {
        "series": series,
        "band": None,
        "best": None,
        "marks": [],
        "ylabel": HEALTH_TITLES[metric],
        "log": metric != "act_rms",
        "digits": 4,
        "height": 260,
        "empty": "Network health appears with the first evaluation.",
    }
