"""What a new user trips over, checked in a real browser (issue 12): forms across page switches, numbers
out of range, the Watch link's URL, Enter in the grid form, and a chart PNG download.

Runs against a server of its own (its runs, grids and jobs would change what the shared server's tests
of tests/test_browser.py expect to find), started once for the module.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qs, urlparse

import pytest
from conftest import ARTIFACTS, poll, start_streamlit, stop_streamlit
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from test_browser import assert_no_error, open_from_nav, set_number, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.heavy]  # its own server: CI's heavy stage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """This module's own app server and runs folder: {"url", "runs_dir"}."""
    runs_dir = tmp_path_factory.mktemp("forms-runs")
    log = ARTIFACTS / f"streamlit-forms-{os.getpid()}.log"
    proc, url = start_streamlit(runs_dir, log)
    try:
        yield {"url": url, "runs_dir": runs_dir}
    finally:
        stop_streamlit(proc)
        log.unlink(missing_ok=True)


def home(page, server) -> None:
    page.goto(server["url"] + "/")
    wait_idle(page)


def choose(page, picker, option: str) -> None:
    """Pick ``option`` in a multiselect and wait until it shows as chosen.

    The dropdown is opened by typing the option into the picker's search box, and opened again if a
    rerun that an earlier click started (Clear all, say) closed it before the option could be clicked.
    """
    box = picker.locator("input").first
    for attempt in range(3):
        box.click()
        box.fill(option)
        item = page.get_by_role("option", name=option, exact=True).first
        try:
            item.wait_for(timeout=10_000)
            item.click()
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
            wait_idle(page)
    picker.get_by_text(option, exact=True).first.wait_for(timeout=30_000)
    page.keyboard.press("Escape")
    wait_idle(page)


def number(page, label: str):
    return page.get_by_role("spinbutton", name=label, exact=True)


def start_button(page):
    return page.get_by_role("button", name="Start training")


def test_train_form_keeps_edits_across_pages_and_a_bad_number_keeps_start_disabled(page, server):
    home(page, server)
    open_from_nav(page, "Train")
    set_number(page, "Layers", 3)
    set_number(page, "Width", 96)
    set_number(page, "Steps (max_iters)", 123)

    open_from_nav(page, "Runs & ablations")
    open_from_nav(page, "Train")
    kept = {label: number(page, label).input_value() for label in ("Layers", "Width", "Steps (max_iters)")}
    assert kept == {"Layers": "3", "Width": "96", "Steps (max_iters)": "123"}

    assert start_button(page).is_enabled()
    # (0 layers is a valid model now: the bigram baseline of the ladder)
    for label, bad in (("Layers", -3), ("Layers", 999), ("Width", 0), ("Steps (max_iters)", -1), ("Context", 99999)):
        set_number(page, label, bad)  # the value typed reaches the server (no silent fallback to the old one)
        error = page.get_by_test_id("stAlertContentError").first.inner_text()
        assert label in error and str(bad) in error, error
        assert start_button(page).is_disabled(), f"Start enabled with {label} = {bad}"
        good = {"Layers": 3, "Width": 96, "Steps (max_iters)": 123, "Context": 32}[label]
        set_number(page, label, good)
        assert start_button(page).is_enabled()
    assert_no_error(page, "Train (form)")


def test_watch_from_the_active_jobs_banner_puts_the_run_in_the_url(page, server):
    home(page, server)
    open_from_nav(page, "Train")
    set_number(page, "Steps (max_iters)", 20_000)
    start_button(page).click()
    page.wait_for_url(re.compile(r"/train\?.*run="), timeout=60_000)
    run_id = parse_qs(urlparse(page.url).query)["run"][0]
    page.get_by_role("button", name="Stop", exact=True).wait_for(timeout=60_000)

    page.get_by_role("button", name="New run").click()
    wait_idle(page)
    assert "run=" not in page.url
    page.locator(f".st-key-train_watch_{run_id}").get_by_role("button", name="Watch").click()
    page.wait_for_url(re.compile(rf"/train\?.*run={re.escape(run_id)}"), timeout=30_000)

    page.reload()  # the run stays in view: its id is in the URL
    stop = page.get_by_role("button", name="Stop", exact=True)
    stop.wait_for(timeout=60_000)
    assert run_id in page.url
    stop.click()
    page.get_by_text(re.compile(r"^Stopped at step")).first.wait_for(timeout=60_000)
    assert_no_error(page, "Train (watched)")


