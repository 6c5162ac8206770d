"""The ``pytorch2jax-server`` command: says what to install where torch is missing.

The wheel installs the command in every environment, the JAX client's too, where torch
is absent by design; there it would die importing torch. This module imports nothing
heavy until it knows torch is there.
"""

from __future__ import annotations

import importlib.util
import sys


def main() -> int:
    if importlib.util.find_spec("torch") is None:
        print(
            "pytorch2jax-server: this environment has no torch; the worker runs where torch "
            "is: pip install -c constraints.txt 'pytorch2jax[server]' (see the README's "
            "Quickstart), and connect to it from here with pytorch2jax.connect()",
            file=sys.stderr,
        )
        return 2
    from pytorch2jax_server._cli import main as serve

    return serve()
