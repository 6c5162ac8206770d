"""Regression tests for edge cases a review found: each failed before its fix."""

from __future__ import annotations

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.core import FrozenDict

import pytorch2jax
from conftest import tree_allclose
from pytorch2jax import convert_pytnn_to_jax, py_to_jax_wrapper
from pytorch2jax_protocol import pb, pb_grpc
from pytorch2jax_server.engine import Residual, ResidualCache


def test_static_arguments_of_equal_value_but_other_type_are_not_confused():
    times = py_to_jax_wrapper(lambda x, k: x * k)
    x = jnp.arange(3, dtype=jnp.int32)
    assert jax.jit(lambda x: times(x, 2))(x).dtype == jnp.int32
    out = jax.jit(lambda x: times(x, 2.5))(x)
    assert out.dtype == jnp.float32
    tree_allclose(out, np.arange(3) * 2.5)


class _Float64Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 2).double()

    def forward(self, x):
        return self.lin(x.double())


def test_float64_module_without_x64():
    model = _Float64Head()
    apply_fn, params = convert_pytnn_to_jax(model)
    assert params["lin.weight"].dtype == jnp.float32  # jax_enable_x64 is off
    x = jnp.ones((4, 3))
    grads = jax.jit(jax.grad(lambda p: apply_fn(p, x).sum()))(params)
    tree_allclose(grads["lin.weight"], np.full((2, 3), 4.0))
    tree_allclose(apply_fn(params, x), model(torch.ones(4, 3)).detach().numpy())


def test_shape_inference_leaves_training_buffers_alone():
    bn = torch.nn.BatchNorm1d(3).train()
    apply_fn, params = convert_pytnn_to_jax(bn)
    jax.jit(apply_fn).lower(params, jnp.ones((4, 3)))
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(3))


class _OldStyleSquare(torch.autograd.Function):
    """A custom autograd.Function without setup_context: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_a_backward_torch_func_cannot_differentiate_names_the_model_and_torchs_reason():
    square = py_to_jax_wrapper(_OldStyleSquare.apply)
    loss = lambda x: square(x).sum()  # noqa: E731
    x = jnp.arange(3.0)
    # First order runs torch's own autograd: the custom backward works, eagerly and jitted.
    tree_allclose(jax.grad(loss)(x), 2 * x)
    tree_allclose(jax.jit(jax.grad(loss))(x), 2 * x)
    with pytest.raises(
        pytorch2jax.InvalidArgumentError,
        match=r"model 'apply' failed on its arguments as jvp∘(vjp∘)?model: .*setup_context",
    ):
        jax.jvp(jax.grad(loss), (x,), (jnp.ones(3),))


def test_custom_pytree_containers_are_refused_clearly(client):
    apply_fn, params = client.convert_pytnn_to_jax("dict_output")
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=r"a FrozenDict cannot be passed to torch"):
        apply_fn(params, FrozenDict(a=jnp.ones(4)), jnp.ones(4))
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=r"dict keys must be strings"):
        apply_fn(params, {1: jnp.ones(4)}, jnp.ones(4))


def test_residual_of_another_model_is_kept():
    cache = ResidualCache()
    handle = cache.put(Residual("a", [], [], {}, 8))
    assert cache.take(handle, model="b") is None
    assert cache.take(handle, model="a") is not None


def test_zero_size_tensor_with_huge_dimensions_is_invalid_argument(worker):
    huge = pb.Tensor(dtype=pb.FLOAT32, shape=[0, 2**62, 2**62], inline_data=b"")
    request = pb.ForwardRequest(model="scale_shift", arguments=pb.Arguments(args=[pb.Value(tensor=huge)] * 2))
    with grpc.insecure_channel(worker.unix) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.BridgeStub(channel).Forward(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too large to index" in info.value.details()
