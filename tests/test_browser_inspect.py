"""The Inspect page in headless chromium: the token-loss view (coloured tokens with their top-5 hover text),
the knockout grid (a cell per head, switching to mean ablation), and the logit lens, on a trained run.

Runs against a server of its own with one tiny run trained before it starts.
"""

from __future__ import annotations

import os
import re

import pytest
from conftest import ARTIFACTS, poll, start_streamlit, stop_streamlit
from test_browser import assert_no_error, wait_idle

from tinygpt_core.runs import RunStore
from tinygpt_core.training import TrainSpec, train

# heavy: a server of its own and about a minute and a half on a busy 2-core machine (python -m pytest -m heavy).
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.heavy]

N_LAYER, N_HEAD = 2, 2
TOKEN_SPANS = "() => Array.from(document.querySelectorAll('.tinygpt-tokens span[title]')).map(s => s.title)"
HEATMAP_SHAPES = """() => Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"] .js-plotly-plot'))
    .flatMap(gd => (gd._fullData || []).filter(t => t.type === 'heatmap').map(t => [t.z.length, t.z[0].length]))"""
CHART_TITLES = """() => Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"] .js-plotly-plot'))
    .map(gd => (gd.layout && gd.layout.title && gd.layout.title.text) || '')"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """This module's own app server over a runs folder holding one tiny trained run: {"url", "run_id"}."""
    runs_dir = tmp_path_factory.mktemp("inspect-runs")
    spec = TrainSpec.from_preset(
        "tiny",
        "builtin:tiny",
        n_layer=N_LAYER,
        n_head=N_HEAD,
        n_embd=32,
        block_size=16,
        batch_size=4,
        max_iters=4,
        eval_interval=2,
        eval_iters=1,
        warmup_iters=1,
        sample_tokens=0,
        device="cpu",
        name="inspect-me",
    )
    result = train(spec, store=RunStore(runs_dir))
    assert result.status == "done", result.message
    log = ARTIFACTS / f"streamlit-inspect-{os.getpid()}.log"
    proc, url = start_streamlit(runs_dir, log)
    try:
        yield {"url": url, "run_id": result.run_dir.name}
    finally:
        stop_streamlit(proc)
        log.unlink(missing_ok=True)


@pytest.mark.timeout(300)
def test_token_loss_knockout_grid_and_logit_lens_in_a_browser(page, server):
    page.goto(server["url"] + "/")
    wait_idle(page)
    page.get_by_test_id("stSidebarNav").get_by_role("link", name="Inspect", exact=True).click()
    page.get_by_role("heading", name="Inspect", exact=True).first.wait_for(timeout=60_000)
    wait_idle(page)

    # Token loss (the default view): every token of the validation split coloured, hover text with top 5.
    titles = poll(lambda: page.evaluate(TOKEN_SPANS), lambda t: len(t) > 10, 60, "coloured tokens")
    assert titles[0].startswith("first token")
    assert all(re.match(r"loss \d+\.\d\d nats \(p = [\d.]+\) · expected: ", t) for t in titles[1:])
    assert all(t.count("'") >= 10 for t in titles[1:])  # five quoted guesses
    assert_no_error(page, "Inspect · token loss")

    # The knockout grid: one cell per layer and head, and a switch to mean ablation redraws it.
    # (The view picker is a segmented control: its options are radios.)
    page.get_by_role("radio", name="Head knockout", exact=True).click()
    wait_idle(page)
    shapes = poll(lambda: page.evaluate(HEATMAP_SHAPES), lambda s: len(s) > 0, 60, "the knockout grid")
    assert shapes[0] == [N_LAYER, N_HEAD]
    assert any("zero ablation" in t for t in page.evaluate(CHART_TITLES))
    page.get_by_test_id("stRadio").get_by_text("mean", exact=True).click()
    wait_idle(page)
    poll(lambda: page.evaluate(CHART_TITLES), lambda ts: any("mean ablation" in t for t in ts), 60, "mean grid")
    page.get_by_text("Without L", exact=False).first.wait_for(timeout=30_000)  # the text written without the head
    assert_no_error(page, "Inspect · knockout")

    # The logit lens: a row per residual stream (embeddings and each layer).
    page.get_by_role("radio", name="Logit lens", exact=True).click()
    wait_idle(page)
    shapes = poll(lambda: page.evaluate(HEATMAP_SHAPES), lambda s: len(s) == 2, 60, "the two lens heatmaps")
    assert shapes[0][0] == N_LAYER + 1
    assert_no_error(page, "Inspect · logit lens")
