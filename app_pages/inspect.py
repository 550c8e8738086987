"""Inspect page: inside one trained run, token by token.

Three views of the same run: token-level loss (where the model is surprised, and what it expected; two
runs side by side as a per-token difference), the logit lens (what each layer would predict) and head
knockout (which heads the validation loss needs, and what the model writes without them). Thin UI: the
numbers come from tinygpt_core.tokenloss, lens and knockout, the figures from tinygpt_core.viz; results
are cached per run, checkpoint, weights mtime and input.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from app_pages._common import (
    known_symbols_only,
    load_run_cached,
    md,
    open_run_picker,
    openable_runs,
    user_errors,
    weights_mtime,
)
from tinygpt_core import evaltext, knockout, lens, limits, tokenloss, viz
from tinygpt_core.runs import LoadedRun

VIEWS = ["Token loss", "Logit lens", "Head knockout"]
DEFAULT_LOSS_TOKENS = 256
MAX_LOSS_TOKENS = 1024  # coloured spans with hover text: past this the page gets heavy to draw
DEFAULT_KNOCKOUT_TOKENS = 2048
LENS_PROMPT_TOKENS = 24  # a default prompt short enough to read every cell of the lens
MAX_NEW_TOKENS = 200


# --- cached core calls (run_path + checkpoint + mtime identify the weights; _run is the loaded model) --------


@st.cache_data(show_spinner="Reading the validation split…", max_entries=16)
def _val_ids(run_path: str, n: int, _run: LoadedRun) -> list[int]:
    return evaltext.validation_ids(_run, n)


@st.cache_data(show_spinner="Scoring every token…", max_entries=16)
def _token_loss(run_path: str, checkpoint: str, mtime: float, ids: tuple[int, ...], _run: LoadedRun):
    with limits.decode_slot():
        return tokenloss.token_losses(_run.model, _run.tokenizer, list(ids))


@st.cache_data(show_spinner="Decoding every layer…", max_entries=16)
def _lens(run_path: str, checkpoint: str, mtime: float, prompt: str, _run: LoadedRun):
    return lens.logit_lens(_run.model, _run.tokenizer, prompt)


@st.cache_data(show_spinner="Knocking out one head at a time…", max_entries=16)
def _grid(run_path: str, checkpoint: str, mtime: float, ids: tuple[int, ...], method: str, _run: LoadedRun):
    with limits.decode_slot():
        return knockout.knockout_grid(_run.model, list(ids), method)


@st.cache_data(show_spinner="Scoring without those heads…", max_entries=32)
def _set_loss(run_path, checkpoint, mtime, ids: tuple[int, ...], heads: tuple, method: str, _run: LoadedRun):
    with limits.decode_slot():
        return knockout.knockout_loss(_run.model, list(ids), heads, method)


@st.cache_data(show_spinner="Writing with and without those heads…", max_entries=32)
def _texts(run_path, checkpoint, mtime, prompt: str, heads: tuple, method: str, ids: tuple, n: int, _run: LoadedRun):
    with limits.decode_slot():
        return knockout.continuations(
            _run.model, _run.tokenizer, prompt, heads, method, ids=list(ids), max_new_tokens=n
        )


# --- shared inputs -----------------------------------------------------------------------------------


def validation_ids(run: LoadedRun, n: int) -> list[int] | None:
    """The start of the run's validation split (None, with the reason shown, when it cannot be read)."""
    with user_errors("Cannot read the validation split: "):
        return _val_ids(str(run.path), n, run)
    return None


def default_prompt(run: LoadedRun, n_tokens: int) -> str:
    ids = validation_ids(run, 4 * n_tokens) if run is not None else None
    if not ids:
        return "The "
    return run.tokenizer.decode(ids[: min(n_tokens, run.config.model.block_size)])


# --- the views ---------------------------------------------------------------------------------------


