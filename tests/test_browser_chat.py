"""The Chat page in a real browser (issue 16): a message typed into the chat input gets two streamed
answers, the fine-tuned run's and its base's, side by side; the special tokens show on request.

Runs against a server of its own whose runs folder holds a tiny base run and its chat fine-tune.
"""

from __future__ import annotations

import os

import pytest
from chat_helpers import make_base, make_chat
from conftest import ARTIFACTS, start_streamlit, stop_streamlit
from test_browser import assert_no_error, open_from_nav, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("chat-runs")
    base = make_base(runs_dir)
    make_chat(runs_dir, base)
    log = ARTIFACTS / f"streamlit-chat-{os.getpid()}.log"
    proc, url = start_streamlit(runs_dir, log)
    try:
        yield {"url": url, "runs_dir": runs_dir}
    finally:
        stop_streamlit(proc)
        log.unlink(missing_ok=True)


def test_chat_answers_side_by_side_in_the_browser(page, server):
    page.goto(server["url"] + "/")
    wait_idle(page)
    open_from_nav(page, "Chat")
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill("reverse abc")
    box.press("Enter")
    wait_idle(page, timeout_ms=120_000)
    messages = page.get_by_test_id("stChatMessage")
    assert messages.count() == 2
    answer = messages.nth(1).inner_text()
    assert "fine-tuned · chat" in answer and "base · base" in answer
    assert "<user>" not in answer
    page.get_by_text("Show special tokens").click()
    wait_idle(page)
    assert "<user>reverse abc" in page.get_by_test_id("stChatMessage").first.inner_text()
    assert_no_error(page, "Chat")
