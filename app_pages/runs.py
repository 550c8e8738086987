"""Runs & ablations: every run on disk, their curves overlaid, and grids of ablations against a baseline.

Thin page: the run state (tinygpt_core.state: the store and the runner's jobs merged, grid launches),
grid comparison (tinygpt_core.ablations), zips (tinygpt_core.archive) and figures (tinygpt_core.viz)
do the work; this file places widgets and charts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages._ablation_widgets import grid_ablation_picker, grid_labels
from app_pages._common import (
    NOT_YOURS,
    can_manage,
    list_runs,
    md,
    not_yours,
    read_only,
    read_only_notice,
    remember_run,
    run_state,
    runner,
    selected_run_id,
    store,
    user_errors,
    visitor,
)
from tinygpt_core import state, viz
from tinygpt_core.ablation_registry import REGISTRY as ABLATION_REGISTRY
from tinygpt_core.ablations import (
    BASELINE,
    compare_to_baseline,
    metrics_summary,
    with_gap,
)
from tinygpt_core.archive import zip_run
from tinygpt_core.config import PRESETS, check_field, range_text
from tinygpt_core.data import list_builtin_corpora
from tinygpt_core.errors import RunError, TinyGPTError
from tinygpt_core.ladder import RUNG_NAMES, is_ladder, ladder_table
from tinygpt_core.runs import ACTIVE_STATUSES, read_metrics
from tinygpt_core.state import RunState
from tinygpt_core.training import TrainSpec

ROOT = Path(__file__).resolve().parent.parent
GRID_PARAM = "grid"
CURVES = {"val loss": "val_loss", "train loss": "train_loss", "gap (val − train)": "gap"}


# ---- data for the page (no widgets) --------------------------------------------------------------


@st.cache_data(max_entries=256, show_spinner=False)
def _metrics_cached(path: str, mtime: float) -> pd.DataFrame:  # mtime: re-read when the file grows
    return read_metrics(path)


def _metrics(path: Path | None) -> pd.DataFrame | None:
    if path is None:
        return None
    try:
        return _metrics_cached(str(path), os.path.getmtime(path / "metrics.csv"))
    except (OSError, RunError):
        return None


def _runs_frame(runs: list[RunState]) -> pd.DataFrame:
    """One row per run. Missing values stay missing (None/NaN): the tables draw them as MISSING."""
    return pd.DataFrame(
        {
            "name": [r.name for r in runs],
            "grid": [r.grid[0] if r.grid else None for r in runs],
            "preset": [r.preset or "custom" for r in runs],
            "ablations": [list(r.ablations) for r in runs],
            "status": [r.status for r in runs],
            "params": [r.params for r in runs],
            "best_val": [r.best_val_loss for r in runs],
            "final_train": [r.final_train_loss for r in runs],
            "final_val": [r.final_val_loss for r in runs],
            "gap": [r.gap for r in runs],
            "steps": [r.step for r in runs],
            "max_iters": [r.max_iters for r in runs],
            "time": [r.elapsed_s for r in runs],
            "created": pd.to_datetime([r.created_at or None for r in runs], utc=True, errors="coerce"),
            "corpus": [r.corpus for r in runs],
            "message": [r.error or r.message or None for r in runs],
            "id": [r.id for r in runs],
        }
    )


MISSING = "–"  # how a table shows a value that does not exist (st.dataframe's default is a literal "None")
RUN_COLUMNS = {
    "name": st.column_config.TextColumn("name", pinned=True),  # width: _text_width, so no name is cut
    "grid": st.column_config.TextColumn(
        "grid", help="The ablation grid this run belongs to (open it in the *Ablation grid* tab)."
    ),
    "preset": st.column_config.TextColumn("preset"),
    "ablations": st.column_config.ListColumn("ablations", help="How the model departs from GPT-2's design."),
    "status": st.column_config.TextColumn("status"),
    "params": st.column_config.NumberColumn("params", format="compact"),
    "best_val": st.column_config.NumberColumn("best val", format="%.3f", help="Lowest validation loss."),
    "final_train": st.column_config.NumberColumn("final train", format="%.3f"),
    "final_val": st.column_config.NumberColumn("final val", format="%.3f"),
    "gap": st.column_config.NumberColumn(
        "gap",
        format="%+.3f",
        help="Final val loss − final train loss. Growing above 0: the model memorises its training text.",
    ),
    "steps": st.column_config.NumberColumn("steps", format="%d"),
    "max_iters": st.column_config.NumberColumn("of", format="%d"),
    "time": st.column_config.NumberColumn("time (s)", format="%.1f"),
    "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm"),
    "corpus": st.column_config.TextColumn("corpus"),
    "message": st.column_config.TextColumn("message", width="large", help="Status message, or why a run is broken."),
    "id": st.column_config.TextColumn("run id"),
}


def _text_width(values: pd.Series, least: int = 80, most: int = 560) -> int:
    """Pixels a text column needs to show its longest value whole (about 8 px a character, plus padding)."""
    longest = max((len(str(v)) for v in values if isinstance(v, str)), default=0)
    return max(least, min(most, 8 * longest + 24))


def _run_columns(df: pd.DataFrame) -> dict:
    """RUN_COLUMNS with the name and grid columns as wide as their longest value."""
    widths = {col: _text_width(df[col]) for col in ("name", "grid")}
    return {
        **RUN_COLUMNS,
        "name": st.column_config.TextColumn("name", width=widths["name"], pinned=True),
        "grid": st.column_config.TextColumn("grid", width=widths["grid"], help=RUN_COLUMNS["grid"]["help"]),
    }


def _chart_downloads(fig, key: str, stem: str) -> None:
    """HTML (always) and PNG downloads of a chart, each made only when its button is clicked.

    When this server cannot make PNGs (no kaleido, no browser for it, or it failed once), the PNG
    button is disabled and a sentence below says why and what to use instead."""
    c1, c2, _ = st.columns([1, 1, 4])
    c1.download_button(
        "Chart as HTML",
        data=lambda: viz.figure_to_html(fig),
        file_name=f"{stem}.html",
        mime="text/html",
        key=f"{key}_html",
        icon=":material/download:",
        on_click="ignore",
    )
    problem = viz.png_export_problem()

    def png() -> bytes:
        # Runs on Streamlit's download thread when the button is clicked. Raising (never returning b"")
        # makes the button show "Failed to generate file for download" instead of saving an empty file.
        data = viz.figure_to_png(fig)
        if data is None:
            raise RuntimeError(viz.png_unavailable_reason() or viz.PNG_FAILED)
        return data

    c2.download_button(
        "Chart as PNG",
        data=png,
        file_name=f"{stem}.png",
        mime="image/png",
        key=f"{key}_png",
        icon=":material/image:",
        disabled=problem is not None,
        help=problem or "Made when you click (takes a few seconds: a browser on the server draws it).",
        on_click="ignore",
    )
    if problem is not None:
        st.caption(problem)


# ---- all runs ------------------------------------------------------------------------------------


def _sync_overlay_from_table(ids: list[str]) -> None:
    """Table selection → the 'Runs to compare' multiselect (a callback runs before widgets render)."""
    event = st.session_state.get("runs_table")
    rows = event.selection.rows if event is not None else []
    st.session_state["runs_overlay"] = [ids[i] for i in rows if i < len(ids)]


def all_runs_section(runs: list[RunState]) -> None:
    if not runs:
        st.info(
            "No runs yet. Train one on the **Train** page, press **Quick start** on Home, "
            "or launch an ablation grid in the next tab."
        )
        return

    df = _runs_frame(runs)
    ids = df["id"].tolist()
    by_id = {r.id: r for r in runs}
    n_broken = sum(r.broken for r in runs)
    st.caption(
        f"{len(runs)} run(s) in `{store().root}`"
        + (f" · {n_broken} broken (see *message*)" if n_broken else "")
        + ". Select rows to overlay their curves."
    )
    st.dataframe(
        df,
        key="runs_table",
        hide_index=True,
        column_config=_run_columns(df),
        width="stretch",
        on_select=lambda: _sync_overlay_from_table(ids),
        selection_mode="multi-row",
        placeholder=MISSING,
        height=min(400, 38 + 35 * len(df)),
    )

    st.subheader("Overlay curves")
    comparable = [r.id for r in runs if not r.broken]
    # Keep the multiselect's state valid when runs were deleted elsewhere (another tab, the CLI).
    st.session_state["runs_overlay"] = [i for i in st.session_state.get("runs_overlay", []) if i in comparable]
    chosen = st.multiselect(
        "Runs to compare",
        comparable,
        key="runs_overlay",
        format_func=lambda i: by_id[i].name,
        placeholder="Select rows in the table, or pick runs here",
    )
    c1, c2 = st.columns([2, 1])
    curve = c1.segmented_control("Curve", list(CURVES), default="val loss", key="runs_curve") or "val loss"
    show_train = c2.toggle(
        "Train loss dashed",
        value=True,
        key="runs_show_train",
        disabled=CURVES[curve] != "val_loss",
        help="Each run's train loss in the same colour, dashed: the space between is the gap.",
    )
    if not chosen:
        st.caption("Nothing selected yet.")
    else:
        curves = {}
        for run_id in chosen:
            m = _metrics(by_id[run_id].path)
            if m is None:
                st.warning(f"Run **{md(by_id[run_id].name)}** has no readable metrics yet; it is left out.")
                continue
            curves[_unique(curves, by_id[run_id].name)] = with_gap(m)
        metric = CURVES[curve]
        fig = viz.overlay_figure(curves, metric=metric, show_train=show_train and metric == "val_loss")
        st.plotly_chart(fig, key="runs_overlay_chart", width="stretch")
        if metric == "gap":
            st.caption("Gap = val loss − train loss at each evaluation. Above 0 and rising: memorising, not learning.")
        _chart_downloads(fig, "runs_overlay", "runs-overlay")

    st.subheader("Manage a run")
    default = selected_run_id()
    pick_from = chosen or ids
    index = pick_from.index(default) if default in pick_from else 0
    run_id = st.selectbox(
        "Run",
        pick_from,
        index=index,
        key="runs_manage",
        format_func=lambda i: f"{by_id[i].name} · {by_id[i].status} · {by_id[i].id}",
    )
    if run_id is not None:
        manage_run(by_id[run_id])


def _unique(existing: dict, name: str) -> str:
    """Two runs can share a name (re-runs); the chart legend needs distinct keys."""
    if name not in existing:
        return name
    n = 2
    while f"{name} ({n})" in existing:
        n += 1
    return f"{name} ({n})"


def manage_run(run: RunState) -> None:
    if run.broken:
        st.warning(f"Run **{md(run.name)}** cannot be opened: {md(run.error)}")
    elif run.message:
        st.caption(f"{run.status}: {md(run.message)}")
    live = run.active
    cols = st.columns(5)

    def _zip() -> bytes:
        # Runs on a download thread: a vanished folder must not raise there.
        try:
            return zip_run(run.path)
        except TinyGPTError as exc:
            return str(exc).encode()

    cols[0].download_button(
        "Download .zip",
        data=_zip,
        file_name=f"{run.id}.zip",
        mime="application/zip",
        key="runs_zip",
        icon=":material/folder_zip:",
        disabled=run.path is None or (run.broken and not (run.path / "config.json").exists()),
    )
    openable = run.has_weights
    links = [
        ("app_pages/train.py", "Open in Train", ":material/model_training:", True),
        ("app_pages/attention.py", "Attention", ":material/grid_on:", openable),
        ("app_pages/sampling.py", "Sampling", ":material/casino:", openable),
    ]
    for col, (page, label, icon, enabled) in zip(cols[1:4], links):
        if (ROOT / page).exists():  # pages are optional in navigation; never link to a missing one
            col.page_link(page, label=label, icon=icon, query_params={"run": run.id}, disabled=not enabled)
    locked = read_only()
    mine = can_manage(run.path)  # issue 11: only the run's owner (or the operator) may delete it
    if not mine and not locked:
        not_yours("runs_manage")
    with cols[4].popover(
        "Delete…",
        icon=":material/delete:",
        disabled=live or locked or not mine,
        help="Deleting is turned off on this server (read-only mode)."
        if locked
        else NOT_YOURS
        if not mine
        else "Stop the run first."
        if live
        else "Remove this run's folder from disk.",
    ):
        st.markdown(f"Delete **{md(run.name)}** (`{run.id}`) and all its files? This cannot be undone.")
        if locked:  # a disabled popover cannot open; draw no button behind it either
            st.caption("Deleting is turned off on this server (read-only mode).")
        elif not mine:
            st.caption(NOT_YOURS)
        elif st.button("Delete permanently", type="primary", key="runs_delete_confirm"):
            deleted = False
            with user_errors("Could not delete: "):
                if not can_manage(run.path):  # checked again at the click: the owner file is the truth
                    raise RunError(NOT_YOURS)
                store().delete(run.id)
                deleted = True
            if deleted:
                if selected_run_id() == run.id:
                    remember_run(None)
                    st.query_params.pop("run", None)
                # No need to touch "runs_overlay": it drops ids that are gone before it is drawn.
                st.session_state["runs_flash"] = f"Deleted run {md(run.name)} ({md(run.id)})."
                st.rerun()


# ---- ablation grids ------------------------------------------------------------------------------


def _ablation_order(label: str) -> int:
    return -1 if label == BASELINE else ABLATION_REGISTRY.order(label)


def _grid_members(runs: list[RunState], grid_id: str) -> list[RunState]:
    """Every run of one grid (the core finds them): a ladder bottom rung first; an ablation grid baseline
    first, then in the ablation list's order."""
    members = state.grid_members(runs, grid_id)
    if is_ladder(m.grid[1] for m in members):
        return sorted(members, key=lambda m: RUNG_NAMES.index(m.grid[1]))
    return sorted(members, key=lambda m: (_ablation_order(m.grid[1]), m.grid[1]))