def token_loss_view(summary, checkpoint: str, run: LoadedRun, mtime: float) -> None:
    st.caption(
        "Every token coloured by how surprised the model was to see it (its loss, −log p, in nats): green is "
        "expected, red is as bad as a uniform guess or worse. Hover a token for the model's top 5 guesses."
    )
    left, right = st.columns([2, 1], vertical_alignment="bottom")
    source = left.radio("Text", ["Validation split", "Your text"], horizontal=True, key="insp_loss_source")
    n = right.number_input("Tokens", 16, MAX_LOSS_TOKENS, DEFAULT_LOSS_TOKENS, step=64, key="insp_loss_tokens")
    if source == "Validation split":
        ids = validation_ids(run, int(n))
        if ids is None:
            return
    else:
        text = st.text_area("Your text", value=default_prompt(run, 64), key=f"insp_loss_text_{summary.id}")
        text = known_symbols_only(run.tokenizer, text)
        ids = None
        with user_errors("Cannot read the text: "):
            ids = evaltext.text_ids(run.tokenizer, text, int(n))
        if ids is None:
            return
    tl = None
    with user_errors("Cannot score the text: "):
        tl = _token_loss(str(summary.path), checkpoint, mtime, tuple(ids), run)
    if tl is None:
        return
    m = st.columns(3)
    m[0].metric("Mean loss", f"{tl.mean_loss:.3f}", help="nats per token over the tokens shown")
    m[1].metric("Perplexity", f"{np.exp(tl.mean_loss):.2f}", help="exp(mean loss): the effective number of choices")
    m[2].metric("Uniform guess", f"{tl.uniform_loss:.3f}", help="ln(vocabulary size): the loss of knowing nothing")
    st.html(viz.token_html(tl.tokens, tokenloss.loss_colours(tl), tokenloss.hover_titles(tl, run.tokenizer)))

    st.markdown("**Compare with another run** on the same tokens")
    others = [r for r in openable_runs() if r.id != summary.id]
    if not others:
        st.caption("Train a second run (an ablation, say) to see where it loses against this one.")
        return
    other = st.selectbox(
        "Second run", [None, *others], key="insp_loss_other", format_func=lambda r: "—" if r is None else r.name
    )
    if other is None:
        return
    run_b = load_run_cached(other, checkpoint)
    if run_b is None:
        return
    diff = None
    with user_errors("Cannot compare: "):
        ids_b = run_b.tokenizer.encode(run.tokenizer.decode(ids))
        tl_b = _token_loss(str(other.path), checkpoint, weights_mtime(other, checkpoint), tuple(ids_b), run_b)
        diff = tokenloss.compare(tl, tl_b)
    if diff is None:
        return
    c = st.columns(3)
    c[0].metric(md(summary.name), f"{diff.mean_a:.3f}")
    c[1].metric(md(other.name), f"{diff.mean_b:.3f}", delta=f"{diff.mean_b - diff.mean_a:+.3f}", delta_color="inverse")
    c[2].metric("Tokens it loses on", f"{int(np.nansum(diff.diff > 0)):,} of {len(diff.diff) - 1:,}")
    st.caption(
        f"Red: **{md(other.name)}** loses more than **{md(summary.name)}** on that token; green: it does better; "
        "yellow: the same (±2 nats saturate)."
    )
    titles = [  # token_html escapes them
        "first token" if not np.isfinite(d) else f"{other.name} − {summary.name}: {d:+.2f} nats" for d in diff.diff
    ]
    st.html(viz.token_html(tl.tokens, diff.colours(), titles))
    worst = diff.worst(10)
    if worst:
        rows = [
            {
                "position": p,
                "token": viz.visible_token(tl.tokens[p]),
                f"loss {summary.name}": round(float(tl.loss[p]), 3),
                f"loss {other.name}": round(float(tl_b.loss[p]), 3),
                "difference": round(float(diff.diff[p]), 3),
            }
            for p in worst
        ]
        st.caption("Where the second run loses most:")
        st.dataframe(rows, hide_index=True, key="insp_loss_worst")


def lens_view(summary, checkpoint: str, run: LoadedRun, mtime: float) -> None:
    st.caption(
        "The residual stream after the embeddings and after each layer, decoded through the final norm and "
        "the output head as if the model stopped there. The last row is the model's own prediction."
    )
    prompt_key = f"insp_lens_prompt_{summary.id}"
    if prompt_key not in st.session_state:
        st.session_state[prompt_key] = default_prompt(run, LENS_PROMPT_TOKENS)
    prompt = known_symbols_only(run.tokenizer, st.text_area("Prompt", key=prompt_key, height=80))
    if not prompt:
        st.info("Type a prompt to see how each layer's prediction forms.")
        return
    result = None
    with user_errors("Cannot run the logit lens: "):
        result = _lens(str(summary.path), checkpoint, mtime, prompt, run)
    if result is None:
        return
    if result.cropped:
        st.info(f"Only the last {len(result.ids)} tokens fit the model's context: showing those.")
    names = run.tokenizer.token_strings(list(range(run.tokenizer.vocab_size)))
    st.plotly_chart(viz.logit_lens_figure(result, "top", names), key="insp_lens_top", width="stretch")
    st.plotly_chart(viz.logit_lens_figure(result, "next", names), key="insp_lens_next", width="stretch")


