"""Watching a run must not slow it down: the same Quick start, unwatched and then watched in chromium.

Once, a run watched on its Train page trained at about 1/80 of its unwatched rate (the server's page
reruns held the interpreter lock the training thread needed). This guards against that collapse with
a loose ratio measured inside the test, not a wall-clock bound; the real targets live in bench/watched.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import poll

from app_pages._live_chart import POINTS_JS as CHART_POINTS

# heavy: a step-rate ratio wants the machine to itself, so it runs with the load tests, not beside others.
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.heavy]

IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
MIN_RATIO = 1 / 3


def status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "status.json").read_text()).get("status", "")
    except (OSError, ValueError):
        return ""


def steps_per_s(run_dir: Path) -> float:
    m = pd.read_csv(run_dir / "metrics.csv")
    return int(m["step"].iloc[-1]) / float(m["elapsed_s"].iloc[-1])


def quick_start(page) -> str:
    """Press Home's Quick start; returns the run id once the Train page has it in the URL."""
    page.goto("/")
    page.wait_for_timeout(300)
    page.wait_for_selector(IDLE, timeout=90_000)
    page.get_by_role("button", name="Quick start").click()
    href = poll(lambda: page.evaluate("location.href"), lambda h: "run=" in h, 90, "the run id in the URL")
    return href.split("run=", 1)[1].split("&", 1)[0]


@pytest.mark.timeout(600)
def test_a_watched_run_keeps_at_least_a_third_of_its_unwatched_step_rate(page, app_server):
    runs_dir = Path(app_server["runs_dir"])

    # Unwatched: start it, then leave the page at once.
    alone = runs_dir / quick_start(page)
    page.goto("about:blank")
    poll(lambda: status(alone), lambda s: s == "done", 300, "the unwatched run to finish")

    # Watched: the same Quick start, with its Train page open (and its chart updating) throughout.
    watched = runs_dir / quick_start(page)
    # A second tab opened mid-run finds the job by its run id and shows the curve so far.
    other = page.context.new_page()
    other.goto(f"/train?run={watched.name}")
    poll(lambda: other.evaluate(CHART_POINTS), lambda n: n > 0, 90, "the second tab's chart")
    other.close()
    seen = []
    deadline = time.monotonic() + 300
    while status(watched) in ("", "queued", "running"):
        assert time.monotonic() < deadline, "the watched run did not finish in 300 s"
        try:
            seen.append(page.evaluate(CHART_POINTS))
        except Exception:  # noqa: BLE001 - the chart remounting between two reads
            pass
        time.sleep(0.5)
    assert status(watched) == "done"
    assert len(set(seen)) > 2, f"the chart did not update while the run trained (points seen: {seen})"

    rate_alone, rate_watched = steps_per_s(alone), steps_per_s(watched)
    print(f"\nsteps/s unwatched {rate_alone:.1f}, watched {rate_watched:.1f} ({rate_watched / rate_alone:.0%})")
    assert rate_watched >= MIN_RATIO * rate_alone, (
        f"watching the run slowed it from {rate_alone:.1f} to {rate_watched:.1f} steps/s"
    )
