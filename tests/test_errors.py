"""Every mistake a user can make gets its own exception class and a message that says
what to do, and the worker keeps serving the next good request."""

from __future__ import annotations

import os
import signal
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pytorch2jax
from conftest import start_worker, tree_allclose


@pytest.fixture(scope="module")
def mlp(client):
    return client.convert_pytnn_to_jax("mlp")


def _still_serves(mlp) -> None:
    apply_fn, params = mlp
    assert apply_fn(params, jnp.ones((2, 8))).shape == (2, 1)


def test_unknown_model_names_the_served_ones(client, worker, mlp):
    with pytest.raises(
        pytorch2jax.ModelNotFoundError,
        match=rf"model 'mlpp' is not served by {worker.unix}; served models: .*\bmlp\b",
    ):
        client.convert_pytnn_to_jax("mlpp")
    # The same error when the worker itself is asked (no client-side cache in the way).
    with pytest.raises(pytorch2jax.ModelNotFoundError, match=r"model 'mlpp' is not served"):
        client.get_parameters("mlpp")
    _still_serves(mlp)


def test_function_is_not_a_module(client):
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=r"use py_to_jax_wrapper\('scale_shift'\)"):
        client.convert_pytnn_to_jax("scale_shift")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_wrong_number_of_arguments(mlp, jit):
    apply_fn, params = mlp
    fn = jax.jit(apply_fn) if jit else apply_fn
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=r"model 'mlp' takes \(x\); it cannot be called with 2 positional"):
        fn(params, jnp.ones((2, 8)), jnp.ones((2, 8)))
    _still_serves(mlp)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_wrong_shape_carries_torch_message(mlp, jit):
    apply_fn, params = mlp
    fn = jax.jit(apply_fn) if jit else apply_fn
    # Eager calls carry torch's CPU kernel message, traced ones its fake-tensor message.
    message = r"mat1 and mat2 shapes cannot be multiplied|must have same reduction dim"
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=message):
        fn(params, jnp.ones((2, 7)))
    _still_serves(mlp)


def test_wrong_input_dtype(mlp):
    apply_fn, params = mlp
    message = r"model 'mlp' failed on its arguments: RuntimeError: .*same dtype"
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=message):
        apply_fn(params, jnp.ones((2, 8), jnp.int32))
    # Fake tensors do not check dtypes in linear, so under jit torch's CPU kernel finds the
    # mismatch at run time, inside the compiled call: JAX wraps our error, message intact.
    with pytest.raises(Exception, match=r"InvalidArgumentError: worker at .*" + message):
        jax.jit(apply_fn)(params, jnp.ones((2, 8), jnp.int32)).block_until_ready()
    _still_serves(mlp)


def test_wrong_parameter_dtype_and_name(mlp):
    apply_fn, params = mlp
    bad = dict(params, **{"net.0.weight": params["net.0.weight"].astype(jnp.bfloat16)})
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=r"parameter 'net.0.weight' .* must be float32\[64, 8\]; got bfloat16\[64, 8\]"):
        jax.jit(apply_fn)(bad, jnp.ones((2, 8)))
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=r"model 'mlp' has no parameter 'weight'"):
        apply_fn({"weight": jnp.ones(3)}, jnp.ones((2, 8)))
    _still_serves(mlp)


def test_unsupported_argument_type(mlp):
    apply_fn, params = mlp
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=r"cannot pass a object to torch"):
        apply_fn(params, object())


def test_data_dependent_shapes_need_declaring(client):
    masked = client.py_to_jax_wrapper("masked_select")
    x = jnp.array([1.0, -2.0, 3.0])
    tree_allclose(masked(x), np.array([1.0, 3.0]))  # eagerly, no shapes are needed
    with pytest.raises(pytorch2jax.UnsupportedError, match=r"depend on its input data.*out_shapes="):
        jax.jit(masked)(x)
    declared = client.py_to_jax_wrapper("masked_select", out_shapes=jax.ShapeDtypeStruct((2,), jnp.float32))
    tree_allclose(jax.jit(declared)(x), np.array([1.0, 3.0]))
    with pytest.raises(Exception, match=r"returned float32\[1\] but float32\[2\] was expected"):
        jax.jit(declared)(jnp.array([1.0, -2.0, -3.0])).block_until_ready()


