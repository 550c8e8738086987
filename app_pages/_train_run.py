"""The Train page's run view: one run, live while it trains (polled by fragments) and its outcome
once it has ended (not a page: the underscore keeps it out of navigation).

Everything shown comes from the core's run state (``tinygpt_core.state``: the disk and the runner's
job merged); this module only renders it.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app_pages._common import (
    RUN_PARAM,
    can_manage,
    format_count,
    format_duration,
    format_loss,
    md,
    not_yours,
    read_only,
    remember_job,
    remember_run,
    run_state,
    runner,
    user_errors,
    visitor,
)
from app_pages._live_board import live_board
from app_pages._live_chart import live_chart
from app_pages._train_form import K
from tinygpt_core import health, viz
from tinygpt_core.dynamics import induction_marks
from tinygpt_core.errors import TinyGPTError
from tinygpt_core.state import RunState

HEALTH_POLL_S = 5.0  # network health changes only at evaluations: a slower refresh of its own
POLL_S = 1.0  # refresh while a job is queued or running (the chart updates in place, keeping zoom)
SHOWN_SAMPLES = 3  # newest samples shown in full; older ones go in an expander


def load_view(job_id: str | None, run_id: str | None) -> RunState | None:
    """The run to show, from the core (live job and disk merged); None, with the reason, when unknown."""
    try:
        return run_state(run_id, job_id)
    except TinyGPTError as exc:
        if run_id:
            st.error(f"Cannot open run {md(repr(run_id))}: {md(exc)}")
        return None


def _last(df: pd.DataFrame | None, col: str) -> float | None:
    if df is None or df.empty or col not in df:
        return None
    s = df[col].dropna()
    return float(s.iloc[-1]) if len(s) else None


def run_view(job_id: str | None, run_id: str | None) -> None:
    view = load_view(job_id, run_id)
    top = st.columns([5, 1], vertical_alignment="bottom")
    with top[1]:
        if st.button("New run", icon=":material/add:", key=K + "new", width="stretch"):
            remember_job(None)
            if RUN_PARAM in st.query_params:
                del st.query_params[RUN_PARAM]
            st.rerun()
    if view is None:
        top[0].title("Train")
        st.warning("This run is not known here (it may have been deleted). Press **New run** to start one.")
        return
    top[0].title(md(view.name))
    if view.job_id and view.job_id != job_id:
        remember_job(view.job_id)  # found by run id (a reload or a second tab): keep watching that job
    if st.query_params.get(RUN_PARAM) != view.run_id:
        remember_run(view.run_id)  # found by job id: the run id goes in the URL too, so a reload finds it

    started_active = view.active

    # One fragment per tab refreshes everything live (status, chart, samples) once a second: each
    # refresh is a script run on the server that also trains, so every open tab costs CPU there.
    @st.fragment(run_every=POLL_S if started_active else None)
    def live_panel() -> None:
        v = (load_view(view.job_id, view.run_id) or view) if started_active else view
        if started_active and not v.active:
            st.rerun()  # it just ended: redraw the whole page once, without the timer
        _status(v)
        opts = st.columns([1, 1, 4])
        ppl = opts[0].toggle("Perplexity", key=K + "ppl", help="Show exp(loss): the effective number of choices.")
        log_y = opts[1].toggle("Log scale", key=K + "logy")
        opts[2].caption("Drag across the chart to zoom in, double-click to zoom out; new steps keep your zoom.")
        chart_col, sample_col = st.columns([3, 2], gap="large")
        with chart_col:
            marks = induction_marks(v.metrics)  # the step where induction heads form (dynamics), if they did
            live_chart(viz.loss_chart_data(v.metrics, perplexity=ppl, log_y=log_y, marks=marks), key=K + "loss_chart")
        with sample_col:
            live_board(samples_board(v), key=K + "samples_board")

    live_panel()
    _health_panel(view, started_active)


def _status(v: RunState) -> None:
    _alert(v)
    live_board(status_board(v), key=K + "status_board")

    if v.active:
        if v.can_stop and not can_manage(v.path):  # only the run's owner (or the operator) may stop it
            not_yours("train_stop")
        elif v.can_stop:
            if st.button("Stop", icon=":material/stop:", key=K + "stop", type="secondary"):
                with user_errors("Cannot stop: "):
                    runner().stop(v.job_id)
                st.toast("Stopping after the current step…")
        else:
            st.caption("This run is being trained by another process; stop it there.")
    else:
        _resume_button(v)
        _links(v)


def _alert(v: RunState) -> None:
    """How the run ended or why it waits, as an alert; a running run shows the board's progress bar."""
    if v.status == "queued":
        st.info(md(v.message) or "Queued: waiting for a free slot.", icon=":material/hourglass_top:")
    elif v.status == "done":
        at = f" (step {v.best_step:,})" if v.best_step is not None else ""
        st.success(
            f"**Done**: best validation loss {format_loss(v.best_val_loss)}{at}. {md(v.message)}".strip(),
            icon=":material/check_circle:",
        )
    elif v.status == "stopped":
        st.info(md(v.message) or "Stopped.", icon=":material/stop_circle:")  # the message says "Stopped at step …"
    elif v.status in ("diverged", "error", "broken"):
        st.error(f"{v.status.capitalize()}: {md(v.message or 'no message')}")
    elif v.status == "interrupted":
        st.warning(
            f"Interrupted: {md(v.message or 'the process training it ended.')} "
            "Resume it from its last checkpoint, or start a new run."
        )
    elif v.status != "running":
        st.info(f"{v.status}: {md(v.message)}")


