"""The worker's failures, each tied to the one gRPC status code it is reported with.

::

    WorkerError
    ├── ModelNotFound        NOT_FOUND           no model of that name is served
    ├── InvalidRequest       INVALID_ARGUMENT    malformed request, or the model rejected its inputs
    ├── LimitExceeded        RESOURCE_EXHAUSTED  over a size or memory limit
    ├── ResidualLost         FAILED_PRECONDITION the residual handle is gone: re-send the inputs
    ├── CannotInferShapes    UNIMPLEMENTED       output shapes depend on data; declare them
    ├── Unsupported          UNIMPLEMENTED       a transport this worker or client cannot use
    ├── SessionLost          ABORTED             unknown or closed session: open a new one
    ├── CallCancelled        CANCELLED           the deadline passed or the client cancelled
    └── ShuttingDown         UNAVAILABLE         the worker is stopping

Anything else raised while serving is reported as INTERNAL by the servicer, at one place.
"""

from __future__ import annotations

import grpc


class WorkerError(Exception):
    """A failure the worker reports to its client with a specific status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class ModelNotFound(WorkerError):
    """No model of the requested name is served."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidRequest(WorkerError):
    """The request is malformed, or the model refused its arguments."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceeded(WorkerError):
    """A size or memory limit of the worker was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ResidualLost(WorkerError):
    """A residual handle that the worker does not (or no longer) hold."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class CannotInferShapes(WorkerError):
    """The model's output shapes cannot be computed without running it on real data."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Unsupported(WorkerError):
    """A transport (or feature) this worker cannot offer to this client."""

    code = grpc.StatusCode.UNIMPLEMENTED


class SessionLost(WorkerError):
    """The call names a session the worker does not hold (restarted, or closed)."""

    code = grpc.StatusCode.ABORTED


class CallCancelled(WorkerError):
    """The call's deadline passed or its client cancelled it: its work is abandoned."""

    code = grpc.StatusCode.CANCELLED


class ShuttingDown(WorkerError):
    """The worker is stopping: it opens no new session."""

    code = grpc.StatusCode.UNAVAILABLE
