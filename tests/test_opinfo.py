"""torch's own OpInfo sample inputs through fused_xent, against torch in float64.

Every sample that ``torch.testing._internal.common_methods_invocations.op_db`` generates for
``nn.functional.cross_entropy`` and the ``nn.functional.linear_cross_entropy`` variants ("",
"chunked", "chunked_none") runs through ``fused_xent.cross_entropy`` /
``fused_xent.linear_cross_entropy`` with the sample's own arguments (fused_xent takes torch's
names), on each path: impl="reference" in float32 and float64, impl="triton" in float32 (the
kernels' dtypes; under the interpreter on a CPU). The loss and the gradient of every input that
requires grad, for a random incoming gradient, are compared with torch's op on float64 copies
(``options`` dropped there: torch's reference path, F.linear then F.cross_entropy).

Probability targets that require grad: both functions differentiate with respect to them (torch's
``-w (1 - eps) log p``), and those samples must pass like the others; each also runs with the
target detached ("-detached" in the id). On a CPU the kernels run under Triton's interpreter,
so the triton path takes every cross_entropy sample and the linear samples of at most two chunk
passes, but only every third of the larger ones (``_on_triton``). Importing op_db needs the
``expecttest`` package (the ``test`` extra); without it, or without an entry, the tests are
skipped with the reason.
"""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, GRAD_RTOL, LOSS_RTOL, rel_err

import fused_xent

_FLAGS_FROZEN = torch.backends.flags_frozen()
try:
    import expecttest  # noqa: F401  (op_db's test utilities import it)
    from torch.testing._internal.common_methods_invocations import op_db
except (Exception, SystemExit) as exc:  # pragma: no cover - depends on the environment
    # SystemExit: torch's test utilities parse sys.argv when imported.
    op_db = None
    _IMPORT_ERROR = f"torch's OpInfo database is not importable ({exc!r}); pip install expecttest"
finally:
    # torch's test utilities freeze the torch.backends flags process-wide when imported; the
    # other test modules collected into this process see torch as usual.
    if not _FLAGS_FROZEN and torch.backends.flags_frozen():
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

SEED = 1234  # the samples' values: make_tensor draws from the global RNG
OPS = (
    ("nn.functional.cross_entropy", ""),
    ("nn.functional.linear_cross_entropy", ""),
    ("nn.functional.linear_cross_entropy", "chunked"),
    ("nn.functional.linear_cross_entropy", "chunked_none"),
)
PATHS = (("reference", torch.float64), ("reference", torch.float32), ("triton", torch.float32))
OURS = {
    "nn.functional.cross_entropy": fused_xent.cross_entropy,
    "nn.functional.linear_cross_entropy": fused_xent.linear_cross_entropy,
}
THEIRS = {
    "nn.functional.cross_entropy": F.cross_entropy,
    "nn.functional.linear_cross_entropy": getattr(F, "linear_cross_entropy", None),
}
TRITON_MAX_PASSES, TRITON_STRIDE = 2, 3
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (LOSS_RTOL, GRAD_RTOL[torch.float32])}


def _opinfo(name: str, variant: str):
    if op_db is None:
        return None
    return next((op for op in op_db if op.name == name and op.variant_test_name == variant), None)


@functools.cache
def _samples(name: str, variant: str, dtype: torch.dtype) -> tuple:
    """The OpInfo's samples, the same on every call and in every process (fixed seeds; the
    global RNG states are restored afterwards)."""
    op = _opinfo(name, variant)
    py_state = random.getstate()
    try:
        random.seed(SEED)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return tuple(op.sample_inputs(DEVICE, dtype, requires_grad=True))
    finally:
        random.setstate(py_state)


def _target(sample):
    return sample.args[-1]  # cross_entropy (input, target); linear (input, linear_weight, target)


def _describe(sample) -> str:
    def short(v):
        if isinstance(v, torch.Tensor):
            shape = "x".join(map(str, v.shape)) or "scalar"
            return shape + ("f" if v.is_floating_point() else "i")
        if type(v).__name__ == "LinearCrossEntropyOptions":
            return f"chunk{v.batch_chunk_size}"
        return str(v)

    parts = [short(sample.input), *map(short, sample.args)]
    parts += [f"{k}={short(v)}" for k, v in sample.kwargs.items()]
    return "-".join(parts)


