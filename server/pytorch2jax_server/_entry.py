"""The ``pytorch2jax-server`` command: says what to install where torch is missing.

The wheel installs the command in every environment, the JAX client's too, where torch
is absent by design; there it would die importing torch with a bare traceback.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        import torch  # noqa: F401 - the worker's first need; _cli imports it too
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        print(
            "pytorch2jax-server: this environment has no torch; the worker runs where torch "
            "is: pip install -c constraints.txt 'pytorch2jax[server]' (see the README's "
            "Quickstart), and connect to it from here with pytorch2jax.connect()",
            file=sys.stderr,
        )
        return 2
    from pytorch2jax_server._cli import main as serve

    return serve()
