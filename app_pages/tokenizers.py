"""Tokenizers page: one text through the char, word and BPE tokenizers, and BPE merges step by step.

Thin UI: the tokenizers are trained and applied by tinygpt_core.tokenizers, the corpora come from
tinygpt_core.data and the coloured token strips from tinygpt_core.viz.
"""

from __future__ import annotations

import time
from collections import Counter

import pandas as pd
import streamlit as st

from app_pages._common import kept, user_errors
from tinygpt_core import limits
from tinygpt_core.data import builtin_corpus_problem, corpus_from_bytes, list_builtin_corpora, load_corpus
from tinygpt_core.errors import TinyGPTError
from tinygpt_core.tokenizers import Tokenizer, train_tokenizer
from tinygpt_core.viz import token_html, visible_token

DEFAULT_TEXT = "Hello, world! <user> Tokenizers don't split text the way you'd expect 🙂 — do they?"
BPE_MIN_SIZE, BPE_MAX_SIZE = 260, 8192  # 256 bytes + 3 special tokens + at least one merge; bounded training work
# Preferred default corpus, best first: real prose teaches BPE the most readable merges.
PREFERRED_CORPORA = ("shakespeare", "pystdlib", "tiny")
# token_html colours values 0..1 from red through yellow to green; two light neighbours alternate.
ALTERNATE = (0.55, 0.95)


@st.cache_data(show_spinner="Loading corpus…", max_entries=4)
def _builtin_text(name: str) -> str:
    return load_corpus(f"builtin:{name}").text


def _missing(name: str) -> str | None:
    """Why builtin:NAME cannot be loaded here (e.g. Shakespeare not downloaded yet), or None: the core's
    check, shared with the Train page's picker (cheap, so a download that lands is seen at once)."""
    return builtin_corpus_problem(name)


# Keyed by the corpus text's hash + kind + size (the text itself is not hashed on every rerun); a
# trained tokenizer is read-only afterwards, so one per server.
@st.cache_resource(show_spinner="Training tokenizer…", max_entries=12)
def _trained(corpus_sha: str, kind: str, vocab_size: int | None, _text: str) -> tuple[Tokenizer, float]:
    start = time.perf_counter()
    tok = train_tokenizer(kind, _text, vocab_size)
    return tok, time.perf_counter() - start


@st.cache_data(show_spinner=False, max_entries=32)
def _bpe_steps(corpus_sha: str, vocab_size: int, text: str, _corpus_text: str) -> list[list[str]]:
    tok, _ = _trained(corpus_sha, "bpe", vocab_size, _corpus_text)
    return tok.encode_steps(text)


def _strip(tokens: list[str], ids: list[int] | None = None, highlight: set[str] | None = None) -> None:
    """Tokens as spans in two alternating colours so every boundary shows; hover gives the id and string.

    With ``highlight``, those tokens are green and the rest plain grey instead (the tokens a merge made).
    """
    titles = [f"id {i} · {t!r}" for i, t in zip(ids, tokens)] if ids is not None else [repr(t) for t in tokens]
    if highlight is None:
        values = [ALTERNATE[k % 2] for k in range(len(tokens))]
    else:
        values = [1.0 if t in highlight else float("nan") for t in tokens]
    st.html(token_html(tokens, values, titles))


st.title("Tokenizers")
st.caption(
    "A model never sees letters, only token ids. The same text becomes very different sequences under a "
    "character, a word and a byte-pair (BPE) tokenizer: compare how many tokens each needs and what it "
    "does with symbols it never saw."
)

names = [n for n, _ in list_builtin_corpora()]
descriptions = dict(list_builtin_corpora())
default_corpus = next((n for n in PREFERRED_CORPORA if n in names and not _missing(n)), names[0])
UPLOAD = "upload"
max_mb = limits.current().max_upload_mb

with st.form("tok_train_form", border=True):
    f1, f2, f3 = st.columns([3, 3, 1], vertical_alignment="bottom")
    choice = f1.selectbox(
        "Corpus the tokenizers learn from",
        [*names, UPLOAD],
        index=names.index(default_corpus),
        format_func=lambda n: (
            "Your own .txt file…" if n == UPLOAD else f"builtin:{n}" + (" (not downloaded)" if _missing(n) else "")
        ),
        key="tok_corpus",
        help="\n\n".join(f"**builtin:{n}**: {d}" for n, d in descriptions.items()),
    )
    bpe_size = f2.number_input(
        "BPE vocabulary size",
        min_value=BPE_MIN_SIZE,
        max_value=BPE_MAX_SIZE,
        value=512,
        step=64,
        key="tok_bpe_size",
        help=f"256 byte tokens + learned merges + 3 special tokens ({BPE_MIN_SIZE:,} to {BPE_MAX_SIZE:,}). "
        "Bigger vocabularies give fewer, longer tokens.",
    )
    uploaded = st.file_uploader(
        f"Your own corpus: a UTF-8 .txt file of up to {max_mb} MB (used when the corpus is 'Your own .txt file')",
        type=["txt"],
        key="tok_upload",
        max_upload_size=max_mb,
    )
    f3.form_submit_button("Train", type="primary", icon=":material/play_arrow:", width="stretch")

if choice == UPLOAD:
    if uploaded is None:
        st.info("Choose a .txt file above, then press **Train**.", icon=":material/upload_file:")
        st.stop()
    try:
        upload = corpus_from_bytes(uploaded.name, uploaded.getvalue(), max_bytes=limits.current().max_upload_bytes)
    except TinyGPTError as exc:
        st.error(f"Cannot use that file: {exc}", icon=":material/error:")
        st.stop()
    corpus_label, corpus_text, corpus_sha = upload.name, upload.text, upload.sha256
    st.caption(f"{corpus_label} — your file, {len(corpus_text):,} characters (kept only in this server's memory).")
