"""The Tokenizers page through AppTest: one text through three tokenizers with counts, unknown
symbols, the BPE merge table and the merge-by-merge slider, and retraining at another size."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture(scope="module", autouse=True)
def fresh_caches():
    """Trained tokenizers are cached per process; start the module from scratch, then reuse them."""
    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    st.cache_resource.clear()
    st.cache_data.clear()


@pytest.fixture
def empty_store(tmp_path, monkeypatch):
    """No runs at all: this page needs none (the run store is created fresh by the app)."""
    monkeypatch.setenv("TINYGPT_RUNS_DIR", str(tmp_path))
    return tmp_path


def open_page(corpus: str | None = "tiny", size: int | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    at.switch_page("app_pages/tokenizers.py").run()
    assert not at.exception
    if corpus is not None or size is not None:
        if corpus is not None:
            at.selectbox(key="tok_corpus").set_value(corpus)
        if size is not None:
            at.number_input(key="tok_bpe_size").set_value(size)
        at.button[0].click().run()  # the form's Train button
        assert not at.exception
    return at


def strip_tokens(html: str) -> list[str]:
    return re.findall(r"<span [^>]*>(.*?)</span>", html)


def metrics(at: AppTest, label: str) -> list[int]:
    return [int(m.value.replace(",", "")) for m in at.metric if m.label == label]


def test_three_tokenizations_with_counts_and_unknowns(empty_store):
    at = open_page("tiny")
    assert not at.exception and not at.error
    text = at.text_area(key="tok_text").value
    assert "<user>" in text and "🙂" in text
    counts, vocab = metrics(at, "Tokens"), metrics(at, "Vocabulary")
    assert len(counts) == 3 and len(vocab) == 3
    char_n, word_n, bpe_n = counts
    assert word_n < bpe_n < char_n  # words are the longest pieces, characters the shortest
    assert vocab[2] <= 512  # BPE: bytes + merges + special tokens
    strips = [strip_tokens(h.value) for h in at.get("html")]
    assert [len(s) for s in strips[:3]] == counts
    assert "&lt;user&gt;" in strips[0] and "&lt;user&gt;" in strips[2]  # a special token is one token
    # The emoji: char cannot read it (a warning naming it), word maps it to <unk>, BPE reads its bytes.
    assert any("🙂" in w.value for w in at.warning)
    assert "&lt;unk&gt;" in strips[1]
    assert any("<unk>" in i.value and "🙂" in i.value for i in at.info)


def test_merge_table_and_slider_steps(empty_store):
    at = open_page("tiny", size=300)
    assert not at.exception and not at.error
    assert any("300 tokens" in s.value and "builtin:tiny" in s.value for s in at.success)
    table = at.dataframe[0].value
    assert list(table.columns) == ["rank", "id", "left", "right", "merged"]
    assert len(table) == 300 - 256 - 3
    first = table.iloc[0]
    assert first["merged"] == first["left"] + first["right"]

    step0 = strip_tokens(at.get("html")[-1].value)
    slider = at.slider[0]
    assert slider.value == 0 and slider.max > 1
    slider.set_value(slider.max).run()
    assert not at.exception
    last = strip_tokens(at.get("html")[-1].value)
    assert len(last) < len(step0)
    assert len(last) == metrics(at, "Tokens")[2]  # all merges applied = the BPE column's tokens
    at.slider[0].set_value(1).run()
    one = strip_tokens(at.get("html")[-1].value)
    assert len(one) < len(step0) and one != last
    assert any(m.value.startswith("Step **1** merged into") for m in at.markdown)


def test_bigger_vocabulary_gives_fewer_tokens(empty_store):
    at = open_page("tiny", size=260)
    at.text_area(key="tok_text").set_value("The light held, and the keeper slept.").run()
    assert metrics(at, "Vocabulary")[2] == 260
    small = metrics(at, "Tokens")[2]
    at.number_input(key="tok_bpe_size").set_value(512)
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert metrics(at, "Vocabulary")[2] == 512
    assert metrics(at, "Tokens")[2] < small


def test_any_bpe_size_in_range_trains_and_bpe_bytes_read_as_byte_labels(empty_store):
    at = open_page("tiny", size=333)
    assert not at.error
    bpe_strip = at.get("html")[2].proto.body  # char, word, bpe strips in that order
    # The emoji's bytes are never merged on the tiny corpus: each shows its value, never U+FFFD.
    assert "<0xF0>" in bpe_strip.replace("&lt;", "<").replace("&gt;", ">") and "\ufffd" not in bpe_strip


def test_a_builtin_corpus_missing_here_is_marked_and_explained(empty_store, monkeypatch):
    from tinygpt_core import data

    monkeypatch.setattr(data, "_shakespeare_candidates", lambda: [empty_store / "nowhere.txt"])
    st.cache_data.clear()  # forget that the corpus loaded in the tests before this one
    at = open_page(None)
    box = at.selectbox(key="tok_corpus")
    assert box.format_func("shakespeare").endswith("(not downloaded)")
    assert not box.format_func("tiny").endswith("(not downloaded)")
    box.set_value("shakespeare")
    at.button[0].click().run()
    assert not at.exception
    assert any("builtin:shakespeare cannot be used" in w.value for w in at.warning)


def test_the_text_is_kept_across_a_visit_to_another_page(empty_store):
    """Issue 12 item 4 (forms forget), on this page's text."""
    at = open_page()
    at.text_area(key="tok_text").set_value("kept across pages").run()
    at.switch_page("app_pages/runs.py").run()
    at.switch_page("app_pages/tokenizers.py").run()
    assert not at.exception
    assert at.text_area(key="tok_text").value == "kept across pages"
