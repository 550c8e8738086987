"""Start and stop a real `streamlit run app.py` for the scripts (screenshots), independent of the tests.

The browser tests have their own server fixture in tests/conftest.py; scripts never import tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"  # Debian's chromium, driven by playwright (never `playwright install`)
SERVER_START_TIMEOUT_S = 90  # importing torch and streamlit on a 2-core machine takes a while


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


def start_streamlit(runs_dir: Path, log_path: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start the app on a free loopback port with ``runs_dir`` as its run store; (process, base url) once healthy."""
    port = port or _free_port()
    env = {
        **os.environ,
        "TINYGPT_RUNS_DIR": str(runs_dir),
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
        "PYTHONUNBUFFERED": "1",
        "TINYGPT_NUM_THREADS": os.environ.get("TINYGPT_NUM_THREADS", "1"),  # leave cores to chromium
    }
    cmd = [
        sys.executable, "-m", "streamlit", "run", "app.py",
        "--server.headless", "true",
        "--server.port", str(port),
        "--server.address", "127.0.0.1",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process in stop_streamlit
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc._tinygpt_log = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stop_streamlit(proc)
            raise RuntimeError(f"streamlit exited with {proc.returncode}; see {log_path}")
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
