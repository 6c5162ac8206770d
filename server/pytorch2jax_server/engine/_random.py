"""Randomness as a function of a JAX key: torch's generators seeded for one call.

JAX is functional: a call must be a deterministic function of its parameters, its inputs
and a PRNG key. Torch draws from global generators (``nn.Dropout`` takes no generator),
so a keyed call seeds them from the key, runs, and puts back what they held before: the
worker's own generators never move, and every evaluation of the call (the forward, a
backward that recomputes it, a ``jax.checkpoint`` rematerialisation, a recompute after a
lost residual, another worker of a pool) draws exactly the same numbers.

The generators are the process's, so calls that touch them run one at a time
(``_LOCK``): keyed calls, and unkeyed calls of a module in training mode, which are
watched: one that draws random numbers without a key (dropout in training) is refused,
because its result would not be a function of its inputs. Other calls (functions, modules
in eval mode) neither wait nor are watched; one that draws anyway draws from torch's
global generator, as plain torch would.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Sequence

import torch

from pytorch2jax_server.engine._cancel import waiting_for
from pytorch2jax_server.engine._errors import InvalidRequestError

_LOCK = threading.Lock()
_this_thread = threading.local()  # .seeded: this thread holds _LOCK for a keyed call

#: What a key's bytes may take: a raw key of any JAX PRNG implementation (threefry's is 2
#: uint32, rbg's 4), a batch of them under vmap, but not a tensor posing as one.
_MAX_KEY_BYTES = 1 << 20

#: How a refused call is told to pass a key, in each API.
KEY_HINT = (
    "pass a JAX PRNG key: apply_fn(params, x, rng=key), linen "
    "Module.apply(..., rngs={'dropout': key}), an nnx.Rngs given to convert_pytnn_to_nnx "
    "(rngs=nnx.Rngs(dropout=0)) or to the call, or call it with train=False"
)


def seed_of(key: torch.Tensor) -> int:
    """A 63-bit seed from a key's bytes: its raw data, as int32 bits (the wire has no
    uint32), of one key or of the whole batch under vmap."""
    if key.dtype != torch.int32 or key.numel() * 4 > _MAX_KEY_BYTES or key.numel() == 0:
        raise InvalidRequestError(
            "a PRNG key crosses as the int32 bits of its raw key data "
            "(jax.lax.bitcast_convert_type(jax.random.key_data(key), jnp.int32)); got "
            f"{str(key.dtype).removeprefix('torch.')}{list(key.shape)}"
        )
    data = key.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generators(devices: Sequence[torch.device]) -> list[torch.Generator]:
    if not devices:  # the CPU's alone: every watched call of a CPU module asks
        return [torch.default_generator]
    found = [torch.default_generator]
    for d in {d for d in devices if d.type == "cuda"}:
        found.append(torch.cuda.default_generators[d.index or 0])
    return found


def snapshot(devices: Sequence[torch.device] = ()) -> list[tuple[torch.Generator, torch.Tensor]]:
    """The state of the generators a call on ``devices`` draws from (CPU always)."""
    return [(g, g.get_state()) for g in _generators(devices)]


def restore(states: list[tuple[torch.Generator, torch.Tensor]]) -> None:
    for g, state in states:
        g.set_state(state)


def rewind_point(devices: Sequence[torch.device]) -> list | None:
    """Where a keyed call's generators stand now, for ``restore`` (None in an unkeyed
    call, whose generators other threads may be drawing from): a vmap that falls back to
    a loop rewinds to it, so the loop draws what a loop from the start would."""
    return snapshot(devices) if getattr(_this_thread, "seeded", False) else None


_UNTOUCHED = contextlib.nullcontext()


def drawing(
    key: torch.Tensor | None,
    *,
    devices: Sequence[torch.device],
    watched: bool,
    name: str,
) -> contextlib.AbstractContextManager[None]:
    """Runs the block with torch's generators seeded from ``key``, then restores them.

    Without a key and ``watched`` (a module in training mode), the block runs on the
    generators as they are and is refused if it drew from them. Without either, the block
    just runs (and this costs nothing: it is on every call's path).
    """
    if key is None and not watched:
        return _UNTOUCHED
    return _Seeded(None if key is None else seed_of(key), devices, name)


class _Seeded:
    """``drawing``'s seeded or watched block. (A class, not a generator: every call of a
    module in training mode takes it.)"""

    __slots__ = ("_before", "_devices", "_fingerprints", "_name", "_seed")

    def __init__(self, seed: int | None, devices: Sequence[torch.device], name: str) -> None:
        self._seed, self._devices, self._name = seed, devices, name

    def __enter__(self) -> None:
        waiting_for(_LOCK).__enter__()
        try:
            self._before = before = snapshot(self._devices)
            if self._seed is None:
                # What a watched block is compared with afterwards: bytes compare in about
                # a microsecond, where torch.equal of the states takes three.
                self._fingerprints = [_fingerprint(state) for _, state in before]
            else:
                for g, _ in before:
                    g.manual_seed(self._seed)
                _this_thread.seeded = True
        except BaseException:
            _LOCK.release()
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if self._seed is not None:
                _this_thread.seeded = False
                restore(self._before)
                return
            for (g, _), before in zip(self._before, self._fingerprints):
                if _fingerprint(g.get_state()) != before:
                    break
            else:
                return
            restore(self._before)  # the process's generators never move
            if exc is None:
                raise InvalidRequestError(
                    f"model {self._name!r} drew random numbers in training mode (dropout, "
                    "say) but the call has no PRNG key, so its result would not be a "
                    f"function of its inputs; {KEY_HINT}"
                )
        finally:
            _LOCK.release()


def _fingerprint(state: torch.Tensor) -> bytes:
    return state.numpy().tobytes()
