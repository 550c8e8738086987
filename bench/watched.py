"""Bench 8: does watching a run slow it down? Server-trained runs with 0, 1 and 3 browser tabs open.

A real ``streamlit run app.py`` server (from this checkout, or ``--repo`` another one, e.g. main's,
to measure a "before") trains runs that headless Chromium tabs watch on the Train page, the way a
person does. For the ``tiny`` preset the run is started with Home's Quick start button (400 steps on
builtin:tiny); for ``baby`` with the Train page's form (preset baby, fewer steps). Right after Start
the starting tab either leaves (0 tabs) or stays, and more tabs open the same run URL (1 or 3 tabs).

Per run: tokens/s = trained tokens / logged training seconds (metrics.csv, evals included), the wall
time from the click to "done", and, with tabs open, the longest gap between two chart updates seen in
the first tab. With 3 tabs a fourth opens mid-run and the time until it shows the chart is noted.
A CLI run (its own process, tiny preset, CLI_STEPS steps) watched by one tab is compared with one
nobody watches.

Scenarios run in turns (tiny 0/1/3, baby 0/1/3, CLI 0/1, then again), so a neighbour's burst of CPU
lands on every side; ratios are of medians of the same preset. Figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from app_pages._live_chart import POINTS_JS
from bench.common import REPO, Report, fmt, median

# Points drawn by the live chart, or (a "before" checkout) by plotly's charts, so both can be compared.
CHART_POINTS = f"""() => ({POINTS_JS})() + Array.from(
    document.querySelectorAll('[data-testid="stPlotlyChart"] .js-plotly-plot'))
    .map(gd => (gd._fullData || []).reduce((n, t) => n + (t.x ? t.x.length : 0), 0))
    .reduce((a, b) => a + b, 0)"""

CHROMIUM = "/usr/bin/chromium"
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
TOKENS_PER_STEP = {"tiny": 16 * 32, "baby": 24 * 64}  # batch_size * block_size of the presets
TARGETS = {1: 0.80, 3: 0.60}
# The CLI's tiny run: about 20 s on an idle 2-core machine. (It was 200 steps, about 3 s, so most of what
# that measured was the tab opening, not a tab watching.)
CLI_STEPS = 1200


# --- the server -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: Path, runs_dir: Path, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true"]
    cmd += ["--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none"]
    cmd += ["--browser.gatherUsageStats", "false"]
    full_env = {**os.environ, "TINYGPT_RUNS_DIR": str(runs_dir), "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(runs_dir.parent / f"server-{port}.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, cwd=repo, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return proc, url
        if proc.poll() is not None:
            break
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"the server in {repo} did not start; see {log.name}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


# --- CPU accounting -----------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int, kids: dict[int, list[int]]) -> set[int]:
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += kids.get(pid, [])
    return out


def _cpu(pids) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])  # utime + stime of the process (all its threads)
    return total / _TICK


class CpuMeter:
    """CPU seconds used by the web server's own process (not its training child) and by this bench's
    browser (every process under this one that is not the server or a CLI run), over an interval."""

    def __init__(self, server_pid: int, exclude: tuple[int, ...] = ()):
        self.server_pid, self.exclude = server_pid, exclude

    def read(self) -> tuple[float, float]:
        kids = _children()
        skip = _tree(self.server_pid, kids)
        for pid in self.exclude:
            skip |= _tree(pid, kids)
        browser = _tree(os.getpid(), kids) - skip - {os.getpid()}
        return _cpu([self.server_pid]), _cpu(browser)

    def start(self) -> None:
        self.t0, (self.s0, self.b0) = time.monotonic(), self.read()

    def stop(self) -> dict:
        (s1, b1), dt = self.read(), time.monotonic() - self.t0
        # A browser process that exited in between (a closed tab) takes its CPU time with it: never below 0.
        return dict(server_cpu=max(0.0, s1 - self.s0) / dt, browser_cpu=max(0.0, b1 - self.b0) / dt)


# --- one run ------------------------------------------------------------------------------------------


def _status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "status.json").read_text()).get("status", "")
    except (OSError, ValueError):
        return ""


def _rate(run_dir: Path, preset: str) -> tuple[float, int, float]:
    """(tokens/s, steps, logged seconds) from metrics.csv."""
    import pandas as pd

    m = pd.read_csv(run_dir / "metrics.csv")
    steps, elapsed = int(m["step"].iloc[-1]), float(m["elapsed_s"].iloc[-1])
    return steps * TOKENS_PER_STEP[preset] / elapsed, steps, elapsed


def _wait_idle(page, timeout_ms: int = 120_000) -> None:
    page.wait_for_timeout(300)
    page.wait_for_selector(IDLE, timeout=timeout_ms)


def _start_from_page(page, preset: str, steps: int) -> None:
    if preset == "tiny":  # Quick start, as a new user does
        page.goto("/")
        _wait_idle(page)
        page.get_by_role("button", name="Quick start").click()
        return
    page.goto("/train")
    _wait_idle(page)
    page.get_by_test_id("stSelectbox").filter(has_text="Preset").click()
    page.get_by_role("option", name=preset, exact=True).click()
    _wait_idle(page)
    box = page.get_by_role("spinbutton", name="Steps (max_iters)", exact=True)
    box.fill(str(steps))
    box.press("Enter")
    _wait_idle(page)
    page.get_by_role("button", name="Start training").click()


def _run_id(page) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        href = page.evaluate("location.href")  # st.switch_page changes it with pushState
        q = dict(p.split("=", 1) for p in href.partition("?")[2].split("&") if "=" in p)
        if "run" in q:
            return q["run"]
        time.sleep(0.05)
    raise RuntimeError(f"no run id in the URL {page.url}")


def _watch(tab0, run_dir: Path, cap_s: float) -> tuple[float, bool]:
    """Sample tab0's chart until the run ends (or cap_s); returns (longest gap between updates, capped)."""
    last_n, last_change, gap = None, time.monotonic(), 0.0
    deadline = time.monotonic() + cap_s
    while _status(run_dir) in ("", "queued", "running"):
        if time.monotonic() > deadline:
            return gap, True
        now = time.monotonic()
        if tab0 is not None:
            try:
                n = tab0.evaluate(CHART_POINTS)
            except Exception:  # noqa: BLE001 - a remount between reads
                n = last_n
            # Gaps count from the chart's first points: the wait for those is the page opening (a new
            # tab's is reported as "new tab s"), not a live chart that stopped updating.
            if n != last_n:
                if last_n and _status(run_dir) == "running":
                    gap = max(gap, now - last_change)
                last_n, last_change = n, now
            elif last_n:
                gap = max(gap, now - last_change)
        time.sleep(0.2)
    return gap, False