def test_an_address_nobody_listens_on_fails_at_once(tmp_path):
    """A refused connection is known at once: no waiting out the timeout in silence."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]  # nobody listens on it once closed
    for target in (f"unix://{tmp_path}/nobody.sock", f"127.0.0.1:{free_port}"):
        start = time.monotonic()
        with pytest.raises(pytorch2jax.WorkerUnavailableError, match="nothing listens at .*connection refused.*pytorch2jax-server --listen"):
            pytorch2jax.connect(target, timeout=30.0)
        assert time.monotonic() - start < 3.0, target


def test_an_address_that_never_answers_fails_within_timeout():
    """A listening socket that never speaks gRPC (accepting, silent) takes the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        start = time.monotonic()
        with pytest.raises(pytorch2jax.WorkerUnavailableError, match=r"no worker answers at .* after 1 s; is it running\?"):
            pytorch2jax.connect(f"127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
        assert time.monotonic() - start < 8.0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (50051, r"takes an address string, not a number: connect\('localhost:50051'\)"),
        ("http://localhost:50051", r"is a URL.*connect\('localhost:50051'\)"),
        ("https://w.example/", r"is a URL.*connect\('w.example'\)"),
        ("localhost", r"has no port: connect\('localhost:50051'\)"),
        (["localhost:1", "otherhost"], r"'otherhost' has no port"),
        ({"host": "x"}, r"a target is 'host:port'"),
    ],
)
def test_misspelt_targets_say_the_right_spelling(target, message):
    start = time.monotonic()
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=message):
        pytorch2jax.connect(target, timeout=30.0)
    assert time.monotonic() - start < 1.0


def test_worker_killed_mid_session():
    with start_worker(models={"mlp": "pytorch2jax_server.examples:mlp()"}) as w:
        with pytorch2jax.connect(w.tcp, call_timeout=20) as client:
            apply_fn, params = client.convert_pytnn_to_jax("mlp")
            jitted = jax.jit(apply_fn)
            x = jnp.ones((2, 8))
            jitted(params, x).block_until_ready()
            os.kill(w.process.pid, signal.SIGKILL)
            w.process.wait()
            start = time.monotonic()
            with pytest.raises(pytorch2jax.WorkerUnavailableError, match=r"worker at 127.0.0.1:\d+: no answer .*is the worker running\?"):
                apply_fn(params, x)
            # Inside compiled code JAX wraps callback errors; ours is named in the message.
            with pytest.raises(Exception, match=r"WorkerUnavailableError: worker at"):
                jitted(params, x).block_until_ready()
            assert time.monotonic() - start < 20.0


def test_a_wrong_shape_under_jit_leaves_no_traceback_in_the_workers_log():
    """Shape inference of a wrong-shape call fails in torch's fake tensors, which log a
    traceback; the client gets the error, and the worker's log does not look like a crash."""
    with start_worker(models={"mlp": "pytorch2jax_server.examples:mlp()"}) as w:
        with pytorch2jax.connect(w.unix) as client:
            apply_fn, params = client.convert_pytnn_to_jax("mlp")
            with pytest.raises(pytorch2jax.InvalidArgumentError, match="failed on its arguments"):
                jax.jit(apply_fn)(params, jnp.ones((2, 5)))  # the MLP takes 8 features
            jax.jit(apply_fn)(params, jnp.ones((2, 8))).block_until_ready()  # still serving
        log = w.stderr()
    assert "Traceback" not in log and "failed while attempting to run meta" not in log, log


@pytest.mark.parametrize("bridge", ["in_process", "inline", "shm"])
def test_an_error_under_jit_gives_back_our_exception(bridge, clients):
    """XLA reports an error raised inside a compiled call as its own JaxRuntimeError
    (jaxlib formats it: our class cannot come through); original_error gives ours back,
    and the text carries none of the bridge's own frames."""
    from pytorch2jax_server import examples

    if bridge == "in_process":
        apply_fn, params = pytorch2jax.convert_pytnn_to_jax(examples.dropout_mlp())
    else:
        apply_fn, params = clients[bridge].convert_pytnn_to_jax("dropout_mlp")
    call = jax.jit(lambda p, x: apply_fn(p, x, train=True))  # dropout, and no key
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        call(params, jnp.ones((4, 4)))
    original = pytorch2jax.original_error(info.value)
    assert isinstance(original, pytorch2jax.InvalidArgumentError)
    assert "no PRNG key" in str(original)
    text = str(info.value)
    assert text.rstrip().endswith(f"InvalidArgumentError: {original}")
    for internal in ("_ad.py", "_inprocess.py", "_remote.py", "_backend.py"):
        assert internal not in text, internal
    assert pytorch2jax.original_error(RuntimeError("something else")) is None
