"""The Train page's setup view: corpus, tokenizer, preset or sizes, ablations, training settings,
estimates and Start (not a page: the underscore keeps it out of navigation).

The form's values and the specs they stand for are in ``pages._train_form``; the job runs in the
core's runner, never in this script.
"""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from app_pages._ablation_widgets import ablation_toggles
from app_pages._common import (
    active_runs,
    format_count,
    format_duration,
    kept,
    md,
    read_only_notice,
    remember_job,
    remember_run,
    runner,
    store,
    user_errors,
    visitor,
)
from app_pages._train_form import (
    LAST_FORM,
    NUMBER_FIELDS,
    SIZED_TOKENIZERS,
    SOURCES,
    K,
    allowed,
    apply_preset,
    build_spec,
    form_problems,
    form_values,
    form_vocab_size,
    init_form,
    model_overrides,
    param_count,
    train_overrides,
)
from tinygpt_core import limits
from tinygpt_core.config import PRESETS, ModelConfig, TrainConfig, get_preset
from tinygpt_core.data import (
    Corpus,
    builtin_corpus_problem,
    corpus_from_bytes,
    list_builtin_corpora,
    load_visitor_corpus,
)
from tinygpt_core.errors import TinyGPTError
from tinygpt_core.training import TrainSpec

TOKENIZER_HELP = {
    "char": "one token per character: tiny vocabulary, long sequences",
    "word": "one token per word or punctuation mark: large vocabulary",
    "bpe": "byte-level BPE: merges frequent byte pairs up to the vocabulary size",
    "gpt2": "GPT-2's own 50,257-token BPE (through tiktoken): models that pair with GPT-2's tokenizer when "
    "exported; tiktoken needs GPT-2's vocabulary file once (downloaded on a connected machine)",
}
ESTIMATES = "trainpage_estimates"  # measured seconds per step, by configuration


def corpus_from_upload(uploaded) -> Corpus | None:
    """Decode an uploaded file (size cap, UTF-8 check); st.error and None when it cannot be used."""
    if uploaded is None:
        return None
    try:
        return corpus_from_bytes(uploaded.name, uploaded.getvalue(), max_bytes=limits.current().max_upload_bytes)
    except TinyGPTError as exc:
        st.error(str(exc))
        return None


def number_input(field: str, *, help: str | None = None, **kwargs: Any) -> None:
    """A number field of the form: its label from NUMBER_FIELDS, its allowed range (the core's) in the help,
    its value kept across pages. No min/max: ``form_problems`` names a value out of range and Start waits."""
    label, setting = NUMBER_FIELDS[field]
    if setting is not None:
        kwargs.setdefault("step", 1)  # an int step makes a whole-number input (no min/max to tell it so)
    rng = allowed(field)
    text = " ".join(x for x in (help, f"Allowed: {rng}." if rng else None) if x) or None
    st.number_input(label, help=text, **kept(K + field), **kwargs)


