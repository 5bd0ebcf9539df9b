"""TRL's fused LM head served by fused_xent (``fused_xent.hf.patch``; tested with TRL 1.16).

TRL's trainers (SFT, DPO, GRPO, RLOO, KTO) give the model a fused LM head of their own at
construction (``trl.trainer.utils.add_fused_lm_head``) and call ``model(..., labels=...,
fused_lm_head=True)``: that forward runs the backbone and ``_ChunkedLogProbFunction`` (TRL's
kernels) instead of the model's head. Two hooks, installed when ``trl.trainer.utils`` is imported
(at once if it already is), make the models patched by ``fused_xent.hf.patch`` run fused_xent
there, whichever came first:

* ``_ChunkedLogProbFunction`` is replaced by :class:`_Dispatch`, which serves the call with
  fused_xent while a patched model's fused call is in flight (:data:`ACTIVE`), and hands every
  other call to TRL's own function unchanged.
* ``add_fused_lm_head`` is wrapped, so that a head added to an already patched model is wrapped
  in turn (``fused_xent.hf`` sets :data:`on_fused_head`).

TRL's DistillationTrainer computes its loss with ``ChunkedDivergenceFunction`` from both
models' hidden states and heads; that name in ``trl.trainer.distillation_trainer`` is replaced by
:class:`_DivergenceDispatch`, which serves it with
:func:`fused_xent.linear_distillation_loss` when the student's head weight is a patched model's
(:data:`divergence_server`, fused_xent.hf's), and hands it to TRL otherwise.

TRL's forward keeps doing everything else (the backbone, the shift and mask, the loss over
``num_items_in_batch``, a mixture-of-experts router loss, its output class), so the trainers'
metrics stay intact. A fused call of a patched model that does not reach fused_xent raises,
naming TRL; it is never a silent no-op.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys

import torch

TESTED_TRL = "1.16"  # the release CI installs (the `trl` extra pins the range)
_UTILS = "trl.trainer.utils"
_FUNCTION = "_ChunkedLogProbFunction"
_ADD = "add_fused_lm_head"
_DISTILL = "trl.trainer.distillation_trainer"  # DistillationTrainer's chunked divergence
_DIVERGENCE = "ChunkedDivergenceFunction"
_EXTRAS = ("log_sum_sq_probs", "mean_logits", "is_top1")

# The fused call in flight: an object with ``serve(hidden, weight, bias, targets, temperature,
# softcap, logit_scale, outputs)`` and a ``served`` flag (fused_xent.hf's).
ACTIVE: contextvars.ContextVar = contextvars.ContextVar("fused_xent_trl_call", default=None)
on_fused_head = None  # fused_xent.hf's callback: a model that was just given TRL's head
# fused_xent.hf's: the function serving TRL's chunked divergence for this student head weight,
# or None (not a patched model's head)
divergence_server = None
_why_not: str | None = None  # why the hooks could not be installed, if they could not


def trl_version() -> str:
    trl = sys.modules.get("trl")
    return getattr(trl, "__version__", "?")


class _Dispatch:
    """Stands in for TRL's ``_ChunkedLogProbFunction``: fused_xent for a patched model's fused
    call, TRL's own function for everything else."""

    def __init__(self, original) -> None:
        self.original = original

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, softcap=None,
              logit_scale=1.0, outputs=("log_probs",)):  # fmt: skip
        call = ACTIVE.get()
        if call is None:
            return self.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                       softcap, logit_scale, outputs)  # fmt: skip
        call.served = True
        return call.serve(hidden, weight, bias, targets, temperature, softcap, logit_scale,
                          tuple(outputs))  # fmt: skip

    def __getattr__(self, name):
        return getattr(self.original, name)


class _DivergenceDispatch:
    """Stands in for TRL's ``ChunkedDivergenceFunction`` (DistillationTrainer): fused_xent when
    the student's head is a patched model's, TRL's own function otherwise."""

    def __init__(self, original) -> None:
        self.original = original

    def apply(self, *args):
        serve = divergence_server(args[1]) if divergence_server is not None else None
        if serve is None:
            return self.original.apply(*args)
        return serve(*args)

    def __getattr__(self, name):
        return getattr(self.original, name)


def _wrap_add(add):
    @functools.wraps(add)
    def add_fused_lm_head(model, *args, **kwargs):
        out = add(model, *args, **kwargs)
        if on_fused_head is not None:
            on_fused_head(model)
        return out

    add_fused_lm_head._fused_xent_wraps = add
    return add_fused_lm_head


