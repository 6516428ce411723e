# syntax=docker/dockerfile:1
# lpi-serve, the HTTP server (`python -m server`). Two targets:
#
#   cpu (default)  docker build -t lpi-serve .
#                  docker run -p 8000:8000 -v lpi-data:/data -e LPI_ADMIN_KEY=... lpi-serve
#   gpu            docker build --target gpu -t lpi-serve:gpu .
#                  docker run --gpus all -p 8000:8000 -v lpi-data:/data lpi-serve:gpu
#
# With no LPI_BACKBONE the first start builds the demo bundle into /data/demo (about a minute
# on two CPU cores; reused afterwards), hence the health check's long start period. Settings
# are LPI_* env vars (`docker run lpi-serve python -m server --help`); LPI_THREADS caps torch's
# threads, which otherwise follow the host's cores, not the container's CPU quota. A bind
# mount for /data must be writable by uid 10001.
#
# EXTRAS picks the project's extras: e.g. --build-arg EXTRAS=server,onnx (CPU onnxruntime, for
# LPI_ENGINE=onnx) or server,edge; TORCH_INDEX the wheel index torch comes from. Nothing at run
# time needs torchvision, open_clip or timm (the CLIP tokenizer's vocabulary ships with lpi).
#
# Size: the cpu target installs what the README's CPU-only command installs (torch's CPU wheel,
# then '.[server]'); that install measured 1.09 GB in a fresh virtual environment with torch
# 2.13.0+cpu (benchmarks/install_size.py), so expect the image to be about that plus the
# python:3.11-slim base. The image itself has not been built and measured: the machine this was
# written on has no Docker engine. For scale, '.[server]' with the torch pip resolves by default
# (there 2.14.1+cu130, a CUDA build) measured 5.87 GB the same way; the gpu target's cu126 build
# was not measured.
#
# Needs BuildKit (Docker 23+): the source is bind-mounted for `pip install`, never copied into a
# layer, so the image holds only the installed package.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin lpi \
    && mkdir /data \
    && chown lpi:lpi /data
# Inherited by both targets. /data is created and owned above: a new named volume starts as a
# copy of it, so the server (non-root) can write there.
ENV LPI_HOST=0.0.0.0 \
    LPI_PORT=8000 \
    LPI_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
# /healthz answers once start-up (and a first demo build) is done; python, as slim has no curl.
# The empty ProxyHandler keeps an HTTP(S)_PROXY in the environment from catching localhost.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('LPI_PORT', '8000'), timeout=4)" || exit 1
CMD ["python", "-m", "server"]


# GPU: torch's CUDA wheels bring their own CUDA and cuDNN libraries (the host needs only the
# NVIDIA driver and container toolkit), which onnxruntime-gpu uses once torch has loaded them;
# so a slim base, not an nvidia/cuda image with a second copy. Triton (the prefix-attention
# kernel) compiles a small C launcher at first use, hence gcc.
FROM base AS gpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG EXTRAS=server,onnx-gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# torch first, from TORCH_INDEX, then pinned while the project installs, so that nothing swaps in
# another torch build.
RUN --mount=type=bind,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX}" torch \
    && pip freeze | grep -iE '^torch==' > /tmp/torch.txt \
    && pip install --constraint /tmp/torch.txt "/src[${EXTRAS}]" \
    && rm /tmp/torch.txt
ENV LPI_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER lpi
WORKDIR /home/lpi


# CPU, the default target (last in the file): torch's CPU-only wheel, not PyPI's CUDA build (GBs),
# installed first so that the project's torch requirement is already met (the README's CPU path).
FROM base AS cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=server
RUN --mount=type=bind,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX}" torch \
    && pip freeze | grep -iE '^torch==' > /tmp/torch.txt \
    && pip install --constraint /tmp/torch.txt "/src[${EXTRAS}]" \
    && rm /tmp/torch.txt
USER lpi
WORKDIR /home/lpi