def knockout_view(summary, checkpoint: str, run: LoadedRun, mtime: float) -> None:
    cfg = run.config.model
    if cfg.n_layer == 0:
        st.info("This run is a bigram model (no layers): it has no attention heads to knock out.")
        return
    st.caption(
        "Switch attention heads off at inference and see what the validation loss loses. *Zero* removes a "
        "head's output; *mean* replaces it by its average output, so the head stops reading the context but "
        "keeps its constant offset."
    )
    left, right = st.columns([2, 1], vertical_alignment="bottom")
    method = left.radio("Ablation", list(knockout.METHODS), horizontal=True, key="insp_ko_method")
    n = right.number_input(
        "Validation tokens", 64, limits.MAX_INSPECT_TOKENS, DEFAULT_KNOCKOUT_TOKENS, step=256, key="insp_ko_tokens"
    )
    ids = validation_ids(run, int(n))
    if ids is None:
        return
    grid = None
    with user_errors("Cannot run the knockout grid: "):
        grid = _grid(str(summary.path), checkpoint, mtime, tuple(ids), method, run)
    if grid is None:
        return
    st.plotly_chart(viz.knockout_figure(grid), key="insp_ko_grid", width="stretch")
    top = np.unravel_index(int(np.argmax(grid.delta)), grid.delta.shape)
    st.caption(
        f"Scored on {grid.n_tokens:,} validation tokens. Removing layer {top[0]}, head {top[1]} costs the most "
        f"({grid.delta[top]:+.3f} nats); a cell near 0 is a head the loss does not need."
    )

    st.markdown("**Remove several heads at once**")
    options = [(layer, h) for layer in range(cfg.n_layer) for h in range(cfg.n_head)]
    heads = st.multiselect(
        "Heads to knock out",
        options,
        default=[(int(top[0]), int(top[1]))],
        format_func=lambda x: f"layer {x[0]} · head {x[1]}",
        key=f"insp_ko_heads_{summary.id}",
    )
    heads = tuple(sorted(heads))
    if not heads:
        st.info("Pick one or more heads to see the loss and the text without them.")
        return
    with user_errors("Cannot score without those heads: "):
        base, without = _set_loss(str(summary.path), checkpoint, mtime, tuple(ids), heads, method, run)
        m = st.columns(2)
        m[0].metric("Val loss, every head", f"{base:.3f}")
        m[1].metric(
            f"Without {len(heads)} head{'s' if len(heads) > 1 else ''}",
            f"{without:.3f}",
            delta=f"{without - base:+.3f}",
            delta_color="inverse",
        )
    p_left, p_right = st.columns([4, 1], vertical_alignment="bottom")
    prompt = p_left.text_input("Prompt", value=default_prompt(run, 16), key=f"insp_ko_prompt_{summary.id}")
    cap = min(MAX_NEW_TOKENS, limits.current().max_new_tokens)
    n_new = p_right.number_input("New tokens", 1, cap, min(80, cap), key="insp_ko_new")
    prompt = known_symbols_only(run.tokenizer, prompt)
    if not prompt:
        return
    texts = None
    with user_errors("Cannot write: "):
        texts = _texts(str(summary.path), checkpoint, mtime, prompt, heads, method, tuple(ids), int(n_new), run)
    if texts is None:
        return
    cols = st.columns(2)
    with cols[0]:
        st.caption("With every head (greedy)")
        st.code(texts.prompt + texts.with_all, language=None, wrap_lines=True)
    with cols[1]:
        st.caption("Without " + ", ".join(knockout.head_label(h) for h in texts.heads) + f" ({method} ablation)")
        st.code(texts.prompt + texts.without, language=None, wrap_lines=True)


# --- page ----------------------------------------------------------------------------------------------

st.title("Inspect")
st.caption("Look inside one trained run: where it is surprised, what each layer predicts, which heads matter.")

picked = open_run_picker("insp")
if picked is None:
    st.stop()
summary, checkpoint, run = picked
mtime = weights_mtime(summary, checkpoint)

view = st.segmented_control("View", VIEWS, default=VIEWS[0], key="insp_view") or VIEWS[0]
if view == "Token loss":
    token_loss_view(summary, checkpoint, run, mtime)
elif view == "Logit lens":
    lens_view(summary, checkpoint, run, mtime)
else:
    knockout_view(summary, checkpoint, run, mtime)
