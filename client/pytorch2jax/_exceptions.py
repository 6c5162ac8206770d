"""The exceptions pytorch2jax raises, and the one place gRPC errors become them.

::

    Pytorch2JaxError
    ├── WorkerUnavailableError   no worker answers: not started, killed, or shutting down
    ├── WorkerTimeoutError       a call ran past its deadline (also a TimeoutError)
    ├── CallCancelledError       the call was cancelled
    ├── ModelNotFoundError       the worker serves no model of that name (also a LookupError)
    ├── InvalidArgumentError     wrong arity, shape or dtype, or the model rejected its
    │                            inputs (also a ValueError)
    ├── ResourceExhaustedError   over a size, memory or concurrency limit of the worker
    ├── ResidualLostError        the worker dropped a forward's autograd state
    ├── SessionLostError         the worker no longer knows this client's session (it
    │                            restarted); the client opens a new one and retries
    ├── UnsupportedError         the worker cannot do what was asked (e.g. infer the output
    │                            shapes of a data-dependent model)
    ├── AuthenticationError      missing or wrong credentials
    └── WorkerInternalError      a bug or crash inside the worker

    VmapFallbackWarning          (a UserWarning) torch could not batch a model under
                                 ``vmap``: its batch runs as a loop on the torch side

Inside a ``jax.jit``-compiled program, JAX reports an exception raised by a callback as a
``jax.errors.JaxRuntimeError`` whose text ends with the original class name and message
(jaxlib formats it; the class itself cannot come through). ``original_error`` gives the
original back. Errors found while tracing (unknown model, arity, shape, dtype) are raised
as the classes above.
"""

from __future__ import annotations

import collections
import threading

import grpc


class Pytorch2JaxError(Exception):
    """Base class of every error pytorch2jax raises."""


class WorkerUnavailableError(Pytorch2JaxError, ConnectionError):
    """No worker answers at the target: it is not running, was killed, or is shutting down."""


class WorkerTimeoutError(Pytorch2JaxError, TimeoutError):
    """A call did not finish within its deadline."""


class CallCancelledError(Pytorch2JaxError):
    """The call was cancelled before it finished."""


class ModelNotFoundError(Pytorch2JaxError, LookupError):
    """The worker serves no model of the requested name."""


class InvalidArgumentError(Pytorch2JaxError, ValueError):
    """The call's arguments do not fit the model: arity, shape or dtype."""


class ResourceExhaustedError(Pytorch2JaxError):
    """The worker refused the call: over a size, memory or concurrency limit."""


class ResidualLostError(Pytorch2JaxError):
    """The worker no longer holds the autograd state of a forward."""


class SessionLostError(Pytorch2JaxError):
    """The worker no longer holds this client's transport session (restarted or closed)."""


class UnsupportedError(Pytorch2JaxError):
    """The worker cannot do what was asked."""


class AuthenticationError(Pytorch2JaxError):
    """The worker refused the client's credentials."""


class VmapFallbackWarning(UserWarning):
    """``torch.func.vmap`` could not batch a model, so its batch runs as a loop on the
    torch side (``vmap_method="auto"``)."""


class WorkerInternalError(Pytorch2JaxError):
    """The worker failed for a reason of its own (a bug, or a crash mid-call)."""


#: Every gRPC status code, and the class it is raised as. OK never reaches here.
_BY_CODE: dict[grpc.StatusCode, type[Pytorch2JaxError]] = {
    grpc.StatusCode.CANCELLED: CallCancelledError,
    grpc.StatusCode.UNKNOWN: WorkerInternalError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: WorkerTimeoutError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: WorkerInternalError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: ResidualLostError,
    grpc.StatusCode.ABORTED: SessionLostError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.UNIMPLEMENTED: UnsupportedError,
    grpc.StatusCode.INTERNAL: WorkerInternalError,
    grpc.StatusCode.UNAVAILABLE: WorkerUnavailableError,
    grpc.StatusCode.DATA_LOSS: WorkerInternalError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
}

# What to do about each class, said once here rather than at every call site.
_HINTS: dict[type[Pytorch2JaxError], str] = {
    WorkerUnavailableError: "is the worker running? Start it with "
    "`pytorch2jax-server --listen ADDRESS --model NAME=package.module:attr`",
    WorkerTimeoutError: "raise call_timeout= in pytorch2jax.connect() if the model needs longer",
    ResourceExhaustedError: "send smaller batches, or raise the worker's limits "
    "(pytorch2jax-server --help)",
    WorkerInternalError: "the worker's log has the traceback",
    AuthenticationError: "pass the worker's token to pytorch2jax.connect(token=...) or set "
    "PYTORCH2JAX_TOKEN",
}


#: gRPC's own words for its limits (how they begin), and what to say with them.
_LIMITS = (
    (
        "Concurrent RPC limit exceeded!",
        "the worker is serving as many RPCs as it accepts at once (pytorch2jax-server "
        "--max-concurrent-calls, --max-sessions); retry later",
    ),
    (
        "Received message larger than max",
        "{}: a message is larger than the worker's --max-message-mb or this client's "
        "max_message_bytes= allow; send smaller batches, raise both, or, on one host, use "
        "transport='shm', which sends tensors outside the messages",
    ),
    (
        "Sent message larger than max",
        "{}: the request is larger than this client's max_message_bytes= allows; send "
        "smaller batches, or raise it and the worker's --max-message-mb",
    ),
)


def _explained(details: str) -> str:
    for prefix, explanation in _LIMITS:
        if details.startswith(prefix):
            return explanation.format(details)
    return details


def from_status(code: grpc.StatusCode, message: str) -> Pytorch2JaxError:
    """The exception for a failure with status ``code``, its message ending in a hint
    (unless it already names the worker setting to change)."""
    cls = _BY_CODE.get(code, WorkerInternalError)
    hint = _HINTS.get(cls)
    if cls is ResourceExhaustedError and " --" in message:
        hint = None
    return cls(f"{message}; {hint}" if hint else message)


def from_rpc_error(error: grpc.RpcError, target: str) -> Pytorch2JaxError:
    """The exception to raise for a failed call to the worker at ``target``."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(code)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"no answer ({details})"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        details = _explained(details)
    return from_status(code, f"worker at {target}: {details}")


# -- errors that left a compiled computation ---------------------------------------------

_RECENT = 64
_raised: collections.deque[Pytorch2JaxError] = collections.deque(maxlen=_RECENT)
_raised_lock = threading.Lock()


def remember(error: Pytorch2JaxError) -> None:
    """Notes an error leaving a callback, for ``original_error`` (the last few are kept)."""
    with _raised_lock:
        _raised.append(error)


def original_error(error: BaseException) -> Pytorch2JaxError | None:
    """The pytorch2jax exception that a ``jax.errors.JaxRuntimeError`` reports, or None.

    Under ``jit``, XLA turns an exception raised inside the computation into its own
    runtime error, with the original's class and message at the end of its text. This
    gives back the original (one of the last 64 raised in this process), to catch or
    re-raise by its class::

        try:
            jax.jit(apply_fn)(params, x)
        except jax.errors.JaxRuntimeError as e:
            raise pytorch2jax.original_error(e) or e from None
    """
    if isinstance(error, Pytorch2JaxError):
        return error
    text = str(error)
    with _raised_lock:
        recent = list(_raised)
    for candidate in reversed(recent):
        if f"{type(candidate).__name__}: {candidate}" in text:
            return candidate
    return None