def setup_view() -> None:
    init_form()
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

    f = form_values()
    model_cfg, train_cfg = _check_configs(f)
    _estimates(f, model_cfg, train_cfg, corpus)

    ready = model_cfg is not None and train_cfg is not None and corpus is not None
    name_col, start_col = st.columns([3, 1], vertical_alignment="bottom")
    name_col.text_input(
        "Run name (optional)",
        **kept(K + "name"),
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
    """Runs training right now on this server (from any browser session), each with a link to watch it."""
    try:
        active = active_runs()
    except TinyGPTError:
        return
    for r in active[:5]:
        with st.container(border=True):
            c1, c2 = st.columns([4, 1], vertical_alignment="center")
            what = r.message if r.status == "queued" else f"step {r.step}/{r.max_iters}"
            c1.markdown(f":material/progress_activity: **{md(r.name)}** is {r.status} on {r.device} · {md(what)}")
            # A button, not a page_link: a link to the page already open changes the view but not the URL,
            # so a reload lost the run. remember_job/remember_run put both ids in the URL (?run=…&job=…).
            c2.button(
                "Watch",
                icon=":material/visibility:",
                key=f"{K}watch_{r.run_id}",
                on_click=_watch,
                args=(r.run_id, r.job_id),
                width="stretch",
            )


def _watch(run_id: str, job_id: str | None) -> None:
    """on_click of Watch: the run becomes the one in view, and in the URL, before the page is drawn again."""
    remember_job(job_id)
    remember_run(run_id)


def _corpus_section() -> Corpus | str | None:
    """The corpus to train on: "builtin:NAME", a server path, an uploaded Corpus; None when not usable."""
    st.subheader("Corpus")
    # Server paths only where the operator allowed folders (TINYGPT_CORPUS_DIRS); otherwise not offered at all.
    try:
        allowed = limits.corpus_dirs()
    except TinyGPTError as exc:
        st.error(f"Server settings: {md(exc)}")
        allowed = ()
    sources = SOURCES if allowed else SOURCES[:2]
    if st.session_state.get(K + "source") not in sources:
        st.session_state[K + "source"] = SOURCES[0]
    source = st.radio("Source", sources, **kept(K + "source"), horizontal=True, label_visibility="collapsed")
    if source == SOURCES[0]:
        builtins = dict(list_builtin_corpora())
        if st.session_state.get(K + "builtin") not in builtins:
            st.session_state[K + "builtin"] = next(iter(builtins))
        name = st.selectbox(
            "Built-in corpus",
            list(builtins),
            **kept(K + "builtin"),
            format_func=lambda n: f"builtin:{n}" + (" (not downloaded)" if builtin_corpus_problem(n) else ""),
        )
        st.caption(builtins[name])
        if why := builtin_corpus_problem(name):  # e.g. Tiny Shakespeare not fetched yet: say so before Start
            st.warning(f"builtin:{name} cannot be used on this server: {why}", icon=":material/cloud_off:")
            return None
        return f"builtin:{name}"
    if source == SOURCES[1]:
        mb = limits.current().max_upload_mb  # TINYGPT_MAX_UPLOAD_MB; checked again on the bytes received
        uploaded = st.file_uploader(
            f"A UTF-8 text file (up to {mb} MB)", type=["txt"], key=K + "upload", max_upload_size=mb
        )
        corpus = corpus_from_upload(uploaded)
        if corpus is not None:
            st.caption(f"{md(corpus.name)}: {corpus.chars:,} characters.")
        return corpus
    path = st.text_input(
        "Path of a UTF-8 text file on the server",
        **kept(K + "path"),
        placeholder=str(allowed[0] / "my_corpus.txt"),
        help="Only files inside these folders: " + ", ".join(str(a) for a in allowed),
    )
    if not path.strip():
        return None
    try:  # the one visitor check (tinygpt_core.data): inside the allowed folders, links and .. resolved
        corpus = load_visitor_corpus(path.strip())
    except TinyGPTError as exc:
        st.error(md(exc), icon=":material/block:")
        return None
    st.caption(f"{md(corpus.name)}: {corpus.chars:,} characters.")
    return corpus


def _tokenizer_section() -> None:
    st.subheader("Tokenizer")
    kind = st.radio(
        "Tokenizer", list(TOKENIZER_HELP), **kept(K + "tokenizer"), horizontal=True, label_visibility="collapsed"
    )
    st.caption(TOKENIZER_HELP[kind])
    if kind in SIZED_TOKENIZERS:
        number_input(
            "vocab",
            step=64,
            help="BPE: the target size after merges. Word: the most frequent words kept "
            "(the rest share one unknown token).",
        )


def _model_section() -> None:
    st.subheader("Model")
    preset = st.selectbox(
        "Preset",
        list(PRESETS),
        **kept(K + "preset"),
        on_change=apply_preset,
        help="Picking a preset fills in every setting below; change any of them after.",
    )
    st.caption(PRESETS[preset].description)
    c = st.columns(3)
    with c[0]:
        number_input("n_layer", help="Transformer blocks (n_layer).")
    with c[1]:
        number_input("n_head", help="Attention heads per block; must divide the width.")
    with c[2]:
        number_input("n_embd", step=8, help="Residual stream width (n_embd).")
    c = st.columns(3)
    with c[0]:
        number_input("block_size", step=8, help="Block size: the longest context the model sees, in tokens.")
    with c[1]:
        number_input("ff_mult", help="MLP hidden width = this × width.")
    with c[2]:
        number_input("dropout", step=0.05, format="%.2f", help="Dropout probability, from 0 up to (not including) 1.")


def _ablation_section() -> None:
    with st.expander("Ablations: switch parts of the architecture off", icon=":material/science:"):
        ablation_toggles(K)


def _training_section() -> None:
    with st.expander("Training settings", icon=":material/tune:", expanded=True):
        c = st.columns(4)
        with c[0]:
            number_input("max_iters", step=50)
        with c[1]:
            number_input("batch_size", step=4)
        with c[2]:
            number_input(
                "lr", step=1e-4, format="%.1e", help="Peak learning rate, after warm-up; cosine decay to a tenth of it."
            )
        with c[3]:
            number_input(
                "eval_interval", step=25, help="Estimate train and val loss and write a sample every this many steps."
            )
        c = st.columns(4)
        with c[0]:
            number_input("seed")
        with c[1]:
            number_input("patience", help="Stop after this many evals without a better validation loss.")
        with c[2]:
            number_input("stop_val", step=0.1, format="%.3f", help="Stop as soon as the validation loss reaches this.")
        with c[3]:
            number_input(
                "grad_clip",
                step=0.5,
                format="%.2f",
                help="Clips the gradient norm; protects against sudden jumps in the loss.",
            )
        c = st.columns(4)
        with c[0]:
            number_input("warmup", step=10)
        c[1].selectbox(
            "Device",
            ["auto", "cpu", "cuda", "mps"],
            **kept(K + "device"),
            help="auto: the GPU when there is one, else the CPU.",
        )
        c[2].selectbox(
            "Precision",
            ["auto", "fp32", "bf16"],
            **kept(K + "precision"),
            help="auto: bf16 on GPUs that support it, else fp32.",
        )
        with c[3]:
            st.toggle(
                "torch.compile",
                **kept(K + "compile"),
                help="Compiles the model first: faster steps on a GPU after a slow start.",
            )
        st.toggle(
            "TensorBoard events",
            **kept(K + "tensorboard"),
            help="Also write losses, learning rate, tokens/s, gradient norm and attention images at each "
            "evaluation as TensorBoard events, into the run's own folder. The run folder stays the source of "
            f"truth; view them with `tensorboard --logdir {md(str(store().root))}`.",
        )


def _check_configs(f: dict[str, Any]) -> tuple[ModelConfig | None, TrainConfig | None]:
    """Validate the sizes and settings as they are typed, so mistakes show before Start."""
    model_cfg = train_cfg = None
    problems = form_problems(f)
    if problems:  # empty or out of range: named here, and Start stays disabled until they are fixed
        st.error("Fix these before starting:\n\n" + "\n".join(f"- {p}" for p in problems), icon=":material/error:")
        return None, None
    try:
        cfg = get_preset(f["preset"]).model_config(**model_overrides(f)).validate()
        # The server's TINYGPT_MAX_PARAMS, on the vocabulary the form asks for (the runner checks the real one).
        vocab = form_vocab_size(f, cfg)
        limits.check_params(param_count(cfg, vocab))
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
    vocab = form_vocab_size(f, model_cfg)
    approx = {"char": "≈ ", "gpt2": ""}.get(f["tokenizer"], "≤ ")  # char: the vocabulary is the corpus's own characters
    sized = ModelConfig.from_dict({**model_cfg.to_dict(), "vocab_size": vocab})
    params = param_count(sized)
    c1, c2, c3 = st.columns([1, 1, 2], vertical_alignment="center")
    c1.metric(
        "Parameters",
        f"{approx}{format_count(params)}",
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
            help=f"About {format_duration(per_step * train_cfg.max_iters)} for {train_cfg.max_iters} steps, "
            "plus evaluation.",
        )
        c3.caption(
            f"≈ {format_duration(per_step * train_cfg.max_iters)} for {train_cfg.max_iters:,} steps (plus evals and "
            "a second or two to start), timed in a training process like the run's; other runs training at "
            "the same time share the cores."
        )
    else:
        c2.metric("Time", "–", help="Press Estimate time.")


def _start(f: dict[str, Any], corpus: Corpus | str) -> None:
    """Submit the job (the runner validates first: a bad spec writes nothing) and switch to its view."""
    job_id = None
    with st.spinner("Checking the corpus and settings…"), user_errors("Cannot start: "):
        job_id = runner().submit(build_spec(f, corpus), owner=visitor())
    if job_id is None:
        return
    st.session_state[LAST_FORM] = {k: v for k, v in f.items() if k not in ("source", "path", "name")}
    remember_job(job_id)
    remember_run(runner().state(job_id).run_id)
    st.rerun()
