# The pytorch2jax worker: PyTorch and the worker, no JAX.
#   docker build -f docker/worker.Dockerfile .                           # CPU
#   docker build -f docker/worker.Dockerfile --build-arg TORCH_VARIANT=cu130 .   # CUDA
# TORCH_VARIANT names a wheel index of download.pytorch.org: cpu, cu126, cu128, cu130.
# TORCH_VERSION must satisfy constraints.txt, which the rest is installed with.
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY protos protos
COPY server server
COPY client client

# torch first, from its own index: PyPI's Linux torch pulls CUDA packages even for CPU.
# The CUDA variants add cuda-python, which the CUDA IPC transport needs.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}" \
    && if [ "${TORCH_VARIANT}" = cpu ]; then extras=server; else extras=server,cuda; fi \
    && pip install --no-cache-dir -c constraints.txt "/src[${extras}]" \
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
