"""Fixtures shared by the test modules.

- Core: ``tiny_spec`` (a seconds-long TrainSpec), the ``store`` and ``runner`` fixtures (a run store
  in tmp_path and a LocalJobRunner on it, one job per device, shut down after the test),
  ``one_torch_thread`` (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)
  and ``wait_until``.
- Browser: Debian's chromium for playwright, a real `streamlit run app.py` server, and a screenshot
  of the page when a browser test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
SERVER_START_TIMEOUT_S = 90  # importing torch and streamlit on a 2-core machine takes a while


# --- the core: tiny specs, a run store, a runner ------------------------------------------------------

TINY_SETTINGS = dict(  # a tiny spec's training: seconds on one CPU thread
    max_iters=12,
    eval_interval=6,
    eval_iters=1,
    n_layer=1,
    n_head=2,
    n_embd=32,
    block_size=16,
    batch_size=4,
    sample_tokens=8,
    device="cpu",
    warmup_iters=1,
)


def tiny_spec(**overrides):
    """A TrainSpec of the tiny preset on builtin:tiny that trains in seconds; ``overrides`` as from_preset's."""
    from tinygpt_core.training import TrainSpec

    return TrainSpec.from_preset("tiny", "builtin:tiny", **{**TINY_SETTINGS, **overrides})


def wait_until(predicate, timeout: float = 30.0, every_s: float = 0.02) -> None:
    """Wait for ``predicate()`` to hold; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(every_s)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box they make each op crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store(tmp_path):
    """An empty run store in the test's tmp_path."""
    from tinygpt_core.runs import RunStore

    return RunStore(tmp_path / "runs")


@pytest.fixture
def runner(store):
    """A LocalJobRunner on ``store`` running one job at a time per device; its jobs are stopped after the test.

    It trains in this process (a thread), so tests can swap in stand-ins (a patched training.train, a
    NaN loss, a failing disk); tests of the child-process backend build their own runner."""
    from tinygpt_core.jobs import LocalJobRunner

    r = LocalJobRunner(store, max_jobs_per_device=1, execution="thread")
    yield r
    r.shutdown()


# --- the browser ------------------------------------------------------------------------------------


def _playwright_missing() -> str | None:
    try:
        import playwright  # noqa: F401
        import pytest_playwright  # noqa: F401
    except ImportError:
        return "playwright/pytest-playwright not installed (pip install playwright pytest-playwright)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found (apt-get install -y --no-install-recommends chromium)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Skip (with the reason) rather than error when the browser stack is absent on a dev machine.
    reason = _playwright_missing()
    if reason:
        for item in items:
            if "browser" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    """Drive the system chromium (never `playwright install`), quietly: no GPU, no network chatter."""
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    }


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict) -> dict:
    # Wide enough for the app's layout="wide" pages with the sidebar open.
    return {**browser_context_args, "viewport": {"width": 1400, "height": 1000}}


def poll(fn, predicate, timeout_s: float, what: str, every_s: float = 0.25):
    """Call ``fn`` until ``predicate`` holds for its value (returned); fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if predicate(value):
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what} (last: {value})"
        time.sleep(every_s)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.read().strip() == b"ok"
    except (urllib.error.URLError, OSError):
        return False


def start_streamlit(
    runs_dir: Path,
    log_path: Path,
    port: int | None = None,
    extra_env: dict | None = None,
    extra_args: tuple[str, ...] = (),
) -> tuple[subprocess.Popen, str]:
    """Start `streamlit run app.py` on a free loopback port; returns (process, base url) once healthy.

    ``extra_env`` (e.g. operator limits) and ``extra_args`` (streamlit flags) are added to the defaults."""
    port = port or _free_port()
    env = {
        **os.environ,
        "TINYGPT_RUNS_DIR": str(runs_dir),
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
        "PYTHONUNBUFFERED": "1",
        # Chromium runs on the same (small) machine: torch's OpenMP threads competing with it for the
        # cores slow training ~10x, so the test server trains on one thread unless told otherwise.
        "TINYGPT_NUM_THREADS": os.environ.get("TINYGPT_NUM_THREADS", "1"),
        **(extra_env or {}),
    }
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
        "--server.fileWatcherType",
        "none",  # tests edit nothing; watching the tree costs CPU
        "--browser.gatherUsageStats",
        "false",
        *extra_args,
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process in stop_streamlit
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc._tinygpt_log = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stop_streamlit(proc)
            raise RuntimeError(
                f"streamlit exited with {proc.returncode}; see {log_path}:\n{log_path.read_text()[-3000:]}"
            )
        if _healthy(url):
            return proc, url
        time.sleep(0.25)
    stop_streamlit(proc)
    raise RuntimeError(f"streamlit did not answer /_stcore/health within {SERVER_START_TIMEOUT_S} s; see {log_path}")


def stop_streamlit(proc: subprocess.Popen) -> None:
    """Stop the server we started, by its PID (terminate, then kill if it lingers)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    log = getattr(proc, "_tinygpt_log", None)
    if log is not None:
        log.close()