GRID_TAB, RUNS_TAB = "Ablation grid", "All runs"


def launch_grid_form() -> None:
    if read_only_notice("Launching ablation grids is turned off here."):
        return
    corpora = [name for name, _ in list_builtin_corpora()]
    presets = list(PRESETS)
    # enter_to_submit=False: Enter in "Steps per run" (a number input) must not launch a grid; only the button does.
    with st.form("grid_form", border=True, enter_to_submit=False):
        st.markdown("**New grid** — one baseline plus one run per ablation, same data, same seed, same data order.")
        c1, c2, c3, c4 = st.columns(4)
        c1.selectbox(
            "Baseline preset",
            presets,
            index=presets.index("tiny") if "tiny" in presets else 0,
            key="grid_preset",
            help="\n".join(f"- **{name}**: {p.description}" for name, p in PRESETS.items()),
        )
        c2.selectbox("Corpus", corpora, index=corpora.index("tiny") if "tiny" in corpora else 0, key="grid_corpus")
        # No min/max (issue 12 item 5): a browser silently keeps the old value of an out-of-range entry, and
        # the form would launch with it. The core's ranges are stated here and checked on Launch.
        c3.number_input(
            "Steps per run (max_iters)",
            value=300,
            step=50,
            key="grid_max_iters",
            help=f"Allowed: {range_text('max_iters')}.",
        )
        c4.number_input("Seed", value=1337, step=1, key="grid_seed", help=f"Allowed: {range_text('seed')}.")
        grid_ablation_picker("grid_")
        b1, b2 = st.columns(2)
        b1.form_submit_button(
            "Launch grid", type="primary", icon=":material/play_arrow:", on_click=_launch_grid, args=(visitor(),)
        )
        b2.form_submit_button(
            "Launch ladder",
            icon=":material/stairs:",
            on_click=_launch_grid,
            args=(visitor(), True),
            help="Instead of the ablations: the preset climbed from a bigram model to the full transformer, "
            "one addition per run (" + " → ".join(RUNG_NAMES) + "), same data, seed and data order.",
        )
    error = st.session_state.pop("runs_grid_error", None)
    if error:
        st.error(error)


