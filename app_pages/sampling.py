"""Sampling page: one run, one prompt, one seed, several decoding strategies side by side.

Thin UI: generation, the next-token distribution and the text statistics come from
tinygpt_core.sampling; the coloured tokens and the distribution chart from tinygpt_core.viz.
Results are cached per run, weights mtime, prompt and settings, so editing one column leaves the
others as they are (and the same seed always shows the same text).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from typing import Any

import pandas as pd
import streamlit as st

from app_pages._common import (
    corpus_start,
    kept,
    known_symbols_only,
    md,
    open_run_picker,
    user_errors,
    weights_mtime,
)
from tinygpt_core import limits
from tinygpt_core.errors import ConfigError, TinyGPTError
from tinygpt_core.runs import LoadedRun
from tinygpt_core.sampling import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    REPETITION_PENALTY_RANGE,
    GenerationResult,
    SamplingSettings,
    StepInfo,
    generate,
    next_token_distribution,
    text_stats,
)
from tinygpt_core.viz import distribution_figure, token_html

FALLBACK_PROMPT = "The "
DEFAULT_PROMPT_TOKENS = 24
PROMPT_TOKENS_SHOWN = 48  # a long prompt is shown by its end only; the continuation is what matters


@dataclass(frozen=True)
class Column:
    title: str
    blurb: str
    settings: SamplingSettings


# Preset columns: id -> title, one line on what it does, and its starting settings.
COLUMNS: dict[str, Column] = {
    "greedy": Column(
        "Greedy", "Always the most likely token: deterministic, often loops.", SamplingSettings(strategy="greedy")
    ),
    "temperature": Column(
        "Temperature",
        "Sample from the whole distribution, sharpened (T < 1) or flattened (T > 1).",
        SamplingSettings(strategy="sample", temperature=0.8),
    ),
    "top_k": Column(
        "Top-k", "Sample among the k most likely tokens only.", SamplingSettings(strategy="sample", top_k=10)
    ),
    "top_p": Column(
        "Top-p",
        "Sample among the fewest tokens holding p of the probability (nucleus).",
        SamplingSettings(strategy="sample", top_p=0.9),
    ),
    "min_p": Column(
        "Min-p",
        "Drop tokens less than min-p times as likely as the best one.",
        SamplingSettings(strategy="sample", min_p=0.1),
    ),
    "combined": Column(
        "Combined",
        "Temperature, top-k, top-p and a repetition penalty together.",
        SamplingSettings(strategy="sample", temperature=0.8, top_k=20, top_p=0.95, repetition_penalty=1.2),
    ),
    "beam": Column(
        "Beam search",
        "Keep the best few partial texts by total log-probability.",
        SamplingSettings(strategy="beam", num_beams=4),
    ),
}
DEFAULT_COLUMNS = ["greedy", "temperature", "top_p", "beam"]


def _default_prompt(run: LoadedRun) -> str:
    """The first few tokens of the run's corpus: a prompt the model knows how to continue."""
    tok = run.tokenizer
    text = corpus_start(run)
    if not text or (tok.kind == "char" and tok.unknown_symbols(text[:500])):
        return FALLBACK_PROMPT if not tok.unknown_symbols(FALLBACK_PROMPT) else ""
    n = min(DEFAULT_PROMPT_TOKENS, max(1, run.config.model.block_size // 2))
    try:
        prompt = tok.decode(tok.encode(text[:400])[:n])
    except TinyGPTError:
        prompt = text[:n]
    # End on a whole word ("The lighthouse", not "The lighthouse o") when there is a space to cut at.
    cut = prompt.rstrip().rfind(" ")
    return prompt[:cut] if cut > 0 else prompt


def _kept_from(key: str, default: Any, low: float | None = None, high: float | None = None) -> dict[str, Any]:
    """``kept(key)`` for a widget whose starting value is ``default``: the value is given through
    session_state (a widget given both value= and a kept value warns), and a kept slider value outside
    this run's bounds (another run's vocabulary, another server limit) is brought back inside them."""
    value = st.session_state.setdefault(key, default)
    if value is not None and high is not None and value > high:
        st.session_state[key] = high
    if value is not None and low is not None and value < low:
        st.session_state[key] = low
    return kept(key)


def _number(label: str, key: str, default: float | int | None, step: float | int, help: str, **kw: Any) -> Any:
    """A setting's number box, kept across pages. No min/max on purpose: a bound in the widget is a second
    copy of the core's (they drifted: issue 12), and a browser refuses an out-of-range entry silently;
    SamplingSettings.validate and limits.check_decode name what is wrong instead, beside the column."""
    return st.number_input(label, step=step, help=help, **_kept_from(key, default), **kw)


def _settings_widgets(cid: str, vocab_size: int, max_beams: int) -> SamplingSettings:
    """The expander of one column; returns its settings (not yet validated: the caller shows errors).
    Every field keeps its value across visits to other pages (kept)."""
    base = COLUMNS[cid].settings
    k = f"smp_{cid}_"
    s = dataclasses.replace(base)
    with st.expander("Settings", icon=":material/tune:"):
        if base.strategy == "sample":
            s.temperature = _number(
                "Temperature",
                k + "temperature",
                float(base.temperature),
                0.05,
                "Divides the logits: below 1 sharpens the distribution, above 1 flattens it. 0 is greedy. "
                f"Allowed: {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}.",
            )
            s.top_k = _number(
                "Top-k",
                k + "top_k",
                None if base.top_k is None else min(base.top_k, vocab_size),
                1,
                f"Keep only the k most likely tokens (1 to {vocab_size}, this run's vocabulary). Empty = off.",
                placeholder="off",
                value=None,  # starts empty = off, and can be emptied again (the kept value shows)
            )
            s.top_p = _number(
                "Top-p",
                k + "top_p",
                base.top_p,
                0.05,
                "Keep the most likely tokens until their probabilities add up to p (0 < p <= 1). Empty = off.",
                placeholder="off",
                value=None,  # starts empty = off, and can be emptied again (the kept value shows)
            )
            s.min_p = _number(
                "Min-p",
                k + "min_p",
                base.min_p,
                0.01,
                "Drop tokens less likely than min-p × the top token's probability (0 to 1). Empty = off.",
                placeholder="off",
                value=None,  # starts empty = off, and can be emptied again (the kept value shows)
            )
        elif base.strategy == "beam":
            s.num_beams = _number(
                "Beams",
                k + "num_beams",
                min(int(base.num_beams), max_beams),  # TINYGPT_MAX_BEAMS
                1,
                f"How many partial texts are kept at each step (at most the vocabulary size, {vocab_size}, and "
                f"{max_beams} on this server).",
            )
            s.length_penalty = _number(
                "Length penalty",
                k + "length_penalty",
                float(base.length_penalty),
                0.1,
                "Score = log-probability / length^penalty. All beams here have the same length, so it "
                "rescales the scores without reordering them.",
            )
        low, high = REPETITION_PENALTY_RANGE
        s.repetition_penalty = _number(
            "Repetition penalty",
            k + "repetition_penalty",
            float(base.repetition_penalty),
            0.05,
            f"Above 1 makes tokens already in the text less likely (1 = off). Allowed: {low:g} to {high:g}.",
        )
    return s


@st.cache_data(show_spinner=False, max_entries=64)
def _generate(
    run_path: str, checkpoint: str, mtime: float, prompt: str, settings_json: str, _run: LoadedRun
) -> GenerationResult:
    # run_path + checkpoint + mtime identify the weights, settings_json the decoding (seed included).
    # A cache miss takes one of the server's decoding slots (TINYGPT_MAX_DECODES_AT_ONCE): requests
    # take turns instead of all competing for the cores other visitors' pages need (issue 11).
    with limits.decode_slot():
        settings = SamplingSettings(**json.loads(settings_json))
        # Only a chat run may write the special tokens (<user>, ...); any other run never does.
        return generate(_run.model, _run.tokenizer, prompt, settings, special_tokens=_run.config.chat is not None)


@st.cache_data(show_spinner=False, max_entries=32)
def _distribution(
    run_path: str, checkpoint: str, mtime: float, prompt: str, settings_json: str, _run: LoadedRun
) -> dict:
    labelled = {label: SamplingSettings(**d) for label, d in json.loads(settings_json).items()}
    chat_run = _run.config.chat is not None
    return next_token_distribution(_run.model, _run.tokenizer, prompt, labelled, special_tokens=chat_run)


def _new_seed() -> None:
    """Button callback: a different seed (set before the seed box is drawn again)."""
    old = st.session_state.get("smp_seed")
    new = old
    while new == old:
        new = random.randrange(100_000)
    st.session_state["smp_seed"] = new


def _fmt(x: float, spec: str) -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def _token_title(s: StepInfo, filters: bool) -> str:
    """A generated token's hover text: the model's probability and rank (comparable across columns), then
    the probability after the column's filters where they change it (sampling columns)."""
    title = f"{s.token!r}: p = {s.prob:.3f} (model), rank {s.rank}"
    if filters:
        title += f"\nafter this column's filters: p = {s.filtered_prob:.3f}"
    return title + "\nmodel's most likely: " + ", ".join(f"{t!r} {p:.2f}" for t, p in s.top[:5])


def _show_result(result: GenerationResult, run: LoadedRun) -> None:
    tok = run.tokenizer
    prompt_ids = result.prompt_ids[-PROMPT_TOKENS_SHOWN:] if result.prompt else []
    prompt_tokens = tok.token_strings(prompt_ids)
    filters = result.settings.strategy == "sample" or result.settings.repetition_penalty != 1.0
    titles = ["prompt"] * len(prompt_tokens) + [_token_title(s, filters) for s in result.steps]
    values = [float("nan")] * len(prompt_tokens) + [s.prob for s in result.steps]
    st.html(token_html(prompt_tokens + [s.token for s in result.steps], values, titles))
    stats = text_stats(result.token_ids, [s.logprob for s in result.steps])
    st.markdown(
        f"mean log-prob (model) **{_fmt(stats['mean_logprob'], '.2f')}**"
        f" · distinct-2 **{_fmt(stats['distinct_2'], '.2f')}**"
        f" · repeated 4-grams **{_fmt(stats['repetition'], '.0%')}**"
    )
    st.caption(f"{len(result.token_ids)} tokens in {result.elapsed_s:.2f} s ({result.tokens_per_s:,.0f} tokens/s)")
    if result.beams:
        with st.expander(f"All {len(result.beams)} beams"):
            st.dataframe(
                pd.DataFrame({"score": [round(s, 3) for _, s in result.beams], "text": [t for t, _ in result.beams]}),
                hide_index=True,
                width="stretch",
            )


st.title("Sampling")
st.caption(
    "The model only ever gives a probability for every possible next token; a decoding strategy decides which "
    "one to write. Run the same model with several strategies on one prompt and one seed, and see what each "
    "keeps and cuts of the distribution."
)

try:  # the server's decoding bounds (TINYGPT_MAX_NEW_TOKENS, TINYGPT_MAX_BEAMS, TINYGPT_MAX_DECODE_WORK)
    LIMITS = limits.current()
except TinyGPTError as exc:
    st.error(f"Server settings: {md(exc)}")
    st.stop()

picked = open_run_picker("smp")
if picked is None:
    st.stop()
summary, checkpoint, run = picked
tok = run.tokenizer
vocab = tok.vocab_size
block = run.config.model.block_size

# Every widget below keeps its value across visits to other pages (kept, issue 12); starting values go
# through session_state only.
prompt_key = f"smp_prompt_{summary.id}"  # one box per run: switching runs shows that run's default
if prompt_key not in st.session_state:
    st.session_state[prompt_key] = _default_prompt(run)

c_prompt, c_len = st.columns([4, 2])
with c_prompt:
    prompt = st.text_area(
        "Prompt", **kept(prompt_key), height=124, help="Empty is allowed: the model then starts from a newline."
    )
with c_len:
    top = LIMITS.max_new_tokens
    low = min(10, top)
    max_new = st.slider("New tokens", low, top, step=low, **_kept_from("smp_max_new", min(80, top), low, top))
    c_seed, c_new = st.columns([3, 2], vertical_alignment="bottom")
    seed = c_seed.number_input(
        "Seed",
        0,
        2**31 - 1,
        step=1,
        **_kept_from("smp_seed", 1234),
        help="The same seed gives the same text in every sampling column.",
    )
    c_new.button("New seed", icon=":material/casino:", key="smp_new_seed", on_click=_new_seed, width="stretch")
    half = max(1, block // 2)
    jump = st.toggle(
        "Fast past the context",
        **_kept_from("smp_fast_slide", False),
        help=f"This model sees at most {block} tokens. Off: past that, it always sees exactly the last {block} "
        f"(one full forward per new token). On: the window jumps {half} tokens at a time and the KV cache is "
        f"reused in between, so the model sees {block - half + 1} to {block} tokens: long texts decode about 2.7× "
        "faster per token at baby size (bench/RESULTS.md, generation).",
    )
chosen = st.multiselect(
    "Strategies to compare",
    list(COLUMNS),
    format_func=lambda c: COLUMNS[c].title,
    **_kept_from("smp_columns", list(DEFAULT_COLUMNS)),
)

prompt = known_symbols_only(tok, prompt)
n_prompt = len(tok.encode(prompt))
if n_prompt > block:
    st.info(
        f"The prompt is {n_prompt} tokens; the model sees only the last {block} of them.", icon=":material/content_cut:"
    )
if not chosen:
    st.info("Pick at least one column above.")
    st.stop()

st.caption(
    "Colours, hover probabilities and mean log-prob are the model's own (its softmax at temperature 1, before any "
    "penalty or filter), so the columns compare; hovering a token of a sampling column also shows its probability "
    "after that column's filters."
)
mtime = weights_mtime(summary, checkpoint)
budget_box = st.empty()  # the decoding budget's message, above the columns
valid: dict[str, SamplingSettings] = {}
boxes = {}
# At most three columns per row (two when there are four), so token strips stay readable.
per_row = len(chosen) if len(chosen) <= 3 else (2 if len(chosen) == 4 else 3)
cols = [c for start in range(0, len(chosen), per_row) for c in st.columns(per_row, gap="medium")][: len(chosen)]
for col, cid in zip(cols, chosen):
    spec = COLUMNS[cid]
    with col, st.container(border=True):
        st.markdown(f"**{spec.title}**")
        st.caption(spec.blurb)
        settings = _settings_widgets(cid, vocab, LIMITS.max_beams)
        settings.max_new_tokens = int(max_new)
        settings.context_slide = half if jump else 1
        settings.seed = int(seed) if settings.strategy == "sample" else None
        try:
            settings.validate(vocab)
        except ConfigError as exc:
            st.error(str(exc), icon=":material/error:")
            continue
        st.caption(f"`{settings.describe()}`")
        valid[spec.title] = settings
        boxes[spec.title] = st.container()

# The whole request is checked against the server's decoding budget before any column decodes, so a
# request over it gets a message at once instead of tying up the server's cores (issue 11).
over_budget = None
try:
    limits.check_decode(valid.values(), LIMITS)
except ConfigError as exc:
    over_budget = str(exc)
    budget_box.error(md(over_budget), icon=":material/speed:")
for title, settings in valid.items():
    if over_budget:
        boxes[title].caption("Not decoded: the request is over this server's decoding budget (see above).")
        continue
    with boxes[title]:
        result = None
        with st.spinner("Generating…"), user_errors("Cannot generate: "):
            result = _generate(
                str(summary.path), checkpoint, mtime, prompt, json.dumps(dataclasses.asdict(settings)), run
            )
        if result is not None:
            _show_result(result, run)

if valid:
    st.subheader("What each setting keeps of the next-token distribution")
    st.caption(
        "Grey bars: the model's probabilities for the token right after the prompt (most likely first). "
        "Each row below: a dot where that column's setting can still pick the token, a cross where it cuts it."
    )
    dist = None
    with user_errors("Cannot compute the distribution: "):
        dist = _distribution(
            str(summary.path),
            checkpoint,
            mtime,
            prompt,
            json.dumps({t: dataclasses.asdict(s) for t, s in valid.items()}),
            run,
        )
    if dist is not None:
        top_n = (
            vocab
            if vocab <= 10
            else st.columns([1, 2])[0].slider(
                "Tokens shown", 10, min(100, vocab), **_kept_from("smp_top_n", min(30, vocab), 10, min(100, vocab))
            )
        )
        st.plotly_chart(
            distribution_figure(dist["tokens"], dist["probs"], dist["kept"], top_n=top_n),
            key="smp_distribution",
            width="stretch",
        )
