"""How the worker's failures become gRPC statuses, and what their messages may say.

``status_of`` maps an exception to its code, in one table: the engine's errors
(``engine.WorkerError``) carry the name of theirs (``status``, a plain string: the engine
knows no gRPC), malformed messages are INVALID_ARGUMENT, running out of memory is
RESOURCE_EXHAUSTED, anything unexpected is INTERNAL and logged with its traceback.
Every message is ``scrubbed`` of file paths and shared-memory names, loses its traceback
blocks and is ``bounded`` to 4 KiB before it leaves; the worker's log keeps the original
(at INFO). ``RefuseUndecodable`` does the same for
requests that never reach a handler because their bytes do not parse.
"""

from __future__ import annotations

import logging
import re

import grpc
import torch

from pytorch2jax_protocol import dtypes, values
from pytorch2jax_protocol.tensors import WireFormatError
from pytorch2jax_server.engine import WorkerError

_log = logging.getLogger("pytorch2jax_server")

_MALFORMED = (WireFormatError, values.TreeFormatError, dtypes.UnsupportedDTypeError)


#: What to take out of a message: absolute paths (of two parts or more; in quotes, with
#: whatever they hold), paths from the home or the current folder (``~/``, ``./``,
#: ``../``), and shared-memory segment names, with or without their slash. A client needs
#: neither the worker's file layout nor a segment's name (which would let another local
#: process open the segment); exceptions from torch or the OS may carry both. Web
#: addresses stay. (An unquoted path with a space loses only its part before the space.)
_PRIVATE = re.compile(
    r"(?P<url>https?://[^\s'\"]+)"
    r"|(?P<segment>(?<![\w-])/?p2j-[0-9a-f]{32})"
    r"|(?P<quote>['\"])(?:/|~/|\.\.?/)[^'\"\n]*(?P=quote)"
    r"|(?<![\w.])/(?:[\w.@+~-]+/)+[\w.@+~-]*"
    r"|(?<![\w.~/])(?:~|\.\.?)/[\w.@+~-]+(?:/[\w.@+~-]*)*"
)


def _replacement(m: re.Match) -> str:
    if m["url"]:
        return m["url"]
    if m["segment"]:
        return "<segment>"
    if m["quote"]:
        return f"{m['quote']}<path>{m['quote']}"
    return "<path>"


def scrubbed(message: str) -> str:
    """``message`` without paths or segment names."""
    return _PRIVATE.sub(_replacement, message)


#: The longest message a client is sent, in bytes: well inside gRPC's limits on error
#: details (8 KiB soft, 16 KiB hard), past which the client gets RESOURCE_EXHAUSTED
#: ("metadata size exceeds ...") in place of the error's own status.
MAX_DETAILS_BYTES = 4096

#: A traceback block in a message (a DataLoader worker's, say): its header and the
#: indented frame lines after it; the exception's own last line, not indented, stays. And
#: the sentences that chain two blocks.
_TRACEBACK = re.compile(
    r"(?:Original )?Traceback \(most recent call last\):[ \t]*\n(?:[ \t]+[^\n]*(?:\n|$))*"
)
_CHAINING = re.compile(
    r"\n\s*(?:During handling of the above exception, another exception occurred"
    r"|The above exception was the direct cause of the following exception):\s*\n"
)


def without_tracebacks(message: str) -> str:
    """``message`` with its traceback blocks taken out (each exception's last line kept)."""
    if "Traceback (most recent call last)" not in message:
        return message
    return _TRACEBACK.sub("", _CHAINING.sub("\n", message))


def bounded(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """``message`` within ``limit`` UTF-8 bytes: its start and its end, and how much of
    the middle was cut."""
    data = message.encode()
    if len(data) <= limit:
        return message
    keep = (limit - 120) // 2
    head = data[:keep].decode(errors="ignore")
    tail = data[-keep:].decode(errors="ignore")
    cut = len(message) - len(head) - len(tail)
    return f"{head} [... {cut} characters cut; the worker's log has them all ...] {tail}"


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failure is reported with."""
    if isinstance(e, WorkerError):
        code, details = grpc.StatusCode[e.status], str(e)
    elif isinstance(e, _MALFORMED):
        code, details = grpc.StatusCode.INVALID_ARGUMENT, str(e)
    elif isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        code, details = grpc.StatusCode.RESOURCE_EXHAUSTED, f"the worker ran out of memory: {e}"
    else:
        _log.exception("internal error while serving a request")
        code = grpc.StatusCode.INTERNAL
        details = f"internal error in the worker: {type(e).__name__}: {e}"
    said = bounded(without_tracebacks(scrubbed(details)))
    if said != details:
        _log.info("%s: %s (sent without paths, tracebacks and length)", code.name, details)
    return code, said


_UNDECODABLE = object()  # what a request that does not parse is handed on as


class RefuseUndecodable(grpc.ServerInterceptor):
    """Requests whose bytes do not parse (garbage, truncated, nested too deep, invalid
    UTF-8) get INVALID_ARGUMENT: left to gRPC, they would be INTERNAL ("Exception
    deserializing request!") with a traceback in the log for each. Applies to every
    method with one request message, health and reflection too."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        method = handler_call_details.method.rsplit("/", 1)[-1]
        refusal = (
            f"the request is not a valid {method} request message; are the client's and "
            "the worker's pytorch2jax versions the same?"
        )

        def tolerant(data: bytes):
            try:
                return parse(data)
            except Exception:  # noqa: BLE001 - DecodeError, RecursionError, UnicodeError...
                return _UNDECODABLE

        def guarded(behavior):
            def call(request, context):
                if request is _UNDECODABLE:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
                return behavior(request, context)

            return call

        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        return handler._replace(
            request_deserializer=tolerant, **{kind: guarded(getattr(handler, kind))}
        )
