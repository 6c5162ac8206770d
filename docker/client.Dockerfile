# A JAX training environment with the pytorch2jax client, no PyTorch, and the example
# training script. JAX_EXTRA=cuda13 installs JAX for NVIDIA GPUs.
#   docker build -f docker/client.Dockerfile .
# BASE_IMAGE: any image with python3, its venv module, groupadd and useradd.
# Air-gapped (docker/docker-compose.airgap.yml, docker/compose-test.sh): wheels for the
# image's Python in WHEELHOUSE, a folder of the build context, and PIP_NO_INDEX=1.
ARG PYTHON_VERSION=3.12
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

FROM ${BASE_IMAGE}
ARG JAX_EXTRA=""
ARG WHEELHOUSE=docker/wheelhouse
# 1: install from WHEELHOUSE alone (pip reads PIP_NO_INDEX from the environment).
ARG PIP_NO_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY ${WHEELHOUSE} wheelhouse/
COPY pyproject.toml constraints.txt ./

# The dependencies first, as pyproject.toml lists them, in a layer of their own: a change
# to the sources then reinstalls only the project, not jax. With JAX_EXTRA, jax's CUDA
# plugin and cuda-python too; all of it one resolve under constraints.txt.
RUN python3 -m venv /opt/venv \
    && extras=client \
    && if [ -n "${JAX_EXTRA}" ]; then extras=client,cuda; set -- "jax[${JAX_EXTRA}]"; fi \
    && python3 -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print(*p["dependencies"], *(r for e in sys.argv[1].split(",") for r in p["optional-dependencies"][e]), sep="\n")' \
        "${extras}" >requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt --find-links wheelhouse \
        -r requirements.txt "$@"

COPY README.md ./
COPY protos protos
COPY server server
COPY client client
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps -c constraints.txt --find-links wheelhouse /src \
    && groupadd --gid 10001 p2j && useradd --uid 10001 --gid 10001 --create-home p2j \
    && mkdir -p /run/pytorch2jax /opt/pytorch2jax/examples \
    && chown p2j /run/pytorch2jax

COPY examples/train_remote.py /opt/pytorch2jax/examples/train_remote.py

USER 10001:10001
WORKDIR /home/p2j
ENV PYTORCH2JAX_TARGET=unix:///run/pytorch2jax/worker.sock
CMD ["python", "/opt/pytorch2jax/examples/train_remote.py"]
