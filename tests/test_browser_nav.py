"""The first navigation a visitor sees is the app's own, on a fresh server, from the first frame,
whichever page they open first.

A folder named `pages/` next to app.py would make Streamlit run a fresh server's first session as an
old-style multipage app: the sidebar first listed every file of that folder ("app", "common", ...), and a
first visit to a shared link such as /train?run=… ran that page's file alone, with no navigation at all.
The page scripts therefore live in app_pages/. Each test starts its own server (the shared one of
tests/conftest.py has served other sessions already, and the effect only shows on the first), records
every state of the sidebar navigation from the moment the document exists (a MutationObserver
installed before any page script runs), and checks each of them.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import ARTIFACTS, poll, start_streamlit, stop_streamlit

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NAV_TITLES = ["Home", "Train", "Runs & ablations", "Attention", "Inspect", "Sampling", "Chat", "Tokenizers"]
NOT_PAGES = {"app", "common", "_common", "train form", "train setup", "train run"}

# Every distinct list of sidebar nav entries, in the order they appeared (records even a state that
# lasts a single frame: the observer runs on every DOM change).
RECORD_NAV = """
window.__navSeen = [];
const record = () => {
  const nav = document.querySelector('[data-testid="stSidebarNav"]');
  const names = nav ? Array.from(nav.querySelectorAll('a'))
    .map(a => a.innerText.split('\\n').map(t => t.trim()).filter(Boolean).pop() || '')  // the label, not the icon
    .filter(Boolean) : [];
  const key = JSON.stringify(names);
  const seen = window.__navSeen;
  if (names.length && (!seen.length || seen[seen.length - 1] !== key)) seen.push(key);
};
new MutationObserver(record).observe(document, {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture
def fresh_server(tmp_path):
    log = ARTIFACTS / f"streamlit-nav-{os.getpid()}.log"
    proc, url = start_streamlit(tmp_path / "runs", log)
    try:
        yield url
    finally:
        stop_streamlit(proc)
        log.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("first_url", "heading"),
    [
        pytest.param("/", "TinyGPT Lab", id="home"),
        # A fresh server each (7 s): the deep links run in CI's heavy stage.
        pytest.param("/train?run=no-such-run", "Train", id="train-link", marks=pytest.mark.heavy),
        pytest.param("/attention", "Attention", id="attention", marks=pytest.mark.heavy),
    ],
)
def test_the_first_navigation_lists_only_the_apps_pages(browser, fresh_server, first_url, heading):
    page = browser.new_page()
    try:
        page.add_init_script(RECORD_NAV)
        page.goto(fresh_server + first_url, wait_until="commit")
        seen = poll(
            lambda: [json.loads(k) for k in page.evaluate("window.__navSeen || []")],
            lambda states: bool(states) and states[-1] == NAV_TITLES,
            timeout_s=90,
            what=f"the app's navigation in the sidebar of {first_url}",
        )
        page.get_by_role("heading", name=heading, exact=True).first.wait_for(timeout=60_000)
        page.wait_for_timeout(500)  # anything drawn after the app settled would be recorded too
        seen = [json.loads(k) for k in page.evaluate("window.__navSeen")]
    finally:
        page.close()
    assert seen[0] == NAV_TITLES, f"the first navigation shown was {seen[0]} (all: {seen})"
    for names in seen:
        assert not {n.lower() for n in names} & NOT_PAGES, f"a file that is not a page was listed: {names}"
        assert names == NAV_TITLES, f"the navigation changed to {names} (all: {seen})"