def server_run(
    browser, url: str, runs_dir: Path, preset: str, tabs: int, steps: int, cap_s: float, meter: CpuMeter
) -> dict:
    ctx = browser.new_context(base_url=url, viewport={"width": 1280, "height": 900})
    try:
        page = ctx.new_page()
        t0 = time.monotonic()
        _start_from_page(page, preset, steps)
        run_id = _run_id(page)
        run_dir = runs_dir / run_id
        if tabs == 0:
            page.goto("about:blank")
        pages = [page] if tabs else []
        first_paint = None
        watch_url = f"/train?run={run_id}"
        for _ in range(1, tabs):
            p = ctx.new_page()
            p.goto(watch_url)
            pages.append(p)
        if tabs == 3:  # a fourth tab arrives mid-run: how long until it shows the chart?
            time.sleep(1.0)
            if _status(run_dir) == "running":
                p = ctx.new_page()
                t1 = time.monotonic()
                p.goto(watch_url)
                while time.monotonic() - t1 < 30:
                    with contextlib.suppress(Exception):
                        if p.evaluate(CHART_POINTS) > 0:
                            first_paint = time.monotonic() - t1
                            break
                    time.sleep(0.1)
                p.close()
        meter.start()
        gap, capped = _watch(pages[0] if pages else None, run_dir, cap_s)
        cpu = meter.stop()
        if capped:  # the "before": stop it from a tab rather than wait many minutes
            stopper = pages[0] if pages else ctx.new_page()
            if not pages:
                stopper.goto(f"/train?run={run_id}")
            stopper.get_by_role("button", name="Stop", exact=True).click(timeout=60_000)
            deadline = time.monotonic() + 120
            while _status(run_dir) == "running" and time.monotonic() < deadline:
                time.sleep(0.2)
        wall = time.monotonic() - t0
        tps, done, elapsed = _rate(run_dir, preset)
        return dict(
            tps=tps, steps=done, elapsed=elapsed, wall=wall, gap=gap, first_paint=first_paint, capped=capped, **cpu
        )
    finally:
        ctx.close()


