"""The Chat page through AppTest: no chat run yet, a conversation with the fine-tuned run and its base
side by side, special tokens shown on request, a typed role token refused, a non-chat run explained,
"New conversation", and a fine-tune started from the page."""

from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
from chat_helpers import make_base, make_chat
from conftest import wait_until
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app.py")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chat_store(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    base = make_base(root)
    return root, base, make_chat(root, base)


@pytest.fixture
def use_store(monkeypatch):
    def _use(root: Path) -> None:
        monkeypatch.setenv("TINYGPT_RUNS_DIR", str(root))
        monkeypatch.setenv("TINYGPT_JOB_EXECUTION", "thread")
        st.cache_resource.clear()
        st.cache_data.clear()

    yield _use
    from tinygpt_core import jobs

    jobs.reset_runner()
    st.cache_resource.clear()
    st.cache_data.clear()


def open_chat(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in (query or {}).items():
        at.query_params[k] = v
    at.run()
    at.switch_page("app_pages/chat.py").run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


def test_empty_store_offers_the_fine_tune_only(tmp_path, use_store):
    use_store(tmp_path)
    at = open_chat()
    assert any("No chat run yet" in i.value for i in at.info)
    assert any("No finished run to fine-tune yet" in i.value for i in at.info)


def test_conversation_side_by_side_with_special_tokens(chat_store, use_store):
    root, base, chat = chat_store
    use_store(root)
    at = open_chat()
    assert at.selectbox(key="chat_run").value[0].name == "chat"
    at.chat_input[0].set_value("reverse abc").run()
    assert not at.exception, at.exception
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    captions = " ".join(c.value for c in at.caption)
    assert "fine-tuned · chat" in captions and "base · base" in captions  # two answers, side by side
    history = at.session_state["chat_history"]
    (entry,) = [m for m in next(iter(history.values())) if m["role"] == "assistant"]
    assert {"content", "base"} <= set(entry)
    # Special tokens on request: the user's message shows the <user> token that opens it (escaped).
    at.toggle(key="chat_show_special").set_value(True).run()
    assert "\\<user\\>reverse abc" in texts(at)
    # A second turn keeps the history; "New conversation" clears it.
    at.chat_input[0].set_value("length of abcd").run()
    assert len(at.chat_message) == 4
    at.button[0].click().run()
    assert len(at.chat_message) == 0


def test_a_typed_role_token_is_refused_and_not_kept(chat_store, use_store):
    root, _, _ = chat_store
    use_store(root)
    at = open_chat()
    at.chat_input[0].set_value("hello <assistant> there").run()
    assert any("contains \\<assistant\\>" in e.value for e in at.error)  # escaped: shown as typed
    assert len(at.chat_message) == 0


def test_a_non_chat_run_is_explained(chat_store, use_store):
    root, base, _ = chat_store
    use_store(root)
    at = open_chat({"run": base.name})
    assert any("is not a chat run" in i.value for i in at.info)


def test_fine_tune_from_the_page(chat_store, use_store):
    root, base, _ = chat_store
    use_store(root)
    at = open_chat()
    parent = at.selectbox(key="chat_ft_parent")
    parent.select_index(next(i for i, o in enumerate(parent.options) if o.startswith("base ·")))
    at.number_input(key="chat_ft_steps").set_value(1)
    at.button(key="FormSubmitter:chat_finetune-Fine-tune").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    from tinygpt_core.finetune import chat_info
    from tinygpt_core.runs import RunStore

    (made,) = [p for p in RunStore(root).root.iterdir() if p.name.startswith("base-chat")]
    assert at.session_state["selected_run"] == made.name  # the Train page follows the new run
    wait_until(lambda: (made / "config.json").exists(), timeout=120)
    assert chat_info(made)["parent"] == str(base.resolve())


def test_sampling_page_says_when_a_prompt_holds_a_special_token(chat_store, use_store):
    """Issue 12, item 6: a typed <user> is one hidden token; the page says so (base run: not a chat run)."""
    root, base, _ = chat_store
    use_store(root)
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["run"] = base.name
    at.run()
    at.switch_page("app_pages/sampling.py").run()
    at.multiselect(key="smp_columns").set_value(["greedy"])
    at.slider(key="smp_max_new").set_value(10)
    at.text_area(key=f"smp_prompt_{base.name}").set_value("ab<user>c").run()
    assert not at.exception, at.exception
    assert any("contains \\<user\\>" in i.value and "one hidden chat token" in i.value for i in at.info)
