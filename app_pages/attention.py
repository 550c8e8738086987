"""Attention page: what each head of a trained run attends to in a prompt, and per-head statistics.

Thin UI: the attention weights and statistics come from tinygpt_core.inspection, the figures from
tinygpt_core.viz. Results are cached per run, checkpoint, weights mtime and prompt. A run that kept a
checkpoint history (checkpoints.history) gets a step slider: the same views at any kept step (models
from dynamics.model_at's per-step cache), each head's scores over training, and the loss per token
position over training (tinygpt_core.dynamics).
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from app_pages._common import corpus_start, kept, known_symbols_only, open_run_picker, user_errors, weights_mtime
from tinygpt_core import dynamics
from tinygpt_core.checkpoints import history, weights_path
from tinygpt_core.errors import TinyGPTError
from tinygpt_core.inspection import (
    AttentionMaps,
    attention_maps,
    head_stats,
    induction_scores,
    no_attention_reason,
    repeated_random_tokens,
)
from tinygpt_core.runs import LoadedRun
from tinygpt_core.viz import (
    DYNAMICS_SCORES,
    attention_grid_figure,
    attention_head_figure,
    head_scores_over_steps_figure,
    head_stats_figure,
    plural,
    position_loss_figure,
)

FALLBACK_PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"
DEFAULT_PROMPT_TOKENS = 48  # long enough to show structure, short enough for readable heatmaps
ALL_LAYERS = -1

# metric key -> (title, one-line explanation). "induction" is added from induction_scores.
STATS: dict[str, tuple[str, str]] = {
    "entropy": (
        "Entropy (nats)",
        "How spread out a head's attention is: 0 = always one token, high = averaging over many.",
    ),
    "mean_distance": (
        "Mean distance (tokens)",
        "How far back a head looks on average: small = local context, large = long-range.",
    ),
    "prev_token": (
        "Previous-token score",
        "Weight on the token just before: near 1 means a previous-token head.",
    ),
    "first_token": (
        "First-token score",
        "Weight on position 0: heads with nothing to do often park their attention there.",
    ),
    "induction": (
        "Induction score",
        "On a random sequence shown twice: weight on the token after the earlier copy of the current one.",
    ),
}


def _default_prompt(run: LoadedRun) -> str:
    """The start of the run's corpus, cut to a readable number of tokens."""
    tok = run.tokenizer
    n = min(run.config.model.block_size, DEFAULT_PROMPT_TOKENS)
    text = corpus_start(run)
    if text is None and run.samples:
        text = run.samples[-1].get("text") or None
    if not text or (tok.kind == "char" and tok.unknown_symbols(text[:2000])):
        text = FALLBACK_PROMPT
    try:
        return tok.decode(tok.encode(text[: 40 * n])[:n])
    except TinyGPTError:
        return text[:n]