def _launch_grid(owner: str, ladder: bool = False) -> None:
    """on_click of Launch grid (or, with ``ladder``, Launch ladder): queue the grid for ``owner`` (this
    visitor), then show it. A callback runs
    before any widget of the next run is drawn, so it can point the tabs, the grid selector and ?grid= at
    the new grid at once."""
    ss = st.session_state
    launched = None
    try:
        for name, key in (("max_iters", "grid_max_iters"), ("seed", "grid_seed")):
            check_field(name, ss[key])  # names the setting and its range (an empty box too)
        base = TrainSpec.from_preset(
            ss["grid_preset"],
            f"builtin:{ss['grid_corpus']}",
            max_iters=int(ss["grid_max_iters"]),
            seed=int(ss["grid_seed"]),
        )
        # All of the grid or none of it; the visitor's job cap (TINYGPT_MAX_JOBS_PER_VISITOR) counts every member.
        if ladder:
            launched = state.launch_ladder(runner(), base, owner=owner)
        else:
            launched = state.launch_grid(runner(), base, grid_labels("grid_"), owner=owner)
    except TinyGPTError as exc:
        ss["runs_grid_error"] = f"Could not launch the grid: {exc}"
        return
    show_grid(launched.grid_id)
    how = f" ({launched.note})" if launched.note else ""
    ss["runs_flash"] = (
        f"Launched **{launched.grid_id}**: {len(launched.job_ids)} runs on {launched.device}. They queue "
        f"and train in turn{how}; the curves below update as they go."
    )


