"""Running a module with the client's parameters in place of its own.

``torch.func.functional_call`` does this for any module, at about 10 us a call, which is
most of a small call's time on the worker. For modules whose submodules all keep their
parameters and buffers in the plain ``_parameters``/``_buffers`` dicts (no custom
``__setattr__``/``__getattr__``, no parametrizations), ``Reparametrizer`` swaps the
values in those dicts directly, at every place a tied tensor is held, and puts the
originals back afterwards. Other modules (``nn.LSTM`` keeps flat weight lists that its
``__setattr__`` maintains, say) go through ``functional_call``.

Either way the swap mutates the module object, so callers serialise calls of one module.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.func import functional_call
from torch.nn.utils import parametrize

_Slot = tuple[dict, str]  # a submodule's _parameters or _buffers dict, and a key in it


def _plain(module: torch.nn.Module) -> bool:
    cls = type(module)
    return (
        cls.__setattr__ is torch.nn.Module.__setattr__
        and cls.__getattr__ is torch.nn.Module.__getattr__
        and not parametrize.is_parametrized(module)
    )


def _slots(module: torch.nn.Module) -> dict[str, list[_Slot]] | None:
    """Every place each parameter and buffer is held, by the name ``named_parameters`` and
    ``named_buffers`` give it (tied tensors are held at several places under one name);
    None when some submodule is not plain."""
    by_tensor: dict[int, list[_Slot]] = defaultdict(list)
    for sub in module.modules(remove_duplicate=False):
        if not _plain(sub):
            return None
        for table in (sub._parameters, sub._buffers):
            for key, value in table.items():
                if value is not None:
                    by_tensor[id(value)].append((table, key))
    names = dict(module.named_parameters())
    names.update(module.named_buffers())
    return {name: by_tensor[id(t)] for name, t in names.items()}


class Reparametrizer:
    """Calls ``module`` with some of its parameters and buffers replaced by given tensors."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module
        self._slots = _slots(module)

    @property
    def direct(self) -> bool:
        """Whether calls swap tensors directly (else through ``functional_call``)."""
        return self._slots is not None

    def __call__(
        self,
        replacements: dict[str, torch.Tensor],
        args: tuple,
        kwargs: dict,
        *,
        final: dict[str, torch.Tensor] | None = None,
    ) -> Any:
        """``module(*args, **kwargs)`` with ``replacements`` (by parameter or buffer name, as
        ``named_parameters``/``named_buffers`` give them) in place of its own tensors.

        ``final``, if given, receives what each replaced slot holds after the call: a
        module may assign a new tensor to a buffer rather than update it in place. (Through
        ``functional_call`` only in-place updates are seen, in ``replacements`` itself.)
        """
        if self._slots is None:
            return functional_call(self._module, replacements, args, kwargs, tie_weights=True)
        swapped: list[tuple[dict, str, Any]] = []
        try:
            for name, value in replacements.items():
                for table, key in self._slots[name]:
                    swapped.append((table, key, table[key]))
                    table[key] = value
            return self._module(*args, **kwargs)
        finally:
            if final is not None:
                for name in replacements:
                    table, key = self._slots[name][0]
                    final[name] = table[key]
            for table, key, original in reversed(swapped):
                table[key] = original