def cli_run(browser, url: str, repo: Path, runs_dir: Path, watched: bool, n: int, server_pid: int) -> dict:
    run_dir = runs_dir / f"cli-{'watched' if watched else 'alone'}-{n}"
    cmd = [sys.executable, "-m", "tinygpt_core", "train", "--corpus", "builtin:tiny", "--preset", "tiny"]
    cmd += ["--out", str(run_dir), "--no-progress", "--max-iters", str(CLI_STEPS)]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ctx = browser.new_context(base_url=url, viewport={"width": 1280, "height": 900}) if watched else None
    try:
        if ctx is not None:
            while not (run_dir / "status.json").exists() and proc.poll() is None:
                time.sleep(0.05)
            page = ctx.new_page()
            page.goto(f"/train?run={run_dir.name}")
        meter = CpuMeter(server_pid, exclude=(proc.pid,))
        meter.start()
        proc.wait(timeout=600)
        cpu = meter.stop()
    finally:
        if ctx is not None:
            ctx.close()
    if proc.returncode:
        raise RuntimeError(f"CLI run failed: {proc.stderr.read().decode()[-2000:]}")
    tps, steps, elapsed = _rate(run_dir, "tiny")
    return dict(tps=tps, steps=steps, elapsed=elapsed, **cpu)


# --- the bench ----------------------------------------------------------------------------------------


def measure(repo: Path, repeats: int, baby_steps: int, cap_s: float, label: str) -> dict:
    from playwright.sync_api import sync_playwright

    results: dict[tuple, list[dict]] = {}
    load: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tinygpt-watched-") as tmp:
        runs_dir = Path(tmp) / "runs"
        runs_dir.mkdir()
        proc, url = start_server(repo, runs_dir)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
                )
                # Warm-up: the first page load compiles the app's modules and the first run pays for imports.
                meter = CpuMeter(proc.pid)
                server_run(browser, url, runs_dir, "tiny", 0, 0, cap_s, meter)
                for r in range(repeats):
                    for preset in ("tiny", "baby"):
                        for tabs in (0, 1, 3):
                            out = server_run(browser, url, runs_dir, preset, tabs, baby_steps, cap_s, meter)
                            results.setdefault((preset, tabs), []).append(out)
                            load.append(os.getloadavg()[0])
                            print(f"[{label}] {preset} tabs={tabs}: {out}", flush=True)
                    for watched in (False, True):
                        out = cli_run(browser, url, repo, runs_dir, watched, r, proc.pid)
                        results.setdefault(("cli", int(watched)), []).append(out)
                        load.append(os.getloadavg()[0])
                        print(f"[{label}] cli watched={watched}: {out}", flush=True)
                browser.close()
        finally:
            stop_server(proc)
    return dict(results=results, load=load)


