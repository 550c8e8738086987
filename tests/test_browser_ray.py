"""The Train page through the Ray runner: a server started with TINYGPT_RUNNER=ray and RAY_ADDRESS
pointing to the session's Ray head (conftest.ray_head) trains a run on a Ray worker, live, and the run
lands in the server's own runs folder (no shared filesystem is used: the worker ships it back)."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import ARTIFACTS, poll, start_streamlit, stop_streamlit
from test_browser import assert_no_error, open_from_nav, set_number, wait_idle

from app_pages._live_chart import POINTS_JS as CHART_POINTS

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.ray]


@pytest.fixture
def ray_app(ray_head, tmp_path):
    runs_dir = tmp_path / "runs"
    log_path = ARTIFACTS / f"streamlit-ray-{os.getpid()}.log"
    proc, url = start_streamlit(runs_dir, log_path, extra_env={"TINYGPT_RUNNER": "ray", "RAY_ADDRESS": ray_head})
    try:
        yield {"url": url, "runs_dir": runs_dir}
    finally:
        stop_streamlit(proc)
        log_path.unlink(missing_ok=True)


@pytest.mark.timeout(420)
def test_train_page_trains_on_the_ray_cluster(browser, ray_app):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    try:
        page.goto(ray_app["url"] + "/")
        wait_idle(page)
        open_from_nav(page, "Train")
        set_number(page, "Steps (max_iters)", 60)
        set_number(page, "Eval every (steps)", 20)
        name = page.get_by_role("textbox", name="Run name (optional)")
        name.fill("ray-browser")
        name.press("Enter")
        wait_idle(page)
        page.get_by_role("button", name="Start training").click()

        points = lambda: page.evaluate(CHART_POINTS)  # noqa: E731
        poll(points, lambda n: n > 0, 180, "the loss chart's first points (from the Ray worker)")
        page.get_by_text(re.compile(r"^Done\b")).first.wait_for(timeout=180_000)  # "Done: best validation loss …"
        page.get_by_role("link", name="Open in Attention").wait_for(timeout=30_000)
        assert_no_error(page, "Train (done on Ray)")
    finally:
        context.close()

    (run_dir,) = [p for p in ray_app["runs_dir"].iterdir() if p.is_dir()]
    placement = json.loads((run_dir / "placement.json").read_text())
    assert placement["runner"] == "ray" and placement["pid"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "metrics.csv").is_file()
