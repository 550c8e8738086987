"""Helpers shared by every page: the run store, the job runner, run selection and error display.

Not a page (the leading underscore keeps it out of navigation). Everything here is UI glue; the
logic lives in tinygpt_core.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import streamlit as st

from tinygpt_core import limits, state
from tinygpt_core.data import load_corpus
from tinygpt_core.errors import TinyGPTError
from tinygpt_core.jobs import JobRunner, get_runner
from tinygpt_core.runs import CHECKPOINT_FILES, LoadedRun, RunStore
from tinygpt_core.state import RunState

# Query-parameter and session keys shared across pages, so a reload or a second tab finds the run.
RUN_PARAM = "run"
JOB_PARAM = "job"


@st.cache_resource
def store() -> RunStore:
    """One run store per server process (root from $TINYGPT_RUNS_DIR or ./runs)."""
    return RunStore()


def runner() -> JobRunner:
    """The process-wide job runner; a malformed operator limit stops the page with the reason."""
    try:
        return _runner()
    except TinyGPTError as exc:  # e.g. TINYGPT_MAX_JOBS_PER_DEVICE=lots: say so, not a traceback
        st.error(f"Server settings: {exc}")
        st.stop()


@st.cache_resource
def _runner() -> JobRunner:
    """The process-wide job runner, shared by every browser session.

    Held in st.cache_resource as well as in tinygpt_core.jobs: when a source file changes,
    Streamlit's file watcher re-imports tinygpt_core, and the re-imported module would hand out a
    fresh runner that no longer knows the jobs still training. Tests that reset the runner
    (jobs.reset_runner) clear st.cache_resource too."""
    return get_runner()


def kept(key: str) -> dict[str, Any]:
    """A widget's ``key`` plus what keeps its value for the whole session, across visits to other pages.

    Streamlit forgets the state of every widget a script run does not draw, which is every widget of a
    page while the user is on another one: edits came back as defaults. One line per widget keeps them:
    ``st.number_input("Layers", **kept("train_n_layer"))`` (persist_state="session", Streamlit 1.67). The
    key must be unique to its page (a key shared by two pages resets on a switch)."""
    return {"key": key, "persist_state": "session"}


def list_runs() -> list[RunState]:
    """Every run to list (on disk and this server's jobs, merged by the core), newest first."""
    return state.list_runs(store(), runner())


def run_state(run_id: str | None, job_id: str | None = None) -> RunState:
    """One run's current state, with metrics and samples; RunError when nobody knows it."""
    return state.run_state(store(), runner(), run_id, job_id)


def active_runs() -> list[RunState]:
    """The runs this server is training or has queued (from the runner alone: no disk read), newest first."""
    return state.active_runs(runner())


def openable_runs() -> list[RunState]:
    """Runs with weights to open (not broken, not still queued)."""
    return [r for r in list_runs() if r.has_weights]


def selected_run_id() -> str | None:
    return st.query_params.get(RUN_PARAM) or st.session_state.get("selected_run")


def remember_run(run_id: str | None) -> None:
    """Make a run the current one for every page, and put it in the URL."""
    st.session_state["selected_run"] = run_id
    if run_id:
        st.query_params[RUN_PARAM] = run_id


def run_picker(label: str = "Run", *, key: str) -> RunState | None:
    """A selectbox of openable runs, defaulting to the current run; None (with a hint) when there are none."""
    runs = openable_runs()
    if not runs:
        st.info("No trained runs yet. Train one on the **Train** page (or press Quick start on Home).")
        return None
    ids = [r.id for r in runs]
    current = selected_run_id()
    index = ids.index(current) if current in ids else 0
    chosen = st.selectbox(
        label,
        runs,
        index=index,
        key=key,
        format_func=lambda r: f"{r.name} · {r.status} · best val {_fmt(r.best_val_loss)}",
    )
    if chosen is not None:
        remember_run(chosen.id)
    return chosen


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def format_loss(x: float | None) -> str:
    """A loss for display: three decimals, or a dash when there is none yet."""
    return _fmt(x)


def format_count(n: int | float | None) -> str:
    """A count for display: 1.23M, 45.6k, 789, or a dash."""
    if n is None:
        return "–"
    n = float(n)
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_duration(s: float | None) -> str:
    """Seconds for display: 10.6s, 3m 05s, 1h 02m, or a dash (tenths under a minute, as the core's
    messages give them: "Finished 30 steps in 10.6 s" sits beside Time 10.6s, not 11s)."""
    if s is None or not math.isfinite(s):
        return "–"
    if round(s, 1) < 60:
        return f"{max(0.0, s):.1f}s"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def recent_runs(n: int = 5) -> list[RunState]:
    """The newest n runs on disk (broken ones included, so a user sees why they cannot open them)."""
    try:
        return list_runs()[:n]
    except TinyGPTError as exc:
        st.error(f"Cannot list runs: {exc}")
        return []


def selected_job_id() -> str | None:
    """The background job this session last started or opened (query param "job", else session)."""
    return st.query_params.get(JOB_PARAM) or st.session_state.get("selected_job")


def remember_job(job_id: str | None) -> None:
    """Remember the job being watched, in the session and the URL (a reload finds it again)."""
    st.session_state["selected_job"] = job_id
    if job_id:
        st.query_params[JOB_PARAM] = job_id
    elif JOB_PARAM in st.query_params:
        del st.query_params[JOB_PARAM]


@st.cache_resource(max_entries=4, show_spinner="Loading model…")
def _load(path: str, checkpoint: str, mtime: float) -> LoadedRun:  # mtime: reload when the weights change
    return store().load(Path(path).name, checkpoint=checkpoint)


def weights_mtime(run: RunState, checkpoint: str) -> float | None:
    """When a run's checkpoint was last written (None: not there): cache keys that follow retraining."""
    if run.path is None:
        return None
    try:
        return os.path.getmtime(run.path / CHECKPOINT_FILES[checkpoint])
    except (OSError, KeyError):
        return None


@st.cache_data(show_spinner=False, max_entries=8)
def _corpus_start(source: str) -> str | None:
    try:
        return load_corpus(source).text[:4000]
    except TinyGPTError:
        return None


def corpus_start(run: LoadedRun) -> str | None:
    """The first few thousand characters of the run's corpus (for default prompts), or None when the
    corpus cannot be read any more (an upload, a moved file)."""
    return _corpus_start(run.config.corpus.get("source") or run.config.corpus.get("name") or "")


def load_run_cached(run: RunState, checkpoint: str = "best") -> LoadedRun | None:
    """Load a run's model once per server (eval mode); shows the reason and returns None when it cannot."""
    mtime = weights_mtime(run, checkpoint)
    if mtime is None:
        st.error(f"Run **{run.name}** has no {checkpoint} checkpoint yet. Pick another checkpoint or run.")
        return None
    try:
        return _load(str(run.path), checkpoint, mtime)
    except TinyGPTError as exc:
        st.error(f"Cannot open run **{run.name}**: {exc}")
        return None


def open_run_picker(prefix: str) -> tuple[RunState, str, LoadedRun] | None:
    """The Run picker and Best/Last checkpoint radio of the model pages: (summary, checkpoint, loaded run),
    or None (with the reason shown) when there is nothing to open. ``prefix`` keeps each page's keys apart."""
    left, right = st.columns([4, 2], vertical_alignment="bottom")
    with left:
        summary = run_picker("Run", key=f"{prefix}_run")
    if summary is None:
        return None
    with right:
        checkpoint = st.radio(
            "Checkpoint",
            ["best", "last"],
            horizontal=True,
            key=f"{prefix}_checkpoint",
            format_func=lambda c: {"best": "Best val loss", "last": "Last step"}[c],
        )
    run = load_run_cached(summary, checkpoint)
    return None if run is None else (summary, checkpoint, run)


def known_symbols_only(tokenizer, prompt: str) -> str:
    """The prompt as the run's tokenizer can read it, with a warning naming what it lacks: a char
    tokenizer cannot encode unseen characters, so they are dropped; word tokenizers read them as <unk>."""
    unknown = tokenizer.unknown_symbols(prompt)
    if not unknown:
        return prompt
    listed = ", ".join(repr(u) for u in unknown[:20]) + (" …" if len(unknown) > 20 else "")
    if tokenizer.kind == "char":
        st.warning(
            f"This run's tokenizer has never seen {listed}, so they are left out of the prompt. Remove them, or "
            "pick a run trained on a corpus that contains them.",
            icon=":material/warning:",
        )
        lacking = set(unknown)
        return "".join(c for c in prompt if c not in lacking)
    st.warning(
        f"Not in this run's vocabulary, read as `<unk>`: {listed}. Use words from the training corpus.",
        icon=":material/warning:",
    )
    return prompt


@contextlib.contextmanager
def user_errors(prefix: str = ""):
    """Show a TinyGPTError as st.error (what is wrong and what to do) instead of a traceback."""
    try:
        yield
    except TinyGPTError as exc:
        st.error(f"{prefix}{exc}")


def read_only() -> bool:
    """The operator's read-only mode (TINYGPT_READ_ONLY): runs are shown, nothing is trained or deleted.

    A malformed limit variable is shown as an error and treated as read-only: the safe side."""
    try:
        return limits.current().read_only
    except TinyGPTError as exc:
        st.error(f"Server settings: {exc}")
        return True


def read_only_notice(what: str) -> bool:
    """In read-only mode, an st.info saying ``what`` is turned off and why; returns whether it is read-only."""
    if not read_only():
        return False
    st.info(f"{what} {limits.READ_ONLY_NOTE}", icon=":material/lock:")
    return True
