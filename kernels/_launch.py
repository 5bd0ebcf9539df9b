"""The kernels' launch: Triton's ``kernel[grid](...)`` the first time, the compiled kernel itself
after that.

``JITFunction.run`` spends most of a short row's host time (bench/host_time.py): it binds and
specialises every argument, hashes a cache key, looks up hooks and global values, then calls the
compiled kernel's launcher. :func:`launch` does the first launch of each *specialisation* through
it and keeps what it returned; later launches with the same specialisation call the launcher
directly, as ``JITFunction.run`` does (the call its line has had since Triton 3.3: grid, stream,
function, packed metadata, launch metadata, the enter / exit hooks, then every parameter in
order, constexprs included), with no launch metadata and no hooks (the launcher skips None
ones) while no hook is installed.

The key is finer than Triton's, never coarser, so a kept kernel is always the one Triton would
pick: the kernel (its id: the kernels are module globals, never freed), the device, the launch
keywords (the constexprs and ``num_warps``, by value), and for each positional argument what
Triton specialises on: a tensor's dtype and 16-byte alignment; an int's being 1, divisible by 16,
negative, or beyond 32 bits; a float's type; anything else its type and value. A launcher that
takes other arguments (another Triton) raises TypeError before launching: Triton's path then,
for good. ``FUSED_XENT_CHECK_LAUNCH=1`` also asks Triton
for its kernel and its bound arguments at every launch and raises if either differs
(``tests/test_launch.py`` runs the launchers that way against a stub driver); a launch enter or
exit hook (a profiler), the interpreter, or ``FUSED_XENT_SLOW_LAUNCH=1`` take Triton's own path
every time.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.runtime.driver import driver

try:  # Triton >= 3.4
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - the oldest releases keep the hooks on CompiledKernel
    _knobs = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
ENABLED = (
    not _INTERPRET
    and _knobs is not None
    and _VERSION >= (3, 4)
    and os.environ.get("FUSED_XENT_SLOW_LAUNCH", "0") != "1"
)
CHECK = os.environ.get("FUSED_XENT_CHECK_LAUNCH", "0") == "1"
_Chain = getattr(_knobs, "HookChain", None)  # Triton >= 3.5's launch hooks, empty by default
_KEPT: dict = {}  # key -> (compiled kernel, the parameters after the positional ones)


_Tensor = torch.Tensor


def _specs(args) -> tuple:
    """What Triton specialises each positional argument on, or finer (one comprehension: a
    function call per argument would cost more than the rest of the key)."""
    return tuple([
        (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, _Tensor)
        else (a == 1, a % 16 == 0, a < 0, a.bit_length() > 31) if type(a) is int
        else float if type(a) is float
        else (type(a), a)
        for a in args
    ])  # fmt: skip


def _active(hook) -> bool:
    """A launch hook that does something (Triton 3.9's are hook chains, empty by default)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or bool(calls)


def _hooks() -> bool:
    runtime = _knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    if type(enter) is _Chain and type(exit_) is _Chain:  # (Triton 3.9: one test, per launch)
        return bool(enter.calls or exit_.calls)
    return _active(enter) or _active(exit_)


# Compile options every launch passes. FMA contraction on, as every Triton so far defaults to
# and as the kernels' counts and tolerances were measured with: Triton 3.9 warns at every first
# compile that its default turns off in 3.10 where a launch does not say. A user's own
# TRITON_DEFAULT_FP_FUSION is Triton's to apply (and TRITON_FORCE_DISABLE_FP_FUSION always is).
COMPILE_OPTIONS = {} if "TRITON_DEFAULT_FP_FUSION" in os.environ else {"enable_fp_fusion": True}


def launch(kernel, grid: tuple, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``; the compiled kernel's launcher directly once this
    specialisation has been launched through Triton. ``COMPILE_OPTIONS`` unless given."""
    for name, value in COMPILE_OPTIONS.items():
        kwargs.setdefault(name, value)
    if not ENABLED or _hooks():
        return kernel[grid](*args, **kwargs)
    device = driver.active.get_current_device()
    # id(): a JITFunction hashes in Python (its cache key); the kernels are module globals.
    key = (id(kernel), device, _specs(args), tuple(kwargs.items()))
    kept = _KEPT.get(key)
    if kept is None:
        compiled = kernel[grid](*args, **kwargs)
        if hasattr(compiled, "result"):  # an asynchronous compile's future
            compiled = compiled.result()
        if compiled is not None:  # (None: a patched run that only records, bench/static.py)
            tail = tuple(kwargs.get(p.name, p.default) for p in kernel.params[len(args) :])
            _KEPT[key] = (compiled, tail)
        return compiled
    compiled, tail = kept
    if CHECK:
        _check(kernel, grid, args, kwargs, compiled, tail)
    stream = driver.active.get_current_stream(device)
    n = len(grid)
    try:
        compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream,
                     compiled.function, compiled.packed_metadata, None, None, None, *args,
                     *tail)  # fmt: skip
    except TypeError:
        # A Triton whose launcher takes other arguments (raised before anything launched):
        # Triton's own path from now on.
        _disable()
        return kernel[grid](*args, **kwargs)
    return compiled


def _disable() -> None:
    global ENABLED
    ENABLED = False
    _KEPT.clear()


def _check(kernel, grid, args, kwargs, compiled, tail) -> None:
    """Triton's own choice for this call (compiled, not launched) and its bound arguments must
    be what :func:`launch` is about to use."""
    own = kernel.run(*args, grid=grid, warmup=True, **kwargs)
    if hasattr(own, "result"):
        own = own.result()
    if own is not compiled:
        raise AssertionError(f"fused_xent launch: another kernel than Triton's for {kernel}")
    binder = kernel.device_caches[driver.active.get_current_device()][4]
    bound = tuple(binder(*args, **kwargs)[0].values())
    mine = (*args, *tail)
    same = len(bound) == len(mine) and all(
        a is b or (not isinstance(a, torch.Tensor) and type(a) is type(b) and a == b)
        for a, b in zip(bound, mine, strict=False)
    )
    if not same:
        raise AssertionError(f"fused_xent launch: other arguments than Triton's for {kernel}")


class Prepared:
    """:func:`launch` for one kernel whose keyword arguments (constexprs, ``num_warps``) are
    fixed once, for a plan that fixes most positional arguments too (a loss's launches for one
    row length and dtype, ``xent.PlainXent``). Each call passes its positional arguments and
    ``spec``: the caller's account of what Triton specialises on among the arguments that
    change from call to call (their pointers' alignment, the integers that follow the row
    count); those that never change within the plan need none. The first call of each ``spec``
    goes through Triton (``kernel[grid]``), later ones to its compiled kernel directly, as
    :func:`launch` does; ``FUSED_XENT_CHECK_LAUNCH=1`` checks every call against Triton's own
    choice and binding (``tests/test_launch.py``)."""

    __slots__ = ("kernel", "kwargs", "kept", "device")

    def __init__(self, kernel, device, **kwargs):
        kwargs = {**COMPILE_OPTIONS, **kwargs}
        self.kernel, self.device, self.kwargs, self.kept = kernel, device, kwargs, {}

    def __call__(self, n_programs: int, spec, *args):
        kept = self.kept.get(spec)
        if kept is None or not ENABLED or _hooks():
            return self._first(n_programs, spec, args)
        compiled, tail = kept
        if CHECK:
            _check(self.kernel, (n_programs,), args, self.kwargs, compiled, tail)
        try:
            compiled.run(n_programs, 1, 1, driver.active.get_current_stream(self.device),
                         compiled.function, compiled.packed_metadata, None, None, None, *args,
                         *tail)  # fmt: skip
        except TypeError:  # a launcher that takes other arguments, as in launch()
            _disable()
            return self.kernel[(n_programs,)](*args, **self.kwargs)
        return compiled

    def _first(self, n_programs, spec, args):
        if not ENABLED or _hooks():
            return self.kernel[(n_programs,)](*args, **self.kwargs)
        compiled = launch(self.kernel, (n_programs,), *args, **self.kwargs)
        if ENABLED and compiled is not None:  # (launch may have turned the fast path off)
            tail = tuple(self.kwargs.get(p.name, p.default)
                         for p in self.kernel.params[len(args) :])  # fmt: skip
            self.kept[spec] = (compiled, tail)
        return compiled
