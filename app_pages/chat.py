"""Chat page: talk to a chat run (fine-tuned on conversations), beside its base model; start a fine-tune.

Thin UI: the chat format, the prompt fitted to the context and the streamed answer come from
tinygpt_core.chatbot; which runs are chat runs and the fine-tune spec from tinygpt_core.finetune;
the sampling settings are the sampling module's own (SamplingSettings). The conversation is kept in
the session as plain text (never tensors), one per chosen run, and "New conversation" clears it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import streamlit as st

from app_pages._common import (
    kept,
    load_run_cached,
    md,
    openable_runs,
    read_only_notice,
    remember_job,
    remember_run,
    runner,
    selected_run_id,
    user_errors,
    visitor,
)
from tinygpt_core import limits
from tinygpt_core.chat import ROLE_TOKENS, Message, check_user_text
from tinygpt_core.chatbot import Reply, stream_reply
from tinygpt_core.chatdata import BUILTIN_CHAT, BUILTIN_DESCRIPTION
from tinygpt_core.errors import TinyGPTError
from tinygpt_core.finetune import FINETUNE_SETTINGS, chat_info, finetune_spec
from tinygpt_core.sampling import MAX_TEMPERATURE, MIN_TEMPERATURE, SamplingSettings

HISTORY = "chat_history"  # session key: {run id: [{"role", "content", "base"}]}
UPLOAD = "Upload a JSONL file"
MAX_KEPT_MESSAGES = 200  # per conversation, in the session: bounded memory for a long chat


def _chat_record(run) -> dict | None:
    try:
        return chat_info(run.path)
    except TinyGPTError:
        return None


def _settings() -> tuple[SamplingSettings, bool, bool]:
    """The sidebar: sampling settings, "show special tokens" and "compare with the base model"."""
    with st.sidebar:
        st.subheader("Answer settings")
        strategy = st.radio("Strategy", ["greedy", "sample"], horizontal=True, **kept("chat_strategy"))
        s = SamplingSettings(strategy=strategy)
        if strategy == "sample":
            s.temperature = st.number_input(
                "Temperature", MIN_TEMPERATURE, MAX_TEMPERATURE, 0.8, 0.05, format="%.3g", **kept("chat_temperature")
            )
            s.top_k = st.number_input("Top-k", 1, 10_000, None, 1, placeholder="off", **kept("chat_top_k"))
            s.top_p = st.number_input("Top-p", 0.01, 1.0, None, 0.05, placeholder="off", **kept("chat_top_p"))
            seed = st.number_input("Seed", 0, 1_000_000, None, 1, placeholder="random", **kept("chat_seed"))
            s.seed = None if seed is None else int(seed)
        top = limits.current().max_new_tokens  # TINYGPT_MAX_NEW_TOKENS, as on the Sampling page
        s.max_new_tokens = int(
            st.number_input("Longest answer (tokens)", 1, top, min(40, top), 1, **kept("chat_max_tokens"))
        )
        show = st.toggle(
            "Show special tokens",
            help="Write out the hidden tokens that mark who speaks: "
            + ", ".join(f"`{t}`" for t in ROLE_TOKENS.values()),
            **kept("chat_show_special"),
        )
        compare = st.toggle("Base model side by side", value=True, **kept("chat_compare"))
    return s, show, compare


def _shown(message: dict, show: bool, key: str = "content") -> str:
    text = message.get(key) or ""
    if not show:
        return md(text)
    role = message["role"]
    opened = ROLE_TOKENS[role] + text
    if role == "assistant" and message.get(f"{key}_ended"):
        opened += ROLE_TOKENS["user"]
    return md(opened)


def _history(run_id: str) -> list[dict]:
    return st.session_state.setdefault(HISTORY, {}).setdefault(run_id, [])


def _messages(history: list[dict], key: str) -> list[Message]:
    """The conversation one model has had: its own answers (``key``) after each user message."""
    out = []
    for m in history:
        text = m.get(key) if m["role"] == "assistant" else m["content"]
        if m["role"] == "assistant" and not (text or "").strip():
            out.pop()  # an empty answer is no message: that exchange is left out
            continue
        out.append(Message(m["role"], text))
    return out


def _answer(run, history: list[dict], key: str, settings: SamplingSettings, show: bool, entry: dict) -> bool:
    """Stream one model's answer into the page and ``entry``; False (with the reason shown) when it cannot."""
    reply = Reply()
    try:
        with limits.decode_slot():  # requests take turns on a shared server (TINYGPT_MAX_DECODES_AT_ONCE)
            st.write_stream(
                md(piece)
                for piece in stream_reply(
                    run.model, run.tokenizer, _messages(history, key), settings, show_special=show, reply=reply
                )
            )
    except TinyGPTError as exc:
        st.error(f"Cannot answer: {md(exc)}")
        return False
    entry[key], entry[f"{key}_ended"] = reply.text, reply.ended
    if reply.dropped:
        st.caption(f"The {reply.dropped} oldest messages no longer fit the context and were left out.")
    return True


