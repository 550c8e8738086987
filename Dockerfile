# TinyGPT Lab: the Streamlit app on port 8501, on a GPU when the container gets one.
#
# No CUDA base image is needed: on Linux x86_64 the registry's torch wheel is the CUDA build and
# brings the CUDA libraries as wheels, so `docker run --gpus all` trains on the GPU and a machine
# without one trains on the CPU.
#
#   docker build -t tinygpt-lab .
#   docker run --gpus all -p 8501:8501 -v tinygpt-runs:/app/runs tinygpt-lab
#   docker build --build-arg WITH_RAY=1 -t tinygpt-lab:ray .   # + the Ray runner (deploy/compose.ray.yaml)
FROM python:3.12.8-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STREAMLIT_SERVER_ADDRESS=0.0.0.0 \
    STREAMLIT_SERVER_PORT=8501 \
    STREAMLIT_SERVER_HEADLESS=true \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
    TINYGPT_RUNS_DIR=/app/runs

WORKDIR /app

# Chart PNG downloads: kaleido renders with a local Chromium (Debian's, pinned by the base image's release).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends chromium fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*
ENV BROWSER_PATH=/usr/bin/chromium

# Dependencies first, in their own layer, so code edits do not reinstall torch.
COPY requirements.txt requirements-ray.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# WITH_RAY=1: the same image also runs the Ray runner and Ray's head and workers (deploy/, docs/CLUSTER.md).
ARG WITH_RAY=0
RUN if [ "$WITH_RAY" = "1" ]; then pip install --no-cache-dir -r requirements-ray.txt; fi

# The app runs as an unprivileged numeric user; the code stays root-owned (read-only to it) and
# only the runs folder is writable.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /app/runs \
    && chown 10001:10001 /app/runs

COPY . .

VOLUME ["/app/runs"]
USER 10001:10001
EXPOSE 8501

# slim has no curl: ask the server's health endpoint with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4); sys.exit(0 if r.read().strip() == b'ok' else 1)"]

CMD ["streamlit", "run", "app.py"]
