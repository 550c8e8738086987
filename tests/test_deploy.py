"""The cluster deployment files (deploy/, docs/CLUSTER.md): parsed and checked, and linted by yamllint.

Docker Compose: app + Ray head + a GPU worker from one image built WITH_RAY=1; KubeRay: a RayCluster
with GPU workers and the app beside it. What is checked is what breaks a deployment quietly: ports,
the app's runner settings, GPU requests, the Ray version against requirements-ray.txt."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.ray.yaml"
KUBERAY = DEPLOY / "kuberay-raycluster.yaml"


def _ray_pin() -> str:
    (line,) = [ln for ln in (ROOT / "requirements-ray.txt").read_text().splitlines() if ln.startswith("ray")]
    return re.search(r"==\s*([\d.]+)", line).group(1).rstrip(".")


def test_compose_has_app_head_and_gpu_worker():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert set(services) == {"app", "ray-head", "ray-gpu-worker"}
    for name, svc in services.items():
        assert svc["build"]["args"]["WITH_RAY"] == "1", name  # one image with Ray for all three
    head, worker, app = services["ray-head"], services["ray-gpu-worker"], services["app"]
    assert "--head" in head["command"] and "--port=6379" in head["command"] and "6379:6379" in head["ports"]
    assert "--address=ray-head:6379" in worker["command"] and "--num-gpus=1" in worker["command"]
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    env = app["environment"]
    assert env["TINYGPT_RUNNER"] == "ray" and env["RAY_ADDRESS"] == "ray-head:6379"
    assert 0 < float(env["TINYGPT_RAY_GPUS_PER_JOB"]) <= 1
    assert "8501:8501" in app["ports"]
    # Only the app holds the runs: no shared filesystem between it and the workers.
    assert any(v.endswith(":/app/runs") for v in app["volumes"])
    assert "volumes" not in worker and "volumes" not in head
    assert app["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_kuberay_cluster_requests_gpus_and_matches_the_ray_pin():
    docs = [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"RayCluster", "Deployment", "Service", "PersistentVolumeClaim"} <= set(kinds)
    cluster = kinds["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"].startswith(_ray_pin())
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert 6379 in ports
    (group,) = cluster["spec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == group["rayStartParams"]["num-gpus"] == "1"
    app = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in app["env"]}
    assert env["TINYGPT_RUNNER"] == "ray" and env["RAY_ADDRESS"].endswith(":6379")
    assert env["RAY_ADDRESS"].startswith(cluster["metadata"]["name"] + "-head-svc")  # KubeRay's service name
    assert app["readinessProbe"]["httpGet"]["path"] == "/_stcore/health"


def test_dockerfile_installs_ray_only_when_asked():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG WITH_RAY=0" in text and "-r requirements-ray.txt" in text
    assert "ray" not in (ROOT / "requirements.txt").read_text().lower()  # the README's commands need no Ray
    assert "-r requirements-ray.txt" in (ROOT / "requirements-dev.txt").read_text()  # CI tests it


def test_yamllint_passes():
    try:
        import yamllint  # noqa: F401
    except ImportError:
        pytest.skip("yamllint is not installed (it is in requirements-dev.txt)")
    cmd = [sys.executable, "-m", "yamllint", "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