def _install(module) -> None:
    """Both hooks into a loaded ``trl.trainer.utils`` (and every ``trl`` module that imported
    ``add_fused_lm_head`` from it), or the divergence's into a loaded distillation trainer's
    module; idempotent. What is missing is kept in ``_why_not``."""
    global _why_not
    if module.__name__ == _DISTILL:
        divergence = getattr(module, _DIVERGENCE, None)
        if divergence is not None and not isinstance(divergence, _DivergenceDispatch):
            setattr(module, _DIVERGENCE, _DivergenceDispatch(divergence))
        return
    utils = module
    function, add = getattr(utils, _FUNCTION, None), getattr(utils, _ADD, None)
    if function is None or add is None:
        missing = [n for n, v in ((_FUNCTION, function), (_ADD, add)) if v is None]
        _why_not = (
            f"TRL {trl_version()}'s {_UTILS} has no {' / '.join(missing)}: fused_xent serves the "
            f"fused LM head of TRL {TESTED_TRL}"
        )
        return
    if not isinstance(function, _Dispatch):
        setattr(utils, _FUNCTION, _Dispatch(function))
    if getattr(add, "_fused_xent_wraps", None) is None:
        wrapped = _wrap_add(add)
        for name, module in list(sys.modules.items()):
            if (name == "trl" or name.startswith("trl.")) and module is not None:
                for attr, value in list(vars(module).items()):
                    if value is add:
                        setattr(module, attr, wrapped)
    _why_not = None


class _Loader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _install(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Installs the hooks right after ``trl.trainer.utils`` is imported (before any trainer
    module binds ``add_fused_lm_head``), and the divergence's after the distillation trainer's
    module."""

    def find_spec(self, name, path, target=None):
        if name not in (_UTILS, _DISTILL):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def ensure_hooks() -> None:
    """The hooks now if TRL's utilities are imported, else when they are (nothing is imported
    here: without TRL installed, nothing happens)."""
    for name in (_UTILS, _DISTILL):
        if sys.modules.get(name) is not None:
            _install(sys.modules[name])
    if sys.modules.get(_UTILS) is not None and sys.modules.get(_DISTILL) is not None:
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        try:
            installed = importlib.util.find_spec("trl") is not None
        except (ImportError, ValueError):
            installed = False
        if installed:
            sys.meta_path.insert(0, _Finder())


def require() -> None:
    """Raise unless TRL's fused head can be served (its utilities loaded and hooked)."""
    utils = sys.modules.get(_UTILS)
    if utils is not None and not isinstance(getattr(utils, _FUNCTION, None), _Dispatch):
        _install(utils)
    if utils is None or not isinstance(getattr(utils, _FUNCTION, None), _Dispatch):
        why = _why_not or f"{_UTILS} is not imported"
        raise RuntimeError(
            f"fused_xent.hf: the model was called with fused_lm_head=True (TRL's fused LM head), "
            f"which fused_xent cannot serve here: {why}. Install TRL {TESTED_TRL} "
            "(pip install 'fused_xent[trl]'), or turn TRL's fused head off"
        )


def is_trl_forward(forward) -> bool:
    """Whether ``forward`` is TRL's fused-head forward (``add_fused_lm_head``'s)."""
    func = getattr(forward, "__func__", forward)
    # Read off the code and its globals: functools.wraps gave it the model's names.
    code, glob = getattr(func, "__code__", None), getattr(func, "__globals__", {})
    return code is not None and glob.get("__name__") == _UTILS and _ADD in code.co_qualname


# --------------------------------------------------------------------------------------------
# The per-token fields TRL's head returns, by fused_xent
# --------------------------------------------------------------------------------------------


