# syntax=docker/dockerfile:1
# RICE product-recognition service.
#   GPU (default): docker build -t rice .
#   CPU hosts:     docker build --build-arg VARIANT=cpu -t rice:cpu .
# The default encoder's ImageNet weights ship inside a pip package, so they are baked in; mount
# trained RICE checkpoints and point RICE_CHECKPOINT at them (e.g. -v ./models:/models:ro
# -e RICE_CHECKPOINT=/models/rice.pt).
ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-gpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG FAISS=faiss-gpu-cu12==1.14.1.post1

FROM ${CPU_IMAGE} AS base-cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG FAISS=faiss-cpu==1.15.1

# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

FROM base AS builder
ARG TORCH_INDEX
ARG FAISS
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index matching the variant, so the package's own torch>= pin is satisfied;
# the same version as the Makefile's TORCH_SPEC (tests/test_deploy.py checks they agree)
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY index ./index
COPY pipeline ./pipeline
COPY service ./service
# the operator tools: `docker compose run --rm api-1 rice reindex ...` runs beside the replicas,
# on the same Redis and originals volume
COPY tools ./tools
# the project itself (its dependency ranges live in pyproject.toml)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir . \
 && if [ "${FAISS#faiss-cpu}" = "${FAISS}" ]; then pip uninstall -y faiss-cpu && pip install --no-cache-dir "${FAISS}"; fi

FROM base AS runtime
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    RICE_HOST=0.0.0.0 \
    RICE_PORT=8000 \
    RICE_GALLERY_PATH=/data/gallery.db \
    RICE_ALLOW_OPEN=false \
    RICE_JOB_DIR=/jobs
# /jobs: timeline job uploads; /originals: items' original images. Mount one volume at each on every
# replica so any of them can run a job and a reindex finds every original.
RUN useradd --create-home --uid 10001 rice && mkdir -p /data /models /jobs /originals && chown rice:rice /data /jobs /originals
USER 10001
WORKDIR /home/rice
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('RICE_PORT') or '8000'; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4).status == 200 else 1)"]
CMD ["python3", "-m", "service"]
