"""Take the README's screenshots from the app running for real.

    python scripts/screenshots.py [--out docs/screenshots] [--keep-runs DIR] [--quick]

Trains a few small runs into a temporary run store (a baseline and an ablation grid on builtin:tiny,
and an induction model), starts `streamlit run app.py` on a free port, then drives Debian's chromium
through playwright the way a user would: Quick start on Home, the live Train view, overlaid curves on
Runs & ablations, the head grid on Attention and the strategy columns on Sampling. Every other page of
the navigation (one added later included) is then shot as it opens, as <its url path>.png. The script
fails when a page shows an exception or a page of the navigation got no screenshot.

--quick trains 2% of the steps (10-step runs): a check that the script still runs end to end (minutes
instead of tens of minutes on a busy CPU), not pictures for the README.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _server import CHROMIUM, start_streamlit, stop_streamlit  # noqa: E402
from playwright.sync_api import Page, sync_playwright  # noqa: E402

from tinygpt_core.ablations import grid_specs  # noqa: E402
from tinygpt_core.runs import RunStore  # noqa: E402
from tinygpt_core.training import TrainSpec, train  # noqa: E402

IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
VIEWPORT = {"width": 1400, "height": 900}


def make_runs(runs_dir: Path, scale: float = 1.0) -> None:
    """The runs the pages show: an ablation grid on the tiny corpus and an induction model."""
    store = RunStore(runs_dir)

    def steps(n: int, every: int) -> dict[str, int]:
        return {"max_iters": max(10, round(n * scale)), "eval_interval": max(2, round(every * scale))}

    base = TrainSpec.from_preset("tiny", "builtin:tiny", **steps(300, 25), seed=1)
    for spec in grid_specs(base, ["no-layernorm", "pos-none", "no-residual"], grid_id="grid-demo"):
        train(spec, store=store)
    train(
        TrainSpec.from_preset(
            "tiny", "builtin:induction", **steps(600, 100), seed=1, n_layer=2, n_head=4, name="induction"
        ),
        store=store,
    )


def settle(page: Page, ms: int = 600) -> None:
    page.wait_for_timeout(ms)
    page.wait_for_selector(IDLE, timeout=120_000)
    page.wait_for_timeout(ms)


def nav(page: Page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title, exact=True).click()
    settle(page, 1500)


def pick_run(page: Page, name: str) -> None:
    page.get_by_test_id("stSelectbox").first.click()
    page.get_by_role("option", name=re.compile(re.escape(name))).first.click()


def shoot(page: Page, path: Path) -> None:
    shown = page.get_by_test_id("stException")
    if shown.count():  # a README picture of a traceback is a bug to fix, not to publish
        raise SystemExit(f"{path.stem}: the page shows an exception: {shown.first.inner_text()[:400]}")
    page.screenshot(path=str(path), full_page=False)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def nav_pages(page: Page) -> dict[str, str]:
    """Every page in the sidebar navigation: {screenshot name: link href}; Home (the url "/") is "home"."""
    pages = {}
    for link in page.get_by_test_id("stSidebarNav").get_by_role("link").all():
        href = link.get_attribute("href") or ""
        pages[urlparse(href).path.strip("/").rsplit("/", 1)[-1] or "home"] = href
    return pages


def take(base_url: str, out: Path) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
        page.goto(base_url)
        settle(page, 1500)
        shoot(page, out / "home.png")

        # Quick start: the Train page follows the run live; shoot once a few evaluations are drawn.
        page.get_by_role("button", name="Quick start").click()
        page.wait_for_url(re.compile(r"/train\?"), timeout=60_000)
        page.get_by_role("link", name="Open in Attention").wait_for(timeout=180_000)
        settle(page, 1500)
        shoot(page, out / "train.png")

        nav(page, "Runs & ablations")
        page.get_by_role("tab", name="Ablation grid").click()
        settle(page, 2500)
        page.get_by_text("Grid curve").first.scroll_into_view_if_needed()
        page.mouse.wheel(0, 250)
        page.wait_for_timeout(800)
        shoot(page, out / "runs.png")

        nav(page, "Attention")
        pick_run(page, "induction")
        settle(page, 2500)
        shoot(page, out / "attention.png")

        nav(page, "Sampling")
        pick_run(page, "quick-start")
        settle(page, 2500)
        shoot(page, out / "sampling.png")

        # Every other page as it opens, on the quick-start run (the current run of this session).
        shot = {"home", "train", "runs", "attention", "sampling"}
        pages = nav_pages(page)
        for name, href in pages.items():
            if name not in shot:  # by its href: a link's text also holds its icon's name
                page.get_by_test_id("stSidebarNav").locator(f'a[href="{href}"]').click()
                settle(page, 1500)
                shoot(page, out / f"{name}.png")
                shot.add(name)
        browser.close()
    missing = sorted(name for name in pages if not (out / f"{name}.png").exists())
    if missing:
        raise SystemExit(f"no screenshot of {', '.join(missing)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument(
        "--keep-runs",
        type=Path,
        help="train into this folder and keep it (default: a temp folder); a folder that holds runs is reused",
    )
    parser.add_argument("--quick", action="store_true", help="2%% of the training: check the script runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.keep_runs or Path(tmp) / "runs"
        if not (args.keep_runs and any(runs_dir.glob("*/config.json"))):
            make_runs(runs_dir, 0.02 if args.quick else 1.0)
        proc, url = start_streamlit(runs_dir, Path(tmp) / "server.log")
        try:
            take(url, args.out)
        finally:
            stop_streamlit(proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
