"""The worker's Prometheus metrics (``--metrics-listen``) and the client's ``stats()``."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import grpc
import jax
import jax.numpy as jnp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pytorch2jax
from conftest import start_worker, wait_until, worker_stats
from pytorch2jax_protocol import pb, pb_grpc

MODELS = {
    "mlp": "pytorch2jax_server.examples:mlp()",
    "scale_shift": "pytorch2jax_server.examples:scale_shift",
}
THREADS = 3
#: Forwards, and forwards with their VJP, each thread makes of each model.
N = 4
#: Calls the worker refuses with INVALID_ARGUMENT (an input of the wrong width).
BAD = 3


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample at ``url``, by its name and labels."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _calls(samples, model: str, method: str, code: str = "OK") -> float:
    return _value(samples, "pytorch2jax_calls_total", model=model, method=method, code=code)


def _all_codes(samples, model: str, method: str) -> float:
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "pytorch2jax_calls_total"
        and {("model", model), ("method", method)} <= labels
    )


def _metrics_url(stderr: str) -> str:
    found = re.search(r"^metrics on (http://\S+/metrics)$", stderr, re.M)
    assert found, stderr
    return found[1]


def test_metrics_count_the_calls_made_and_what_the_worker_holds():
    with start_worker("--metrics-listen", "127.0.0.1:0", models=MODELS) as w:
        url = _metrics_url(w.stderr())
        client = pytorch2jax.connect(w.unix)
        apply_fn, params = client.convert_pytnn_to_jax("mlp")
        scale_shift = client.py_to_jax_wrapper("scale_shift")
        x = jnp.ones((4, 8))
        forward_mlp = jax.jit(apply_fn)
        grad_mlp = jax.jit(jax.grad(lambda p, x: apply_fn(p, x).sum()))
        forward_ss = jax.jit(scale_shift)
        grad_ss = jax.jit(jax.grad(lambda x: scale_shift(x, x).sum()))
        #: Per model: a forward, and a forward with its VJP.
        steps = [
            (lambda: forward_mlp(params, x), lambda: grad_mlp(params, x)),
            (lambda: forward_ss(x, x), lambda: grad_ss(x)),
        ]
        for forward, grad in steps:  # compiled (and shapes inferred) here
            jax.block_until_ready((forward(), grad()))
        before = _scrape(url)
        seen_before = client.stats()

        scrapes, done, failures = [], threading.Event(), []

        def scraper() -> None:
            while not done.wait(0.05):
                scrapes.append(_scrape(url))

        def load() -> None:
            try:
                for _ in range(N):
                    for forward, grad in steps:
                        jax.block_until_ready((forward(), grad()))
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                failures.append(e)

        threads = [threading.Thread(target=load) for _ in range(THREADS)]
        watcher = threading.Thread(target=scraper)
        watcher.start()
        for t in threads:
            t.start()
        for _ in range(BAD):  # traced anew each time: the worker infers shapes and refuses
            with pytest.raises(pytorch2jax.InvalidArgumentError, match="model 'mlp' failed"):
                forward_mlp(params, jnp.ones((4, 3)))
        for t in threads:
            t.join()
        done.set()
        watcher.join()
        assert not failures, failures
        wait_until(lambda: _value(_scrape(url), "pytorch2jax_calls_in_flight") == 0)
        after = _scrape(url)

        # Scraped during the load: counts only grow, in-flight calls stay within the callers.
        assert scrapes
        for earlier, later in zip([before, *scrapes], [*scrapes, after]):
            assert _calls(earlier, "mlp", "Forward") <= _calls(later, "mlp", "Forward")
        for s in scrapes:
            assert 0 <= _value(s, "pytorch2jax_calls_in_flight") <= THREADS + 1
        assert _value(after, "pytorch2jax_calls_waiting") == 0

        # Exactly the calls made: a forward, and a forward with its VJP, per step.
        def made(model: str, method: str, code: str = "OK") -> float:
            return _calls(after, model, method, code) - _calls(before, model, method, code)

        for model in MODELS:
            assert made(model, "Forward") == 2 * N * THREADS
            assert made(model, "Vjp") == N * THREADS
        bad = "INVALID_ARGUMENT"
        assert made("mlp", "InferShapes", bad) == BAD
        assert not any(
            name == "pytorch2jax_calls_total" and ("code", "OK") not in labels
            and ("code", bad) not in labels
            for name, labels in after
        ), "no call failed but the bad ones"

        # One latency observation per call, whatever its status.
        methods = [(m, method) for m in MODELS for method in ("Forward", "Vjp", "InferShapes")]
        for model, method in [*methods, ("mlp", "GetParameters"), ("", "ListModels")]:
            labels = {"model": model, "method": method}
            count = _value(after, "pytorch2jax_call_duration_seconds_count", **labels)
            assert count == _all_codes(after, model, method) > 0, labels
            inf = _value(after, "pytorch2jax_call_duration_seconds_bucket", le="+Inf", **labels)
            fast = _value(after, "pytorch2jax_call_duration_seconds_bucket", le="0.0001", **labels)
            assert inf == count and fast <= count
            assert _value(after, "pytorch2jax_call_duration_seconds_sum", **labels) > 0

        # The client saw what the worker saw (it is the only one calling models).
        seen = client.stats()
        for method in ("Forward", "Vjp", "InferShapes"):
            assert seen["calls"][method] == sum(_all_codes(after, m, method) for m in MODELS)
            assert seen["seconds"][method] > 0
        assert seen["calls"]["Forward"] - seen_before["calls"]["Forward"] == 4 * N * THREADS
        for model in MODELS:
            served = sum(_all_codes(after, model, m) for m in ("Forward", "Vjp", "InferShapes"))
            assert seen["models"][model] == served
        assert seen["errors"] == {bad: BAD}
        assert seen["retries"] == 0

        # What the worker holds, read at the scrape from where GetWorkerStats reads it.
        vjp_fn = jax.vjp(lambda p: apply_fn(p, x), params)[1]  # eager: keeps its residual
        held, stats = _scrape(url), worker_stats(w.tcp)
        assert _value(held, "pytorch2jax_residuals") == stats.residuals >= 1
        assert _value(held, "pytorch2jax_residual_bytes") == stats.residual_bytes > 0
        assert _value(held, "pytorch2jax_sessions") == stats.sessions == 1
        assert _value(held, "pytorch2jax_shared_memory_regions") == stats.regions
        assert _value(held, "pytorch2jax_shared_memory_bytes") == stats.region_bytes
        assert _value(held, "process_resident_memory_bytes") > 0
        del vjp_fn

        client.close()  # its session goes, and with it its memory and residuals
        wait_until(lambda: _value(_scrape(url), "pytorch2jax_sessions") == 0)
        released = _scrape(url)
        assert _value(released, "pytorch2jax_shared_memory_bytes") == 0
        assert _value(released, "pytorch2jax_residuals") == 0

        w.process.send_signal(signal.SIGTERM)
        assert w.process.wait(timeout=30) == 0
        with pytest.raises(urllib.error.URLError):  # the listener stopped with the worker
            _scrape(url)


def test_a_bad_call_is_counted_under_its_code_and_made_up_models_add_no_series():
    with start_worker("--metrics-listen", "127.0.0.1:0", models=MODELS) as w:
        url = _metrics_url(w.stderr())
        with grpc.insecure_channel(w.tcp) as channel:
            stub = pb_grpc.BridgeStub(channel)
            for name in ("no-such-model", "another"):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Forward(pb.ForwardRequest(model=name), timeout=10)
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError):
                list(stub.GetParameters(pb.GetParametersRequest(model="nope"), timeout=10))
        samples = _scrape(url)
        assert _calls(samples, "", "Forward", "NOT_FOUND") == 2
        assert _calls(samples, "", "GetParameters", "NOT_FOUND") == 1
        models = {dict(labels).get("model") for name, labels in samples if "model" in dict(labels)}
        assert models <= {"", *MODELS}


def test_metrics_listen_from_the_config_file(tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text(
        '[server]\nmetrics_listen = "127.0.0.1:0"\n'
        '[models]\nf = "pytorch2jax_server.examples:double"\n'
    )
    with start_worker("--config", str(config), models={}) as w:
        samples = _scrape(_metrics_url(w.stderr()))
        assert _value(samples, "pytorch2jax_sessions") == 0


def test_a_busy_metrics_port_is_refused_with_a_fix():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "pytorch2jax_server", "--listen", "127.0.0.1:0",
             "--metrics-listen", address, "--model", "f=pytorch2jax_server.examples:double"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"cannot serve metrics on {address}: " in result.stderr
    assert "choose another port, or port 0 for any free one" in result.stderr


def test_workers_in_one_process_count_apart():
    from pytorch2jax_server import Registry, create_server
    from pytorch2jax_server.examples import double

    workers = [
        create_server(Registry({"f": double}), ["127.0.0.1:0"], metrics_listen="127.0.0.1:0")
        for _ in range(2)
    ]
    try:
        with grpc.insecure_channel(workers[0].addresses[0]) as channel:
            pb_grpc.BridgeStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        first, second = (_scrape(w.metrics.url) for w in workers)
        assert _calls(first, "", "ListModels") == 1
        assert _calls(second, "", "ListModels") == 0
    finally:
        for w in workers:
            w.stop(0)
    with pytest.raises(urllib.error.URLError):
        _scrape(workers[0].metrics.url)
