"""The Attention page's step slider in headless chromium: dragging it to a kept step redraws the heads.

Runs its own server over a run store holding one tiny run with a checkpoint history.
"""

from __future__ import annotations

import json

import pytest
from conftest import ARTIFACTS, poll, start_streamlit, stop_streamlit

from tinygpt_core.runs import RunStore
from tinygpt_core.training import TrainSpec, train

# heavy: a server of its own and chromium cost a minute or more on 2 cores, which the README's default
# test command (under 5 min) cannot absorb; `python -m pytest -m heavy` runs it.
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.heavy]

IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
# The first attention grid's first heatmap, as plotly parsed it (z rows of the first head).
FIRST_GRID = """() => {
    const gds = Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"] .js-plotly-plot'));
    const gd = gds.find(g => ((g.layout || {}).title || {}).text && g.layout.title.text.includes('attention ·'));
    if (!gd) return null;
    const t = (gd._fullData || []).find(t => t.type === 'heatmap');
    return t ? JSON.stringify(Array.from(t.z, row => Array.from(row))) : null;
}"""
OVER_TRAINING = """() => Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"] .js-plotly-plot'))
    .filter(gd => (((gd.layout || {}).title || {}).text || '').includes('over training')).length"""


@pytest.fixture(scope="module")
def history_server(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    spec = TrainSpec.from_preset(
        "tiny",
        "builtin:tiny",
        name="scrub",
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=16,
        batch_size=4,
        max_iters=8,
        eval_interval=4,
        eval_iters=1,
        warmup_iters=1,
        sample_tokens=0,
        device="cpu",
    )
    assert train(spec, store=RunStore(runs)).status == "done"
    proc, url = start_streamlit(runs, ARTIFACTS / "streamlit-dynamics.log")
    try:
        yield url
    finally:
        stop_streamlit(proc)


def wait_idle(page) -> None:
    page.wait_for_timeout(300)
    page.wait_for_selector(IDLE, timeout=60_000)


@pytest.mark.timeout(300)
def test_dragging_the_step_slider_redraws_the_heads(page, history_server):
    page.goto(history_server + "/attention")
    page.get_by_role("heading", name="Attention", exact=True).first.wait_for(timeout=60_000)
    wait_idle(page)
    final = poll(lambda: page.evaluate(FIRST_GRID), lambda z: z is not None, 60, "the attention grid")
    assert page.evaluate(OVER_TRAINING) == 2  # head scores over training, loss per position × step
    assert "Kept 5 checkpoints" in page.locator("body").inner_text()

    thumb = page.get_by_role("slider").first
    assert "checkpoint" in (thumb.get_attribute("aria-valuetext") or "")  # starts at the picked checkpoint
    thumb.focus()
    thumb.press("Home")  # the first kept step: the initial weights
    wait_idle(page)
    assert (thumb.get_attribute("aria-valuetext") or "") == "step 0"
    at_init = poll(lambda: page.evaluate(FIRST_GRID), lambda z: z is not None and z != final, 60, "a redrawn grid")
    assert json.loads(at_init) != json.loads(final)
    thumb.press("ArrowRight")  # step 1
    wait_idle(page)
    assert (thumb.get_attribute("aria-valuetext") or "") == "step 1"
    assert page.get_by_test_id("stException").count() == 0