def show_grid(grid_id: str) -> None:
    """Make ``grid_id`` the grid in view: its tab, the grid selector and ?grid= (call before they are drawn)."""
    st.session_state["runs_tab"] = GRID_TAB
    st.session_state["runs_grid_pick"] = grid_id
    st.query_params[GRID_PARAM] = grid_id


def grid_section(runs: list[RunState]) -> None:
    launch_grid_form()
    grids = state.known_grids(runs)
    if not grids:
        st.info("No grids yet. Pick a baseline and some ablations above and press **Launch grid**.")
        return
    if st.session_state.get("runs_grid_pick") not in grids:
        wanted = st.query_params.get(GRID_PARAM)
        st.session_state["runs_grid_pick"] = wanted if wanted in grids else grids[0]
    grid_id = st.selectbox("Grid", grids, key="runs_grid_pick")
    if grid_id != st.query_params.get(GRID_PARAM):
        st.query_params[GRID_PARAM] = grid_id
    live = any(m.active for m in _grid_members(runs, grid_id))
    grid_live_view(grid_id, live)


def grid_live_view(grid_id: str, live: bool) -> None:
    # run_every is fixed when the fragment is defined: poll only while some job of the grid is unfinished.
    @st.fragment(run_every=1.0 if live else None)
    def _view() -> None:
        members = _grid_members(list_runs(), grid_id)
        rows, curves = [], {}
        for m in members:
            label = m.grid[1]
            if m.active:  # the live job's metrics (in memory while it trains: no disk reads)
                metrics = _live_metrics(m)
            else:
                metrics = _metrics(m.path)
            stats = metrics_summary(metrics) if metrics is not None else {}
            rows.append({"name": f"{grid_id}/{label}", "status": m.status, **stats, "message": m.error or m.message})
            if metrics is not None and len(metrics):
                curves[label] = with_gap(metrics)

        still_live = any(r["status"] in ACTIVE_STATUSES for r in rows)
        if live and not still_live:
            st.rerun()  # the grid finished: a full rerun stops this fragment's timer
        done = sum(r["status"] not in ACTIVE_STATUSES for r in rows)
        st.progress(done / max(1, len(rows)), text=f"{done} of {len(rows)} runs finished")

        c1, c2 = st.columns([2, 1])
        curve = c1.segmented_control("Grid curve", list(CURVES), default="val loss", key="grid_curve") or "val loss"
        show_train = c2.toggle(
            "Train loss dashed", value=False, key="grid_show_train", disabled=CURVES[curve] != "val_loss"
        )
        metric = CURVES[curve]
        fig = viz.overlay_figure(
            curves, metric=metric, baseline=BASELINE, show_train=show_train and metric == "val_loss"
        )
        st.plotly_chart(fig, key="grid_overlay_chart", width="stretch")

        if is_ladder(m.grid[1] for m in members):
            _ladder_view(rows)
        else:
            table = compare_to_baseline(rows)
            if rows:
                table = table.merge(pd.DataFrame(rows)[["name", "message"]], on="name", how="left")
            st.dataframe(
                table.drop(columns=["name"]),
                key="grid_table",
                hide_index=True,
                placeholder=MISSING,
                width="stretch",
                column_config={
                    "ablation": st.column_config.TextColumn("ablation", pinned=True),
                    "final_train_loss": st.column_config.NumberColumn("final train", format="%.3f"),
                    "final_val_loss": st.column_config.NumberColumn("final val", format="%.3f"),
                    "gap": st.column_config.NumberColumn("gap", format="%+.3f", help="final val − final train"),
                    "best_val_loss": st.column_config.NumberColumn("best val", format="%.3f"),
                    "delta": st.column_config.NumberColumn(
                        "Δ val vs baseline", format="%+.3f", help="> 0: the ablation hurts; < 0: it helps."
                    ),
                    "ratio": st.column_config.NumberColumn("val ÷ baseline", format="%.3f"),
                    "message": st.column_config.TextColumn("message", width="large"),
                },
            )
        if not live:
            _chart_downloads(fig, "grid_overlay", grid_id)
        unfinished = [m.job_id for m in members if m.can_stop and can_manage(m.path)]  # only the owner's
        if unfinished and st.button(
            "Stop this grid",
            icon=":material/stop:",
            key="grid_stop",
            help="Queued runs are dropped; the running one stops after its current step.",
        ):
            with user_errors("Could not stop: "):
                for job_id in reversed(unfinished):  # queued ones first, so none starts as another stops
                    runner().stop(job_id)
            st.rerun()

    _view()


