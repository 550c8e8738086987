"""Train page: choose a corpus, tokenizer and model, start a background job, and watch it learn.

Two views on one page. Without a run in the URL it shows the setup (corpus, tokenizer, preset or
sizes, ablations, training and speed settings, estimates, Start). With ?run=… (and ?job=… when
this server process runs it) it shows that run: live while it trains (polled by fragments), and
its outcome once it has ended. Training itself happens in tinygpt_core.jobs, never in this script.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import streamlit as st
import torch

from pages._common import (
    JOB_PARAM,
    RUN_PARAM,
    format_loss,
    read_only,
    read_only_notice,
    remember_job,
    remember_run,
    runner,
    store,
    user_errors,
)
from tinygpt_core import limits, viz
from tinygpt_core.config import PRESETS, ModelConfig, TrainConfig, get_preset
from tinygpt_core.data import Corpus, corpus_from_bytes, list_builtin_corpora
from tinygpt_core.errors import TinyGPTError
from tinygpt_core.model import GPT
from tinygpt_core.runs import read_metrics, read_samples, read_status
from tinygpt_core.training import TrainSpec

K = "train_"  # prefix of every widget key on this page (session_state is shared by all pages)
SOURCES = ("Built-in", "Upload a .txt file", "File on the server")
TOKENIZER_HELP = {
    "char": "one token per character: tiny vocabulary, long sequences",
    "word": "one token per word or punctuation mark: large vocabulary",
    "bpe": "byte-level BPE: merges frequent byte pairs up to the vocabulary size",
}
POLL_S = 0.5  # status refresh while a job is queued or running
CHART_POLL_S = 1.0  # the chart remounts on every refresh (zoom resets), so a little slower
SHOWN_SAMPLES = 3  # newest samples shown in full; older ones go in an expander
# Form fields a preset does not set, with their starting values.
OTHER_FIELDS: dict[str, Any] = {
    "source": SOURCES[0],
    "builtin": "tiny",
    "path": "",
    "name": "",
    "device": "auto",
    "precision": "auto",
    "compile": False,
}
# Session keys that are not widgets (no page prefix, so they never look like form fields).
LAST_FORM = "trainpage_last_form"  # the last form submitted, restored when the setup view comes back
ESTIMATES = "trainpage_estimates"  # measured seconds per step, by configuration


# --- setup: defaults and form state ----------------------------------------------------------------


def preset_defaults(name: str) -> dict[str, Any]:
    """The widget values a preset stands for (keys without the page prefix)."""
    p = get_preset(name)
    m, t = p.model_config(), p.train_config()
    return {
        "tokenizer": p.tokenizer,
        "vocab": p.tokenizer_vocab_size or 512,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_embd": m.n_embd,
        "block_size": m.block_size,
        "ff_mult": m.ff_mult,
        "dropout": float(m.dropout),
        "no_ln": not m.use_layernorm,
        "no_res": not m.use_residual,
        "pos": m.pos_encoding,
        "post_norm": m.norm_position == "post",
        "swap_qk": m.swap_qk,
        "window_on": m.attn_window is not None,
        "window": m.attn_window or 16,
        "relu": m.activation == "relu",
        "untied": not m.tie_weights,
        "no_bias": not m.bias,
        "max_iters": t.max_iters,
        "batch_size": t.batch_size,
        "lr": float(t.lr),
        "eval_interval": t.eval_interval,
        "seed": t.seed,
        "patience": t.early_stop_patience or 0,
        "stop_val": float(t.stop_at_val_loss or 0.0),
        "grad_clip": float(t.grad_clip),
        "warmup": t.warmup_iters,
    }


def _apply_preset() -> None:
    """on_change of the preset box: every setting the preset defines takes the preset's value."""
    for k, v in preset_defaults(st.session_state[K + "preset"]).items():
        st.session_state[K + k] = v


def _init_form() -> None:
    """Give each widget its starting value once (from the last submitted form, else the preset).

    Widgets get their value only through session_state (no value= argument), so the preset's
    on_change can overwrite them."""
    last = st.session_state.get(LAST_FORM, {})
    st.session_state.setdefault(K + "preset", last.get("preset", "tiny"))
    for k, v in preset_defaults(st.session_state[K + "preset"]).items():
        st.session_state.setdefault(K + k, last.get(k, v))
    for k, v in OTHER_FIELDS.items():
        st.session_state.setdefault(K + k, last.get(k, v))


