"""The worker's Prometheus metrics, and the HTTP listener that serves them.

Each worker has its own ``CollectorRegistry`` (never prometheus_client's global one), so
that several workers in one process, as in tests, count apart. Two kinds of metric:

- counted as calls end (``Metrics.record``, from the servicer's ``_reporting``): calls by
  model, method and status code, and their latency;
- read when scraped (``_Held``), from the objects ``GetWorkerStats`` reads too: calls in
  flight and waiting their turn (``Calls``), residuals (``ResidualCache``), sessions and
  their shared memory (``Sessions.held``); and the process's own (CPU, memory, files).

``record`` costs a dict lookup, a counter increment and a histogram observation: a few
microseconds, beside calls that take hundreds.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from pytorch2jax_server._calls import Calls
    from pytorch2jax_server._sessions import Sessions
    from pytorch2jax_server.engine import ResidualCache

PREFIX = "pytorch2jax_"
#: Latency buckets, in seconds: from a ListModels (about 100 us) to a long forward (60 s).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip

_ADDRESS = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]/]+)):(?P<port>\d{1,5})")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets) as ``(host, port)``; ValueError, with the
    right spelling, for anything else."""
    m = _ADDRESS.fullmatch(text.strip())
    if m is None or int(m["port"]) > 65535:
        raise ValueError(
            f"{text!r} is not HOST:PORT; e.g. 127.0.0.1:9464, or 127.0.0.1:0 for any free "
            "port (the worker prints the one it got)"
        )
    return m["v6"] or m["host"], int(m["port"])


class _Held:
    """Gauges of what the worker holds, read at each scrape."""

    def __init__(self, calls: Calls, residuals: ResidualCache, sessions: Sessions) -> None:
        self._calls = calls
        self._residuals = residuals
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        sessions, regions, region_bytes = self._sessions.held()
        for name, doc, value in (
            ("calls_in_flight", "Calls admitted and not done: running or waiting their turn.",
             self._calls.in_flight),
            ("calls_waiting", "Calls admitted and waiting for their turn to run.",
             self._calls.waiting),
            ("residuals", "Forwards whose autograd state is kept for a VJP.",
             len(self._residuals)),
            ("residual_bytes", "Bytes of the autograd state kept for VJPs.",
             self._residuals.nbytes),
            ("sessions", "Open client sessions.", sessions),
            ("shared_memory_regions", "Shared-memory regions the sessions have mapped.",
             regions),
            ("shared_memory_bytes", "Bytes of shared memory the sessions have mapped.",
             region_bytes),
        ):  # fmt: skip
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)


class Metrics:
    """One worker's metrics: ``record`` each call as it ends; ``serve`` them over HTTP.

    Example::

        metrics = Metrics(calls, residuals, sessions)
        metrics.record("Forward", "mlp", "OK", 0.004)
        url = metrics.serve("127.0.0.1:0")   # http://127.0.0.1:PORT/metrics
        ...
        metrics.close()
    """

    def __init__(self, calls: Calls, residuals: ResidualCache, sessions: Sessions) -> None:
        self.registry = CollectorRegistry()
        self.url: str | None = None
        self._calls = Counter(
            PREFIX + "calls",
            "Calls answered, by model (empty for RPCs naming none, or a model not served), "
            "RPC method and gRPC status code.",
            ("model", "method", "code"),
            registry=self.registry,
        )
        self._latency = Histogram(
            PREFIX + "call_duration_seconds",
            "Time from a call's arrival to its answer (waiting for its turn included), by "
            "model and RPC method.",
            ("model", "method"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # A label set's children, looked up once: labels() costs more than inc+observe.
        self._children: dict[tuple[str, str, str], tuple] = {}
        self.registry.register(_Held(calls, residuals, sessions))
        ProcessCollector(registry=self.registry)
        self._http = None
        self._thread: threading.Thread | None = None

    def record(self, method: str, model: str, code: str, seconds: float) -> None:
        """One call of ``method`` on ``model`` answered with ``code`` after ``seconds``."""
        key = (model, method, code)
        children = self._children.get(key)
        if children is None:
            children = self._children.setdefault(
                key, (self._calls.labels(*key), self._latency.labels(model, method))
            )
        children[0].inc()
        children[1].observe(seconds)

    def serve(self, address: str) -> str:
        """Serves the metrics at ``http://address/metrics`` (port 0: any free one) from a
        thread of their own; returns that URL (with the bound port)."""
        host, port = parse_address(address)
        try:
            self._http, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise OSError(
                f"cannot serve metrics on {address}: {e.strerror or e}; choose another port, "
                "or port 0 for any free one (the worker prints the port it got)"
            ) from None
        self._thread.name = "p2j-metrics"
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self._http.server_address[1]}/metrics"
        return self.url

    def close(self) -> None:
        """Stops serving (if it served); the counts stay readable in ``registry``."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join()
            self._http = None
