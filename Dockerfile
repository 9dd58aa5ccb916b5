# syntax=docker/dockerfile:1
#
# mcdrop: one image for every role (API, Celery worker, migrations); the command picks the role.
#
#   CPU image (default, small: the CPU-only torch wheel):
#     docker build -t mcdrop .
#   GPU image (CUDA-enabled torch wheel; the host needs the NVIDIA driver + container toolkit):
#     docker build -t mcdrop:gpu --build-arg TORCH_INDEX_URL= .
#     docker build -t mcdrop:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# TORCH_INDEX_URL is added as an *extra* package index for the install (PIP_EXTRA_INDEX_URL);
# every version stays pinned by constraints.txt (`torch==2.13.0` also matches the `+cpu` /
# `+cuXXX` local builds of that index). Empty means PyPI only, whose Linux x86_64 torch wheel
# is the CUDA build. The CUDA runtime comes with the wheel, so no CUDA base image is needed.
#
# Roles (the default CMD is the API):
#   docker run -p 8000:8000 mcdrop                          # mcdrop serve
#   docker run mcdrop mcdrop migrate
#   docker run mcdrop mcdrop worker --queues cpu
#   docker run --gpus all mcdrop:gpu mcdrop worker --queues cuda,cpu

FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv "$VIRTUAL_ENV" \
    && groupadd --system --gid 10001 mcdrop \
    && useradd --system --uid 10001 --gid mcdrop --home-dir /var/lib/mcdrop --no-create-home \
        --shell /usr/sbin/nologin mcdrop \
    && install -d -o mcdrop -g mcdrop -m 0750 /var/lib/mcdrop

WORKDIR /app

# 1) Dependencies only (the torch layer is large): stub packages so that editing the source
#    does not invalidate this layer.
COPY pyproject.toml README.md constraints.txt ./
RUN mkdir -p service workers migrations \
    && touch service/__init__.py workers/__init__.py migrations/__init__.py \
    && PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" pip install --no-cache-dir -c constraints.txt . \
    && rm -rf service workers migrations build *.egg-info

# 2) The project itself (dependencies are already satisfied by step 1).
COPY service/ service/
COPY workers/ workers/
COPY migrations/ migrations/
RUN pip install --no-cache-dir --no-deps --force-reinstall -c constraints.txt . \
    && rm -rf build *.egg-info

ENV MCDROP_HOST=0.0.0.0 \
    MCDROP_PORT=8000 \
    MCDROP_DATA_DIR=/var/lib/mcdrop \
    NUMBA_CACHE_DIR=/tmp/numba-cache

# NUMBA_CACHE_DIR: the MC engine's CPU kernels (service/ml/mc_kernels.py) are compiled for the
# host's CPU at the first start of a container (~1-2 s, in the API's and the worker's warm-up)
# and cached there; site-packages is not writable by the mcdrop user.

# MCDROP_DATA_DIR (datasets, checkpoints, models). Mount a volume here; a fresh named volume
# starts as a copy of this mcdrop-owned directory, so the non-root user can write to it.

USER mcdrop:mcdrop

EXPOSE 8000

# Liveness of the API (the default command). docker-compose.yml overrides it for the worker
# and disables it for the one-shot migrate container.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MCDROP_PORT', '8000'), timeout=4)" || exit 1

CMD ["mcdrop", "serve"]
