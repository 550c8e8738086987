"""Bench 6: the app: seconds from ``streamlit run app.py`` to healthy, and to the first rendered page.

Each round starts a fresh server on a free port (runs folder in a temp directory), polls
``/_stcore/health`` every 50 ms until it answers ``ok``, then opens the home page in headless
chromium (Debian's, through playwright) and waits until its title heading is visible and the
script run has finished. Both times count from the moment ``streamlit run`` was spawned; the
browser is launched before the server so its own start-up is not counted.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from bench.common import REPO, Report, median

CHROMIUM = "/usr/bin/chromium"
TARGET_S = 5.0
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
            return r.status == 200 and r.read().strip() == b"ok"
    except (urllib.error.URLError, OSError):
        return False


def one_start(browser, runs_dir: str, timeout_s: float = 90.0) -> tuple[float, float | None]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TINYGPT_RUNS_DIR": runs_dir}
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "app.py",
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--browser.gatherUsageStats",
        "false",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not healthy(url):
            if proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"streamlit did not become healthy (exit code {proc.poll()})")
            time.sleep(0.05)
        t_health = time.perf_counter() - t0
        t_page = None
        if browser is not None:
            page = browser.new_page()
            page.goto(url)
            page.get_by_role("heading", name="TinyGPT Lab").first.wait_for(timeout=timeout_s * 1000)
            page.wait_for_selector(IDLE, timeout=timeout_s * 1000)
            t_page = time.perf_counter() - t0
            page.close()
        return t_health, t_page
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(quick: bool = False, results=None, rounds: int = 3) -> dict:
    rounds = 1 if quick else rounds
    health, pages = [], []
    note = ""
    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-") as runs_dir:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            sync_playwright = None
            note = "playwright is not installed: only the health time was measured."
        if sync_playwright is not None and os.access(CHROMIUM, os.X_OK):
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
                try:
                    for _ in range(rounds):
                        h, pg = one_start(browser, runs_dir)
                        health.append(h)
                        pages.append(pg)
                finally:
                    browser.close()
        else:
            note = note or f"{CHROMIUM} is missing: only the health time was measured."
            for _ in range(rounds):
                health.append(one_start(None, runs_dir)[0])
    report = Report("6. App start-up: `streamlit run app.py`", quick=quick)
    rows = [["to /_stcore/health ok", f"{median(health):.2f}", " / ".join(f"{x:.2f}" for x in health)]]
    if pages and pages[0] is not None:
        rows.append(
            [
                "to the first rendered page (home heading shown, script idle)",
                f"{median(pages):.2f}",
                " / ".join(f"{x:.2f}" for x in pages),
            ]
        )
    report.add(
        f"Fresh server each round ({rounds}), seconds from spawning `streamlit run`; headless chromium "
        f"launched beforehand."
    )
    report.add_table(["milestone", "median s", "rounds"], rows)
    report.add(f"Healthy in {median(health):.2f} s (target < {TARGET_S:.0f} s)." + (f" {note}" if note else ""))
    report.emit(results)
    return dict(health_s=health, page_s=pages)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    run(args.quick, rounds=args.rounds)


if __name__ == "__main__":
    main()
