"""Helpers shared by every page: the run store, the job runner, run selection and error display.

Not a page (the leading underscore keeps it out of navigation). Everything here is UI glue; the
logic lives in tinygpt_core.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Any

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from tinygpt_core import checkpoints, limits, owners, state
from tinygpt_core.data import load_visitor_corpus
from tinygpt_core.errors import TinyGPTError
from tinygpt_core.jobs import JobRunner, get_runner
from tinygpt_core.runs import LoadedRun, RunStore
from tinygpt_core.sampling import special_tokens_notice
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
        path = checkpoints.weights_path(run.path, checkpoint)
        return None if path is None else os.path.getmtime(path)
    except OSError:
        return None


@st.cache_data(show_spinner=False, max_entries=8)
def _corpus_start(run_path: str, source: str) -> str | None:
    # The run's own copy first (kept for every non-built-in corpus); a path only through the visitor
    # check (TINYGPT_CORPUS_DIRS): a run made by the CLI from any file must not open that file to visitors.
    try:
        with open(Path(run_path) / "corpus.txt", encoding="utf-8") as f:
            return f.read(4000)
    except (OSError, UnicodeDecodeError):
        pass
    try:
        return load_visitor_corpus(source).text[:4000]
    except TinyGPTError:
        return None


def corpus_start(run: LoadedRun) -> str | None:
    """The first few thousand characters of the run's corpus (for default prompts), or None when the
    corpus cannot be read any more (an upload, a moved file) or is not the visitor's to read."""
    return _corpus_start(str(run.path), run.config.corpus.get("source") or run.config.corpus.get("name") or "")


def load_run_cached(run: RunState, checkpoint: str = "best") -> LoadedRun | None:
    """Load a run's model once per server (eval mode); shows the reason and returns None when it cannot."""
    mtime = weights_mtime(run, checkpoint)
    if mtime is None:
        st.error(f"Run **{md(run.name)}** has no {checkpoint} checkpoint yet. Pick another checkpoint or run.")
        return None
    try:
        return _load(str(run.path), checkpoint, mtime)
    except TinyGPTError as exc:
        st.error(f"Cannot open run **{md(run.name)}**: {md(exc)}")
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
            **kept(f"{prefix}_checkpoint"),
            format_func=lambda c: {"best": "Best val loss", "last": "Last step"}[c],
        )
    run = load_run_cached(summary, checkpoint)
    return None if run is None else (summary, checkpoint, run)


def known_symbols_only(tokenizer, prompt: str) -> str:
    """The prompt as the run's tokenizer can read it, with a warning naming what it lacks: a char
    tokenizer cannot encode unseen characters, so they are dropped; word tokenizers read them as <unk>.
    A special (chat) token typed in the prompt is said to be one hidden token (issue 12, item 6)."""
    notice = special_tokens_notice(tokenizer, prompt)
    if notice:
        st.info(md(notice), icon=":material/info:")
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
        st.error(f"{prefix}{md(exc)}")


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


# --- serving to visitors: who is here, what they may manage, escaping (issue 11) ----------------------
#
# Owner identity. A visitor is whoever holds this browser's owner token: a random secret kept in a
# cookie (OWNER_COOKIE) of the lab's own origin, so it survives a reload, a new tab and a page switch,
# and is sent only to this server. Not in the URL: a shared or bookmarked link (?run=…) must never
# hand over the right to stop or delete a run, and URLs end up in histories, screenshots and logs.
# Streamlit's st.context.cookies is read-only and read when the websocket connects, so the token is
# made on the server at the first visit, kept in the session, and written to the cookie by a tiny
# script (st.html with JavaScript); every later connection reads it back. Only its hash reaches disk
# (owners.visitor_owner). Where Streamlit's login is configured, the signed-in account is the owner.
# Clearing cookies (or a private window) makes a new visitor: their earlier runs then need the operator.

OWNER_COOKIE = "tinygpt_owner"
_OWNER_TOKEN = "_tinygpt_owner_token"
_COOKIE_WRITTEN = "_tinygpt_owner_cookie_written"
_ADMIN = "_tinygpt_is_operator"
COOKIE_MAX_AGE_S = 400 * 24 * 3600  # browsers cap cookie lifetimes at about 400 days


def _login_account() -> str | None:
    """The signed-in account (st.user's sub, else e-mail) when Streamlit's login is configured and used."""
    try:
        if not st.user.is_logged_in:
            return None
        account = st.user.get("sub") or st.user.get("email")
    except Exception:  # noqa: BLE001 - no auth configured (or an older Streamlit): no login identity
        return None
    return str(account) if account else None