def _finetune_form(runs) -> None:
    st.subheader("Fine-tune a run for chat")
    st.caption(
        "Starts a new run from a trained run's weights and tokenizer and trains it on conversations; the loss "
        "counts only the assistant's tokens. It trains live on the Train page; at each evaluation it answers "
        "held-out prompts (their exact-match accuracy is a curve of the run)."
    )
    if read_only_notice("Fine-tuning is turned off on this server."):
        return
    finished = [r for r in runs if r.status not in ("queued", "running")]
    if not finished:
        st.info("No finished run to fine-tune yet: train one on the **Train** page first.")
        return
    with st.form("chat_finetune", enter_to_submit=False):
        ids = [r.id for r in finished]
        current = selected_run_id()
        parent = st.selectbox(
            "Start from",
            finished,
            index=ids.index(current) if current in ids else 0,
            format_func=lambda r: f"{r.name} · {r.status}",
            key="chat_ft_parent",
        )
        source = st.radio(
            "Conversations", [BUILTIN_CHAT, UPLOAD], key="chat_ft_source", horizontal=True, help=BUILTIN_DESCRIPTION
        )
        mb = limits.current().max_upload_mb
        uploaded = st.file_uploader(
            f'JSONL, one {{"messages": [...]}} per line (up to {mb} MB)',
            type=["jsonl"],
            key="chat_ft_upload",
            max_upload_size=mb,
        )
        top = limits.current().max_iters  # TINYGPT_MAX_ITERS
        steps = st.number_input("Steps", 1, top, min(FINETUNE_SETTINGS["max_iters"], top), 50, key="chat_ft_steps")
        go = st.form_submit_button("Fine-tune", type="primary", icon=":material/chat:")
    if not go:
        return
    if source == UPLOAD and uploaded is None:
        st.error("Choose a JSONL file to upload first, or pick the built-in conversations.")
        return
    job_id = None
    with user_errors("Could not start the fine-tune: "):
        if source == UPLOAD:
            spec = finetune_spec(parent.path, uploaded.name, data=uploaded.getvalue(), max_iters=int(steps))
        else:
            spec = finetune_spec(parent.path, BUILTIN_CHAT, max_iters=int(steps))
        job_id = runner().submit(spec, owner=visitor())
    if job_id is not None:
        snap = runner().state(job_id)
        remember_job(job_id)
        params = {"job": job_id}
        if snap.run_id:
            remember_run(snap.run_id)
            params["run"] = snap.run_id
        st.switch_page("app_pages/train.py", query_params=params)


def main() -> None:
    st.title("Chat")
    st.caption("Talk to a run fine-tuned on conversations, with the model it started from answering the same message.")
    runs = openable_runs()
    chat_runs = [(r, rec) for r in runs for rec in (_chat_record(r),) if rec is not None]
    if not chat_runs:
        st.info("No chat run yet. Fine-tune a trained run on conversations below; it then appears here.")
    else:
        ids = [r.id for r, _ in chat_runs]
        current = selected_run_id()
        summary, record = st.selectbox(
            "Chat run",
            chat_runs,
            index=ids.index(current) if current in ids else 0,
            format_func=lambda p: f"{p[0].name} · {p[0].status} · from {p[1].get('parent_name', '?')}",
            key="chat_run",
        )
        if current is not None and current not in ids and any(r.id == current for r in runs):
            other = next(r for r in runs if r.id == current)
            st.info(
                f"**{md(other.name)}** is not a chat run: it was never fine-tuned on conversations, so it only "
                "continues text. Fine-tune it below, or pick a chat run.",
                icon=":material/info:",
            )
        _chat(summary, record, runs)
    st.divider()
    _finetune_form(runs)


def _chat(summary, record: dict, runs) -> None:
    settings, show, compare = _settings()
    run = load_run_cached(summary)
    if run is None:
        return
    base_path = Path(record.get("parent", ""))
    base_summary = next((r for r in runs if r.path is not None and Path(r.path).resolve() == base_path), None)
    base = None
    if compare:
        if base_summary is None:
            st.caption(f"The base run ({md(record.get('parent_name', base_path.name))}) is gone: no side by side.")
        else:
            base = load_run_cached(base_summary)
    history = _history(summary.id)
    if st.button("New conversation", icon=":material/add_comment:", disabled=not history):
        history.clear()
    names = (summary.name, base_summary.name if base_summary is not None else "")
    for m in history:
        with st.chat_message(m["role"]):
            if m["role"] == "user" or base is None:
                st.markdown(_shown(m, show))
            else:
                left, right = st.columns(2)
                left.caption(f"fine-tuned · {md(names[0])}")
                left.markdown(_shown(m, show))
                right.caption(f"base · {md(names[1])}")
                right.markdown(_shown(m, show, "base"))
    text = st.chat_input("Message", max_chars=2000)
    if not text:
        return
    try:
        check_user_text(text)  # e.g. a typed <user>: say so, keep nothing
    except TinyGPTError as exc:
        st.error(f"{md(exc)}.", icon=":material/error:")
        return
    user = {"role": "user", "content": text}
    with st.chat_message("user"):
        st.markdown(_shown(user, show))
    entry = {"role": "assistant", "content": "", "base": ""}
    with st.chat_message("assistant"):
        if base is None:
            ok = _answer(run, [*history, user], "content", settings, show, entry)
        else:
            left, right = st.columns(2)
            with left:
                st.caption(f"fine-tuned · {md(names[0])}")
                ok = _answer(run, [*history, user], "content", settings, show, entry)
            with right:
                st.caption(f"base · {md(names[1])}")
                if ok:
                    _answer(base, [*history, user], "base", dataclasses.replace(settings), show, entry)
    if ok:  # a message the model could not read is not kept: the conversation goes on without it
        history.extend([user, entry])
        del history[:-MAX_KEPT_MESSAGES]  # older turns no longer fit any context of this lab anyway


main()