def status_board(v: RunState) -> dict:
    """The live board's progress bar (while running), metric cards and facts line for ``v``."""
    progress = None
    if v.status == "running":
        text = v.message or f"Step {v.step:,}" + (f" of {v.max_iters:,}" if v.max_iters else "")
        progress = dict(fraction=min(1.0, v.step / v.max_iters) if v.max_iters else 0.0, text=text)
    metrics = [
        dict(label="Step", value=f"{v.step:,}", sub=f"/ {v.max_iters:,}" if v.max_iters else None),
        dict(label="Train loss", value=format_loss(_last(v.metrics, "train_loss"))),
        dict(label="Val loss", value=format_loss(_last(v.metrics, "val_loss"))),
        dict(
            label="Best val",
            value=format_loss(v.best_val_loss),
            help=f"at step {v.best_step:,}" if v.best_step is not None else None,
        ),
        dict(
            label="Tokens/s",
            value=format_count(v.tokens_per_s),
            help="Tokens trained per second of wall-clock time, evaluations included (recently, while it trains).",
        ),
        dict(label="ETA", value=format_duration(v.eta_s), help=f"Elapsed {format_duration(v.elapsed_s)}")
        if v.active
        else dict(label="Time", value=format_duration(v.elapsed_s)),
    ]
    accuracy = _last(v.metrics, "chat_accuracy")  # a chat run: exact match on held-out prompts at its last eval
    facts = [
        f"held-out exact match {accuracy:.0%}" if accuracy is not None else None,
        f"{format_count(v.params)} parameters" if v.params else None,
        f"on {v.device}" if v.device else None,
        f"run {v.run_id}",
    ]
    return dict(progress=progress, metrics=metrics, facts=" · ".join(x for x in facts if x))


def samples_board(v: RunState) -> dict:
    """The newest samples in full, older ones (up to 20) folded into one block."""
    newest = sorted(v.samples or [], key=lambda s: s["step"], reverse=True)
    shown = [dict(title=f"step {s['step']:,}", text=s["text"]) for s in newest[:20]]
    older = shown[SHOWN_SAMPLES:]
    return dict(
        heading="What it writes (a sample at each evaluation, newest first)",
        empty="No samples yet: the first one comes with the first evaluation.",
        samples=shown[:SHOWN_SAMPLES],
        older=dict(label=f"{len(newest) - SHOWN_SAMPLES} older samples", samples=older) if older else None,
    )


def _resume_button(v: RunState) -> None:
    """A stopped or interrupted run continues from its last checkpoint, in a background job like any run."""
    if not v.can_resume or read_only():
        return
    if not can_manage(v.path):  # only the run's owner (or the operator) may resume it
        not_yours("train_resume")
        return
    if st.button(
        "Resume",
        icon=":material/play_arrow:",
        key=K + "resume",
        type="primary",
        help="Continue from the last checkpoint (weights, optimizer and data order), up to its max_iters.",
    ):
        job_id = None
        with user_errors("Cannot resume: "):
            job_id = runner().resume(v.run_id, owner=visitor())
        if job_id is not None:
            remember_job(job_id)
            remember_run(v.run_id)
            st.rerun()


def _links(v: RunState) -> None:
    cols = st.columns(4)
    if v.has_weights:
        with cols[0]:
            st.page_link(
                "app_pages/attention.py",
                label="Open in Attention",
                icon=":material/grid_on:",
                query_params={RUN_PARAM: v.run_id},
            )
        with cols[1]:
            st.page_link(
                "app_pages/sampling.py",
                label="Sample from it",
                icon=":material/casino:",
                query_params={RUN_PARAM: v.run_id},
            )
    with cols[2]:
        st.page_link(
            "app_pages/runs.py",
            label="Compare in Runs",
            icon=":material/stacked_line_chart:",
            query_params={RUN_PARAM: v.run_id},
        )


def _health_panel(view: RunState, started_active: bool) -> None:
    """Network health per layer at each evaluation (tinygpt_core.health), and what looks wrong, in words.

    Its own fragment, refreshed every HEALTH_POLL_S while the run trains: health changes only at an
    evaluation, so it need not redraw with the live chart. Runs from before health was logged have none,
    and nothing is drawn for them."""

    @st.fragment(run_every=HEALTH_POLL_S if started_active else None)
    def health_panel() -> None:
        v = (load_view(view.job_id, view.run_id) or view) if started_active else view
        long = health.health_frame(v.metrics)
        if long.empty:
            if v.active:
                st.caption("Network health (gradient norm, update size, activation RMS per layer) with each eval.")
            return
        st.markdown("**Network health** per layer, at each evaluation")
        for note in health.diagnose(v.metrics):
            st.warning(md(note), icon=":material/monitor_heart:")
        for col, metric in zip(st.columns(len(viz.HEALTH_TITLES)), viz.HEALTH_TITLES, strict=True):
            with col:
                live_chart(viz.health_chart_data(long, metric), key=K + "health_" + metric)

    health_panel()


# --- page ------------------------------------------------------------------------------------------