def per_token(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs):
    """(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1) of ``hidden @ weight.T +
    bias`` under TRL's transform (``softcap * tanh(logit_scale * x / softcap) / temperature``),
    None where ``outputs`` does not ask for it: the log-probs and the entropy (both with their
    gradients) from :func:`fused_xent.linear_token_logprobs`'s Function; top-1 from the argmax
    of the same sweep; log sum p^2 and the mean logit (and then top-1 too), without gradient,
    from one more sweep over the head's slabs, only when asked for."""
    from .logprobs import linear_token_logprobs

    if weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
        # cast_lm_head_to_fp32: float32 hidden states, the head in its own dtype (TRL casts the
        # head to the hidden states' dtype, as here).
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    entropy_too = "entropy" in outputs
    softcap = None if softcap is None else float(softcap)
    extras = {}
    if any(name in outputs for name in _EXTRAS[:2]):  # a sweep of their own (top-1 with them)
        extras = _extras(hidden, weight, bias, targets, temperature, softcap, logit_scale)
    if "is_top1" in outputs and not extras:  # SFT: the argmax from the log-probs' own sweep
        logp, entropy, top = _logprobs_with_argmax(
            hidden, weight, bias, targets, float(temperature), softcap, float(logit_scale),
            entropy_too,
        )  # fmt: skip
        extras = {"is_top1": top == targets.reshape(-1).to(top.device).long()}
    else:
        got = linear_token_logprobs(
            hidden, weight, targets, linear_bias=bias, temperature=float(temperature),
            logit_scale=float(logit_scale), softcap=softcap, return_entropy=entropy_too,
        )  # fmt: skip
        logp, entropy = got if entropy_too else (got, None)
    return (logp, entropy, *(extras.get(name) if name in outputs else None for name in _EXTRAS))


def _logprobs_with_argmax(hidden, weight, bias, targets, temperature, softcap, logit_scale,
                          entropy_too):  # fmt: skip
    """What :func:`fused_xent.linear_token_logprobs` computes (by slabs, the same Function) and
    the argmax of each row from the same forward sweep (the kernels' own, first on ties): no
    extra sweep for TRL's top-1. TRL hands (N, D) hidden states and N valid targets."""
    from .autograd import LinearTokenLogprobFunction, logprob_outputs, slab_loss_rows
    from .functional import _backend, autocast_linear
    from .logprobs import _token_options

    hidden, weight, bias = autocast_linear(hidden, weight, bias)
    opts = _token_options(-100, temperature, logit_scale, softcap)
    backend = _backend("auto", hidden)
    target = targets.reshape(-1)
    found = {}

    def rows(h, w, b, t, o, chunk_size, be, return_entropy):
        loss, stats, entropy, predicted = slab_loss_rows(h, w, b, t, o, be, return_entropy, True)
        found["argmax"] = predicted
        logp, entropy = logprob_outputs(loss, entropy, t, o)
        return logp, stats, entropy

    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if wants_grad:
        out = LinearTokenLogprobFunction.apply(hidden, weight, bias, target, opts, None, True,
                                               backend, entropy_too, rows)  # fmt: skip
        logp, entropy = out if entropy_too else (out, None)
    else:
        logp, _, entropy = rows(hidden, weight, bias, target, opts, None, backend, entropy_too)
    return logp, entropy, found["argmax"]


@torch.no_grad()
def _extras(hidden, weight, bias, targets, temperature, softcap, logit_scale):
    """log(sum p^2), the mean transformed logit and whether the target is the first argmax, by
    vocabulary slabs (float32 copies of a slab at a time, never the whole logits)."""
    from .autograd import _slab_logits, _slabs, pick_vocab_slab

    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device

    def full(value):
        return torch.full((n_rows,), value, dtype=torch.float32, device=device)

    lse, lse2, total, best = full(-torch.inf), full(-torch.inf), full(0.0), full(-torch.inf)
    index = torch.zeros(n_rows, dtype=torch.int64, device=device)
    with torch.autocast(device.type, enabled=False):
        for start, end in _slabs(vocab, pick_vocab_slab(n_rows, vocab, hidden.dtype, False)):
            z = _slab_logits(hidden, weight, bias, start, end).float()
            if logit_scale != 1.0:
                z.mul_(logit_scale)
            if softcap is not None:
                z.div_(softcap).tanh_().mul_(softcap)
            if temperature != 1.0:
                z.div_(temperature)
            torch.logaddexp(lse, z.logsumexp(dim=1), out=lse)
            torch.logaddexp(lse2, (2.0 * z).logsumexp(dim=1), out=lse2)
            total.add_(z.sum(dim=1))
            top, where = z.max(dim=1)  # the first maximum (argmax's rule)
            better = top > best
            index = torch.where(better, where + start, index)
            best = torch.where(better, top, best)
    return {
        "log_sum_sq_probs": lse2 - 2.0 * lse,
        "mean_logits": total / vocab,
        "is_top1": index == targets.to(index.device).long(),
    }
