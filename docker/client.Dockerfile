# A JAX training environment with the pytorch2jax client, no PyTorch, and the example
# training script. JAX_EXTRA=cuda13 installs JAX for NVIDIA GPUs.
#   docker build -f docker/client.Dockerfile .
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim

ARG JAX_EXTRA=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY protos protos
COPY server server
COPY client client

RUN pip install --no-cache-dir -c constraints.txt "/src[client]" \
    && if [ -n "${JAX_EXTRA}" ]; then \
        pip install --no-cache-dir -c constraints.txt "jax[${JAX_EXTRA}]" "/src[cuda]"; fi \
    && groupadd --gid 10001 p2j && useradd --uid 10001 --gid 10001 --create-home p2j \
    && mkdir -p /run/pytorch2jax /opt/pytorch2jax/examples \
    && chown p2j /run/pytorch2jax

COPY examples/train_remote.py /opt/pytorch2jax/examples/train_remote.py

USER 10001:10001
WORKDIR /home/p2j
ENV PYTORCH2JAX_TARGET=unix:///run/pytorch2jax/worker.sock
CMD ["python", "/opt/pytorch2jax/examples/train_remote.py"]