@pytest.fixture(scope="session")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A real app server with an empty, temporary runs folder, shared by the browser tests."""
    runs_dir = tmp_path_factory.mktemp("runs")
    # One log per server: several pytest sessions may share this checkout at once.
    log_path = ARTIFACTS / f"streamlit-server-{os.getpid()}.log"
    _SERVER_LOGS.append(log_path)
    proc, url = start_streamlit(runs_dir, log_path)
    try:
        yield {"url": url, "runs_dir": runs_dir, "pid": proc.pid, "log": log_path}
    finally:
        stop_streamlit(proc)


@pytest.fixture(scope="session")
def base_url(app_server: dict) -> str:
    """pytest-playwright's contexts resolve page.goto("/") against the test server."""
    return app_server["url"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    # The page fixture is still open during the call phase's report: capture what the user would see.
    if report.when == "call" and report.failed:
        page = getattr(item, "funcargs", {}).get("page")
        if page is not None:
            ARTIFACTS.mkdir(exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)[-150:]
            try:
                page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
                (ARTIFACTS / f"{name}.html").write_text(page.content())
            except Exception as exc:  # noqa: BLE001 - a failed screenshot must not hide the real failure
                report.sections.append(("screenshot", f"could not save a screenshot: {exc}"))


_SERVER_LOGS: list[Path] = []  # the logs of servers this session started (and only those)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Keep our server log only when something failed; a green run leaves no artefacts behind.
    if exitstatus != 0:
        return
    for log in _SERVER_LOGS:
        log.unlink(missing_ok=True)
    if _SERVER_LOGS and ARTIFACTS.is_dir() and not any(ARTIFACTS.iterdir()):
        shutil.rmtree(ARTIFACTS, ignore_errors=True)


# --- Ray: one real head on loopback per test session ---------------------------------------------------


def ray_missing() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install -r requirements-ray.txt)"
    return None


def _ray_exe() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Ray head (2 CPUs, loopback only, no dashboard) started for this session; its address.

    Started with `ray start --head --block` as our child, every port chosen free (other sessions may
    run their own head on this machine), and stopped by its PID: never `ray stop`, which would stop
    every Ray instance of the machine. This pytest process connects to it once (ray.init through
    RayJobRunner), as an app server or the CLI would with RAY_ADDRESS."""
    reason = ray_missing()
    if reason:
        pytest.skip(reason)
    port = _free_port()
    # A short temp dir: Ray's unix sockets live under it and socket paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rg", dir="/tmp"))
    ports = {
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
    }
    cmd = [
        _ray_exe(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats",
        "--temp-dir", str(temp_dir), *[str(x) for kv in ports.items() for x in kv],
    ]  # fmt: skip
    log_path = ARTIFACTS / f"ray-head-{os.getpid()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    # Ray 2.60 authenticates clients with a token from ~/.ray/auth_token, which other sessions' heads on
    # this machine may rewrite. This head is private to the session (on a machine with no network), so
    # its token check is off: in this process, the head and every app server the tests start.
    saved_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TINYGPT_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    started = False
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"ray start exited with {proc.returncode}; see {log_path}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, f"the Ray head did not listen within 90 s; see {log_path}"
            time.sleep(0.5)
        time.sleep(2)  # the raylet registers just after the GCS answers
        started = True
        yield address
    finally:
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        # SIGTERM to our `ray start --block` (it stops the head's processes), then its whole group.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if saved_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_mode
        if started:  # a head that did not start keeps its log for the failure's reader
            log_path.unlink(missing_ok=True)


@pytest.fixture
def ray_runner(ray_head: str, store):
    """A RayJobRunner on ``store`` and the session's head (not finding other tests' jobs again)."""
    from tinygpt_core.ray_runner import RayJobRunner

    r = RayJobRunner(store, address=ray_head, reattach=False)
    yield r
    r.shutdown(timeout=30)