def _owner_token() -> str:
    token = st.session_state.get(_OWNER_TOKEN)
    if not owners.valid_token(token):
        cookie = st.context.cookies.get(OWNER_COOKIE)
        token = cookie if owners.valid_token(cookie) else owners.new_token()
        st.session_state[_OWNER_TOKEN] = token
    return token


def visitor() -> str:
    """This browser's owner id (owners.py): the signed-in account, else the cookie-held visitor token."""
    account = _login_account()
    if account:
        return owners.user_owner(account)
    token = _owner_token()
    _write_owner_cookie(token)
    return owners.visitor_owner(token)


def _write_owner_cookie(token: str) -> None:
    """Until the browser sends the token back (st.context.cookies is read once, at connection), each
    full script run stores it in the lab's cookie with a one-line script in the sidebar (no room on
    the page; never from inside a fragment, where the sidebar is off limits). Once per run. The
    token is the visitor's own and URL-safe (owners.valid_token), so it needs no escaping."""
    if st.context.cookies.get(OWNER_COOKIE) == token:
        return
    ctx = get_script_run_ctx()
    if ctx is None or _in_fragment():
        return
    run_marker = id(ctx.cursors) if hasattr(ctx, "cursors") else None
    if st.session_state.get(_COOKIE_WRITTEN) == (run_marker, ctx.page_script_hash):
        return
    st.session_state[_COOKIE_WRITTEN] = (run_marker, ctx.page_script_hash)
    st.sidebar.html(
        f"<script>document.cookie = '{OWNER_COOKIE}={token}; Max-Age={COOKIE_MAX_AGE_S}; Path=/; "
        f"SameSite=Strict' + (location.protocol === 'https:' ? '; Secure' : '');</script>",
        unsafe_allow_javascript=True,
    )


def _in_fragment() -> bool:
    try:  # Streamlit-internal: which fragment (if any) this thread is running
        from streamlit.runtime.scriptrunner_utils.script_run_context import ThreadState

        return ThreadState.get().fragment_id is not None
    except Exception:  # noqa: BLE001 - another Streamlit: assume a full run
        return False


def is_operator() -> bool:
    """Whether this session has unlocked managing every run with TINYGPT_ADMIN_PASSWORD."""
    return bool(st.session_state.get(_ADMIN)) and owners.admin_password_set()


def run_owner(run_path: Path | str | None) -> str | None:
    return owners.read_owner(run_path) if run_path else None


def can_manage(run_path: Path | str | None) -> bool:
    """May this visitor stop, resume or delete the run in ``run_path``? (owners.can_manage decides.)"""
    return owners.can_manage(run_owner(run_path), visitor(), is_operator())


NOT_YOURS = (
    "Only whoever started this run (from their own browser) or the lab's operator can stop, resume or "
    "delete it. You can still open, compare and sample it."
)


def not_yours(key: str) -> None:
    """Say why this visitor may not manage a run, and (when TINYGPT_ADMIN_PASSWORD is set) let the
    operator unlock managing every run for this browser session. ``key`` keeps widget keys apart."""
    st.caption(NOT_YOURS)
    if not owners.admin_password_set():
        return
    with st.popover("Operator", icon=":material/admin_panel_settings:"):
        with st.form(f"_operator_form_{key}", border=False):
            password = st.text_input("Operator password", type="password", key=f"_operator_password_{key}")
            unlock = st.form_submit_button("Unlock")
        if unlock:
            if owners.admin_login(password):  # constant-time compare, rate-limited (owners.py)
                st.session_state[_ADMIN] = True
                st.rerun(scope="app")
            else:
                st.error("Wrong password (or too many tries: wait a minute).")


# What makes links (also bare "http://…", "www.…" and e-mail autolinks), images, HTML, code, emphasis, maths.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~$:@])|(?<=www)(\.)", re.IGNORECASE)


def md(text: object) -> str:
    """``text`` escaped for st.markdown and friends: names, prompts and messages a visitor typed render
    as the characters they typed (no links, images, HTML, colours or icons)."""
    escaped = _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), str(text)).replace("\n", " ")
    # Streamlit links bare addresses after markdown is parsed (escapes do not stop it): an invisible
    # word joiner inside "://" and "www." keeps them text.
    return escaped.replace("\\://", "\\:\u2060//").replace("www\\.", "www\u2060\\.")