def _rows(label: str, m: dict) -> list[list[str]]:
    res = m["results"]
    rows = []
    for preset in ("tiny", "baby"):
        base = median(x["tps"] for x in res[(preset, 0)])
        base_wall = median(x["wall"] for x in res[(preset, 0)])
        for tabs in (0, 1, 3):
            xs = res[(preset, tabs)]
            tps = median(x["tps"] for x in xs)
            target = TARGETS.get(tabs)
            ratio = f"{100 * tps / base:.0f}%" + (f" (≥ {100 * target:.0f}%)" if target else "")
            paint = [x["first_paint"] for x in xs if x["first_paint"] is not None]
            wall = median(x["wall"] for x in xs)
            rows.append(
                [
                    label,
                    f"{'Quick start (tiny)' if preset == 'tiny' else 'baby'}, {tabs} tab{'s' if tabs != 1 else ''}",
                    "/".join(f"{x['tps']:,.0f}" for x in xs) + (" (capped)" if any(x["capped"] for x in xs) else ""),
                    f"{tps:,.0f}",
                    f"{tps / TOKENS_PER_STEP[preset]:.1f}",
                    ratio,
                    f"{wall:.1f} ({wall / base_wall:.1f}×)",
                    fmt(max(x["gap"] for x in xs), 1) if tabs else "–",
                    fmt(max(paint), 1) if paint else "–",
                    _cpu_cell(xs),
                ]
            )
    alone = median(x["tps"] for x in res[("cli", 0)])
    for watched in (0, 1):
        xs = res[("cli", watched)]
        tps = median(x["tps"] for x in xs)
        ratio = f"{100 * tps / alone:.0f}%" + (" (≥ 96%)" if watched else "")
        rows.append(
            [
                label,
                f"CLI tiny, {'1 tab' if watched else 'unwatched'}",
                "/".join(f"{x['tps']:,.0f}" for x in xs),
                f"{tps:,.0f}",
                f"{tps / TOKENS_PER_STEP['tiny']:.1f}",
                ratio,
                "–",
                "–",
                "–",
                _cpu_cell(xs),
            ]
        )
    return rows


def _cpu_cell(xs: list[dict]) -> str:
    """Median CPU cores used by the web server process and by the browser while the run trained."""
    return f"{median(x['server_cpu'] for x in xs):.2f} / {median(x['browser_cpu'] for x in xs):.2f}"


def run(
    quick: bool = False,
    results=None,
    repeats: int = 2,
    baby_steps: int = 150,
    before: Path | None = None,
    before_repeats: int | None = None,
) -> dict:
    repeats, baby_steps = (1, 30) if quick else (repeats, baby_steps)
    cap_s = 30.0 if quick else 60.0
    measured = {}
    if before is not None:
        measured["before"] = measure(before, before_repeats or repeats, baby_steps, cap_s, "before")
    measured["after"] = measure(REPO, repeats, baby_steps, cap_s, "after")
    report = Report("8. Watching a run: tokens/s with 0, 1 and 3 browser tabs on its Train page", quick=quick)
    report.add(
        f"A `streamlit run app.py` server trains; headless Chromium tabs watch the Train page. `tiny` = Home's "
        f"Quick start (400 steps, builtin:tiny); `baby` = the Train form, {baby_steps} steps on builtin:tiny; "
        f"CLI: `tiny`, {CLI_STEPS} steps. "
        f"{repeats} runs per row (before: {before_repeats or repeats}), scenarios in turns; "
        "tokens/s = tokens / logged training seconds (evals in). "
        f"A run still going after {cap_s:.0f} s is stopped from a tab and its rate taken so far (capped). "
        "Wall = click to done; gap = longest time between two chart updates in a watching tab, from its "
        "first points on; "
        "new tab = seconds until a tab opened mid-run (with 3 watching) shows the chart; "
        "CPU = cores used (CPU-seconds per second) by the web server's own process and by the browser while "
        "the run trained: the cost of watching, which the training process competes with. "
        "Load (1-min) during the runs: "
        + "; ".join(f"{k} {min(m['load']):.1f}–{max(m['load']):.1f}" for k, m in measured.items())
        + "."
    )
    rows = []
    for label, m in measured.items():
        rows += _rows(label, m)
    report.add_table(
        [
            "code",
            "scenario",
            "tokens/s (runs)",
            "median",
            "steps/s",
            "vs unwatched",
            "wall s",
            "gap s",
            "new tab s",
            "CPU server / browser",
        ],
        rows,
    )
    report.emit(results)
    return measured


# --- steady state: what watching costs once the tabs are open ---------------------------------------------


