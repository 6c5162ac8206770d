# The pytorch2jax worker: PyTorch and the worker, no JAX.
#   docker build -f docker/worker.Dockerfile .                                   # CPU
#   docker build -f docker/worker.Dockerfile --build-arg TORCH_VARIANT=cu130 .   # CUDA
# TORCH_VARIANT names a wheel index of download.pytorch.org: cpu, cu126, cu128, cu130
# (TORCH_INDEX_URL replaces that index, e.g. with a mirror). TORCH_VERSION must satisfy
# constraints.txt, which every pip install here is constrained by.
# BASE_IMAGE: any image with python3, its venv module, groupadd and useradd.
# Air-gapped (docker/docker-compose.airgap.yml, docker/compose-test.sh): wheels for the
# image's Python in WHEELHOUSE, a folder of the build context, and PIP_NO_INDEX=1.
ARG PYTHON_VERSION=3.12
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

FROM ${BASE_IMAGE}
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
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
# to the sources then reinstalls only the project, not torch.
# torch from its own index, beside the package index: PyPI's Linux torch pulls CUDA
# packages even for CPU, and torch's dependencies (sympy, networkx, ...) are on PyPI. The
# index's local version (2.13.0+cpu) sorts above PyPI's 2.13.0, so its build is chosen.
# The CUDA variants add cuda-python, which the CUDA IPC transport needs.
RUN python3 -m venv /opt/venv \
    && if [ "${TORCH_VARIANT}" = cpu ]; then extras=server; else extras=server,cuda; fi \
    && python3 -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print(*p["dependencies"], *(r for e in sys.argv[1].split(",") for r in p["optional-dependencies"][e]), sep="\n")' \
        "${extras}" >requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt --find-links wheelhouse \
        --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" -r requirements.txt

COPY README.md ./
COPY protos protos
COPY server server
COPY client client
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps -c constraints.txt --find-links wheelhouse /src \
    && groupadd --gid 10001 p2j && useradd --uid 10001 --gid 10001 --create-home p2j \
    && mkdir -p /run/pytorch2jax /etc/pytorch2jax \
    && chown p2j /run/pytorch2jax

# The client container runs as the same uid: the socket (mode 0600) and the shared-memory
# segments (mode 0600) are then reachable by exactly these two.
USER 10001:10001
WORKDIR /home/p2j
ENV PYTORCH2JAX_CONFIG=/etc/pytorch2jax/worker.toml \
    PYTORCH2JAX_LISTEN=unix:///run/pytorch2jax/worker.sock
EXPOSE 50051
HEALTHCHECK --interval=5s --timeout=5s --start-period=120s --retries=5 \
    CMD ["pytorch2jax-health", "unix:///run/pytorch2jax/worker.sock"]
CMD ["pytorch2jax-server"]
