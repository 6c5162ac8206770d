"""The worker's failures, each tied to the one status it is reported with.

::

    WorkerError                 INTERNAL            the base: any failure the worker reports
    ├── ModelNotFoundError      NOT_FOUND           no model of that name is served
    ├── InvalidRequestError     INVALID_ARGUMENT    bad request, or the model rejected its inputs
    ├── LimitExceededError      RESOURCE_EXHAUSTED  over a size or memory limit
    ├── ResidualLostError       FAILED_PRECONDITION the residual handle is gone: re-send the inputs
    ├── CannotInferShapesError  UNIMPLEMENTED       output shapes depend on data; declare them
    ├── UnsupportedError        UNIMPLEMENTED       a transport this worker or client cannot use
    ├── SessionLostError        ABORTED             unknown or closed session: open a new one
    ├── CallCancelledError      CANCELLED           the deadline passed or the client cancelled
    └── ShuttingDownError       UNAVAILABLE         the worker is stopping

``status`` is the name of a gRPC status code, as a plain string: the engine knows no gRPC.
The worker's ``_status.status_of`` turns it into a ``grpc.StatusCode``, and reports
anything else raised while serving as INTERNAL, at one place; the in-process backend maps
it to the client's exception of the same status.
"""

from __future__ import annotations


class WorkerError(Exception):
    """A failure the worker reports to its client with a specific status."""

    status: str = "INTERNAL"


class ModelNotFoundError(WorkerError):
    """No model of the requested name is served."""

    status = "NOT_FOUND"


class InvalidRequestError(WorkerError):
    """The request is malformed, or the model refused its arguments."""

    status = "INVALID_ARGUMENT"


class LimitExceededError(WorkerError):
    """A size or memory limit of the worker was exceeded."""

    status = "RESOURCE_EXHAUSTED"


class ResidualLostError(WorkerError):
    """A residual handle that the worker does not (or no longer) hold."""

    status = "FAILED_PRECONDITION"


class CannotInferShapesError(WorkerError):
    """The model's output shapes cannot be computed without running it on real data."""

    status = "UNIMPLEMENTED"


class UnsupportedError(WorkerError):
    """A transport (or feature) this worker cannot offer to this client."""

    status = "UNIMPLEMENTED"


class SessionLostError(WorkerError):
    """The call names a session the worker does not hold (restarted, or closed)."""

    status = "ABORTED"


class CallCancelledError(WorkerError):
    """The call's deadline passed or its client cancelled it: its work is abandoned."""

    status = "CANCELLED"


class ShuttingDownError(WorkerError):
    """The worker is stopping: it opens no new session."""

    status = "UNAVAILABLE"
