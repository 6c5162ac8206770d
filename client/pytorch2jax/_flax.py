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

from pytorch2jax._exceptions import InvalidArgumentError


def _mode(train: bool | None, deterministic: bool | None, where: str) -> bool | None:
    """Training mode from Flax's two spellings (None: the torch module's own mode)."""
    if train is not None and deterministic is not None and train == deterministic:
        raise InvalidArgumentError(
            f"{where}: train={train} and deterministic={deterministic} contradict each "
            "other; give one of them"
        )
    if train is not None:
        return train
    return None if deterministic is None else not deterministic


def linen_module(
    apply_fn: Callable[..., Any],
    params: dict[str, jax.Array],
    name: str,
    batch_stats: dict[str, jax.Array] | None = None,
) -> type:
    """A linen Module class whose parameters start at ``params`` and whose call runs torch.

    Floating buffers (``batch_stats``) are variables of the ``"batch_stats"`` collection:
    a call with that collection mutable, not in eval mode, writes the buffers torch
    updated back into it, as ``linen.BatchNorm`` does. A call takes its PRNG key from the
    ``"dropout"`` stream when ``apply`` is given one (``rngs={"dropout": key}``).
    """
    stats = dict(batch_stats or {})

    def init_to(value: jax.Array):
        return lambda *_: value

    class TorchLinen(linen.Module):
        @linen.compact
        def __call__(
            self,
            *args: Any,
            train: bool | None = None,
            deterministic: bool | None = None,
            **kwargs: Any,
        ) -> Any:
            mode = _mode(train, deterministic, type(self).__name__)
            p = {n: self.param(n, init_to(v)) for n, v in params.items()}
            mutating = self.is_mutable_collection("batch_stats")
            # Buffers not in the variables (a {"params": ...} from before batch_stats
            # existed) are the torch module's own, as they were.
            held = {
                n: self.variable("batch_stats", n, init_to(v))
                for n, v in stats.items()
                if mutating or self.has_variable("batch_stats", n)
            }
            values = {**p, **{n: v.value for n, v in held.items()}}
            rng = self.make_rng("dropout") if self.has_rng("dropout") else None
            if not (held and mutating and mode is not False):
                return apply_fn(values, *args, rng=rng, train=mode, **kwargs)
            outputs, new = apply_fn(values, *args, rng=rng, train=mode, mutable=True, **kwargs)
            for n, v in held.items():
                v.value = new[n]
            return outputs

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

    As NNX's own layers: ``model.train()``/``model.eval()`` (or ``train=`` and
    ``deterministic=`` per call) choose torch's mode, None leaving the torch module's
    own; outside eval mode a call writes the buffers torch updated into the BatchStats;
    keys for torch's random numbers come from ``rngs`` (given here or to the call), its
    ``dropout`` stream (or ``default``).
    """

    def __init__(
        self,
        apply_fn: Callable[..., Any],
        params: dict[str, jax.Array],
        buffers: dict[str, jax.Array] | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        self.apply_fn = nnx.static(apply_fn)
        self.params = nnx.data({n: nnx.Param(v) for n, v in params.items()})
        self.buffers = nnx.data({n: nnx.BatchStat(v) for n, v in (buffers or {}).items()})
        self.rngs = rngs
        # Set by nnx's Module.train() and .eval(), as on nnx.Dropout and nnx.BatchNorm.
        self.deterministic: bool | None = None
        self.use_running_average: bool | None = None

    def __call__(
        self,
        *args: Any,
        train: bool | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
        **kwargs: Any,
    ) -> Any:
        mode = _mode(train, deterministic, type(self).__name__)
        if mode is None and self.deterministic is not None:
            mode = not self.deterministic
        stream = rngs if rngs is not None else self.rngs
        rng = stream.dropout() if stream is not None else None
        values = {n: v[...] for n, v in self.params.items()}
        values.update({n: v[...] for n, v in self.buffers.items()})
        if not self.buffers or mode is False:
            return self.apply_fn(values, *args, rng=rng, train=mode, **kwargs)
        outputs, new = self.apply_fn(values, *args, rng=rng, train=mode, mutable=True, **kwargs)
        for n, v in self.buffers.items():
            v[...] = new[n]
        return outputs