else:
    if why := _missing(choice):
        st.warning(f"builtin:{choice} cannot be used on this server: {why}", icon=":material/cloud_off:")
        st.stop()
    corpus_label, corpus_text = f"builtin:{choice}", _builtin_text(choice)
    corpus_sha = f"builtin:{choice}"
    st.caption(f"builtin:{choice} — {descriptions.get(choice, '')}")

st.session_state.setdefault("tok_text", DEFAULT_TEXT)  # the start value; kept across page visits (issue 12)
text = st.text_area("Text to tokenize", **kept("tok_text"), height=90)

tokenizers: dict[str, tuple[Tokenizer, float]] = {}
with user_errors("Cannot train the tokenizers: "):
    for kind in ("char", "word", "bpe"):
        tokenizers[kind] = _trained(corpus_sha, kind, bpe_size if kind == "bpe" else None, corpus_text)
if len(tokenizers) < 3:
    st.stop()

bpe, bpe_seconds = tokenizers["bpe"]
st.success(
    f"BPE tokenizer with {bpe.vocab_size:,} tokens ({len(bpe.merges):,} merges) trained on {corpus_label} "
    f"in {bpe_seconds:.2f} s.",
    icon=":material/timer:",
)
if bpe.vocab_size < bpe_size:
    st.info(
        f"{corpus_label} ran out of pairs to merge after {len(bpe.merges):,} merges, so the BPE vocabulary "
        f"is {bpe.vocab_size:,} instead of {bpe_size:,}. Pick a larger corpus for a larger vocabulary."
    )

labels = {"char": "Characters", "word": "Words", "bpe": "Byte pairs (BPE)"}
blurbs = {
    "char": (
        "One token per character seen in the corpus. Tiny vocabulary, long sequences; unseen characters cannot be read."
    ),
    "word": (
        "One token per word, number, punctuation mark or space run. Short sequences, huge vocabulary; "
        "unseen words become <unk>."
    ),
    "bpe": "Starts from the 256 bytes and merges frequent pairs. Any text encodes; common words become single tokens.",
}
cols = st.columns(3, gap="medium")
for col, kind in zip(cols, ("char", "word", "bpe")):
    tok, _ = tokenizers[kind]
    with col, st.container(border=True):
        st.subheader(labels[kind])
        st.caption(blurbs[kind])
        unknown = tok.unknown_symbols(text)
        shown_text = text
        if kind == "char" and unknown:
            st.warning(
                f"{len(unknown)} symbol(s) never appear in {corpus_label}, so a character model trained on it "
                f"cannot read them: {', '.join(repr(u) for u in unknown[:20])}. They are left out below; pick a "
                "corpus that contains them, or use BPE, which reads any text.",
                icon=":material/warning:",
            )
            lacking = set(unknown)
            shown_text = "".join(c for c in text if c not in lacking)
        with user_errors():
            ids = tok.encode(shown_text)
            m1, m2 = st.columns(2)
            m1.metric("Tokens", f"{len(ids):,}")
            m2.metric("Vocabulary", f"{tok.vocab_size:,}")
            if ids:
                st.caption(f"{len(shown_text) / len(ids):.2f} characters per token")
                _strip(tok.token_strings(ids), ids)
            else:
                st.caption("No tokens: the text is empty.")
        if kind == "word" and unknown:
            st.info(
                f"{len(unknown)} piece(s) are not in the word vocabulary and become `<unk>`: "
                f"{', '.join(repr(u) for u in unknown[:20])}{' …' if len(unknown) > 20 else ''}.",
                icon=":material/help:",
            )

st.divider()
st.subheader("BPE merges, step by step")
st.caption(
    "BPE encodes by starting from the text's UTF-8 bytes and applying the learned merges in the order they "
    "were learned. Drag the slider to apply them one at a time to your text."
)
steps = _bpe_steps(corpus_sha, bpe_size, text, corpus_text) if text else [[]]
left, right = st.columns([3, 2], gap="large")
with left:
    if len(steps) > 1:
        k = st.slider("Merges applied to this text", 0, len(steps) - 1, 0, key=f"tok_bpe_step_{len(steps)}")
    else:
        k = 0
        st.caption("No learned merge applies to this text.")
    current = steps[k]
    created: list[str] = []
    if k > 0:
        # The token(s) this step created: present now, more often than one step earlier.
        created = list((Counter(current) - Counter(steps[k - 1])).keys())
        merged_ranks = {m: r for r, (_, _, m) in reversed(list(enumerate(bpe.merge_labels(), 1)))}
        which = ", ".join(
            f"`{visible_token(t)}`" + (f" (merge #{merged_ranks[t]})" if t in merged_ranks else "") for t in created
        )
        st.markdown(f"Step **{k}** merged into {which} → **{len(current)}** tokens (from {len(steps[0])} bytes).")
    else:
        st.markdown(f"Step **0**: the raw UTF-8 bytes, **{len(current)}** tokens.")
    if current:
        _strip(current, highlight=set(created) if k > 0 else None)
with right:
    merges = bpe.merge_labels()
    table = pd.DataFrame(
        {
            "rank": range(1, len(merges) + 1),
            "id": range(256, 256 + len(merges)),
            "left": [visible_token(a) for a, _, _ in merges],
            "right": [visible_token(b) for _, b, _ in merges],
            "merged": [visible_token(m) for _, _, m in merges],
        }
    )
    st.markdown(f"**Learned merges** ({len(merges):,}, in the order learned)")
    st.dataframe(table, hide_index=True, height=320, width="stretch")