def steady(repo: Path, tabs: int, seconds: float, settle_s: float = 6.0) -> dict:
    """A long CLI ``tiny`` run on one thread; ``tabs`` tabs open its Train page, and after ``settle_s`` the
    run's steps/s and the server's and browser's CPU are measured for ``seconds``. The scenarios above
    include opening the tabs; this is the cost of keeping them open."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="tinygpt-steady-") as tmp:
        runs_dir = Path(tmp) / "runs"
        runs_dir.mkdir()
        proc, url = start_server(repo, runs_dir)
        run_dir = runs_dir / "cli-long"
        cmd = [sys.executable, "-m", "tinygpt_core", "train", "--corpus", "builtin:tiny", "--preset", "tiny"]
        cmd += ["--out", str(run_dir), "--no-progress", "--max-iters", "1000000", "--threads", "1"]
        env = {**os.environ, "PYTHONPATH": str(repo)}
        cli = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not (run_dir / "metrics.csv").exists() and cli.poll() is None:
                time.sleep(0.1)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
                ctx = browser.new_context(base_url=url, viewport={"width": 1280, "height": 900})
                for _ in range(tabs):
                    ctx.new_page().goto(f"/train?run={run_dir.name}")
                time.sleep(settle_s)
                meter = CpuMeter(proc.pid, exclude=(cli.pid,))
                meter.start()
                s0, t0 = _rate(run_dir, "tiny")[1], time.monotonic()
                time.sleep(seconds)
                s1, t1 = _rate(run_dir, "tiny")[1], time.monotonic()
                cpu = meter.stop()
                browser.close()
        finally:
            cli.terminate()
            cli.wait(timeout=60)
            stop_server(proc)
    return dict(tabs=tabs, steps_per_s=(s1 - s0) / (t1 - t0), load=os.getloadavg()[0], **cpu)


def run_steady(quick: bool = False, results=None, repeats: int = 2, before: Path | None = None) -> dict:
    seconds, settle = (5.0, 4.0) if quick else (15.0, 6.0)
    repeats = 1 if quick else repeats
    codes = ([("before", before)] if before is not None else []) + [("after", REPO)]
    out: dict[tuple[str, int], list[dict]] = {}
    for _ in range(repeats):  # in turns: a neighbour's burst lands on every row
        for label, repo in codes:
            for tabs in (0, 1, 3):
                m = steady(repo, tabs, seconds, settle)
                out.setdefault((label, tabs), []).append(m)
                print(f"[steady {label}] {m}", flush=True)
    report = Report("8b. Watching a run, steady state: a long CLI run with 0, 1 and 3 tabs open", quick=quick)
    report.add(
        f"A CLI `tiny` run on one thread trains on; N tabs open its Train page, and after {settle:.0f} s its "
        f"steps/s and the CPU of the web server and the browser are measured for {seconds:.0f} s. "
        f"{repeats} run(s) per row, in turns."
    )
    rows = []
    for label, _repo in codes:
        base = median(x["steps_per_s"] for x in out[(label, 0)])
        for tabs in (0, 1, 3):
            xs = out[(label, tabs)]
            sps = median(x["steps_per_s"] for x in xs)
            rows.append(
                [
                    label,
                    str(tabs),
                    "/".join(f"{x['steps_per_s']:.1f}" for x in xs),
                    f"{100 * sps / base:.0f}%",
                    f"{median(x['server_cpu'] for x in xs):.2f}",
                    f"{median(x['browser_cpu'] for x in xs):.2f}",
                    f"{min(x['load'] for x in xs):.1f}–{max(x['load'] for x in xs):.1f}",
                ]
            )
    report.add_table(["code", "tabs", "steps/s (runs)", "vs 0 tabs", "server cores", "browser cores", "load"], rows)
    report.emit(results)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short run of each: checks the script")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each scenario")
    ap.add_argument("--baby-steps", type=int, default=150)
    ap.add_argument("--before", type=Path, help="also measure the app of this checkout first (e.g. /work/main)")
    ap.add_argument("--before-repeats", type=int, help="runs of each scenario for --before (default: --repeats)")
    ap.add_argument("--results", type=Path, help="append the table here instead of bench/RESULTS.md")
    ap.add_argument(
        "--steady", action="store_true", help="only the steady-state table: a long CLI run with tabs kept open"
    )
    args = ap.parse_args(argv)
    if args.steady:
        run_steady(args.quick, args.results, args.repeats, args.before)
        return
    run(args.quick, args.results, args.repeats, args.baby_steps, args.before, args.before_repeats)


if __name__ == "__main__":
    main()
