"""The worker's parameter swap (``_reparametrize``) against ``torch.func.functional_call``."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils import parametrizations

from pytorch2jax_server.engine._reparametrize import Reparametrizer


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 4, bias=False)
        self.head = torch.nn.Linear(4, 4, bias=False)
        self.head.weight = self.embed.weight  # one Parameter at two places
        self.norm = torch.nn.BatchNorm1d(4).eval()

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.embed(x))))


class Failing(torch.nn.Linear):
    def forward(self, x):
        raise ValueError("no")


def _replacements(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {
        n: torch.rand(p.shape, generator=gen).requires_grad_(True)
        for n, p in module.named_parameters()
    }
    for n, b in module.named_buffers():  # BatchNorm statistics: no gradient
        out[n] = torch.rand(b.shape, generator=gen).to(b.dtype) if b.is_floating_point() else b + 1
    return out


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize(
    "make, direct",
    [
        (Tied, True),
        (lambda: torch.nn.LSTM(4, 3, batch_first=True), False),  # its __setattr__ keeps flat weights
        (lambda: parametrizations.weight_norm(torch.nn.Linear(4, 4)), False),
    ],
    ids=["tied+buffers", "lstm", "parametrized"],
)
def test_same_values_and_gradients_as_functional_call(make, direct):
    module = make()
    swap = Reparametrizer(module)
    assert swap.direct is direct
    before = _state(module)
    x = torch.rand(2, 5, 4) if isinstance(module, torch.nn.LSTM) else torch.rand(3, 4)

    ours = _replacements(module)
    theirs = {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in ours.items()}
    got = swap(ours, (x,), {})
    want = functional_call(module, theirs, (x,), {}, tie_weights=True)
    got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
    torch.testing.assert_close(got, want)

    got.sum().backward()
    want.sum().backward()
    for name, t in ours.items():
        if t.requires_grad:
            torch.testing.assert_close(t.grad, theirs[name].grad, msg=name)
    # The module's own tensors are back, unchanged, at every place they were held.
    for name, t in _state(module).items():
        torch.testing.assert_close(t, before[name], msg=name)
    if isinstance(module, Tied):
        assert module.head.weight is module.embed.weight


def test_a_tied_replacement_reaches_every_place():
    module = Tied()
    weight = torch.eye(4)
    x = torch.rand(3, 4)
    out = Reparametrizer(module)({"embed.weight": weight}, (x,), {})
    with torch.no_grad():
        want = torch.tanh(module.norm(x)) @ weight.T
    torch.testing.assert_close(out, want)


def test_originals_come_back_when_the_module_raises():
    module = Failing(2, 2)
    own = module.weight
    with pytest.raises(ValueError):
        Reparametrizer(module)({"weight": torch.zeros(2, 2)}, (torch.ones(2),), {})
    assert module.weight is own