def _form_values() -> dict[str, Any]:
    """The setup form as a plain dict (keys without the page prefix)."""
    keys = [*preset_defaults("tiny"), *OTHER_FIELDS, "preset"]
    return {k: st.session_state.get(K + k) for k in keys}


def model_overrides(f: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from the form (vocab_size is filled in from the tokenizer at training time)."""
    return dict(
        n_layer=int(f["n_layer"]),
        n_head=int(f["n_head"]),
        n_embd=int(f["n_embd"]),
        block_size=int(f["block_size"]),
        ff_mult=int(f["ff_mult"]),
        dropout=float(f["dropout"]),
        use_layernorm=not f["no_ln"],
        use_residual=not f["no_res"],
        pos_encoding=f["pos"],
        norm_position="post" if f["post_norm"] else "pre",
        swap_qk=bool(f["swap_qk"]),
        attn_window=int(f["window"]) if f["window_on"] else None,
        activation="relu" if f["relu"] else "gelu",
        tie_weights=not f["untied"],
        bias=not f["no_bias"],
    )


def train_overrides(f: dict[str, Any]) -> dict[str, Any]:
    return dict(
        max_iters=int(f["max_iters"]),
        batch_size=int(f["batch_size"]),
        lr=float(f["lr"]),
        eval_interval=int(f["eval_interval"]),
        seed=int(f["seed"]),
        early_stop_patience=int(f["patience"]) or None,
        stop_at_val_loss=float(f["stop_val"]) or None,
        grad_clip=float(f["grad_clip"]),
        warmup_iters=int(f["warmup"]),
        device=f["device"],
        precision=f["precision"],
        compile=bool(f["compile"]),
    )


def corpus_from_upload(uploaded) -> Corpus | None:
    """Decode an uploaded file (size cap, UTF-8 check); st.error and None when it cannot be used."""
    if uploaded is None:
        return None
    try:
        return corpus_from_bytes(uploaded.name, uploaded.getvalue(), max_bytes=limits.current().max_upload_bytes)
    except TinyGPTError as exc:
        st.error(str(exc))
        return None


@st.cache_data(max_entries=64, show_spinner=False)
def _param_count(model_json: str) -> int:
    # Built on the meta device: counts the parameters without allocating them.
    with torch.device("meta"):
        return GPT(ModelConfig.from_dict(json.loads(model_json))).num_params()


def _fmt_int(n: int | float | None) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "–"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


# --- setup view --------------------------------------------------------------------------------------


def setup_view() -> None:
    _init_form()
    st.title("Train a tiny GPT")
    _active_jobs_banner()
    if read_only_notice("Training is turned off here."):
        return

    corpus_col, model_col = st.columns(2, gap="large")
    with corpus_col:
        corpus = _corpus_section()
        _tokenizer_section()
    with model_col:
        _model_section()
    _ablation_section()
    _training_section()

    f = _form_values()
    model_cfg, train_cfg = _check_configs(f)
    _estimates(f, model_cfg, train_cfg, corpus)

    ready = model_cfg is not None and train_cfg is not None and corpus is not None
    name_col, start_col = st.columns([3, 1], vertical_alignment="bottom")
    name_col.text_input(
        "Run name (optional)",
        key=K + "name",
        max_chars=60,
        placeholder="e.g. no-layernorm-test",
        help="Shown in the runs list; the run folder gets this name plus the date and time.",
    )
    clicked = start_col.button(
        "Start training",
        type="primary",
        icon=":material/play_arrow:",
        key=K + "start",
        disabled=not ready,
        width="stretch",
    )
    if clicked:
        _start(f, corpus)
    elif corpus is None:
        st.caption("Pick a corpus above to start.")


def _active_jobs_banner() -> None:
    """Jobs training right now on this server (from any browser session), each with a link to watch it."""
    try:
        jobs = [j for j in runner().list_jobs() if not j.finished]
    except TinyGPTError:
        return
    for j in jobs[:5]:
        with st.container(border=True):
            c1, c2 = st.columns([4, 1], vertical_alignment="center")
            what = j.message if j.status == "queued" else f"step {j.step}/{j.max_iters}"
            c1.markdown(f":material/progress_activity: **{j.name}** is {j.status} on {j.device} · {what}")
            c2.page_link(
                "pages/train.py",
                label="Watch",
                icon=":material/visibility:",
                query_params={RUN_PARAM: j.run_id, JOB_PARAM: j.id},
            )


def _corpus_section() -> Corpus | str | None:
    """The corpus to train on: "builtin:NAME", a server path, an uploaded Corpus; None when not usable."""
    st.subheader("Corpus")
    source = st.radio("Source", SOURCES, key=K + "source", horizontal=True, label_visibility="collapsed")
    if source == SOURCES[0]:
        builtins = dict(list_builtin_corpora())
        if st.session_state.get(K + "builtin") not in builtins:
            st.session_state[K + "builtin"] = next(iter(builtins))
        name = st.selectbox("Built-in corpus", list(builtins), key=K + "builtin", format_func=lambda n: f"builtin:{n}")
        st.caption(builtins[name])
        return f"builtin:{name}"
    if source == SOURCES[1]:
        mb = limits.current().max_upload_mb  # TINYGPT_MAX_UPLOAD_MB; checked again on the bytes received
        uploaded = st.file_uploader(
            f"A UTF-8 text file (up to {mb} MB)", type=["txt"], key=K + "upload", max_upload_size=mb
        )
        corpus = corpus_from_upload(uploaded)
        if corpus is not None:
            st.caption(f"{corpus.name}: {corpus.chars:,} characters.")
        return corpus
    path = st.text_input("Path of a UTF-8 text file on the server", key=K + "path", placeholder="/data/my_corpus.txt")
    if not path.strip():
        return None
    return path.strip()


def _tokenizer_section() -> None:
    st.subheader("Tokenizer")
    kind = st.radio(
        "Tokenizer", list(TOKENIZER_HELP), key=K + "tokenizer", horizontal=True, label_visibility="collapsed"
    )
    st.caption(TOKENIZER_HELP[kind])
    if kind in ("bpe", "word"):
        st.number_input(
            "Vocabulary size",
            min_value=16,
            max_value=50_000,
            step=64,
            key=K + "vocab",
            help="BPE: the target size after merges. Word: the most frequent words kept "
            "(the rest share one unknown token).",
        )


def _model_section() -> None:
    st.subheader("Model")
    preset = st.selectbox(
        "Preset",
        list(PRESETS),
        key=K + "preset",
        on_change=_apply_preset,
        help="Picking a preset fills in every setting below; change any of them after.",
    )
    st.caption(PRESETS[preset].description)
    c = st.columns(3)
    c[0].number_input("Layers", 1, 48, step=1, key=K + "n_layer", help="Transformer blocks (n_layer).")
    c[1].number_input(
        "Heads", 1, 64, step=1, key=K + "n_head", help="Attention heads per block; must divide the width."
    )
    c[2].number_input("Width", 8, 4096, step=8, key=K + "n_embd", help="Residual stream width (n_embd).")
    c = st.columns(3)
    c[0].number_input(
        "Context",
        2,
        8192,
        step=8,
        key=K + "block_size",
        help="Block size: the longest context the model sees, in tokens.",
    )
    c[1].number_input("MLP multiplier", 1, 16, step=1, key=K + "ff_mult", help="MLP hidden width = this × width.")
    c[2].number_input("Dropout", 0.0, 0.9, step=0.05, key=K + "dropout", format="%.2f")


ABLATIONS: list[tuple[str, str, str]] = [
    (
        "no_ln",
        "No LayerNorm",
        "Removes the normalisation that keeps activations in range; expect slower or unstable training.",
    ),
    (
        "no_res",
        "No residual connections",
        "Removes the skip paths around attention and MLP: each block must carry everything forward; deep models stall.",
    ),
    (
        "post_norm",
        "Post-norm (original Transformer)",
        "Normalises after adding each branch instead of before it; less stable without warm-up.",
    ),
    (
        "swap_qk",
        "Swap Q and K",
        "Queries use the key projection and keys the query projection; attention stops being what it learned.",
    ),
    ("relu", "ReLU instead of GELU", "The MLP uses the older, sharper ReLU non-linearity."),
    (
        "untied",
        "Untied embeddings",
        "The output layer gets its own matrix instead of sharing the token embeddings: more parameters.",
    ),
    ("no_bias", "No biases", "Removes the bias terms of every linear and LayerNorm layer (as in many modern LLMs)."),
]
POS_HELP = {
    "learned": "a learned vector per position (GPT-2)",
    "sinusoidal": "fixed sine/cosine waves (original Transformer): nothing to learn",
    "none": "no position information at all: only the causal mask tells tokens apart by order",
}


def _ablation_section() -> None:
    with st.expander("Ablations: switch parts of the architecture off", icon=":material/science:"):
        cols = st.columns(2, gap="large")
        for i, (key, label, explanation) in enumerate(ABLATIONS):
            cols[i % 2].toggle(label, key=K + key, help=explanation)
            cols[i % 2].caption(explanation)
        with cols[len(ABLATIONS) % 2]:
            pos = st.radio("Positional encoding", list(POS_HELP), key=K + "pos", horizontal=True)
            st.caption(POS_HELP[pos])
        with cols[(len(ABLATIONS) + 1) % 2]:
            on = st.toggle(
                "Local attention window",
                key=K + "window_on",
                help="Each token attends only to the last N tokens (itself included).",
            )
            if on:
                st.number_input("Window (tokens)", 1, 8192, step=1, key=K + "window")
            st.caption("Limits how far back each token can look; long-range patterns become impossible to learn.")


def _training_section() -> None:
    with st.expander("Training settings", icon=":material/tune:", expanded=True):
        c = st.columns(4)
        c[0].number_input("Steps (max_iters)", 1, 1_000_000, step=50, key=K + "max_iters")
        c[1].number_input("Batch size", 1, 4096, step=4, key=K + "batch_size")
        c[2].number_input(
            "Learning rate",
            1e-6,
            1.0,
            step=1e-4,
            format="%.1e",
            key=K + "lr",
            help="Peak learning rate, after warm-up; cosine decay to a tenth of it.",
        )
        c[3].number_input(
            "Eval every (steps)",
            1,
            1_000_000,
            step=25,
            key=K + "eval_interval",
            help="Estimate train and val loss and write a sample every this many steps.",
        )
        c = st.columns(4)
        c[0].number_input("Seed", 0, 2**31 - 1, step=1, key=K + "seed")
        c[1].number_input(
            "Early-stop patience (0 = off)",
            0,
            10_000,
            step=1,
            key=K + "patience",
            help="Stop after this many evals without a better validation loss.",
        )
        c[2].number_input("Stop at val loss (0 = off)", 0.0, 100.0, step=0.1, format="%.3f", key=K + "stop_val")
        c[3].number_input(
            "Grad clip (0 = off)",
            0.0,
            100.0,
            step=0.5,
            format="%.2f",
            key=K + "grad_clip",
            help="Clips the gradient norm; protects against sudden jumps in the loss.",
        )
        c = st.columns(4)
        c[0].number_input("Warm-up steps", 0, 1_000_000, step=10, key=K + "warmup")
        c[1].selectbox(
            "Device",
            ["auto", "cpu", "cuda", "mps"],
            key=K + "device",
            help="auto: the GPU when there is one, else the CPU.",
        )
        c[2].selectbox(
            "Precision",
            ["auto", "fp32", "bf16"],
            key=K + "precision",
            help="auto: bf16 on GPUs that support it, else fp32.",
        )
        with c[3]:
            st.toggle(
                "torch.compile",
                key=K + "compile",
                help="Compiles the model first: faster steps on a GPU after a slow start.",
            )


def _check_configs(f: dict[str, Any]) -> tuple[ModelConfig | None, TrainConfig | None]:
    """Validate the sizes and settings as they are typed, so mistakes show before Start."""
    model_cfg = train_cfg = None
    try:
        cfg = get_preset(f["preset"]).model_config(**model_overrides(f)).validate()
        # The server's TINYGPT_MAX_PARAMS, on the vocabulary the form asks for (the runner checks the real one).
        vocab = int(f["vocab"]) if f["tokenizer"] in ("bpe", "word") else cfg.vocab_size
        limits.check_params(_param_count(json.dumps({**cfg.to_dict(), "vocab_size": vocab}, sort_keys=True)))
        model_cfg = cfg
    except TinyGPTError as exc:
        st.error(f"Model: {exc}")
    try:
        cfg = get_preset(f["preset"]).train_config(**train_overrides(f)).validate()
        limits.check_max_iters(cfg.max_iters)  # TINYGPT_MAX_ITERS
        train_cfg = cfg
    except TinyGPTError as exc:
        st.error(f"Training: {exc}")
    return model_cfg, train_cfg


def _estimates(
    f: dict[str, Any], model_cfg: ModelConfig | None, train_cfg: TrainConfig | None, corpus: Corpus | str | None
) -> None:
    if model_cfg is None or train_cfg is None:
        return
    vocab = int(f["vocab"]) if f["tokenizer"] in ("bpe", "word") else model_cfg.vocab_size
    approx = "≈ " if f["tokenizer"] == "char" else "≤ "  # char: the vocabulary is the corpus's own characters
    sized = ModelConfig.from_dict({**model_cfg.to_dict(), "vocab_size": vocab})
    params = _param_count(json.dumps(sized.to_dict(), sort_keys=True))
    c1, c2, c3 = st.columns([1, 1, 2], vertical_alignment="center")
    c1.metric(
        "Parameters",
        f"{approx}{_fmt_int(params)}",
        help="Counted on a model built without memory; the exact vocabulary comes from the tokenizer.",
    )
    key = json.dumps([sized.to_dict(), train_cfg.to_dict()], sort_keys=True)
    est = st.session_state.get(ESTIMATES, {})
    if c3.button(
        "Estimate time",
        icon=":material/timer:",
        key=K + "estimate",
        help="Runs a few training steps on random data with these settings, in a training process "
        "like the run's own (same torch threads), so it holds while the run is watched.",
    ):
        with st.spinner("Timing a few steps…"), user_errors("Cannot estimate: "):
            spec = TrainSpec(
                corpus="builtin:tiny",
                model=sized,
                train=train_cfg,
                tokenizer=f["tokenizer"],
                tokenizer_vocab_size=int(f["vocab"]) if f["tokenizer"] != "char" else None,
            )
            est = {key: runner().estimate_step_time(spec)}
            st.session_state[ESTIMATES] = est
    if key in est:
        per_step = est[key]
        c2.metric(
            "Time",
            f"{per_step * 1000:.0f} ms/step",
            help=f"About {_fmt_duration(per_step * train_cfg.max_iters)} for {train_cfg.max_iters} steps, "
            "plus evaluation.",
        )
        c3.caption(
            f"≈ {_fmt_duration(per_step * train_cfg.max_iters)} for {train_cfg.max_iters:,} steps (plus evals and "
            "a second or two to start), timed in a training process like the run's; other runs training at "
            "the same time share the cores."
        )
    else:
        c2.metric("Time", "–", help="Press Estimate time.")


def _build_spec(f: dict[str, Any], corpus: Corpus | str) -> TrainSpec:
    preset = get_preset(f["preset"])
    return TrainSpec(
        corpus=corpus,
        model=preset.model_config(**model_overrides(f)),
        train=preset.train_config(**train_overrides(f)),
        tokenizer=f["tokenizer"],
        tokenizer_vocab_size=int(f["vocab"]) if f["tokenizer"] in ("bpe", "word") else None,
        name=(f.get("name") or "").strip() or None,
        preset=f["preset"],
    )


def _start(f: dict[str, Any], corpus: Corpus | str) -> None:
    """Submit the job (the runner validates first: a bad spec writes nothing) and switch to its view."""
    job_id = None
    with st.spinner("Checking the corpus and settings…"), user_errors("Cannot start: "):
        job_id = runner().submit(_build_spec(f, corpus))
    if job_id is None:
        return
    st.session_state[LAST_FORM] = {k: v for k, v in f.items() if k not in ("source", "path", "name")}
    snap = runner().snapshot(job_id)
    remember_job(job_id)
    remember_run(snap.run_id)
    st.rerun()


# --- run view (live or finished) ---------------------------------------------------------------------


@dataclass
class RunView:
    """What the run view shows, from the live job when this process runs it, else from the run folder."""

    run_id: str
    name: str
    status: str
    message: str
    step: int = 0
    max_iters: int | None = None
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    samples: list[dict] = field(default_factory=list)
    tokens_per_s: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    params: int | None = None
    device: str | None = None
    job_id: str | None = None  # set when the runner of this process has the job (it can be stopped)
    has_weights: bool = False

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")


def load_view(job_id: str | None, run_id: str | None) -> RunView | None:
    """The run to show: the live job if this process has it (by job id, else by run id), else the disk."""
    snap = None
    if job_id:
        try:
            snap = runner().snapshot(job_id)
        except TinyGPTError:
            snap = None
    if snap is None and run_id:
        snap = runner().find_by_run(run_id)
    if snap is not None:
        return RunView(
            run_id=snap.run_id or "",
            name=snap.name,
            status=snap.status,
            message=snap.message,
            step=snap.step,
            max_iters=snap.max_iters,
            metrics=snap.metrics_frame(),
            samples=snap.samples,
            tokens_per_s=snap.tokens_per_s,
            elapsed_s=snap.elapsed_s,
            eta_s=snap.eta_s,
            best_val_loss=snap.best_val_loss,
            best_step=snap.best_step,
            params=snap.params,
            device=snap.device,
            job_id=snap.id,
            has_weights=bool(snap.run_dir and (snap.run_dir / "model.safetensors").exists()),
        )
    if not run_id:
        return None
    try:
        summary = store().summary(run_id)
    except TinyGPTError as exc:
        st.error(f"Cannot open run {run_id!r}: {exc}")
        return None
    status = read_status(summary.path)
    try:
        metrics = read_metrics(summary.path)
    except TinyGPTError:
        metrics = pd.DataFrame()
    return RunView(
        run_id=summary.id,
        name=summary.name,
        status=summary.status,
        message=summary.message or status.message,
        step=summary.steps,
        max_iters=summary.max_iters,
        metrics=metrics,
        samples=read_samples(summary.path),
        elapsed_s=summary.elapsed_s,
        best_val_loss=summary.best_val_loss,
        best_step=summary.best_step,
        params=summary.params,
        has_weights=summary.broken_reason is None and (summary.path / "model.safetensors").exists(),
        tokens_per_s=_last(metrics, "tokens_per_s"),
    )


def _last(df: pd.DataFrame, col: str) -> float | None:
    if df.empty or col not in df:
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
    top[0].title(view.name)
    if view.job_id and view.job_id != job_id:
        remember_job(view.job_id)  # found by run id (a reload or a second tab): keep watching that job

    started_active = view.active

    @st.fragment(run_every=POLL_S if started_active else None)
    def status_panel() -> None:
        v = load_view(view.job_id, view.run_id) or view
        if started_active and not v.active:
            st.rerun()  # it just ended: redraw the whole page once, without the timers
        _status(v)

    status_panel()

    opts = st.columns([1, 1, 1, 3])
    follow = opts[0].toggle(
        "Follow live",
        value=True,
        key=K + "follow",
        disabled=not started_active,
        help="Redraws the chart as it trains (which resets zoom). Turn off to zoom in.",
    )
    ppl = opts[1].toggle("Perplexity", key=K + "ppl", help="Show exp(loss): the effective number of choices.")
    log_y = opts[2].toggle("Log scale", key=K + "logy")

    @st.fragment(run_every=CHART_POLL_S if started_active and follow else None)
    def chart_panel() -> None:
        v = (load_view(view.job_id, view.run_id) or view) if (started_active and follow) else view
        chart_col, sample_col = st.columns([3, 2], gap="large")
        with chart_col:
            _chart(v, ppl, log_y)
            if started_active and not follow:
                st.caption("Chart paused: turn on *Follow live* to see new steps.")
        with sample_col:
            _samples(v)

    chart_panel()


def _status(v: RunView) -> None:
    if v.status == "queued":
        st.info(v.message or "Queued: waiting for a free slot.", icon=":material/hourglass_top:")
    elif v.status == "running":
        frac = min(1.0, v.step / v.max_iters) if v.max_iters else 0.0
        of = f" / {v.max_iters:,}" if v.max_iters else ""
        st.progress(frac, text=f"Step {v.step:,}{of} · {v.message}")
    elif v.status == "done":
        at = f" (step {v.best_step:,})" if v.best_step is not None else ""
        st.success(
            f"**Done**: best validation loss {format_loss(v.best_val_loss)}{at}. {v.message}".strip(),
            icon=":material/check_circle:",
        )
    elif v.status == "stopped":
        st.info(f"Stopped. {v.message}".strip(), icon=":material/stop_circle:")
    elif v.status in ("diverged", "error", "broken"):
        st.error(f"{v.status.capitalize()}: {v.message or 'no message'}")
    elif v.status == "interrupted":
        st.warning(
            f"Interrupted: {v.message or 'the process training it ended.'} "
            "Resume it from its last checkpoint, or start a new run."
        )
    else:
        st.info(f"{v.status}: {v.message}")

    m = st.columns(6)
    m[0].metric("Step", f"{v.step:,}" + (f" / {v.max_iters:,}" if v.max_iters else ""))
    m[1].metric("Train loss", format_loss(_last(v.metrics, "train_loss")))
    m[2].metric("Val loss", format_loss(_last(v.metrics, "val_loss")))
    m[3].metric(
        "Best val", format_loss(v.best_val_loss), help=f"at step {v.best_step}" if v.best_step is not None else None
    )
    m[4].metric("Tokens/s", _fmt_int(v.tokens_per_s))
    if v.active:
        m[5].metric("ETA", _fmt_duration(v.eta_s), help=f"Elapsed {_fmt_duration(v.elapsed_s)}")
    else:
        m[5].metric("Time", _fmt_duration(v.elapsed_s))
    facts = [
        f"{_fmt_int(v.params)} parameters" if v.params else None,
        f"on {v.device}" if v.device else None,
        f"run `{v.run_id}`",
    ]
    st.caption(" · ".join(x for x in facts if x))

    if v.active:
        if v.job_id:
            if st.button("Stop", icon=":material/stop:", key=K + "stop", type="secondary"):
                with user_errors("Cannot stop: "):
                    runner().cancel(v.job_id)
                st.toast("Stopping after the current step…")
        else:
            st.caption("This run is being trained by another process; stop it there.")
    else:
        _resume_button(v)
        _links(v)


def _resume_button(v: RunView) -> None:
    """A stopped or interrupted run continues from its last checkpoint, in a background job like any run."""
    if v.status not in ("stopped", "interrupted") or read_only():
        return
    try:
        resumable = (store().path(v.run_id) / "optimizer.safetensors").exists()
    except TinyGPTError:
        return
    if not resumable:
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
            job_id = runner().resume(v.run_id)
        if job_id is not None:
            remember_job(job_id)
            remember_run(v.run_id)
            st.rerun()


def _links(v: RunView) -> None:
    cols = st.columns(4)
    if v.has_weights:
        with cols[0]:
            st.page_link(
                "pages/attention.py",
                label="Open in Attention",
                icon=":material/grid_on:",
                query_params={RUN_PARAM: v.run_id},
            )
        with cols[1]:
            st.page_link(
                "pages/sampling.py",
                label="Sample from it",
                icon=":material/casino:",
                query_params={RUN_PARAM: v.run_id},
            )
    with cols[2]:
        st.page_link(
            "pages/runs.py",
            label="Compare in Runs",
            icon=":material/stacked_line_chart:",
            query_params={RUN_PARAM: v.run_id},
        )


def _chart(v: RunView, perplexity: bool, log_y: bool) -> None:
    # An empty frame draws an empty chart with a note (viz handles it), so the layout does not jump.
    fig = viz.loss_figure(v.metrics, perplexity=perplexity, log_y=log_y)
    st.plotly_chart(fig, key=K + "loss_chart", width="stretch")


def _samples(v: RunView) -> None:
    st.markdown("**What it writes** (a sample at each evaluation, newest first)")
    if not v.samples:
        st.caption("No samples yet: the first one comes with the first evaluation.")
        return
    newest = sorted(v.samples, key=lambda s: s["step"], reverse=True)
    for s in newest[:SHOWN_SAMPLES]:
        st.caption(f"step {s['step']:,}")
        st.code(s["text"], language=None, wrap_lines=True)
    if len(newest) > SHOWN_SAMPLES:
        with st.expander(f"{len(newest) - SHOWN_SAMPLES} older samples"):
            for s in newest[SHOWN_SAMPLES:20]:
                st.caption(f"step {s['step']:,}")
                st.code(s["text"], language=None, wrap_lines=True)


# --- page ------------------------------------------------------------------------------------------

_job = st.query_params.get(JOB_PARAM)
_run = st.query_params.get(RUN_PARAM)
if _job or _run:
    run_view(_job, _run)
else:
    setup_view()
