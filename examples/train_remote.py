"""Train a PyTorch model served by a worker, from JAX + optax.

The worker owns the torch module; this script imports only the JAX client. It fits the
served MLP to a smooth function of 8 inputs and prints the loss as it goes. With --check,
it first compares the worker's loss and gradients with the same MLP written in JAX, and
at the end requires the loss to have dropped; it exits 1 if either fails.

    pytorch2jax-server --listen unix:///tmp/p2j.sock --model "mlp=pytorch2jax_server.examples:mlp()"
    python examples/train_remote.py --target unix:///tmp/p2j.sock

The worker's address, token and TLS settings may also come from the environment
(PYTORCH2JAX_TARGET, PYTORCH2JAX_TOKEN, PYTORCH2JAX_TLS_CA), as in docker/docker-compose.yml.
With a pool of workers (a list of addresses, or a ``dns:///`` name, as in
docker/docker-compose.replicas.yml) it prints the calls each worker answered at the end,
and --min-workers makes --check require that many of them to have taken calls.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import optax

import pytorch2jax


def make_data(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(key, (n, 8))
    y = jnp.sin(x[:, :4].sum(axis=1, keepdims=True)) + 0.5 * x[:, 4:5] * x[:, 5:6]
    return x, y


def reference_mlp(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """``pytorch2jax_server.examples.MLP`` in JAX: Linear layers ``net.{i}``, tanh between."""
    layers = sorted({int(name.split(".")[1]) for name in params})
    for n, i in enumerate(layers):
        x = x @ params[f"net.{i}.weight"].T + params[f"net.{i}.bias"]
        if n < len(layers) - 1:
            x = jnp.tanh(x)
    return x


def check_gradients(loss_fn, params, x, y) -> None:
    """The worker's loss and gradients against the same MLP in JAX; exits 1 if they differ."""
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, x, y)
    want_loss, want_grads = jax.value_and_grad(
        lambda p: jnp.mean((reference_mlp(p, x) - y) ** 2)
    )(params)
    worst = max(
        float(jnp.max(jnp.abs(grads[n] - want_grads[n])) / (jnp.max(jnp.abs(want_grads[n])) + 1e-12))
        for n in params
    )
    ok = abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss)) and worst < 1e-4
    print(
        f"check: loss {float(loss):.6f} (JAX {float(want_loss):.6f}), largest relative "
        f"gradient difference {worst:.2e}: {'ok' if ok else 'MISMATCH'}",
        flush=True,
    )
    if not ok:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", default=None, help="the worker's address (default: $PYTORCH2JAX_TARGET)"
    )
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--check",
        action="store_true",
        help="check gradients against JAX first (the example MLP), and that the loss drops",
    )
    parser.add_argument(
        "--min-workers",
        type=int,
        default=1,
        help="with --check, also require calls to have reached this many workers of a pool",
    )
    args = parser.parse_args()

    with pytorch2jax.connect(args.target) as worker:
        apply_fn, params = worker.convert_pytnn_to_jax(args.model)
        n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
        print(
            f"training {args.model!r} served by {worker.target} ({worker.transport}): "
            f"{n_params} parameters"
        )

        optimizer = optax.adam(args.lr)
        opt_state = optimizer.init(params)

        def loss_fn(params, x, y):
            return jnp.mean((apply_fn(params, x) - y) ** 2)

        @jax.jit
        def step(params, opt_state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        batch = jax.jit(make_data, static_argnums=1)
        x_eval, y_eval = batch(jax.random.key(1), 1024)
        if args.check:
            check_gradients(loss_fn, params, *batch(jax.random.key(2), args.batch))
        eval_loss = jax.jit(loss_fn)
        first = float(eval_loss(params, x_eval, y_eval))
        print(f"step    0  eval loss {first:.4f}")
        key = jax.random.key(0)
        start = time.perf_counter()
        for i in range(1, args.steps + 1):
            key, sub = jax.random.split(key)
            params, opt_state, loss = step(params, opt_state, *batch(sub, args.batch))
            if i % 25 == 0 or i == args.steps:
                print(f"step {i:4d}  train loss {float(loss):.4f}", flush=True)
        elapsed = time.perf_counter() - start
        last = float(eval_loss(params, x_eval, y_eval))
        print(
            f"done: eval loss {first:.4f} -> {last:.4f} ({first / last:.1f}x lower) in "
            f"{args.steps} steps, {1e3 * elapsed / args.steps:.2f} ms/step"
        )
        if args.check and not last < 0.5 * first:
            print("check: the loss did not halve", flush=True)
            sys.exit(1)
        calls = worker.workers()  # {} for a single worker
        if calls:
            spread = ", ".join(f"{address} {n}" for address, n in sorted(calls.items()))
            print(f"calls per worker: {spread}", flush=True)
        reached = sum(1 for n in calls.values() if n) if calls else 1
        if args.check and reached < args.min_workers:
            print(
                f"check: calls reached {reached} worker(s), not the {args.min_workers} asked for",
                flush=True,
            )
            sys.exit(1)


if __name__ == "__main__":
    main()