def _ladder_view(rows: list[dict]) -> None:
    """A ladder grid: each rung's val loss and its gain over the rung below (tinygpt_core.ladder)."""
    table = ladder_table(rows)
    st.markdown("**The ladder** — each rung adds one part to the one below; the gain is how much val loss it saves.")
    st.plotly_chart(viz.ladder_figure(table), key="ladder_chart", width="stretch")
    st.dataframe(
        table.drop(columns=["name"]),
        key="ladder_table",
        hide_index=True,
        placeholder=MISSING,
        width="stretch",
        column_config={
            "rung": st.column_config.TextColumn("rung", pinned=True),
            "adds": st.column_config.TextColumn("adds", width="large"),
            "val_loss": st.column_config.NumberColumn("final val", format="%.3f"),
            "gain": st.column_config.NumberColumn(
                "gain", format="%+.3f", help="val loss of the rung below − this rung's: > 0, the addition helps."
            ),
            "best_val_loss": st.column_config.NumberColumn("best val", format="%.3f"),
        },
    )


def _live_metrics(run: RunState) -> pd.DataFrame | None:
    try:
        return run_state(run.run_id, run.job_id).metrics
    except TinyGPTError:
        return None


# ---- the page ------------------------------------------------------------------------------------

visitor()  # issue 11: keeps this browser's owner token in its cookie (app_pages/_common.py)
st.title("Runs & ablations")
st.caption(
    "Every run on disk, their curves side by side, and ablation grids: switch one part of the "
    "architecture off at a time and see what it costs."
)

flash = st.session_state.pop("runs_flash", None)
if flash:
    st.success(flash)

runs = list_runs()
# Keyed tabs that track their state, so the page (not the browser) decides which one is open: a grid just
# launched, or a link with ?grid=, opens the grid tab even though a message above shifts the layout.
st.session_state.setdefault("runs_tab", GRID_TAB if st.query_params.get(GRID_PARAM) else RUNS_TAB)
tab_runs, tab_grid = st.tabs([RUNS_TAB, GRID_TAB], key="runs_tab", on_change="rerun")
with tab_runs:
    all_runs_section(runs)
with tab_grid:
    grid_section(runs)
