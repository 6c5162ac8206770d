"""Security: TLS and the bearer token (certificates made by docker/gen-certs.sh, as the
README says, and a worker configured through the environment variables the compose file
uses), and the defaults: loopback only, models named only by the worker's own command
line, no paths or segment names in error messages, shared memory for local peers only."""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import grpc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import start_worker

import pytorch2jax
from pytorch2jax_protocol import pb, pb_grpc
from pytorch2jax_server import _cli, _server, _status, examples

REPO = Path(__file__).resolve().parent.parent


def _make_certs(out: Path) -> Path:
    """A CA, server and client certificates and a token in ``out``, by docker/gen-certs.sh."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is needed to make test certificates")
        pytest.skip("no openssl to make test certificates")
    subprocess.run(["bash", str(REPO / "docker/gen-certs.sh"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return _make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def secure_worker(certs):
    """A worker serving TCP over TLS and requiring a token, set up by environment only."""
    env = {
        "PYTORCH2JAX_TLS_CERT": str(certs / "server.pem"),
        "PYTORCH2JAX_TLS_KEY": str(certs / "server.key"),
        "PYTORCH2JAX_TOKEN_FILE": str(certs / "token"),
    }
    with start_worker(models={"mlp": "pytorch2jax_server.examples:mlp()"}, env=env) as w:
        yield w


def _token(certs: Path) -> str:
    return (certs / "token").read_text().strip()


def test_without_token_is_unauthenticated(secure_worker, certs):
    tls = pytorch2jax.TLS(ca=str(certs / "ca.pem"))
    with pytest.raises(pytorch2jax.AuthenticationError, match="requires a bearer token") as e:
        pytorch2jax.connect(secure_worker.tcp, tls=tls)
    assert "connect(token=" in str(e.value) and "PYTORCH2JAX_TOKEN" in str(e.value)


def test_wrong_token_is_unauthenticated(secure_worker, certs):
    tls = pytorch2jax.TLS(ca=str(certs / "ca.pem"))
    with pytest.raises(pytorch2jax.AuthenticationError, match="token is wrong"):
        pytorch2jax.connect(secure_worker.tcp, tls=tls, token="not-the-token")


def test_token_over_tls_trains(secure_worker, certs):
    """With the token, over TLS: values and gradients as torch in process."""
    tls = pytorch2jax.TLS(ca=str(certs / "ca.pem"))
    with pytorch2jax.connect(secure_worker.tcp, tls=tls, token=_token(certs)) as c:
        apply_fn, params = c.convert_pytnn_to_jax("mlp")
        x = jnp.linspace(-1, 1, 24, dtype=jnp.float32).reshape(3, 8)
        loss, grads = jax.jit(jax.value_and_grad(lambda p: apply_fn(p, x).sum()))(params)
    model = examples.mlp()
    want = model(torch.tensor(np.asarray(x))).sum()
    want.backward()
    np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_token_and_tls_from_the_environment(secure_worker, certs, monkeypatch):
    monkeypatch.setenv("PYTORCH2JAX_TARGET", secure_worker.tcp)
    monkeypatch.setenv("PYTORCH2JAX_TOKEN", _token(certs))
    monkeypatch.setenv("PYTORCH2JAX_TLS_CA", str(certs / "ca.pem"))
    with pytorch2jax.connect() as c:
        assert [m.name for m in c.list_models()] == ["mlp"]


def test_the_unix_socket_needs_the_token_too(secure_worker, certs):
    with pytest.raises(pytorch2jax.AuthenticationError):
        pytorch2jax.connect(secure_worker.unix)
    with pytest.raises(pytorch2jax.AuthenticationError, match="token is wrong"):
        pytorch2jax.connect(secure_worker.unix, token="not-the-token")
    # TLS settings do not apply to a unix socket, which is always plaintext.
    tls = pytorch2jax.TLS(ca=str(certs / "ca.pem"))
    with pytorch2jax.connect(secure_worker.unix, tls=tls, token=_token(certs)) as c:
        assert c.list_models()
    with pytorch2jax.connect(secure_worker.unix, token=_token(certs)) as c:
        assert c.transport in ("lane", "shm")  # the session stream carries the token as well
        apply_fn, params = c.convert_pytnn_to_jax("mlp")
        assert apply_fn(params, jnp.ones((2, 8))).shape == (2, 1)


def test_plaintext_client_to_tls_worker_is_told_about_tls(secure_worker):
    with pytest.raises(pytorch2jax.WorkerUnavailableError, match="PYTORCH2JAX_TLS_CA"):
        pytorch2jax.connect(secure_worker.tcp, tls=False, timeout=1)


def test_untrusted_certificate_is_refused(secure_worker, tmp_path):
    other = _make_certs(tmp_path / "other")
    with pytest.raises(pytorch2jax.WorkerUnavailableError, match="(?i)handshake|certificate|ssl"):
        pytorch2jax.connect(secure_worker.tcp, tls=pytorch2jax.TLS(ca=str(other / "ca.pem")), timeout=1)


def _health(target: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytorch2jax_protocol.health", target, "--timeout", "5"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


def test_health_probe_needs_no_token(secure_worker, certs):
    assert _health(secure_worker.unix).returncode == 0
    ok = _health(secure_worker.tcp, PYTORCH2JAX_TLS_CA=str(certs / "ca.pem"))
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr


def test_health_probe_reports_no_worker(tmp_path):
    result = _health(f"unix://{tmp_path}/nobody.sock")
    assert result.returncode == 1, result.stdout
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr


def test_client_certificates_required(certs):
    env = {
        "PYTORCH2JAX_TLS_CERT": str(certs / "server.pem"),
        "PYTORCH2JAX_TLS_KEY": str(certs / "server.key"),
        "PYTORCH2JAX_TLS_CLIENT_CA": str(certs / "ca.pem"),
    }
    models = {"scale_shift": "pytorch2jax_server.examples:scale_shift"}
    with start_worker(models=models, listen=["127.0.0.1:0"], env=env) as w:
        with pytest.raises(pytorch2jax.WorkerUnavailableError):
            pytorch2jax.connect(w.tcp, tls=pytorch2jax.TLS(ca=str(certs / "ca.pem")), timeout=1)
        tls = pytorch2jax.TLS(
            ca=str(certs / "ca.pem"), cert=str(certs / "client.pem"), key=str(certs / "client.key")
        )
        with pytorch2jax.connect(w.tcp, tls=tls) as c:
            assert [m.name for m in c.list_models()] == ["scale_shift"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tls-cert", "/nonexistent/server.pem"], "both a certificate and its private key"),
        (["--tls-cert", "/nonexistent/s.pem", "--tls-key", "/nonexistent/s.key"], "cannot read"),
        (["--token-file", "/nonexistent/token"], "cannot read the token file"),
    ],
)
def test_bad_security_settings_exit_2(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "pytorch2jax_server", "--model", "f=pytorch2jax_server.examples:scale_shift", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_exposed_address_without_protection_warns():
    models = {"scale_shift": "pytorch2jax_server.examples:scale_shift"}
    with start_worker(models=models, listen=["0.0.0.0:0"]) as w:
        assert "without TLS or a token" in w.stderr()
    with start_worker(models=models, listen=["127.0.0.1:0"]) as w:
        assert "without TLS" not in w.stderr()


def test_pool_over_tls_with_token(certs):
    """Two workers behind one client, over TLS with a token; the VJP is routed to the
    worker that ran the forward, over its own TLS channel."""
    env = {
        "PYTORCH2JAX_TLS_CERT": str(certs / "server.pem"),
        "PYTORCH2JAX_TLS_KEY": str(certs / "server.key"),
        "PYTORCH2JAX_TOKEN_FILE": str(certs / "token"),
    }
    models = {"mlp": "pytorch2jax_server.examples:mlp()"}
    with start_worker(models=models, listen=["localhost:0"], env=env) as a, start_worker(
        models=models, listen=["localhost:0"], env=env
    ) as b:
        tls = pytorch2jax.TLS(ca=str(certs / "ca.pem"))
        with pytorch2jax.connect([a.tcp, b.tcp], tls=tls, token=_token(certs)) as c:
            apply_fn, params = c.convert_pytnn_to_jax("mlp")
            grad = jax.jit(jax.grad(lambda p: apply_fn(p, jnp.ones((2, 8))).sum()))
            for _ in range(4):
                grad(params)
            assert len(c.workers()) == 2 and c._pool.routed_vjps == 4
        with pytest.raises(pytorch2jax.InvalidArgumentError, match="server_name"):
            pytorch2jax.connect([a.tcp, b.tcp.replace("localhost", "127.0.0.1")], tls=tls)


def test_token_file_wins_over_token_in_environment(certs):
    """The command line wins over the environment."""
    models = {"scale_shift": "pytorch2jax_server.examples:scale_shift"}
    env = {"PYTORCH2JAX_TOKEN": "from-the-environment"}
    with start_worker("--token-file", str(certs / "token"), models=models, env=env) as w:
        with pytest.raises(pytorch2jax.AuthenticationError):
            pytorch2jax.connect(w.unix, token="from-the-environment")
        with pytorch2jax.connect(w.unix, token=_token(certs)) as c:
            assert [m.name for m in c.list_models()] == ["scale_shift"]


# -- the defaults ---------------------------------------------------------------------------


def test_default_address_is_loopback_only():
    assert _cli._parser().parse_args(["--model", "f=m:f"]).listen is None  # so the default
    for address in _server.DEFAULT_LISTEN:
        host = address.rsplit(":", 1)[0]
        assert all(info[4][0] in ("127.0.0.1", "::1") for info in socket.getaddrinfo(host, 0))


@pytest.mark.parametrize(
    "name",
    ["os:system", "pytorch2jax_server.examples:mlp()", "subprocess:run", "../../etc/passwd", ""],
)
def test_a_client_cannot_name_code_to_load(name, tmp_path):
    models = {"scale_shift": "pytorch2jax_server.examples:scale_shift"}
    with start_worker(models=models, listen=[f"unix://{tmp_path}/w.sock"]) as w:
        with grpc.insecure_channel(w.unix) as channel:
            stub = pb_grpc.BridgeStub(channel)
            for call in (stub.Forward, stub.InferShapes):
                request = call is stub.Forward and pb.ForwardRequest or pb.InferShapesRequest
                with pytest.raises(grpc.RpcError) as e:
                    call(request(model=name), timeout=10)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
                assert "served models: scale_shift" in e.value.details()


def test_the_serving_code_imports_nothing_by_name():
    """Only _loading (run by the command line) turns names into code; no other module of
    the worker imports it or imports anything dynamically."""
    package = REPO / "server/pytorch2jax_server"
    loaders = {"_loading.py", "_cli.py", "__main__.py"}
    modules = [p for p in package.rglob("*.py") if p.relative_to(package).as_posix() not in loaders]
    assert {"_servicer.py", "_models.py", "_reparametrize.py"} <= {p.name for p in modules}
    for path in modules:
        tree = ast.parse(path.read_text())
        names = {
            n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        dynamic = {n for n in names if n.split(".")[0] == "importlib"} - {"importlib.metadata"}
        assert not dynamic and "pytorch2jax_server._loading" not in names, path.name
        assert not {"import_module", "__import__"} & calls, path.name


@pytest.mark.parametrize(
    "message, scrubbed",
    [
        ("[Errno 2] No such file: '/opt/models/secret/weights.pt'", "[Errno 2] No such file: '<path>'"),
        ("cannot map /p2j-0123456789abcdef0123456789abcdef", "cannot map <segment>"),
        ("File /usr/lib/python3.11/site-packages/torch/nn/functional.py, line 3", "File <path>, line 3"),
        ("'/home/alice/My Models/weights.pt' is missing", "'<path>' is missing"),
        ("cannot open file:///home/alice/secret/w.pt", "cannot open file://<path>"),
        ("search path /opt/lib:/home/alice/secret/lib", "search path <path>:<path>"),
        ("peer unix:/run/p2j/worker.sock", "peer unix:<path>"),
        ("cannot load ./models/secret/w.pt now", "cannot load <path> now"),
        ("cannot load ~/models/w.pt or ../w.pt", "cannot load <path> or <path>"),
        ("\"~/My Models/w.pt\" is missing", "\"<path>\" is missing"),
        ("segment p2j-0123456789abcdef0123456789abcdef is gone", "segment <segment> is gone"),
        ("shape [2, 3] / [3]; see https://pytorch.org/docs/stable/x.html", None),
        ("ratio 1/2, float32[4]/x, 3/4/5", None),
    ],
)
def test_error_messages_lose_paths_and_segment_names(message, scrubbed):
    assert _status.scrubbed(message) == (message if scrubbed is None else scrubbed)


_LEAKY = """
def leaky(x):
    raise FileNotFoundError(2, "No such file or directory", "/srv/private/weights.pt")
