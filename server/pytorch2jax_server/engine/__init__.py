"""The worker's torch engine: served models, their VJPs, and what a VJP keeps meanwhile.

The engine is torch only: it takes and returns torch objects and raises its own errors,
and imports neither gRPC, nor the protobuf stubs, nor jax. Two front ends share it, so
that a model behaves the same served and in process: the gRPC servicer
(``pytorch2jax_server._servicer``, which decodes requests into torch objects and encodes
the results) and the client's in-process backend (``pytorch2jax._inprocess``, which hands
it JAX arrays viewed as tensors).

Example::

    import torch
    from pytorch2jax_server.engine import Registry, ResidualCache, vjp

    model = Registry({"lin": torch.nn.Linear(3, 2)}).get("lin")
    x = torch.ones(4, 3)
    outcome = model.run((x,), {}, [x], {}, keep=model.floating_inputs([x], {}))
    cache = ResidualCache()
    handle = cache.put(outcome.residual)  # ...until the backward comes
    arg_grads, param_grads = vjp(cache.take(handle), [torch.ones(4, 2)])
    # arg_grads: one per argument leaf; param_grads: of the parameters given to run()

    # The same model under transforms: per-example Jacobian-vector products, one call.
    xs, ts = torch.ones(8, 4, 3), torch.ones(8, 4, 3)
    program = (Jvp(wrt=(0,), outputs=(0,)), Vmap(in_dims=(0, 0), size=8))
    tangents = model.run((xs,), {}, [xs], {}, program=program, extras=[ts]).outputs

The surface:

Models
    ``Registry`` (the models a worker serves, by name), ``ServedModel`` (one of them:
    ``run``, ``infer``, ``check_parameters``, ``floating_inputs``, ``call_site``),
    ``CallSite`` (``run`` for calls that differ only in their tensors' data, checking
    their form once: the in-process backend's compiled calls), ``Outcome`` (a
    forward's outputs and its ``Residual``), ``vjp`` (gradients of a kept forward w.r.t.
    all it kept), ``vjp_of_kept`` (a program's Vjp from a kept forward) and
    ``tensor_leaves`` (an output pytree's tensors in wire order). ``run`` takes a call's
    PRNG key (torch's generators seeded from it for that call alone: ``_random``), its
    training or eval mode, and the buffers to return after it.
Programs
    ``Jvp``, ``Vjp`` and ``Vmap`` (the transforms a call can run the model under, as
    ``torch.func`` transforms; ``_programs`` says how), ``VMAP_METHODS`` and ``describe``
    (a program as composed functions, for messages).
Residuals
    ``Residual`` (the autograd state of one forward) and ``ResidualCache`` (the bounded
    cache that keeps them between a Forward and its Vjp), with its defaults
    ``DEFAULT_MAX_ENTRIES``, ``DEFAULT_MAX_BYTES`` and ``DEFAULT_TTL_S``.
Tensors and dtypes
    ``torch_dtype`` and ``wire_dtype`` (torch dtypes <-> the protocol's dtype codes),
    ``is_differentiable``, ``check_dense``, ``dense``, ``dense_cpu`` and ``shape_str``.
Errors
    ``WorkerError`` and one subclass per failure, each with the name of its status code
    in ``status`` (the tree is drawn in ``_errors``).
Cancellation
    ``Call`` (one call's token: ``with call:`` ties it to this thread; setting
    ``cancelled`` stops its torch work at the next submodule), ``install_cancellation_hook``
    (the module hook that does so), ``waiting_for`` (a lock wait that gives up once the
    call is cancelled) and ``WAIT_SLICE_S`` (how often such waits look).
"""

from pytorch2jax_server.engine._cancel import (
    WAIT_SLICE_S,
    Call,
    install_cancellation_hook,
    waiting_for,
)
from pytorch2jax_server.engine._errors import (
    CallCancelledError,
    CannotInferShapesError,
    InvalidRequestError,
    LimitExceededError,
    ModelNotFoundError,
    ResidualLostError,
    SessionLostError,
    ShuttingDownError,
    UnsupportedError,
    WorkerError,
)
from pytorch2jax_server.engine._models import (
    CallSite,
    Outcome,
    Registry,
    ServedModel,
    tensor_leaves,
    vjp,
    vjp_of_kept,
)
from pytorch2jax_server.engine._programs import VMAP_METHODS, Jvp, Transform, Vjp, Vmap, describe
from pytorch2jax_server.engine._residuals import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_TTL_S,
    Residual,
    ResidualCache,
)
from pytorch2jax_server.engine._tensors import (
    check_dense,
    dense,
    dense_cpu,
    is_differentiable,
    shape_str,
    torch_dtype,
    wire_dtype,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_TTL_S",
    "VMAP_METHODS",
    "WAIT_SLICE_S",
    "Call",
    "CallCancelledError",
    "CallSite",
    "CannotInferShapesError",
    "InvalidRequestError",
    "Jvp",
    "LimitExceededError",
    "ModelNotFoundError",
    "Outcome",
    "Registry",
    "Residual",
    "ResidualCache",
    "ResidualLostError",
    "ServedModel",
    "SessionLostError",
    "ShuttingDownError",
    "Transform",
    "UnsupportedError",
    "Vjp",
    "Vmap",
    "WorkerError",
    "check_dense",
    "dense",
    "dense_cpu",
    "describe",
    "install_cancellation_hook",
    "is_differentiable",
    "shape_str",
    "tensor_leaves",
    "torch_dtype",
    "vjp",
    "vjp_of_kept",
    "waiting_for",
    "wire_dtype",
]