def _induction_prompt(run: LoadedRun, seed: int) -> str:
    """A random run of tokens followed by the same run again: the text an induction head completes.

    Tokens are drawn from the readable part of the vocabulary (no special tokens, whitespace or byte
    fragments), so the prompt reads as text and encodes back to the same tokens. Word tokens are
    joined by spaces, since glued-together words would be new, unknown words.
    """
    tok = run.tokenizer
    n_plain = tok.vocab_size - len(tok.special_tokens)  # special tokens only ever appear on purpose
    labels = tok.token_strings(list(range(n_plain)))
    readable = [
        i
        for i, s in enumerate(labels)
        if s.strip() and s.isprintable() and "\ufffd" not in s and (tok.kind != "word" or s.isalnum())
    ] or list(range(n_plain))
    sep = " " if tok.kind == "word" else ""
    per_token = 2 if sep else 1  # with a separator every word brings a space token along
    seq_len = max(2, min(24, run.config.model.block_size // (2 * per_token)))
    picks = repeated_random_tokens(len(readable), seq_len, 1, seed)[0, :seq_len].tolist()
    half = sep.join(labels[readable[k]] for k in picks)
    return half + sep + half


@st.cache_data(show_spinner="Computing attention…", max_entries=64)
def _maps(run_path: str, checkpoint: str, mtime: float, prompt: str, _model, _tok) -> AttentionMaps:
    # run_path + checkpoint (best, last or step-N) + mtime identify the weights; _model (not hashed) holds them.
    return attention_maps(_model, _tok, prompt)


@st.cache_data(show_spinner="Measuring induction scores…", max_entries=64)
def _induction(run_path: str, checkpoint: str, mtime: float, _model, _tok) -> np.ndarray:
    return induction_scores(_model, seq_len=dynamics.INDUCTION_SEQ_LEN, vocab_range=dynamics.plain_vocab_range(_tok))


@st.cache_data(show_spinner="Scoring every head at every kept step…", max_entries=8)
def _scores_over_steps(run_path: str, steps: tuple[int, ...], prompt: str, _tok):
    return dynamics.head_scores_over_steps(run_path, _tok, prompt, list(steps))


@st.cache_data(show_spinner="Measuring the loss per position at every kept step…", max_entries=8)
def _position_loss(run_path: str, steps: tuple[int, ...], _tok):
    return dynamics.position_loss_over_steps(run_path, dynamics.validation_ids(run_path, _tok), list(steps))


def _next_demo(key: str, run: LoadedRun) -> None:
    """Button callback: put a fresh induction demo into the prompt box (before the widget is drawn)."""
    st.session_state["attn_demo_seed"] = st.session_state.get("attn_demo_seed", 0) + 1
    st.session_state[key] = _induction_prompt(run, st.session_state["attn_demo_seed"])


st.title("Attention")
st.caption(
    "Each head of each layer decides, for every token, how much to read from every earlier token. "
    "Pick a run and a prompt to see those weights; rows are the token doing the reading (query), "
    "columns the tokens it reads from (keys)."
)

picked = open_run_picker("attn")
if picked is None:
    st.stop()
summary, checkpoint, run = picked

cfg = run.config.model
tok = run.tokenizer
corpus_name = run.config.corpus.get("name") or run.config.corpus.get("source") or "?"
facts = (
    f"{plural(cfg.n_layer, 'layer')} × {plural(cfg.n_head, 'head')} · context {cfg.block_size} · "
    f"{tok.kind} tokenizer ({plural(tok.vocab_size, 'token')}) · trained on {corpus_name}"
)
ablations = cfg.ablations()
if ablations:
    facts += " · ablations: " + ", ".join(ablations)
st.caption(facts)
nothing_to_show = no_attention_reason(cfg)
if nothing_to_show:
    st.info(nothing_to_show, icon=":material/info:")
    st.stop()

# --- the step: the picked checkpoint, or any step the run kept ---------------------------------
hist = history(summary.path)
model, weights, mtime = run.model, checkpoint, weights_mtime(summary, checkpoint)
step: int | None = None
if hist.scrubbable:
    end = f"{checkpoint} checkpoint"
    picked_step = st.select_slider(
        "Training step",
        options=[*hist.steps, end],
        value=end,
        format_func=lambda s: f"step {s}" if isinstance(s, int) else s,
        key=f"attn_step_{summary.id}",
        help="Scrub through training: every view below is recomputed with the weights kept at that step.",
    )
    st.caption(f":material/history: {hist.summary()}")
    if isinstance(picked_step, int):
        with user_errors("Cannot open that step: "):
            model, weights, step = dynamics.model_at(summary.path, picked_step), f"step-{picked_step}", picked_step
            step_file = weights_path(summary.path, step=picked_step)
            mtime = step_file.stat().st_mtime if step_file is not None else None
else:
    st.caption(f":material/history: {hist.why_not_scrubbable()}")

# --- the prompt ---------------------------------------------------------------------------------
prompt_key = f"attn_prompt_{summary.id}"  # one box per run, so switching runs shows that run's default
is_induction = "induction" in corpus_name
if prompt_key not in st.session_state:
    st.session_state[prompt_key] = _induction_prompt(run, 0) if is_induction else _default_prompt(run)

p_left, p_right = st.columns([5, 1], vertical_alignment="bottom")
with p_right:
    st.button(
        "Induction demo",
        icon=":material/repeat:",
        key="attn_demo",
        on_click=_next_demo,
        args=(prompt_key, run),
        help="A random sequence of tokens followed by the same sequence again. In the second copy an "
        "induction head attends to the token after the earlier copy of the current token.",
        type="primary" if is_induction else "secondary",
        width="stretch",
    )
with p_left:
    prompt = st.text_area("Prompt", **kept(prompt_key), height=80)  # kept across page visits (issue 12)

prompt = known_symbols_only(tok, prompt)
if not prompt:
    st.info("Type a prompt (or press **Induction demo**) to see the attention weights.")
    st.stop()

n_tokens = len(tok.encode(prompt))
if n_tokens > cfg.block_size:
    st.info(
        f"The prompt is {n_tokens} tokens but this model reads at most {cfg.block_size}: "
        f"showing its last {cfg.block_size} tokens.",
        icon=":material/content_cut:",
    )

maps: AttentionMaps | None = None
with user_errors("Cannot compute attention: "):
    maps = _maps(str(summary.path), weights, mtime, prompt, model, tok)
if maps is None:
    st.stop()
if cfg.attn_window is not None:
    st.caption(
        f":material/info: Local attention: each token sees at most {cfg.attn_window} tokens (itself included); "
        "weights outside the band are always zero."
    )

# --- the grid of heads --------------------------------------------------------------------------
st.subheader("Every head")
layer_options = list(range(cfg.n_layer)) + ([ALL_LAYERS] if cfg.n_layer > 1 else [])
default_layer = ALL_LAYERS if cfg.n_layer > 1 and cfg.n_layer * cfg.n_head <= 16 else 0
layer_choice = st.segmented_control(
    "Layer",
    layer_options,
    default=default_layer,
    format_func=lambda i: "All layers" if i == ALL_LAYERS else f"Layer {i}",
    key="attn_layer",
)
if layer_choice is None:  # segmented control can be clicked off; treat it as the first layer
    layer_choice = 0
layers = range(cfg.n_layer) if layer_choice == ALL_LAYERS else [layer_choice]
for layer in layers:
    fig = attention_grid_figure(maps, layer, window=cfg.attn_window)
    st.plotly_chart(fig, key=f"attn_grid_{layer}", width="stretch")

# --- one head, enlarged, with its numbers -------------------------------------------------------
stats = dict(head_stats(maps))
with user_errors("Cannot measure induction scores: "):
    stats["induction"] = _induction(str(summary.path), weights, mtime, model, tok)

st.subheader("One head, enlarged")
h_left, h_right = st.columns([3, 2], gap="large")
with h_right:
    sel_layer = st.selectbox("Layer", range(cfg.n_layer), format_func=lambda i: f"Layer {i}", key="attn_big_layer")
    sel_head = st.selectbox("Head", range(cfg.n_head), format_func=lambda i: f"Head {i}", key="attn_big_head")
    st.caption(f"Layer {sel_layer}, head {sel_head} on this prompt (layers and heads count from 0):")
    m = st.columns(2)
    for i, key in enumerate(k for k in STATS if k in stats):
        value = float(np.asarray(stats[key])[sel_layer, sel_head])
        shown = f"{value:.2f}" if np.isfinite(value) else "–"  # NaN: e.g. no previous token in a 1-token prompt
        m[i % 2].metric(STATS[key][0], shown, help=STATS[key][1])
with h_left:
    st.plotly_chart(
        attention_head_figure(maps, sel_layer, sel_head, window=cfg.attn_window),
        key="attn_head_big",
        width="stretch",
    )

# --- statistics per head ------------------------------------------------------------------------
st.subheader("Per-head statistics")
st.caption(
    "One cell per head (rows: layers, columns: heads). Entropy, distance, previous- and first-token scores "
    "are measured on the prompt above; the induction score on random repeated sequences."
)
shown = [k for k in STATS if k in stats]
for start in range(0, len(shown), 3):
    cols = st.columns(3)
    for col, key in zip(cols, shown[start : start + 3]):
        with col:
            fig = head_stats_figure(stats, key)
            # The figure's title already names the metric; in a third of the page a long colour-bar
            # title would be cut off, so the bar keeps only its numbers.
            fig.update_traces(colorbar=dict(title=dict(text="")))
            st.plotly_chart(fig, key=f"attn_stats_{key}", width="stretch")
            st.caption(STATS[key][1])

# --- over training ------------------------------------------------------------------------------
if hist.scrubbable:
    st.subheader("Over training")
    jump = dynamics.induction_jump(run.metrics)
    st.caption(
        "Every head's scores at every kept step (the grey line is the step shown above"
        + (f"; the dashed one, step {jump}, is where the best induction score jumped" if jump is not None else "")
        + "). Previous-token score and entropy on the prompt above, induction score on random repeated sequences."
    )
    metric = st.segmented_control(
        "Score",
        list(DYNAMICS_SCORES),
        default="induction",
        format_func=lambda k: DYNAMICS_SCORES[k],
        key="attn_dyn_metric",
    )
    with user_errors("Cannot score the kept steps: "):
        scores = _scores_over_steps(str(summary.path), tuple(hist.steps), prompt, tok)
        unreadable = sorted(set(hist.steps) - set(scores["step"]))
        if unreadable:
            st.warning(f"Left out step(s) {', '.join(map(str, unreadable))}: their weights cannot be read.")
        fig = head_scores_over_steps_figure(scores, metric or "induction", current_step=step, induction_step=jump)
        st.plotly_chart(fig, key="attn_dyn_scores", width="stretch")
    with user_errors("Cannot measure the loss per position: "):
        steps, grid = _position_loss(str(summary.path), tuple(hist.steps), tok)
        st.plotly_chart(
            position_loss_figure(steps, grid, induction_step=jump), key="attn_dyn_position_loss", width="stretch"
        )
        st.caption(
            "Validation loss at each position of the context (columns) at each kept step (rows). When "
            "induction heads form, late positions, which can copy from what came before, get cheaper than early ones."
        )
