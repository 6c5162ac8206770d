"""The CUDA IPC transport.

Without a GPU (CI): the handshake, the pool RPC and the references are refused with clear
reasons, and the client says what to install. With one (tests marked ``gpu``, run on a
GPU machine): a worker serving on the GPU, a client whose arrays live there, values and
gradients equal to torch's, and hostile pool references refused.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import jax
import jax.numpy as jnp
import pytest
import torch

import pytorch2jax
from conftest import GPU, RawSession, jax_matches_torch_loss, start_worker
from pytorch2jax_protocol import cuda, pb, shm

MODELS = {"scale_shift": "pytorch2jax_server.examples:scale_shift"}

needs_gpu = pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU, CUDA torch, JAX and cuda-python")


def _cuda_ref(region: int, offset: int, nbytes: int) -> pb.Tensor:
    ref = pb.SharedMemoryRef(region=region, offset=offset, nbytes=nbytes)
    return pb.Tensor(dtype=pb.FLOAT32, shape=[4], cuda_ipc=ref)


@pytest.fixture(scope="module")
def cpu_worker():
    with start_worker(models=MODELS) as w:
        yield w


# -- without a GPU ----------------------------------------------------------------------


def test_a_cpu_worker_refuses_cuda_ipc_in_the_handshake(cpu_worker):
    session = RawSession(cpu_worker.unix, (pb.CUDA_IPC, pb.SHM))
    try:
        assert list(session.info.transports) == [pb.INLINE, pb.SHM]
        assert "serves on the CPU" in session.info.refused
    finally:
        session.close()


def test_create_pool_needs_the_transport(cpu_worker):
    session = RawSession(cpu_worker.unix, (pb.SHM,))
    try:
        with pytest.raises(grpc.RpcError) as e:
            session.stub.CreateCudaPool(
                pb.CreateCudaPoolRequest(device_uuid=bytes(16), size=1 << 20),
                metadata=session.metadata,
            )
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "does not offer CUDA IPC" in e.value.details()
    finally:
        session.close()


def test_a_gpu_reference_to_host_memory_is_refused(cpu_worker):
    session = RawSession(cpu_worker.unix, (pb.SHM,))
    name, mapping = shm.create(1 << 16)
    try:
        region = session.stub.RegisterRegion(
            pb.RegisterRegionRequest(name=name, size=1 << 16), metadata=session.metadata
        ).region
        with pytest.raises(grpc.RpcError) as e:
            session.forward(_cuda_ref(region, 0, 16))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "host memory" in e.value.details()
        assert session.forward(pb.Tensor(dtype=pb.FLOAT32, shape=[1], inline_data=bytes(4)))
    finally:
        shm.unlink(name)
        del mapping
        session.close()


@pytest.mark.skipif(GPU, reason="checks the message shown without a GPU")
def test_connect_cuda_ipc_without_a_gpu_says_what_is_missing(cpu_worker):
    with pytest.raises(pytorch2jax.UnsupportedError, match="cuda_ipc transport needs"):
        pytorch2jax.connect(cpu_worker.unix, transport="cuda_ipc")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_the_worker_refuses_a_gpu_it_does_not_have():
    result = subprocess.run(
        [sys.executable, "-m", "pytorch2jax_server", "--device", "cuda", "--model",
         "f=pytorch2jax_server.examples:scale_shift", "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "cannot serve on device 'cuda'" in result.stderr


# -- with a GPU -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_worker():
    with start_worker("--device", "cuda", models={
        **MODELS, "mlp": "pytorch2jax_server.examples:mlp()"
    }) as w:
        yield w


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_values_and_gradients_match_torch_on_the_gpu(gpu_worker, jit):
    from pytorch2jax_server.examples import mlp

    with pytorch2jax.connect(gpu_worker.unix, transport="cuda_ipc") as client:
        assert client.transport == "cuda_ipc"
        apply_fn, params = client.convert_pytnn_to_jax("mlp")
        x = jax.random.normal(jax.random.PRNGKey(0), (4, 8), jnp.float32)
        assert x.devices().pop().platform == "gpu"
        jax_matches_torch_loss(apply_fn, params, x, mlp().cuda(), jit=jit)
        assert client.transport_info()["arenas"] >= 1


@pytest.mark.gpu
@needs_gpu
def test_hostile_pool_references_are_refused(gpu_worker):
    session = RawSession(gpu_worker.unix, (pb.CUDA_IPC,))
    try:
        assert pb.CUDA_IPC in session.info.transports
        uuid = cuda.device_uuid(jax.devices("gpu")[0].local_hardware_id)
        with pytest.raises(grpc.RpcError) as e:
            session.stub.CreateCudaPool(
                pb.CreateCudaPoolRequest(device_uuid=bytes(16), size=1 << 20),
                metadata=session.metadata,
            )
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED  # another GPU
        pool = session.stub.CreateCudaPool(
            pb.CreateCudaPoolRequest(device_uuid=uuid, size=1 << 20), metadata=session.metadata
        )
        assert len(pool.ipc_handle) == cuda.IPC_HANDLE_BYTES
        for offset, nbytes in ((1 << 20, 16), ((1 << 64) - 64, 16), (0, 12)):
            with pytest.raises(grpc.RpcError) as e:
                session.forward(_cuda_ref(pool.region, offset, nbytes))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert session.forward(_cuda_ref(pool.region, 0, 16)).outputs.HasField("tensor")
    finally:
        session.close()