def _chunk_passes(name: str, sample) -> int:
    """How many chunk passes fused_xent makes over a linear sample: positions x chunks."""
    if name != "nn.functional.linear_cross_entropy":
        return 1
    rows = sample.input.shape[0] if sample.input.dim() == 2 else 1
    positions = math.prod(sample.args[0].shape[1:-1])
    options = sample.kwargs.get("options")
    chunk = getattr(options, "batch_chunk_size", None) or rows
    return positions * -(-rows // chunk)


def _on_triton(name: str, index: int, sample) -> bool:
    """Under the interpreter each chunk pass costs ~0.1-0.2 s: the kernels get every sample of
    up to TRITON_MAX_PASSES passes and every TRITON_STRIDE-th of the larger ones (K-dimensional
    heads of 2-3 positions, 8 rows in chunks of 2-3). On a GPU they get every sample."""
    if DEVICE.type == "cuda":
        return True
    return _chunk_passes(name, sample) <= TRITON_MAX_PASSES or index % TRITON_STRIDE == 0


def _params():
    if op_db is None:
        skip = pytest.mark.skip(reason=_IMPORT_ERROR)
        return [pytest.param(None, None, None, None, None, None, marks=skip, id="no-op_db")]
    params = []
    for name, variant in OPS:
        short = name.removeprefix("nn.functional.") + (f"[{variant}]" if variant else "")
        if _opinfo(name, variant) is None or THEIRS[name] is None:
            reason = f"torch {torch.__version__} has no OpInfo entry {name!r} {variant!r}"
            params.append(pytest.param(name, variant, None, None, None, None, id=f"{short}-none",
                                       marks=pytest.mark.skip(reason=reason)))  # fmt: skip
            continue
        for impl, dtype in PATHS:
            for index, sample in enumerate(_samples(name, variant, dtype)):
                if impl == "triton" and not _on_triton(name, index, sample):
                    continue
                base = f"{short}-{impl}-{str(dtype)[6:]}-{index:03d}-{_describe(sample)}"
                target = _target(sample)
                params.append(pytest.param(name, variant, impl, dtype, index, False, id=base))
                if target.is_floating_point() and target.requires_grad:
                    params.append(pytest.param(name, variant, impl, dtype, index, True,
                                               id=base + "-detached"))  # fmt: skip
    return params


def _copy(value, dtype, detach_target, is_target):
    """A fresh leaf in ``dtype`` (floating tensors), keeping requires_grad."""
    if not isinstance(value, torch.Tensor):
        return value
    if not value.is_floating_point():
        return value.clone()
    grad = value.requires_grad and not (is_target and detach_target)
    return value.detach().to(dtype).clone().requires_grad_(grad)


def _run(fn, sample, dtype, detach_target, grad_seed, **extra):
    """fn(*sample) on copies in ``dtype``: the loss and the gradients of the leaves that require
    grad (in the order input, args, kwargs), for a random incoming gradient."""
    n_args = len(sample.args)
    args = [_copy(a, dtype, detach_target, i == n_args - 1) for i, a in enumerate(sample.args)]
    inp = _copy(sample.input, dtype, detach_target, False)
    kwargs = {k: _copy(v, dtype, detach_target, False) for k, v in sample.kwargs.items()}
    if "weight" in kwargs and isinstance(kwargs["weight"], torch.Tensor):
        kwargs["weight"] = kwargs["weight"].detach()  # class weights: no gradient asked
    leaves = [t for t in (inp, *args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    leaves = [t for t in leaves if t.requires_grad]
    loss = fn(inp, *args, **kwargs, **extra)
    gen = torch.Generator().manual_seed(grad_seed)
    g = torch.rand(loss.shape, generator=gen, dtype=torch.float64) * 2 - 0.5
    grads = torch.autograd.grad(loss, leaves, g.to(loss.dtype).to(loss.device))
    return loss.detach(), grads


@pytest.mark.parametrize("name, variant, impl, dtype, index, detach_target", _params())
def test_opinfo_sample(name, variant, impl, dtype, index, detach_target):
    sample = _samples(name, variant, dtype)[index]
    theirs = THEIRS[name]
    if name == "nn.functional.linear_cross_entropy":
        # The float64 oracle on torch's reference path; fused_xent gets the options.
        def theirs(*args, options=None, **kwargs):
            return F.linear_cross_entropy(*args, **kwargs)

    want_loss, want_grads = _run(theirs, sample, torch.float64, detach_target, index)
    loss, grads = _run(OURS[name], sample, dtype, detach_target, index, impl=impl)
    loss_tol, grad_tol = TOL[dtype]
    assert loss.shape == want_loss.shape
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    err = rel_err(loss, want_loss)
    assert err <= loss_tol, f"loss: rel err {err:.3g} > {loss_tol}"
    assert len(grads) == len(want_grads)
    for i, (got, want) in enumerate(zip(grads, want_grads, strict=True)):
        assert got.dtype == dtype and got.shape == want.shape, i
        err = rel_err(got, want)
        assert err <= grad_tol, f"gradient {i}: rel err {err:.3g} > {grad_tol}"