def test_enter_in_the_grid_form_does_not_launch_a_grid(page, server):
    home(page, server)
    open_from_nav(page, "Runs & ablations")
    page.get_by_role("tab", name="Ablation grid").click()
    wait_idle(page)
    steps = number(page, "Steps per run (max_iters)")
    steps.fill("10")
    steps.press("Enter")
    wait_idle(page)
    page.wait_for_timeout(1500)
    assert page.get_by_text(re.compile(r"^Launched ")).count() == 0
    assert "grid=" not in page.url
    assert_no_error(page, "Runs (grid form)")


def test_chart_png_download_is_a_real_png(page, server, tmp_path):
    from conftest import tiny_spec

    from tinygpt_core.runs import RunStore
    from tinygpt_core.training import train

    store = RunStore(server["runs_dir"])
    for name in ("png-a", "png-b"):
        assert train(tiny_spec(name=name, max_iters=6, eval_interval=3), store=store).status == "done"

    home(page, server)
    open_from_nav(page, "Runs & ablations")
    picker = page.get_by_test_id("stMultiSelect").filter(has_text="Runs to compare")
    for name in ("png-a", "png-b"):
        choose(page, picker, name)
    button = page.get_by_test_id("stDownloadButton").filter(has_text="Chart as PNG").first
    button.wait_for(timeout=30_000)
    with page.expect_download(timeout=120_000) as info:
        button.click()
    path = tmp_path / "chart.png"
    info.value.save_as(path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, (len(data), data[:16])
    assert info.value.suggested_filename.endswith(".png")
    assert_no_error(page, "Runs (PNG)")
    poll(lambda: page.get_by_test_id("stDownloadButtonError").count(), lambda n: n == 0, 5, "no download error")


def test_a_second_grid_opens_on_the_grid_tab_showing_it(page, server):
    home(page, server)
    open_from_nav(page, "Runs & ablations")
    launched = []
    for ablation in ("relu", "no-layernorm"):
        page.get_by_role("tab", name="Ablation grid").click()
        wait_idle(page)
        set_number(page, "Steps per run (max_iters)", 10)
        picker = page.get_by_test_id("stMultiSelect").filter(has_text="Ablations")
        picker.get_by_role("button", name=re.compile("Clear all", re.I)).first.click()  # the defaults
        wait_idle(page)
        choose(page, picker, ablation)
        page.get_by_role("button", name="Launch grid").click()
        wait_idle(page)
        flash = page.get_by_text(re.compile(r"^Launched grid-")).first
        flash.wait_for(timeout=30_000)
        grid_id = re.search(r"(grid-[\w-]+)", flash.inner_text()).group(1)
        launched.append(grid_id)
        url_grid = lambda: parse_qs(urlparse(page.url).query).get("grid", [""])[0]  # noqa: E731
        poll(url_grid, lambda g, want=grid_id: g == want, 30, "?grid= of the new grid")
        assert page.get_by_role("tab", name="Ablation grid").get_attribute("aria-selected") == "true"
        selector = page.get_by_test_id("stSelectbox").filter(has=page.get_by_text("Grid", exact=True)).first
        shown = selector.inner_text() + " " + " ".join(i.input_value() for i in selector.locator("input").all())
        assert grid_id in shown, shown
        page.wait_for_timeout(1100)  # grid ids carry the second they were made in
    assert launched[0] != launched[1]
    assert_no_error(page, "Runs (grids)")
