"""Flax modules around a bridged torch model: linen (as in pytorch2jax 0.1.0) and NNX.

Both take an ``apply_fn(params, *args, **kwargs)`` from either backend, in process
(``convert_pytnn_to_jax``) or served (``Client.convert_pytnn_to_jax``), so they behave the
same whichever runs torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import linen, nnx


def linen_module(apply_fn: Callable[..., Any], params: dict[str, jax.Array], name: str) -> type:
    """A linen Module class whose parameters start at ``params`` and whose call runs torch."""

    def init_to(value: jax.Array):
        return lambda rng: value

    class TorchLinen(linen.Module):
        @linen.compact
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            p = {n: self.param(n, init_to(v)) for n, v in params.items()}
            return apply_fn(p, *args, **kwargs)

    TorchLinen.__name__ = TorchLinen.__qualname__ = f"Torch{name}"
    TorchLinen.__doc__ = f"The torch model {name!r} as a linen Module; parameters by torch name."
    return TorchLinen


class TorchModule(nnx.Module):
    """A torch model as an NNX module: weights are ``nnx.Param``, floating buffers (e.g.
    BatchNorm statistics) ``nnx.BatchStat``, and calling it runs torch.

    Make one with ``convert_pytnn_to_nnx(module)`` (in process) or
    ``Client.convert_pytnn_to_nnx(name)`` (served). Train it like any NNX module::

        model = convert_pytnn_to_nnx(torch.nn.Linear(8, 1))
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean())(model)
        optimizer.update(model, grads)
    """

    def __init__(
        self,
        apply_fn: Callable[..., Any],
        params: dict[str, jax.Array],
        buffers: dict[str, jax.Array] | None = None,
    ) -> None:
        self.apply_fn = nnx.static(apply_fn)
        self.params = nnx.data({n: nnx.Param(v) for n, v in params.items()})
        self.buffers = nnx.data({n: nnx.BatchStat(v) for n, v in (buffers or {}).items()})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values = {n: v[...] for n, v in self.params.items()}
        values.update({n: v[...] for n, v in self.buffers.items()})
        return self.apply_fn(values, *args, **kwargs)
