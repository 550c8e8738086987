"""TinyGPT Lab's entry point: `streamlit run app.py`.

Routes to the pages with st.navigation, sets up the process once (torch threads, through the core)
and draws the Home page: the device in use, what the lab can do, a one-click quick start and the
recent runs. All logic lives in tinygpt_core; this file only places widgets, and imports nothing
slow (no torch) before the navigation is drawn.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

# A local icon: a ":material/…:" icon would make every visitor's browser fetch it from a font host.
st.set_page_config(
    page_title="TinyGPT Lab", layout="wide", page_icon=str(Path(__file__).parent / "assets" / "favicon.png")
)

# (file, nav title, icon, one line for Home). Order is the nav order after Home.
PAGES: list[tuple[str, str, str, str]] = [
    (
        "app_pages/train.py",
        "Train",
        ":material/model_training:",
        "Train a tiny GPT live: watch train and validation loss move, and read what it writes as it learns.",
    ),
    (
        "app_pages/runs.py",
        "Runs & ablations",
        ":material/stacked_line_chart:",
        "Compare runs on disk, overlay their curves and launch a grid of ablations against a baseline.",
    ),
    (
        "app_pages/attention.py",
        "Attention",
        ":material/grid_on:",
        "Open any layer and head and see what each token attends to in your own text.",
    ),
    (
        "app_pages/inspect.py",
        "Inspect",
        ":material/biotech:",
        "Look inside a run: each token's loss, what every layer predicts (logit lens), which heads matter (knockout).",
    ),
    (
        "app_pages/sampling.py",
        "Sampling",
        ":material/casino:",
        "Decode one model with greedy, sampling and beam search side by side; see what top-k/top-p cut.",
    ),
    (
        "app_pages/chat.py",
        "Chat",
        ":material/chat:",
        "Fine-tune a run on conversations and talk to it, beside the model it started from.",
    ),
    (
        "app_pages/tokenizers.py",
        "Tokenizers",
        ":material/text_fields:",
        "Run one text through char, word and BPE tokenizers and step through the BPE merges.",
    ),
]


@st.cache_resource
def _configure_threads_once() -> int:
    """torch's thread count is process-wide: the core sets it once per server ($TINYGPT_NUM_THREADS, else
    one thread: ``device.SERVER_THREADS`` says why)."""
    from tinygpt_core.device import SERVER_THREADS, configure_threads

    return configure_threads(default=SERVER_THREADS)


@st.cache_resource
def _freeze_startup_objects() -> None:
    """Make full garbage collections cheap (once per server process).

    A full collection walks every tracked object: with torch, pandas and plotly loaded, ~250k of
    them, 0.1-0.3 s holding the interpreter lock. Streamlit used to force one after every script run
    (runner.postScriptGC, now off in .streamlit/config.toml): three times a second for each tab
    watching a run, which starved everything else in the server. Python still runs full collections
    now and then; ``gc.freeze`` moves what is loaded by now (plotly's lazily built validators
    included, by drawing one figure) into a generation the collector skips. Later objects are still
    collected."""
    import gc

    from tinygpt_core import viz

    viz.overlay_figure({}).to_json()  # loads plotly's figure machinery before the freeze
    gc.collect()
    gc.freeze()


# The Home page's one-click demos: (button key, label, preset, run name, what to watch). Both train on
# builtin:tiny; what each preset is lives in its description (tinygpt_core.config.PRESETS).
QUICK_STARTS = (
    (
        "quick_start",
        "Quick start",
        "tiny",
        "quick-start",
        "a char-level model in seconds; watch the val curve part from the train curve.",
    ),
    (
        "quick_overfit",
        "Overfit demo",
        "overfit",
        "overfit",
        "word-level, dropout 0.2, under a minute on a CPU; watch train loss fall under 0.3 while val loss "
        "bottoms out early and then climbs: memorising, not learning.",
    ),
)


def home() -> None:
    # Imported here so the navigation itself never fails on a core import problem.
    from app_pages._common import (
        format_loss,
        md,
        read_only,
        recent_runs,
        remember_job,
        remember_run,
        runner,
        user_errors,
        visitor,
    )
    from tinygpt_core.device import device_info
    from tinygpt_core.training import TrainSpec

    st.title("TinyGPT Lab")
    st.caption("Train tiny GPT-style transformers live, look inside them, and switch their parts off.")

    info = device_info()
    left, right = st.columns([3, 2], gap="large")
    with right:
        with st.container(border=True):
            st.markdown("**Device**")
            if info.kind == "cuda":
                st.markdown(f":material/memory: GPU **{info.name}** · {info.memory_gb:.0f} GB")
            elif info.kind == "mps":
                st.markdown(":material/memory: Apple GPU (MPS)")
            else:
                s = "" if info.threads == 1 else "s"
                st.markdown(f":material/memory: CPU **{info.name}** · {info.threads} torch thread{s}")
            st.caption("Runs train here when their device is *auto* (a GPU is used whenever there is one).")

        with st.container(border=True):
            st.markdown("**Quick start**")
            if read_only():
                st.info(
                    "Training is turned off on this server (read-only mode): open the runs below instead.",
                    icon=":material/lock:",
                )
            started = None
            for key, label, preset, name, watch in QUICK_STARTS:
                st.caption(f"**{label}** (*{preset}* preset on builtin:tiny): {watch}")
                if not read_only() and st.button(
                    label,
                    type="primary" if key == "quick_start" else "secondary",
                    icon=":material/play_arrow:",
                    key=key,
                ):
                    started = (preset, name)
            if started is not None:
                job_id = None
                with user_errors("Could not start the quick-start run: "):
                    job_id = runner().submit(
                        TrainSpec.from_preset(started[0], "builtin:tiny", name=started[1]), owner=visitor()
                    )
                if job_id is not None:
                    snap = runner().state(job_id)
                    remember_job(job_id)
                    if snap.run_id:
                        remember_run(snap.run_id)
                    params = {"job": job_id}
                    if snap.run_id:
                        params["run"] = snap.run_id
                    st.switch_page("app_pages/train.py", query_params=params)

    with left:
        st.subheader("What you can do here")
        for path, title, icon, line in PAGES:
            name_col, line_col = st.columns([1.4, 3], vertical_alignment="center")
            with name_col:
                st.page_link(path, label=f"**{title}**", icon=icon)
            line_col.markdown(line)

    st.subheader("Recent runs")
    runs = recent_runs(5)
    if not runs:
        st.info("No runs yet. Press **Quick start** or go to **Train**.")
        return
    for r in runs:
        with st.container(border=True):
            c1, c2, c3 = st.columns([3, 2, 3])
            c1.markdown(f"**{md(r.name)}**" + (f"  \n`{r.id}`" if r.id != r.name else ""))
            extra = f" · {', '.join(r.ablations)}" if r.ablations else ""
            c1.caption(f"{md(r.preset or 'custom')} · {md(r.corpus or '?')} · {r.tokenizer or '?'}{extra}")
            steps = f"{r.step}/{r.max_iters}" if r.max_iters else str(r.step)
            c2.markdown(f"{_status_badge(r.status)}  \nbest val **{format_loss(r.best_val_loss)}** · step {steps}")
            with c3:
                links = st.columns(3)
                links[0].page_link(
                    "app_pages/train.py", label="Open", icon=":material/open_in_new:", query_params={"run": r.id}
                )
                if r.has_weights:
                    links[1].page_link(
                        "app_pages/attention.py",
                        label="Attention",
                        icon=":material/grid_on:",
                        query_params={"run": r.id},
                    )
                    links[2].page_link(
                        "app_pages/sampling.py", label="Sample", icon=":material/casino:", query_params={"run": r.id}
                    )
    st.page_link("app_pages/runs.py", label="All runs", icon=":material/stacked_line_chart:")


def _status_badge(status: str) -> str:
    colour = {
        "done": "green",
        "running": "blue",
        "queued": "gray",
        "stopped": "orange",
        "diverged": "red",
        "error": "red",
        "interrupted": "orange",
        "broken": "red",
    }.get(status, "gray")
    return f":{colour}-badge[{status}]"


# The sidebar shows this navigation, and nothing else, from the first frame, whichever page a visitor
# opens first. The page scripts live in app_pages/, not pages/: a folder named `pages` beside the entry
# script makes Streamlit run a fresh server's first session as an old-style multipage app, which runs
# the requested page's file directly (no app.py, so no navigation at all on a shared /train?run=… link)
# or lists every file of the folder until st.navigation runs (tests/test_browser_nav.py).
nav = st.navigation(
    [st.Page(home, title="Home", icon=":material/home:", default=True)]
    + [st.Page(path, title=title, icon=icon) for path, title, icon, _ in PAGES]
)
try:
    _configure_threads_once()
except Exception as exc:  # noqa: BLE001 - e.g. a malformed TINYGPT_NUM_THREADS: say so on every page
    st.error(f"Server settings: {exc}")
_freeze_startup_objects()  # after the navigation is drawn: it imports plotly and pandas
nav.run()