"""


def test_a_model_error_reaches_the_client_without_the_workers_paths(tmp_path):
    (tmp_path / "leaky_model.py").write_text(_LEAKY)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    models = {"leaky": "leaky_model:leaky"}
    listen = [f"unix://{tmp_path}/w.sock"]
    with start_worker("--log-level", "INFO", models=models, listen=listen, env=env) as w:
        with pytorch2jax.connect(w.unix) as client:
            with pytest.raises(pytorch2jax.InvalidArgumentError) as e:
                client.py_to_jax_wrapper("leaky", out_shapes=jax.ShapeDtypeStruct((2,), jnp.float32))(jnp.ones(2))
        log = w.stderr()
    assert "/srv/private/weights.pt" in log  # the worker's own log keeps it
    # What the worker said, after the client's "worker at <the target it dialled>: ".
    said = str(e.value).split(".sock: ", 1)[1]
    assert "FileNotFoundError: [Errno 2] No such file or directory: '<path>'" in said
    assert "/srv" not in said and "/tmp" not in said


def _other_address() -> str | None:
    """An IPv4 address of this host that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent, a route is chosen
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_shared_memory_is_refused_to_peers_on_other_hosts():
    address = _other_address()
    if address is None:
        pytest.skip("this host has no address but loopback")
    models = {"scale_shift": "pytorch2jax_server.examples:scale_shift"}
    with start_worker(models=models, listen=[f"{address}:0"]) as w:
        # A peer on this address looks, to the worker, like one on another host.
        with pytest.raises(pytorch2jax.UnsupportedError, match="only for local peers"):
            pytorch2jax.connect(w.addresses[0], transport="shm")
        with pytorch2jax.connect(w.addresses[0]) as client:  # auto: inline
            assert client.transport == "inline"
            y = client.py_to_jax_wrapper("scale_shift")(jnp.ones(3), jnp.float32(0))
            np.testing.assert_array_equal(np.asarray(y), 2.0)
