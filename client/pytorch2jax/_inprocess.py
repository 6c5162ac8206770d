"""The original pytorch2jax API: torch runs in this process.

``py_to_jax_wrapper``, ``convert_pytnn_to_jax`` and ``convert_pytnn_to_flax`` behave as in
pytorch2jax 0.1.0, and also work under ``jit``, ``vmap``, ``lax.scan`` and
``jax.checkpoint``. They share the autodiff wrapper (``_ad``) with the remote client and
run torch with the worker's own engine (``pytorch2jax_server.engine``), so a model behaves
the same in process and served. torch is imported when one of them is first called, never
by ``import pytorch2jax``.

Inputs reach torch without copies: under ``jit`` on CPU, torch tensors alias XLA's buffers
(``buffer_callback``); eagerly, they alias the JAX arrays. Outputs are copied once, into
XLA's output buffers (or into new arrays when eager), so that no JAX array aliases memory
that torch may still change. The forward of a differentiated call is the exception: the
autograd graph it keeps for the backward outlives the callback, and XLA lends its buffers
only for the callback's duration, so that forward runs on copies of its inputs.

JAX arrays are immutable, torch tensors are not. The first call for each input signature
runs torch on copies and watches their version counters; an input it writes to in place
is copied before every later call, so JAX arrays are never changed. Buffers given as
parameters (BatchNorm statistics, which torch updates in place without always bumping
the counters) always run on copies. A function that writes
into an input only for some data (not on its first call) is caught by the same counters
and raises InvalidArgumentError, saying to copy the input in torch first (``x = x.clone()``).

What the first call of a signature checked and learnt (its form, by the engine's
``CallSite``; where torch writes; a kept forward's size) serves its later calls, which
then skip those checks: a compiled call looks its signature up once, an eager call every
time.
"""

from __future__ import annotations

import importlib.util
import itertools
import threading
from collections.abc import Callable
from typing import Any

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from pytorch2jax._ad import OutShapes, TorchFunction, module_apply_fn
from pytorch2jax._backend import Backend, Result, Run, Transform, Vmap
from pytorch2jax._callbacks import ArrayIO
from pytorch2jax._exceptions import InvalidArgumentError, ResidualLostError, from_status
from pytorch2jax._torch_arrays import TORCH_HOST_IO, TorchHostIO, torch_module, torch_to_np
from pytorch2jax._torch_device import TorchDeviceIO, serving_device
from pytorch2jax_protocol import HANDLE_BYTES, dtypes


def _need_torch(api: str) -> None:
    """Says what to install when the in-process API is used where torch is not (the JAX
    client's environment, which the worker's API does not need)."""
    if importlib.util.find_spec("torch") is None:
        raise ModuleNotFoundError(
            f"pytorch2jax.{api} runs torch in this process, and this environment has no "
            "torch: pip install -c constraints.txt 'pytorch2jax[server]' here, or serve the "
            "model from a worker (pytorch2jax-server) and use pytorch2jax.connect()",
            name="torch",
        )


def _map_tree(tree: Any, leaf: Callable[[Any], Any]) -> Any:
    """Maps the array leaves of an argument/output pytree, visiting them in wire order
    (dicts by sorted key, as JAX flattens them); static leaves stay as they are."""
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_tree(x, leaf) for x in tree)
    if isinstance(tree, dict):
        return {k: _map_tree(tree[k], leaf) for k in sorted(tree)}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    return leaf(tree)


class _Unwrap:
    """Runs the worker engine and turns its errors into pytorch2jax's exceptions."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        from pytorch2jax_server.engine import WorkerError

        if isinstance(exc, WorkerError):
            raise from_status(grpc.StatusCode[exc.status], str(exc)) from None
        return False


_UNWRAP = _Unwrap()


class _Site:
    """What the calls of one signature (one compiled call site, or one eager signature:
    structure, shapes and dtypes, program, keep) have shown: the engine's ``CallSite``
    for them, and after the first call, which inputs torch writes into in place."""

    __slots__ = ("copied", "engine", "watched", "writes")

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        #: The inputs the first call wrote into; None until it ran.
        self.writes: frozenset[int] | None = None
        #: Those later calls run on copies (the written ones, and buffers), and the
        #: others, whose version counters are watched.
        self.copied: tuple[int, ...] = ()
        self.watched: tuple[int, ...] = ()

    def learn(self, writes: frozenset[int], buffers: set[int], n: int) -> None:
        copied = writes | buffers
        self.copied = tuple(sorted(copied))
        self.watched = tuple(i for i in range(n) if i not in copied)
        self.writes = writes


class LocalModel(Backend):
    """Runs a torch module or function in this process."""

    def __init__(self, obj: Any, name: str, *, device: Any = None) -> None:
        from pytorch2jax_server.engine import ResidualCache, ServedModel, vjp_of_kept

        # A module runs where it is (ServedModel would move it to its device), a function
        # where JAX's arrays are; on a GPU, without copies (``_torch_device``).
        device = serving_device(obj, device)
        self._model = ServedModel(name, obj, "cpu" if device is None else device)
        self._io: TorchHostIO | TorchDeviceIO = (
            TORCH_HOST_IO if device is None else TorchDeviceIO(device, _np_dtype)
        )
        self.buffers = {
            n: jax.ShapeDtypeStruct(tuple(b.shape), _np_dtype(b.dtype))
            for n, b in self._model.buffers.items()
        }
        # Handles from a counter: only this process's code reaches this cache, so they
        # need not be unguessable (as a worker's are), and counting costs no system call.
        counter = itertools.count(1)
        self._residuals = ResidualCache(
            handles=lambda: next(counter).to_bytes(HANDLE_BYTES, "little")
        )
        self._vjp_of_kept = vjp_of_kept
        kind = "module" if self._model.is_module else "function"
        self.description = f"torch {kind} {name!r}"
        # What the calls of each signature have shown, by signature.
        self._sites: dict[Any, _Site] = {}
        self._lock = threading.Lock()

    @property
    def io(self) -> ArrayIO:
        return self._io

    def infer(self, params, args, kwargs, *, int32_as_int64=False, train=None):
        torch = torch_module()
        with _Unwrap():
            self._model.check_parameters(
                {
                    n: torch.empty(s.shape, dtype=_torch_dtype(s.dtype), device="meta")
                    for n, s in params.items()
                }
            )

            def build():
                device = self._model.device
                return _map_tree(
                    (args, kwargs),
                    lambda s: torch.empty(s.shape, dtype=_torch_dtype(s.dtype), device=device),
                )

            outputs = self._model.infer(build, int32_as_int64=int32_as_int64, train=train)
        return _map_tree(
            outputs, lambda t: jax.ShapeDtypeStruct(tuple(t.shape), _np_dtype(t.dtype))
        )

    def run(self, run: Run) -> Result:
        return self._run(run, self._site_of(run))

    def call_site(self):
        site: _Site | None = None

        def call(run: Run) -> Result:
            # The site of its signature, looked up once: eager calls of the signature
            # share what it learns.
            nonlocal site
            if site is None:
                site = self._site_of(run)
            return self._run(run, site)

        return call

    def _site_of(self, run: Run) -> _Site:
        arrays = (*run.params.values(), *run.leaves, *run.extras)
        key = (
            run.structure,  # tree structure, statics, parameter names, mode
            tuple((a.shape, a.dtype) for a in arrays),
            _program_key(run.program),
            run.keep,
            run.int32_as_int64,
        )
        with self._lock:
            site = self._sites.get(key)
            if site is None:
                if len(self._sites) >= _MAX_SITES:
                    self._sites.clear()  # a new shape every call: keep memory bounded
                site = self._sites[key] = _Site(self._model.call_site())
        return site

    def _run(self, run: Run, site: _Site) -> Result:
        kept = run.vjp_of_kept()
        if kept is not None:
            last, cotangents = kept
            found = self._residuals.take(run.residual)
            if found is not None:
                cts = [self._io.to_torch(c) for c in cotangents]
                try:
                    with _UNWRAP:
                        grads = self._vjp_of_kept(found, cts, last.outputs, last.wrt)
                    return Result([self._io.from_torch(g) for g in grads])
                except ResidualLostError:
                    pass  # it kept no state for an input asked about: recompute
        elif run.residual:
            self._residuals.release([run.residual])  # a call that cannot use it
        outcome = self._execute(run, site)
        handle = self._residuals.put(outcome.residual) if outcome.residual else b""
        outputs = _map_tree(outcome.outputs, self._io.from_torch)
        return Result(outputs, handle, tuple(outcome.fallbacks))

    def _execute(self, run: Run, site: _Site):
        params = run.params
        shared = [self._io.to_torch(x) for x in (*params.values(), *run.leaves, *run.extras)]
        first = site.writes is None
        if first or run.keep is not None:
            # A kept autograd graph outlives this call, but XLA's buffers are lent only
            # for its duration: the tensors it saves must own their memory, so that path
            # copies; and the first call runs on copies to learn where torch writes.
            used = [t.clone() for t in shared]
            watched: Any = range(len(used)) if first else ()
        else:
            # Buffers given as parameters (BatchNorm statistics) are state torch updates
            # in place, without always bumping version counters: they always run on
            # copies, as do the inputs the first call wrote into.
            used = shared
            for i in site.copied:
                used[i] = used[i].clone()
            watched = site.watched
        before = [used[i]._version for i in watched]
        n_params, n_base = len(params), len(params) + len(run.leaves)
        leaves = used[n_params:n_base]
        t_args, t_kwargs = run.rebuild(leaves)
        with _UNWRAP:
            outcome = site.engine.run(
                t_args,
                t_kwargs,
                leaves,
                dict(zip(params, used[:n_params])),
                keep=run.keep,
                program=run.program,
                extras=used[n_base:],
                int32_as_int64=run.int32_as_int64,
                # Only read (it seeds torch's generators): no copy.
                key=None if run.key is None else self._io.to_torch(run.key),
                train=run.train,
                returned=run.returned,
            )
        written = [i for i, v in zip(watched, before) if used[i]._version != v]
        if first:
            buffers = {i for i, n in enumerate(params) if n in self._model.buffers}
            site.learn(frozenset(written), buffers, len(used))
        elif written:
            raise InvalidArgumentError(
                f"{self.description} wrote in place into input {min(written)} "
                "(counting parameters first), which it did not do on its first call with "
                "these shapes; JAX arrays must not change: copy it in torch first "
                "(x = x.clone())"
            )
        return outcome

    def release(self, residuals):
        self._residuals.release(residuals)


#: Eager signatures remembered per model, beyond which they are forgotten (and learnt again).
_MAX_SITES = 4096


def _program_key(program: tuple[Transform, ...]) -> tuple:
    # Where torch may write depends on the program, but not on a vmap's method or size.
    return tuple((type(t).__name__, t.in_dims) if isinstance(t, Vmap) else t for t in program)


def _torch_dtype(dtype: Any):
    from pytorch2jax_server.engine import torch_dtype

    return torch_dtype(dtypes.from_numpy(dtype))


def _np_dtype(dtype: Any) -> np.dtype:
    from pytorch2jax_server.engine import wire_dtype

    return dtypes.to_numpy(wire_dtype(dtype))


def _module_name(obj: Any) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


# -- the original API -----------------------------------------------------------------------


def py_to_jax_wrapper(
    fn: Callable | None = None,
    *,
    out_shapes: OutShapes = None,
    vmap_method: str = "auto",
    int32_as_int64: bool = True,
    device: str | None = None,
):
    """Wraps a torch function as a differentiable JAX function.

    Use it as a decorator, as in pytorch2jax 0.1.0. The function takes and returns torch
    tensors (or tuples, lists and dicts of them); the wrapper takes and returns JAX arrays,
    and every JAX transformation composes through it (``jit``, ``grad``, ``jvp``,
    ``hessian``, ``vmap``, ``lax.scan``...), each running as the matching ``torch.func``
    transform. Under ``jit`` the output shapes are inferred with fake tensors; for outputs
    whose shape depends on the data, declare them with ``out_shapes=`` (a pytree of
    ``jax.ShapeDtypeStruct``, or a function of the arguments' ShapeDtypeStructs).
    ``vmap_method`` (``"auto"``, ``"batched"`` or ``"sequential"``) and
    ``int32_as_int64`` (int32 arguments reach torch as int64 while JAX's x64 is off) are
    as for ``Client.convert_pytnn_to_jax``. The wrapped function takes one keyword of its
    own, ``rng=``: a JAX PRNG key that seeds torch's generators for that call, for a
    function that draws random numbers.

    Where JAX runs on a GPU (and torch has CUDA), the function runs there too, on JAX's
    arrays without copies: its tensors are CUDA tensors, and tensors it makes itself
    belong on their device (``torch.rand(x.shape, device=x.device)``). ``device="cpu"``
    runs it on the host instead (on copies of the arrays); ``device="cuda:1"`` names a GPU.

    Example::

        @py_to_jax_wrapper
        def fn(x):
            return torch.sin(x) * 2

        jax.jit(jax.grad(lambda x: fn(x).sum()))(jnp.ones(3))
    """
    _need_torch("py_to_jax_wrapper")
    if fn is None:
        return lambda f: py_to_jax_wrapper(
            f,
            out_shapes=out_shapes,
            vmap_method=vmap_method,
            int32_as_int64=int32_as_int64,
            device=device,
        )
    call = TorchFunction(
        LocalModel(fn, _module_name(fn), device=device),
        out_shapes=out_shapes,
        vmap_method=vmap_method,
        int32_as_int64=int32_as_int64,
    )

    def wrapped(*args: Any, rng: Any = None, **kwargs: Any) -> Any:
        return call({}, args, kwargs, rng=rng)

    wrapped.__name__ = wrapped.__qualname__ = _module_name(fn)
    wrapped.__doc__ = getattr(fn, "__doc__", None)
    wrapped.__wrapped__ = fn
    return wrapped


def convert_pytnn_to_jax(
    module: Any,
    *,
    out_shapes: OutShapes = None,
    vmap_method: str = "auto",
    int32_as_int64: bool = True,
):
    """A torch ``nn.Module`` as ``(apply_fn, params)``, torch running in this process.

    ``params`` holds the module's trainable parameters as JAX arrays (copies: later
    changes to the torch module do not reach them), by ``named_parameters()`` name.
    ``apply_fn(params, *args, **kwargs)`` runs the module functionally with them; buffers
    (e.g. BatchNorm statistics) come from the module unless given in ``params`` too.

    A module on a CUDA device runs there, and stays there: JAX's GPU arrays reach it
    without copies. A module on the CPU runs there, on host copies of GPU arrays.

    ``apply_fn`` takes three keywords of its own (README, "State and randomness"):
    ``rng=key`` (a JAX PRNG key: torch's random numbers, dropout's say, for that call),
    ``train=`` (True or False: training or eval mode for that call; None: the module's
    own) and ``mutable=`` (True: the buffers given in ``params``, or a list of buffer
    names, come back after the call: it then returns ``(outputs, new_buffers)``).

    Example::

        apply_fn, params = convert_pytnn_to_jax(torch.nn.Linear(10, 10))
        grads = jax.grad(lambda p, x: apply_fn(p, x).sum())(params, jnp.ones(10))
    """
    _need_torch("convert_pytnn_to_jax")
    torch = torch_module()
    if not isinstance(module, torch.nn.Module):
        raise InvalidArgumentError(
            f"convert_pytnn_to_jax takes a torch.nn.Module; got {type(module).__name__} "
            "(wrap plain functions with py_to_jax_wrapper)"
        )
    call = TorchFunction(
        LocalModel(module, type(module).__name__),
        out_shapes=out_shapes,
        vmap_method=vmap_method,
        int32_as_int64=int32_as_int64,
    )

    apply_fn = module_apply_fn(call, type(module).__name__)
    params = {n: jnp.asarray(torch_to_np(p)) for n, p in module.named_parameters()}
    return apply_fn, params


def convert_pytnn_to_flax(
    module: Any,
    *,
    out_shapes: OutShapes = None,
    vmap_method: str = "auto",
    int32_as_int64: bool = True,
):
    """A torch ``nn.Module`` as ``(LinenModuleClass, variables)``, as in pytorch2jax 0.1.0.

    Instances of the class take the module's arguments; their parameters start at the
    torch module's values and train like any linen parameters. ``variables`` is
    ``{"params": {...}}``, ready for ``LinenModuleClass().apply(variables, x)``, plus
    ``"batch_stats"`` (the floating buffers, BatchNorm statistics) when the module has
    any. Calls take ``train=``/``deterministic=``, draw their key from the ``"dropout"``
    rng stream, and update ``batch_stats`` when it is mutable, as linen's own layers do
    (README, "State and randomness").

    Example::

        TorchLinear, variables = convert_pytnn_to_flax(torch.nn.Linear(10, 10))
        y = TorchLinear().apply(variables, jnp.ones((4, 10)))
    """
    from pytorch2jax._flax import linen_module

    apply_fn, params = convert_pytnn_to_jax(
        module, out_shapes=out_shapes, vmap_method=vmap_method, int32_as_int64=int32_as_int64
    )
    stats = _floating_buffers(module)
    variables = {"params": params, **({"batch_stats": stats} if stats else {})}
    return linen_module(apply_fn, params, type(module).__name__, stats), variables


def convert_pytnn_to_nnx(
    module: Any,
    *,
    out_shapes: OutShapes = None,
    vmap_method: str = "auto",
    int32_as_int64: bool = True,
    rngs: Any = None,
):
    """A torch ``nn.Module`` as a ``flax.nnx`` module (see ``TorchModule``); ``rngs`` (an
    ``nnx.Rngs``) gives the keys of its random numbers, from its ``dropout`` stream.

    Example::

        model = convert_pytnn_to_nnx(torch.nn.Linear(10, 10))
        y = model(jnp.ones((4, 10)))
    """
    from pytorch2jax._flax import TorchModule

    apply_fn, params = convert_pytnn_to_jax(
        module, out_shapes=out_shapes, vmap_method=vmap_method, int32_as_int64=int32_as_int64
    )
    return TorchModule(apply_fn, params, _floating_buffers(module), rngs=rngs)


def _floating_buffers(module: Any) -> dict[str, jax.Array]:
    """The module's floating buffers (BatchNorm statistics) as JAX arrays: its state."""
    return {
        n: jnp.asarray(torch_to_np(b)) for n, b in module.named_buffers() if b.is_floating_point()
    }
