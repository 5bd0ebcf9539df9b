"""The autograd Function behind ``fused_xent.cross_entropy``: no kernel code, no reference code.

It drives a *backend* (``fused_xent.kernels.xent`` or ``fused_xent.reference``), both of which
offer ``xent_prologue``, ``xent_forward`` and ``xent_backward`` with one
contract, on (N, C) logits; the functional layer has already flattened any other shape to that.

The schedules, chosen by what the forward can know:

* "mean" / "sum" with a gradient wanted (and not in place): the prologue zeroes the reduction's
  counter and computes the "mean" denominator, then one launch computes the rows' losses, the
  reduced loss and the gradient for an incoming gradient of 1. The backward is one launch that
  checks the incoming gradient on the device: 1 leaves the gradient as it is; anything else
  recomputes it from the logits with that gradient applied, so it is rounded once.
* "none", and every reduction with ``inplace_backward``: the forward stores three floats per row
  (``stats``: max, log-sum, softmax coefficient) and the backward makes one more pass over the
  logits, writing the gradient (into the logits' own storage when in place) rounded once.

So forward + backward are at most three launches ("none": two), and nothing is computed that
was not asked for (the log-sum-exp only with ``return_lse``). With ``inplace_backward=True`` the
logits' version counter is bumped, so any autograd node that saved the logits raises instead of
silently reading gradients.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from . import _alloc, reference
from ._options import mean_denominator, over_den, reduce_total


def _loss_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_outputs(logits):
    """The per-row loss, and the (3, N) statistics the backends write beside it."""
    dtype, n_rows = _loss_dtype(logits), logits.shape[0]
    return _alloc.empty((n_rows,), dtype, logits.device), _alloc.empty(
        (3, n_rows), dtype, logits.device
    )


def lse_of(stats):
    """The per-row log-sum-exp from the backends' statistics (max + log-sum); +inf where a row
    holds +inf (its log-sum is NaN there), as ``torch.logsumexp``."""
    row_max = stats[0]
    return torch.where(row_max == float("inf"), row_max, row_max + stats[1])


def token_stats_outputs(logits):
    """The (N,) entropy (float32; float64 for float64 logits) and argmax (int64) outputs."""
    n_rows, device = logits.shape[0], logits.device
    return (
        _alloc.empty((n_rows,), _loss_dtype(logits), device),
        _alloc.empty((n_rows,), torch.int64, device),
    )


def _forward(logits, target, opts, reduction, backend, grad=None, token_stats=None,
             row_weight=None):  # fmt: skip
    """The forward launches: (loss, per-row stats, "mean" denominator or None). ``token_stats``:
    (entropy, predicted) outputs to fill in the same pass."""
    entropy, predicted = token_stats if token_stats is not None else (None, None)
    loss, stats = _row_outputs(logits)
    if reduction == "none":
        backend.xent_forward(logits, target, opts, loss, stats, grad, entropy=entropy,
                             predicted=predicted, row_weight=row_weight)  # fmt: skip
        return loss, stats, None
    device, dtype = logits.device, loss.dtype
    total, den = _alloc.empty((), dtype, device), _alloc.empty((), dtype, device)
    counter = torch.empty((), dtype=torch.int32, device=device)
    backend.xent_prologue(target, opts, logits.shape[1], reduction, den, counter)
    backend.xent_forward(logits, target, opts, loss, stats, grad, None, reduction, total, den,
                         counter, entropy, predicted, row_weight)  # fmt: skip
    return total, stats, den if reduction == "mean" else None


def forward_no_grad(logits, target, opts, reduction, backend, token_stats=None, row_weight=None):
    """(loss, stats) alone: one read of the logits, no gradient written."""
    loss, stats, _ = _forward(logits, target, opts, reduction, backend, None, token_stats,
                              row_weight)  # fmt: skip
    return loss, stats


def refuse_double_backward() -> None:
    """create_graph=True: the gradients computed here are not themselves differentiable, and a
    gradient penalty built on them would silently be a constant; refuse instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fused_xent: double backward (create_graph=True) is not supported; its gradient "
            "is not differentiable. Use torch.nn.functional.cross_entropy for that step."
        )


def _refuse_second_backward(ctx, call: str, why: str) -> None:
    if ctx.consumed:
        raise RuntimeError(
            f"fused_xent: backward ran twice through one {call} call (retain_graph); {why}"
        )
    ctx.consumed = True


def save_forward_grads(ctx, grads) -> None:
    """Keep the gradients a forward computed (None where not wanted) for the backward."""
    ctx.have = tuple(g is not None for g in grads)
    ctx.save_for_backward(*(g for g in grads if g is not None))
    ctx.consumed = False


def take_forward_grads(ctx, call: str) -> list:
    """Those tensors (None where not wanted), handed out once: a second backward (retain_graph)
    is refused, because the first one may have turned them into the gradients in place."""
    _refuse_second_backward(
        ctx, call, "its gradient is computed in the forward and handed out once. Call the loss "
        "again, or use reduction='none' without inplace_backward.",
    )  # fmt: skip
    saved = iter(ctx.saved_tensors)
    return [next(saved) if have else None for have in ctx.have]


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, opts, reduction, inplace_backward, backend, return_lse,
                row_weight=None, return_stats=False):  # fmt: skip
        """Returns the loss, then the lse with ``return_lse``, then (entropy, predicted) with
        ``return_stats``; only the loss is differentiable. ``row_weight``: a per-row weight of
        the loss."""
        ctx.backend, ctx.opts, ctx.reduction = backend, opts, reduction
        ctx.inplace_backward, ctx.consumed = inplace_backward, False
        # The gradient in the forward: for a reduced loss, unless it goes into the logits (which
        # the backward still reads when the incoming gradient is not 1) or a probability target
        # wants one too (written in the backward, beside the logits').
        ctx.fused = reduction != "none" and not inplace_backward and not ctx.needs_input_grad[1]
        grad = _alloc.grad_like(logits) if ctx.fused else None
        token_stats = token_stats_outputs(logits) if return_stats else None
        loss, stats, den = _forward(logits, target, opts, reduction, backend, grad, token_stats,
                                    row_weight)  # fmt: skip
        ctx.save_for_backward(logits, target, stats, den, grad, row_weight)
        # No zeros are made for the gradient of an output the caller did not use.
        ctx.set_materialize_grads(False)
        extra = (lse_of(stats),) if return_lse else ()
        extra += token_stats if return_stats else ()
        if not extra:
            return loss
        ctx.mark_non_differentiable(*extra)
        return (loss, *extra)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        refuse_double_backward()
        if grad_loss is None:
            return (None,) * 9
        if ctx.fused:
            why = "its gradient is computed in the forward and handed out once. Call the loss "
            why += "again, or use reduction='none'."
        else:
            why = "with inplace_backward=True the first backward overwrote the logits with their "
            why += "gradient. Use inplace_backward=False to backward twice."
        if ctx.fused or ctx.inplace_backward:
            _refuse_second_backward(ctx, "cross_entropy", why)
        logits, target, stats, den, grad, row_weight = ctx.saved_tensors
        want_dx, want_dt = ctx.needs_input_grad[:2]
        if not want_dx:
            grad = None
        elif ctx.inplace_backward:
            grad = logits
        elif grad is None:
            grad = _alloc.grad_like(logits)
        # d loss / d (probability target), in the same pass, only when asked for.
        target_grad = _alloc.empty(target.shape, target.dtype, target.device) if want_dt else None
        ctx.backend.xent_backward(logits, target, ctx.opts, stats, grad_loss, grad, ctx.reduction,
                                  den, ctx.fused, target_grad,
                                  row_weight=row_weight)  # fmt: skip
        if ctx.inplace_backward and want_dx:
            torch.autograd.graph.increment_version(logits)
        return grad, target_grad, None, None, None, None, None, None, None


class TokenLogprobFunction(torch.autograd.Function):
    """log p(target) of each row, and optionally its entropy, both differentiable.

    The forward is one launch (the logits read once; three floats per row kept, plus the
    entropy); the backward one more read of the logits and one write of their gradient (in place
    with ``inplace_backward``), for whichever outputs received a gradient.
    """

    @staticmethod
    def forward(ctx, logits, target, opts, backend, return_entropy, inplace_backward,
                rows=None):  # fmt: skip
        """``rows(logits, target, opts, backend, return_entropy) -> (logp, stats, entropy)``: how
        the forward gets them (default :func:`token_rows`; a sharded vocabulary combines them
        across the ranks). The backward is the same either way."""
        logp, stats, entropy = (rows or token_rows)(logits, target, opts, backend, return_entropy)
        ctx.backend, ctx.opts, ctx.inplace_backward, ctx.consumed = (
            backend, opts, inplace_backward, False,
        )  # fmt: skip
        ctx.save_for_backward(logits, target, stats, entropy)
        ctx.set_materialize_grads(False)
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        refuse_double_backward()
        if (grad_logp is None and grad_entropy is None) or not ctx.needs_input_grad[0]:
            return (None,) * 7
        if ctx.inplace_backward:
            _refuse_second_backward(
                ctx, "token_logprobs", "with inplace_backward=True the first backward overwrote "
                "the logits with their gradient. Use inplace_backward=False to backward twice.",
            )  # fmt: skip
        logits, target, stats, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros(logits.shape[0], dtype=stats.dtype, device=logits.device)
        grad = logits if ctx.inplace_backward else _alloc.grad_like(logits)
        ctx.backend.xent_backward(
            logits, target, ctx.opts, stats, grad_logp, grad, dentropy=grad_entropy,
            entropy=None if grad_entropy is None else entropy, logprob=True,
        )  # fmt: skip
        if ctx.inplace_backward:
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None


def plain_outputs(logits):
    """The plain forward's outputs (``PlainXent``): the reduced loss (float32, 0-dim), and one
    float32 buffer for the others: the (3, N) statistics, the (N,) losses, the "mean"
    denominator and the reduction's counter."""
    device = logits.device
    return _alloc.empty((), torch.float32, device), _alloc.empty(
        4 * logits.shape[0] + 2, torch.float32, device
    )


class PlainCrossEntropyFunction(torch.autograd.Function):
    """``CrossEntropyFunction`` for the plain calls ``functional.cross_entropy`` picks out
    (``kernels/xent.py``'s ``PlainXent``: class-index targets, no option but ignore_index, a
    reduced loss): the same kernels and the same gradient-in-the-forward, with fewer host
    steps between them."""

    @staticmethod
    def forward(ctx, logits, target, plan):
        grad = _alloc.empty_like(logits)
        total, work = plain_outputs(logits)
        plan.forward(logits, target, total, work, grad)
        # The logits and the target are saved (their versions checked: the backward reads them
        # when the incoming gradient is not 1); the buffers made here are plain attributes (no
        # one else holds them), the gradient handed out once.
        ctx.save_for_backward(logits, target)
        ctx.plan, ctx.work, ctx.grad, ctx.consumed = plan, work, grad, False
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward()
        _refuse_second_backward(
            ctx, "cross_entropy", "its gradient is computed in the forward and handed out once. "
            "Call the loss again, or use reduction='none'.",
        )  # fmt: skip
        grad, ctx.grad = ctx.grad, None
        logits, target = ctx.saved_tensors
        ctx.plan.backward(logits, target, ctx.work, grad_loss, grad)
        return grad, None, None


def plain_token_rows(logits, target, opts, plan, return_entropy):
    """:func:`token_rows` of a plain ``token_logprobs`` call, ``plan`` (``PlainLogprob``) in the
    backend's place (``TokenLogprobFunction``'s ``rows``; ``opts`` unused): one launch."""
    logp, stats = _row_outputs(logits)
    entropy = None
    if return_entropy:
        entropy = _alloc.empty((logits.shape[0],), torch.float32, logits.device)
    plan.forward(logits, target, logp, stats, entropy)
    return logp, stats, entropy


def token_rows(logits, target, opts, backend, return_entropy):
    """(log p(target), statistics, entropy or None) of (N, V) logits: one launch."""
    logp, stats = _row_outputs(logits)
    entropy = token_stats_outputs(logits)[0] if return_entropy else None
    backend.xent_forward(logits, target, opts, logp, stats, entropy=entropy, logprob=True)
    return logp, stats, entropy


# --------------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# --------------------------------------------------------------------------------------------

# How many rows go into a chunk is a function of the shapes and this budget alone: no query of
# the free memory (which ignores torch's cached blocks and changes from call to call), so the
# chunking, and with it the order in which the weight gradient is summed, is the same on every
# call, and nothing stops torch.compile or a CUDA graph capture.
#
# The trade-off. Per logit a chunk moves about six elements of the logits' dtype (``b`` bytes
# each): the logits product writes them, the kernel reads them (twice for rows longer than a
# block, as at LLM vocabularies) and writes the gradient over them, and the d_hidden and d_weight
# products read that gradient: ``6 b`` bytes, 12 in bfloat16 (a bias adds one more read). The
# float32 weight-gradient accumulator (V x D) is read and written once per chunk (the first chunk
# only writes it): ``8 D / rows`` bytes per logit, which only larger chunks shrink (so do the two
# reads of the weight per chunk, ``2 b D / rows``). Chunks of at least ``32 D / (6 b)`` rows keep
# the accumulator's traffic to at most a quarter of the rest; they take ``16 V D / 3`` bytes of
# logits whatever the dtype (4/3 of the float32 accumulator itself). At D = 4096, V = 128256,
# bfloat16: 128 MiB chunks (512 rows) moved 64 bytes per logit through the accumulator against 12
# for everything else; the rule asks for 11008 rows (2.98 bytes per logit, 2.6 GiB of logits), so
# a batch of 8192 rows is one chunk of 1.96 GiB (the accumulator written once: 2 bytes per logit).
# Chunks never exceed CHUNK_BUDGET_BYTES of logits (the reference counts eight float32 copies per
# logit, its temporaries), nor go below 128 rows: the rule holds up to V x D = 3/16 of the budget
# (805 million at 4 GiB; Llama 3 8B's head is 525 million); beyond, the budget wins (Gemma 2 9B,
# 256000 x 3584 bf16: 8320 rows, 3.4 bytes per logit, 0.29 of the rest). The float32 d_hidden
# (N x D) and d_bias (V) accumulators cost traffic independent of the chunking.
CHUNK_BUDGET_BYTES = 4 << 30
_CHUNK_ROW_MULTIPLE = 128  # keeps the matrix products on tile-friendly sizes
_CHUNK_PASSES = 6  # elements of the logits' dtype a chunk moves per logit (above)
_ACC_SHARE = 4  # the accumulator's traffic: at most 1 / _ACC_SHARE of the chunk's own
_REFERENCE_COPIES = 8  # float32 (float64) temporaries per logit on the reference path


def pick_chunk_size(
    n_rows: int, vocab: int, hidden: int, dtype: torch.dtype, reference: bool = False
) -> int:
    """Rows per chunk, from the shapes and ``CHUNK_BUDGET_BYTES`` alone (deterministic).

    The fewest rows, in multiples of 128, for which the float32 weight-gradient accumulator's
    traffic per logit (``8 * hidden / rows`` bytes) is at most a quarter of the chunk's own
    (``6 * b`` bytes, ``b`` the dtype's size); fewer if the chunk's logits would take more than
    ``CHUNK_BUDGET_BYTES`` (on the reference path: eight float32 copies of them), but at least 128;
    at most ``n_rows`` (at least 1). The last chunk holds what is left. See the comment above
    ``CHUNK_BUDGET_BYTES`` for the numbers.
    """
    size = dtype.itemsize
    multiple = _CHUNK_ROW_MULTIPLE
    # 8 D / rows <= 6 b / 4  <=>  rows >= 32 D / (6 b), rounded up to a multiple of 128
    need = -(-8 * _ACC_SHARE * hidden // (_CHUNK_PASSES * size))
    need = max(-(-need // multiple), 1) * multiple
    logit_bytes = _REFERENCE_COPIES * max(size, 4) if reference else size
    fit = CHUNK_BUDGET_BYTES // (max(vocab, 1) * logit_bytes) // multiple * multiple
    rows = min(need, max(fit, multiple))
    return max(min(rows, n_rows), 1)


# Whether torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc) runs on a device type (cuBLAS has
# it from torch 2.8): probed on first use and remembered. torch 2.13 has no CPU kernel for it, so
# there the upcast copies are the plan rather than a fallback, and nothing is said.
_OUT_DTYPE_MM: dict[str, bool] = {"cpu": False}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _out_dtype_mm(acc, a, b, beta, alpha) -> bool:
    """acc = beta * acc + alpha * a @ b with low-precision a, b and a float32 acc, without
    upcast copies, where torch can; False (nothing written) where it cannot."""
    where = acc.device.type
    known = _OUT_DTYPE_MM.get(where)
    if known is False:
        return False
    if known:
        torch.addmm(acc, a, b, beta=beta, alpha=alpha, out_dtype=acc.dtype, out=acc)
        return True
    try:
        torch.addmm(acc, a, b, beta=beta, alpha=alpha, out_dtype=acc.dtype, out=acc)
    except torch.OutOfMemoryError:
        raise  # says nothing about the op; the caller must see it (and the next call probes)
    except (RuntimeError, TypeError) as exc:
        _OUT_DTYPE_MM[where] = False
        warnings.warn(
            f"fused_xent: torch.addmm(..., out_dtype={acc.dtype}) failed on {where} "
            f"({_first_line(exc)}); linear_cross_entropy now accumulates its {acc.dtype} "
            f"gradients from upcast {acc.dtype} copies of each chunk's operands (more memory "
            "and time, same result)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    _OUT_DTYPE_MM[where] = True
    return True


def _accumulate_mm(acc, a, b, first: bool = False, alpha: float = 1.0) -> None:
    """acc = alpha * a @ b (``first``: acc's contents are ignored, never read) or acc += that,
    accumulating in acc's dtype (float32 for low-precision a, b: cuBLAS's out_dtype products
    where torch has them, else float32 copies of a and b)."""
    beta = 0 if first else 1
    if acc.dtype == a.dtype:
        torch.addmm(acc, a, b, beta=beta, alpha=alpha, out=acc)
    elif not _out_dtype_mm(acc, a, b, beta, alpha):
        torch.addmm(acc, a.to(acc.dtype), b.to(acc.dtype), beta=beta, alpha=alpha, out=acc)


def _chunks(n_rows: int, chunk_size: int):
    return [(s, min(s + chunk_size, n_rows)) for s in range(0, n_rows, chunk_size)]


def _chunk_logits(hidden, weight, bias, start, end):
    if bias is None:
        return hidden[start:end] @ weight.t()
    return torch.addmm(bias, hidden[start:end], weight.t())


def _part(t, rows):
    return None if t is None else t[rows]


def linear_loss_rows(hidden, weight, bias, target, opts, chunk_size, backend, entropy=None,
                     logprob=False, predicted=None, row_weight=None):  # fmt: skip
    """Per-row loss and statistics of hidden @ weight.T + bias, one chunk of logits at a time
    (with ``logprob``: log p(target) instead of the loss; ``entropy``, ``predicted``: (N,)
    outputs; ``row_weight``: per-row weights of the loss)."""
    loss, stats = _row_outputs(hidden)
    for start, end in _chunks(hidden.shape[0], chunk_size):
        rows = slice(start, end)
        logits = _chunk_logits(hidden, weight, bias, start, end)
        backend.xent_forward(
            logits, target[rows], opts, loss[rows], stats[:, rows], entropy=_part(entropy, rows),
            predicted=_part(predicted, rows), row_weight=_part(row_weight, rows), logprob=logprob,
        )  # fmt: skip
    return loss, stats


def _reduce(loss, reduction, den):
    if reduction == "none":
        return loss
    return reduce_total(loss.sum(), den if reduction == "mean" else None)


def linear_forward_no_grad(hidden, weight, bias, target, opts, reduction, chunk_size, backend,
                           row_weight=None, return_stats=False):  # fmt: skip
    """(loss, lse) alone (and entropy, predicted with ``return_stats``): each chunk's logits are
    read once, no gradient written."""
    entropy, predicted = token_stats_outputs(hidden) if return_stats else (None, None)
    loss, stats = linear_loss_rows(hidden, weight, bias, target, opts, chunk_size, backend,
                                   entropy, False, predicted, row_weight)  # fmt: skip
    den = None
    if reduction == "mean":
        den = mean_denominator(target, opts, weight.shape[0], loss.dtype)
    extra = (entropy, predicted) if return_stats else ()
    return (_reduce(loss, reduction, den), lse_of(stats), *extra)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def linear_grad_buffers(hidden, weight, bias, need, fp32_wgrad):
    """The accumulators (d_hidden, d_weight, d_bias), each None where not wanted: float32 for
    half-precision parameters (the parameter's dtype for float32 / float64), except d_weight in
    the weight's dtype when ``fp32_wgrad`` is off. Left unwritten: the first chunk's products
    write them (:func:`accumulate_chunk_grads`), no zero-fill."""
    need_h, need_w, need_b = need
    device = hidden.device
    d_hidden = d_weight = d_bias = None
    if need_h:
        d_hidden = _alloc.empty(hidden.shape, _accumulator_dtype(hidden.dtype), device)
    if need_w:
        w_dtype = _accumulator_dtype(weight.dtype) if fp32_wgrad else weight.dtype
        d_weight = _alloc.empty(weight.shape, w_dtype, device)
    if need_b and bias is not None:
        d_bias = _alloc.empty(weight.shape[:1], _accumulator_dtype(weight.dtype), device)
    return d_hidden, d_weight, d_bias


def weight_sum_scale(d_weight, n_rows: int) -> float:
    """What a float16 d_weight accumulator holds times the sum: 1 / 2**floor(log2(n_rows)).

    The chunk gradients are not divided by the "mean" denominator (that happens once, at the
    end), so their sum over many rows can outgrow float16 (65504) where torch's "mean" gradient
    would not; scaled by about 1 / n_rows (a power of two: exact) it stays that gradient's size.
    """
    if d_weight is None or d_weight.dtype != torch.float16:
        return 1.0
    return 2.0 ** -max(n_rows.bit_length() - 1, 0)


def accumulate_chunk_grads(grads, chunk_grad, hidden, weight, rows, first, w_scale=1.0) -> None:
    """One chunk's d(loss)/d(logits) into the accumulators: d_hidden's rows (written),
    d_weight and d_bias (written by the ``first`` chunk, added to by the others; d_weight times
    ``w_scale``, see :func:`weight_sum_scale`)."""
    d_hidden, d_weight, d_bias = grads
    if d_hidden is not None:
        _accumulate_mm(d_hidden[rows], chunk_grad, weight, first=True)
    if d_weight is not None:
        _accumulate_mm(d_weight, chunk_grad.t(), hidden[rows], first=first, alpha=w_scale)
    if d_bias is not None:
        if first:
            torch.sum(chunk_grad, dim=0, dtype=d_bias.dtype, out=d_bias)
        else:
            d_bias += chunk_grad.sum(dim=0, dtype=d_bias.dtype)


def zero_unwritten(grads) -> None:
    """No rows, no chunk: the gradients are zero (the one case that fills)."""
    for g in grads:
        if g is not None:
            g.zero_()


def finish_linear_grads(grads, scale, dtypes, w_scale=1.0):
    """Each accumulator times ``scale`` in its parameter's dtype: one op, rounded once after
    every scale. In place where the accumulator has that dtype, else into a new tensor (the
    accumulator is not kept). ``scale`` is a device tensor (the incoming gradient over the "mean"
    denominator), or one per gradient (None: no scale, only the rounding); d_weight is also
    divided by ``w_scale``."""
    scales = scale if isinstance(scale, (tuple, list)) else (scale,) * len(grads)
    out = []
    for i, (acc, dtype, s) in enumerate(zip(grads, dtypes, scales, strict=True)):
        if acc is None:
            out.append(None)
            continue
        if s is None and w_scale == 1.0:
            out.append(acc.to(dtype))
            continue
        # A (1,)-shaped factor takes part in type promotion: the product runs in float32 even
        # where the accumulator is float16 (a 0-dim factor would first be rounded to float16).
        f = torch.ones(1, dtype=torch.float32, device=acc.device) if s is None else s.reshape(1)
        if i == 1 and w_scale != 1.0:
            f = f / w_scale
        dest = acc if acc.dtype == dtype else _alloc.empty(acc.shape, dtype, acc.device)
        out.append(torch.mul(acc, f, out=dest))
    return out


def row_scale(dloss):
    """A per-row incoming gradient as (dloss / s, s), s the smallest power of two at least
    max |dloss| (1 when all are 0), on the device: the chunk gradients the kernel writes with
    ``dloss / s`` (at most 1 in magnitude: a uniform gradient gives exactly the unscaled ones)
    then neither overflow nor underflow more than the unscaled ones, and the accumulators are
    multiplied by ``s`` once, at the end (exactly: a power of two)."""
    dloss = dloss.to(torch.float64 if dloss.dtype == torch.float64 else torch.float32)
    one = torch.ones((), dtype=dloss.dtype, device=dloss.device)
    if dloss.numel() == 0:
        return dloss, one
    mantissa, exponent = torch.frexp(dloss.abs().amax())  # max = m * 2**e, 0.5 <= m < 1
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # max = 2**k: s = max
    s = torch.ldexp(one, exponent)
    return dloss / s, s


def _param_dtypes(hidden, weight, bias):
    return hidden.dtype, weight.dtype, None if bias is None else bias.dtype


class LinearCrossEntropyFunction(torch.autograd.Function):
    """cross_entropy(hidden @ weight.T + bias, target) over chunks of rows.

    Every gradient is rounded to its parameter's dtype once, after every scale. Each chunk's
    logits (one matrix product) are turned in place by the kernel into the gradient of the
    per-row losses, *not* divided by the "mean" denominator (in float16 ``p / N`` would underflow)
    nor multiplied by the incoming gradient; two products take it into d_hidden (its rows) and
    d_weight, a sum into d_bias, all accumulated in float32 (out_dtype products on CUDA, float32
    copies elsewhere; d_weight in the weight's dtype with ``fp32_wgrad`` off: one rounding per
    chunk, half the memory). The backward then makes each gradient as ``(acc * (g / den))`` in
    the parameter's dtype, in one op on the device (g the incoming gradient, den the "mean"
    denominator; no host synchronisation).

    "mean"/"sum": all that happens in the forward, and the float32 accumulators live until the
    backward (d_hidden N x D, d_weight V x D, d_bias V). "none": the forward keeps the per-row
    statistics and the backward recomputes each chunk's logits with the per-row incoming gradient
    over a power of two (:func:`row_scale`), multiplied back at the end. Never anything of size
    N x V: one chunk of logits at a time.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, target, opts, reduction, chunk_size, fp32_wgrad, backend,
        row_weight=None, return_stats=False,
    ):  # fmt: skip
        vocab = weight.shape[0]
        entropy, predicted = token_stats_outputs(hidden) if return_stats else (None, None)
        ctx.backend, ctx.opts, ctx.chunk_size, ctx.fp32_wgrad = (
            backend,
            opts,
            chunk_size,
            fp32_wgrad,
        )
        ctx.dtypes = _param_dtypes(hidden, weight, bias)
        # A probability target that wants its gradient: the backward writes it beside the
        # logits' (the "none" schedule, whatever the reduction).
        ctx.fused = reduction != "none" and not ctx.needs_input_grad[3]
        ctx.reduction = reduction
        den = None
        if ctx.fused:
            loss, stats = _row_outputs(hidden)
            if reduction == "mean":
                den = mean_denominator(target, opts, vocab, loss.dtype)
            grads, ctx.w_scale = _linear_xent_grads(
                hidden, weight, bias, target, opts, chunk_size, fp32_wgrad, backend,
                ctx.needs_input_grad[:3], loss=loss, stats=stats, entropy=entropy,
                predicted=predicted, row_weight=row_weight,
            )  # fmt: skip
            save_forward_grads(ctx, (*grads, den))
        else:
            loss, stats = linear_loss_rows(hidden, weight, bias, target, opts, chunk_size, backend,
                                           entropy, False, predicted, row_weight)  # fmt: skip
            if reduction == "mean":
                den = mean_denominator(target, opts, vocab, loss.dtype)
            ctx.save_for_backward(hidden, weight, bias, target, stats, den, row_weight)
        extra = (lse_of(stats), *((entropy, predicted) if return_stats else ()))
        ctx.mark_non_differentiable(*extra)
        return (_reduce(loss, reduction, den), *extra)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        refuse_double_backward()
        d_target = None
        if ctx.fused:
            *grads, den = take_forward_grads(ctx, "linear_cross_entropy")
            scale = over_den(grad_loss, den)
        else:
            hidden, weight, bias, target, stats, den, row_weight = ctx.saved_tensors
            if ctx.reduction != "none":
                grad_loss = over_den(grad_loss, den).expand(hidden.shape[0])
            dloss, scale = row_scale(grad_loss)
            want_dt = ctx.needs_input_grad[3]
            d_target = _alloc.empty(target.shape, target.dtype, target.device) if want_dt else None
            grads, ctx.w_scale = _linear_xent_grads(
                hidden, weight, bias, target, ctx.opts, ctx.chunk_size, ctx.fp32_wgrad,
                ctx.backend, ctx.needs_input_grad[:3], stats=stats, dloss=dloss,
                target_grad=d_target, row_weight=row_weight,
            )  # fmt: skip
            if d_target is not None:
                d_target.mul_(scale.to(d_target.dtype))  # a power of two: exact
        grads = finish_linear_grads(grads, scale, ctx.dtypes, ctx.w_scale)
        return (*grads, d_target, None, None, None, None, None, None, None)


def _linear_xent_grads(
    hidden, weight, bias, target, opts, chunk_size, fp32_wgrad, backend, need, *, loss=None,
    stats=None, dloss=None, target_grad=None, dentropy=None, entropy=None, logprob=False,
    predicted=None, row_weight=None,
):  # fmt: skip
    """The accumulators (d_hidden, d_weight, d_bias) over chunks of rows, and d_weight's
    :func:`weight_sum_scale`.

    With ``loss`` given (the fused forward) each chunk's loss and statistics are written and its
    gradient is that of the per-row losses; otherwise (the backward of "none") the forward's
    ``stats`` and the per-row ``dloss`` give it (with ``dentropy``, ``entropy`` and ``logprob``
    as the kernels' backward takes them). ``row_weight`` weighs the rows' losses either way; the
    fused forward also fills ``entropy`` and ``predicted`` when given.
    """
    grads = linear_grad_buffers(hidden, weight, bias, need, fp32_wgrad)
    n_rows = hidden.shape[0]
    w_scale = weight_sum_scale(grads[1], n_rows)
    for start, end in _chunks(n_rows, chunk_size):
        logits = _chunk_logits(hidden, weight, bias, start, end)
        rows = slice(start, end)
        if loss is not None:
            backend.xent_forward(
                logits, target[rows], opts, loss[rows], stats[:, rows], logits,
                entropy=_part(entropy, rows), predicted=_part(predicted, rows),
                row_weight=_part(row_weight, rows),
            )  # fmt: skip
        else:
            backend.xent_backward(
                logits, target[rows], opts, stats[:, rows], dloss[rows], logits,
                target_grad=_part(target_grad, rows), dentropy=_part(dentropy, rows),
                entropy=_part(entropy, rows), row_weight=_part(row_weight, rows), logprob=logprob,
            )  # fmt: skip
        # logits now hold d(loss)/d(logits) of this chunk.
        accumulate_chunk_grads(grads, logits, hidden, weight, rows, start == 0, w_scale)
    if n_rows == 0:
        zero_unwritten(grads)
    return grads, w_scale


class LinearTokenLogprobFunction(torch.autograd.Function):
    """token log-probs (and entropy) of hidden @ weight.T + bias over chunks of rows.

    The forward keeps three floats per row (and the entropy); the backward recomputes each
    chunk's logits, which the kernel turns in place into their gradient for the per-row incoming
    gradients over a common power of two (:func:`row_scale`), accumulated in float32 as in
    :class:`LinearCrossEntropyFunction` and rounded once. Never anything of size N x V.

    ``rows(hidden, weight, bias, target, opts, chunk_size, backend, return_entropy) -> (logp,
    stats, entropy)`` is how the forward gets them (default :func:`linear_token_rows`), and
    ``sum_hidden(acc)`` sums the float32 hidden-state accumulator over the ranks in place (a head
    sharded by rows: ``fused_xent.distributed``); the rest is the same either way.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, opts, chunk_size, fp32_wgrad, backend,
                return_entropy, rows=None, sum_hidden=None):  # fmt: skip
        default = slab_token_rows if chunk_size is None else linear_token_rows
        logp, stats, entropy = (rows or default)(
            hidden, weight, bias, target, opts, chunk_size, backend, return_entropy
        )
        ctx.opts, ctx.chunk_size, ctx.fp32_wgrad = opts, chunk_size, fp32_wgrad
        ctx.backend, ctx.sum_hidden = backend, sum_hidden
        ctx.dtypes = _param_dtypes(hidden, weight, bias)
        ctx.save_for_backward(hidden, weight, bias, target, stats, entropy)
        ctx.set_materialize_grads(False)
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        refuse_double_backward()
        if grad_logp is None and grad_entropy is None:
            return (None,) * 11
        grads, scale, w_scale = linear_token_grads(ctx, grad_logp, grad_entropy)
        scales = scale if isinstance(scale, tuple) else (scale,) * 3
        grads = finish_linear_grads(grads, sum_hidden_grad(grads, scales, ctx.sum_hidden),
                                    ctx.dtypes, w_scale)  # fmt: skip
        return (*grads, None, None, None, None, None, None, None, None)


def linear_token_rows(hidden, weight, bias, target, opts, chunk_size, backend, return_entropy):
    """(log p(target), statistics, entropy or None) of hidden @ weight.T + bias, by chunks."""
    entropy = token_stats_outputs(hidden)[0] if return_entropy else None
    logp, stats = linear_loss_rows(hidden, weight, bias, target, opts, chunk_size, backend,
                                   entropy, logprob=True)  # fmt: skip
    return logp, stats, entropy


def linear_token_grads(ctx, grad_logp, grad_entropy):
    """The backward of the linear log-probs up to the rounding: the float32 accumulators, the
    power of two ``scale`` they are still to be multiplied by (:func:`row_scale` of both incoming
    gradients together) and d_weight's :func:`weight_sum_scale`. ``ctx`` holds what the forward
    saved: (hidden, weight, bias, target, stats, entropy) and opts, chunk_size, fp32_wgrad,
    backend."""
    hidden, weight, bias, target, stats, entropy = ctx.saved_tensors
    zeros = torch.zeros(hidden.shape[0], dtype=stats.dtype, device=hidden.device)
    incoming = torch.stack([
        zeros if grad_logp is None else grad_logp.to(stats.dtype),
        zeros if grad_entropy is None else grad_entropy.to(stats.dtype),
    ])  # fmt: skip
    scaled, scale = row_scale(incoming)
    backward = dict(dentropy=None if grad_entropy is None else scaled[1],
                    entropy=None if grad_entropy is None else entropy, logprob=True)  # fmt: skip
    if ctx.chunk_size is None:  # vocabulary slabs: d_weight final, the others still to scale
        grads = slab_grads(hidden, weight, bias, target, ctx.opts, ctx.backend,
                           ctx.needs_input_grad[:3], stats, scaled[0], scale,
                           **backward)  # fmt: skip
        return grads, (scale, None, scale), 1.0
    grads, w_scale = _linear_xent_grads(
        hidden, weight, bias, target, ctx.opts, ctx.chunk_size, ctx.fp32_wgrad, ctx.backend,
        ctx.needs_input_grad[:3], stats=stats, dloss=scaled[0], **backward,
    )  # fmt: skip
    return grads, scale, w_scale


# --------------------------------------------------------------------------------------------
# Knowledge distillation
# --------------------------------------------------------------------------------------------

# Rows of the per-row statistics the distillation backends keep for their backward (the layout
# is the backend's own; kernels/distill.py's docstring says what the kernels keep).
DISTILL_STATS = 7


def distill_outputs(logits):
    """The per-row loss and the (7, N) statistics of a distillation backend."""
    dtype, n_rows = _loss_dtype(logits), logits.shape[0]
    return _alloc.empty((n_rows,), dtype, logits.device), _alloc.empty(
        (DISTILL_STATS, n_rows), dtype, logits.device
    )


def distill_denominator(target, opts, n_rows, dtype, device) -> torch.Tensor:
    """What "mean" divides by: the positions whose target is not ``ignore_index`` (all of them
    without a target); a device tensor (no host synchronisation)."""
    if target is None:
        return torch.full((), float(n_rows), dtype=dtype, device=device)
    return (target != opts.ignore_index).sum().to(dtype)


def distill_no_grad(student, teacher, target, opts, reduction, backend):
    """The loss alone: one read of both logits (two for the JSD's long rows), nothing written."""
    loss, stats = distill_outputs(student)
    backend.distill_forward(student, teacher, target, opts, loss, stats)
    den = None
    if reduction == "mean":
        den = distill_denominator(target, opts, student.shape[0], loss.dtype, student.device)
    return _reduce(loss, reduction, den)


class DistillationFunction(torch.autograd.Function):
    """soft_weight * D(P_t, P_s) + hard_weight * CE of (N, V) student logits against teacher
    logits (no gradient to the teacher).

    The schedules, as :class:`CrossEntropyFunction`'s: "mean"/"sum" (not in place) write the
    gradient in the forward for an incoming gradient of 1 (over the "mean" denominator), and the
    backward keeps it when the incoming gradient is 1 (checked on the device) or recomputes it from
    the logits; "none" and every in-place call keep seven floats per row and make the gradient in
    the backward, into the student's own storage with ``inplace_backward``.
    """

    @staticmethod
    def forward(ctx, student, teacher, target, opts, reduction, inplace_backward, backend):
        ctx.backend, ctx.opts, ctx.reduction = backend, opts, reduction
        ctx.inplace_backward, ctx.consumed = inplace_backward, False
        ctx.fused = reduction != "none" and not inplace_backward
        loss, stats = distill_outputs(student)
        den = None
        if reduction == "mean":
            den = distill_denominator(target, opts, student.shape[0], loss.dtype, student.device)
        grad = grad_scale = None
        if ctx.fused:
            grad = _alloc.grad_like(student)
            if den is not None:
                grad_scale = over_den(torch.ones((), dtype=loss.dtype, device=den.device), den)
        backend.distill_forward(student, teacher, target, opts, loss, stats, grad, grad_scale)
        ctx.save_for_backward(student, teacher, target, stats, den, grad)
        return _reduce(loss, reduction, den)

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward()
        if ctx.fused or ctx.inplace_backward:
            why = "its gradient is computed in the forward and handed out once. Call the loss "
            why += "again, or use reduction='none'."
            if ctx.inplace_backward:
                why = "with inplace_backward=True the first backward overwrote the student's "
                why += "logits with their gradient. Use inplace_backward=False to backward twice."
            _refuse_second_backward(ctx, "distillation_loss", why)
        student, teacher, target, stats, den, grad = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        if ctx.inplace_backward:
            grad = student
        elif grad is None:
            grad = _alloc.grad_like(student)
        ctx.backend.distill_backward(student, teacher, target, ctx.opts, stats, grad_loss, grad,
                                     ctx.reduction, den, ctx.fused)  # fmt: skip
        if ctx.inplace_backward:
            torch.autograd.graph.increment_version(student)
        return grad, None, None, None, None, None, None


def linear_distill_rows(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, target, opts,
                        chunk_size, backend, grads=None, w_scale=1.0, dloss=None,
                        stats=None):  # fmt: skip
    """The distillation of ``s_hidden @ s_weight.T + s_bias`` against the teacher's product, one
    chunk of rows at a time: the teacher's chunk under no_grad, never a full logit matrix.

    Without ``grads``: the per-row losses and statistics. With ``grads`` (the accumulators of
    :func:`linear_grad_buffers`): the forward's (``dloss`` None: the gradient of the per-row
    losses, written over each student chunk and accumulated) or the backward's (``dloss`` the
    per-row incoming gradient, ``stats`` the forward's). Returns (loss, stats) (None in the
    backward)."""
    n_rows = s_hidden.shape[0]
    loss = None
    if dloss is None:
        loss, stats = distill_outputs(s_hidden)
    for start, end in _chunks(n_rows, chunk_size):
        rows = slice(start, end)
        student = _chunk_logits(s_hidden, s_weight, s_bias, start, end)
        with torch.no_grad():
            teacher = _chunk_logits(t_hidden, t_weight, t_bias, start, end)
        part = _part(target, rows)
        if dloss is None:
            grad = student if grads is not None else None
            backend.distill_forward(student, teacher, part, opts, loss[rows], stats[:, rows], grad)
        else:
            backend.distill_backward(student, teacher, part, opts, stats[:, rows], dloss[rows],
                                     student)  # fmt: skip
        if grads is not None:
            # student now holds d(loss)/d(logits) of this chunk.
            accumulate_chunk_grads(grads, student, s_hidden, s_weight, rows, start == 0, w_scale)
    if grads is not None and n_rows == 0:
        zero_unwritten(grads)
    return loss, stats


class LinearDistillationFunction(torch.autograd.Function):
    """The distillation loss of ``s_hidden @ s_weight.T + s_bias`` (N, V) against
    ``t_hidden @ t_weight.T + t_bias`` (N, V; the teacher's hidden size may differ), over chunks of
    rows, gradients to the student's three tensors only.

    As :class:`LinearCrossEntropyFunction`: each student chunk is turned in place into the
    gradient of its per-row losses and accumulated in float32 (d_hidden, d_weight, d_bias), each
    gradient rounded once to its parameter's dtype after the incoming gradient and the "mean"
    denominator are applied. "mean"/"sum": in the forward (the accumulators live until the
    backward); "none": the backward recomputes both chunks of logits from the forward's per-row
    statistics with the incoming gradients over a power of two (:func:`row_scale`).
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, target, opts,
                reduction, chunk_size, backend):  # fmt: skip
        ctx.opts, ctx.chunk_size, ctx.backend, ctx.reduction = opts, chunk_size, backend, reduction
        ctx.dtypes = _param_dtypes(s_hidden, s_weight, s_bias)
        ctx.fused = reduction != "none"
        den = None
        args = (s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, target, opts, chunk_size,
                backend)  # fmt: skip
        if ctx.fused:
            grads = linear_grad_buffers(s_hidden, s_weight, s_bias, ctx.needs_input_grad[:3], True)
            ctx.w_scale = weight_sum_scale(grads[1], s_hidden.shape[0])
            loss, _ = linear_distill_rows(*args, grads=grads, w_scale=ctx.w_scale)
            if reduction == "mean":
                den = distill_denominator(target, opts, loss.shape[0], loss.dtype, loss.device)
            save_forward_grads(ctx, (*grads, den))
        else:
            loss, stats = linear_distill_rows(*args)
            ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, target,
                                  stats)  # fmt: skip
        return _reduce(loss, reduction, den)

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward()
        if ctx.fused:
            *grads, den = take_forward_grads(ctx, "linear_distillation_loss")
            scale, w_scale = over_den(grad_loss, den), ctx.w_scale
        else:
            s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, target, stats = (
                ctx.saved_tensors
            )
            dloss, scale = row_scale(grad_loss)
            grads = linear_grad_buffers(s_hidden, s_weight, s_bias, ctx.needs_input_grad[:3], True)
            w_scale = weight_sum_scale(grads[1], s_hidden.shape[0])
            linear_distill_rows(
                s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, target, ctx.opts,
                ctx.chunk_size, ctx.backend, grads=grads, w_scale=w_scale, dloss=dloss, stats=stats,
            )  # fmt: skip
        grads = finish_linear_grads(grads, scale, ctx.dtypes, w_scale)
        return (*grads, None, None, None, None, None, None, None, None)


# --------------------------------------------------------------------------------------------
# The fused linear forms by vocabulary slabs (the default): never the whole logits, no V x D
# accumulator
# --------------------------------------------------------------------------------------------
#
# The forward sweeps the head in slabs of rows W_s (a few thousand classes): each slab's logits
# h W_s^T (N x V_s) go through the cross-entropy kernel as one slice of a vocabulary (the
# vocabulary-parallel options: class_offset, n_classes), and the slices' statistics are merged
# row by row (_SlabMerge: the combine of fused_xent.distributed, streamed), then discarded. The
# backward sweeps the slabs again: it recomputes a slab's logits, the kernel turns them in place
# into their gradient from the whole rows' statistics, and two products make d_weight[slab] =
# dS^T h (summed over all N inside one product: written once, rounded once, no accumulator) and
# add dS W_s to a float32 d_hidden. Four products (8 N D V flops) against the row chunks' three,
# for memory: the weight gradient itself, a float32 d_hidden, the input gradient, a few floats a
# row and one slab of logits (min(N V b / 16, SLAB_BYTES)).

SLAB_BYTES = 64 << 20  # logits in flight at most (the kernels' path; see pick_vocab_slab)
_SLAB_MULTIPLE = 128  # classes: tile-friendly products, 16-byte rows
_SLAB_MIN_LOGITS = 1 << 14


def pick_vocab_slab(n_rows: int, vocab: int, dtype: torch.dtype, kernels: bool) -> int:
    """Classes per slab, from the shapes alone: a slab's logits take at most a sixteenth of the
    whole logits and at most ``SLAB_BYTES`` (off the kernels counted as the reference's eight
    float32 copies a logit), but at least 2**14 logits; a multiple of 128 classes where that
    fits, at least 8."""
    size = dtype.itemsize
    budget = min(n_rows * vocab * size // 16, SLAB_BYTES)
    per_logit = size if kernels else _REFERENCE_COPIES * max(size, 4)
    classes = budget // max(n_rows * per_logit, 1)
    # At least 2**14 logits a slab: a small call takes one or a few slabs (per-slab launches and
    # products cost more than their logits there), within the bound's 1 MiB of slack.
    classes = max(classes, _SLAB_MIN_LOGITS // max(n_rows, 1))
    if classes >= _SLAB_MULTIPLE:
        classes -= classes % _SLAB_MULTIPLE
    return max(8, min(classes, vocab))


def _slabs(vocab: int, slab: int):
    return [(s, min(s + slab, vocab)) for s in range(0, vocab, slab)]


def _slab_opts(opts, start: int, end: int, vocab: int):
    """The options of classes [start, end) of ``vocab`` (this rank's slice where ``opts`` hold
    one: its ``class_offset`` and ``n_classes``), as one slice of a sharded vocabulary (the z-loss
    added once, to the merged rows)."""
    weight = None if opts.weight is None else opts.weight[start:end]
    n_classes = vocab if opts.n_classes is None else opts.n_classes
    return dataclasses.replace(opts, weight=weight, class_offset=opts.class_offset + start,
                               n_classes=n_classes, lse_square_scale=0.0)  # fmt: skip


def _slab_logits(hidden, weight, bias, start, end):
    w = weight[start:end]
    if bias is None:
        return hidden @ w.t()
    return torch.addmm(bias[start:end], hidden, w.t())


def _slab_target(target, start, end):
    return target[:, start:end] if target.is_floating_point() else target


class _SlabMerge:
    """The whole rows' loss and statistics from their slices', one slice at a time.

    With ``m`` the running reference (the largest slice lse so far, 0 while none is finite):
    ``s = sum_r exp(lse_r - m)``, ``acc = sum_r loss_r - A_r (lse_r - m)`` (a slice without share,
    ``A_r = 0``, adds its loss alone, even where its lse is -inf), ``A = sum_r A_r``; the entropy
    ``T = sum_r e_r (H_r - (lse_r - m))``, ``e_r = exp(lse_r - m)``, so that ``H = T / s + log s``;
    and the argmax, the first slice's on ties. Moving ``m`` rescales ``s`` and ``T`` and adds
    ``A`` times the move to ``acc``. In the end: ``lse = m + log s``, ``loss = acc + A log s``
    (plus the z-loss), as ``fused_xent.distributed.combine`` gives for ranks."""

    def __init__(self, n_rows, dtype, device, entropy: bool, predicted: bool) -> None:
        def zeros():
            return torch.zeros(n_rows, dtype=dtype, device=device)

        self.m, self.s, self.acc, self.a = zeros(), zeros(), zeros(), zeros()
        self.t = zeros() if entropy else None
        self.best = torch.full((n_rows,), float("-inf"), dtype=dtype, device=device)
        self.idx = torch.zeros(n_rows, dtype=torch.int64, device=device) if predicted else None

    def add(self, loss_r, stats_r, entropy_r=None, predicted_r=None) -> None:
        lse_r = stats_r[0] + stats_r[1]
        m_old, s_old = self.m, self.s
        m = torch.maximum(m_old, torch.where(lse_r == float("-inf"), m_old, lse_r))
        move = m - m_old
        shrink = torch.exp(-move)
        self.s = torch.where(s_old == 0, 0.0, s_old * shrink) + torch.exp(lse_r - m)
        rel = lse_r - m
        self.acc = (
            self.acc
            + torch.where(self.a == 0, 0.0, self.a * move)
            + loss_r
            - torch.where(stats_r[2] == 0, 0.0, stats_r[2] * rel)
        )
        self.a = self.a + stats_r[2]
        if self.t is not None:
            moved = torch.where(s_old == 0, 0.0, shrink * (self.t + s_old * move))
            e = torch.exp(rel)
            self.t = moved + torch.where(e > 0, e * (entropy_r - rel), 0.0)
        if self.idx is not None:
            local_max = torch.where(stats_r[1] == float("-inf"), float("-inf"), stats_r[0])
            self.idx = torch.where(local_max > self.best, predicted_r, self.idx)
            self.best = torch.maximum(self.best, local_max)
        self.m = m

    def finish(self, target, opts):
        """(loss, stats (max, log-sum, coefficient), entropy or None, predicted or None)."""
        log_sum = self.s.log()
        lse = self.m + log_sum
        z2 = opts.lse_square_scale
        loss = self.acc + torch.where(self.a == 0, 0.0, self.a * log_sum)
        coef = self.a
        if z2 != 0.0:
            loss = loss + z2 * lse * lse
            coef = coef + 2.0 * z2 * lse
        if not target.is_floating_point():
            loss = torch.where(target == opts.ignore_index, 0.0, loss)
        entropy = None
        if self.t is not None:
            entropy = self.t / self.s + log_sum
            entropy = torch.where(self.s == 0, 0.0, torch.where(entropy < 0, 0.0, entropy))
        return loss, torch.stack([self.m, log_sum, coef]), entropy, self.idx


def slab_sweep(hidden, weight, bias, target, opts, backend, entropy=False, predicted=False):
    """The forward sweep over the head's slabs: the :class:`_SlabMerge` of their rows (its
    ``finish`` gives the whole rows'; its ``best`` is their largest logit, -inf where none is
    finite, tracked with ``predicted``)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    slab = pick_vocab_slab(n_rows, vocab, hidden.dtype, backend.impl == "triton")
    merge = _SlabMerge(n_rows, _loss_dtype(hidden), hidden.device, entropy, predicted)
    for start, end in _slabs(vocab, slab):
        logits = _slab_logits(hidden, weight, bias, start, end)
        loss_r, stats_r = _row_outputs(logits)
        token = token_stats_outputs(logits) if entropy or predicted else (None, None)
        if not predicted:
            token = (token[0], None)
        backend.xent_forward(logits, _slab_target(target, start, end),
                             _slab_opts(opts, start, end, vocab), loss_r, stats_r,
                             entropy=token[0], predicted=token[1])  # fmt: skip
        merge.add(loss_r, stats_r, *token)
        del logits
    return merge


def slab_loss_rows(hidden, weight, bias, target, opts, backend, entropy=False, predicted=False):
    """Per-row loss (of the class-index or probability target; not weighted by a token weight),
    statistics of the whole rows (max, log-sum, coefficient), entropy and argmax (None where not
    asked for): the forward sweep over the head's slabs."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if opts.n_classes is None and vocab <= pick_vocab_slab(
        n_rows, vocab, hidden.dtype, backend.impl == "triton"
    ):
        # One slab (a short call): the kernel's rows are the whole rows, nothing to merge.
        logits = _slab_logits(hidden, weight, bias, 0, vocab)
        loss, stats = _row_outputs(logits)
        ent, pred = token_stats_outputs(logits) if entropy or predicted else (None, None)
        pred = pred if predicted else None
        backend.xent_forward(logits, target, opts, loss, stats, entropy=ent, predicted=pred)
        return loss, stats, ent, pred
    merge = slab_sweep(hidden, weight, bias, target, opts, backend, entropy, predicted)
    return merge.finish(target, opts)


def slab_grads(hidden, weight, bias, target, opts, backend, need, stats, dloss, scale,
               target_grad=None, **backward):  # fmt: skip
    """The backward sweep of the cross-entropy (:func:`slab_products`) for the per-row incoming
    gradient ``dloss * scale`` (``dloss`` at most 1 in magnitude, ``scale`` a power of two on the
    device: :func:`row_scale`); ``target_grad`` (N, V) receives d(loss)/d(probability target)
    over ``scale``."""
    vocab = weight.shape[0]
    wants = any(need)

    def to_grad(logits, start, end):
        backend.xent_backward(
            logits, _slab_target(target, start, end), _slab_opts(opts, start, end, vocab), stats,
            dloss, logits if wants else None,
            target_grad=None if target_grad is None else target_grad[:, start:end], **backward,
        )  # fmt: skip

    slab = pick_vocab_slab(hidden.shape[0], vocab, hidden.dtype, backend.impl == "triton")
    return slab_products(hidden, weight, bias, need, scale, slab, to_grad)


def slab_products(hidden, weight, bias, need, scale, slab, to_grad):
    """The backward sweep over the head's slabs of ``slab`` classes: (d_hidden float32, d_weight,
    d_bias float32), each None where not wanted. ``to_grad(logits, start, end)`` turns a slab's
    recomputed logits in place into d(loss)/d(logits) over ``scale`` (a power of two on the
    device). d_weight is final: each slab's rows are one product, rounded once into the weight's
    dtype, then multiplied by the power of two (exact), a slab at a time (on the CPU a
    mixed-dtype product makes a float32 temporary of its size); d_hidden and d_bias are still to
    be multiplied by ``scale`` and rounded."""
    need_h, need_w, need_b = need
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    d_hidden = (
        _alloc.empty(hidden.shape, _accumulator_dtype(hidden.dtype), device) if need_h else None
    )
    d_weight = _alloc.empty(weight.shape, weight.dtype, device) if need_w else None
    d_bias = None
    if need_b and bias is not None:
        d_bias = _alloc.empty((vocab,), _accumulator_dtype(weight.dtype), device)
    # (1,)-shaped: it takes part in type promotion, so the product runs in float32.
    w_factor = scale.to(torch.float32).reshape(1)
    # float16: the slab's product in float32 first (its sum over N of gradients at most 1 can
    # leave float16's range, or flush entries that the power of two would have kept).
    w_half = d_weight is not None and d_weight.dtype == torch.float16
    for start, end in _slabs(vocab, slab):
        logits = _slab_logits(hidden, weight, bias, start, end)
        to_grad(logits, start, end)
        # logits now hold d(loss)/d(logits) of this slab.
        if d_hidden is not None:
            _accumulate_mm(d_hidden, logits, weight[start:end], first=start == 0)
        if d_weight is not None:
            d_w = d_weight[start:end]
            if w_half:
                acc = torch.empty(d_w.shape, dtype=torch.float32, device=device)
                _accumulate_mm(acc, logits.t(), hidden, first=True)
                torch.mul(acc, w_factor, out=d_w)
            else:
                torch.addmm(d_w, logits.t(), hidden, beta=0, out=d_w)
                torch.mul(d_w, w_factor, out=d_w)
        if d_bias is not None:
            torch.sum(logits, dim=0, dtype=d_bias.dtype, out=d_bias[start:end])
        del logits
    if vocab == 0 or n_rows == 0:
        zero_unwritten((d_hidden, d_weight, d_bias))
    return d_hidden, d_weight, d_bias


def _slab_forward(hidden, weight, bias, target, opts, reduction, backend, row_weight,
                  return_stats):  # fmt: skip
    """The forward sweep's per-row loss (times the token weight), statistics, "mean"
    denominator (None otherwise), entropy and argmax (None without ``return_stats``)."""
    loss, stats, entropy, predicted = slab_loss_rows(
        hidden, weight, bias, target, opts, backend, return_stats, return_stats
    )
    den = None
    if reduction == "mean":
        den = mean_denominator(target, opts, weight.shape[0], loss.dtype)
    if row_weight is not None:
        loss = loss * row_weight.to(loss.dtype)
    return loss, stats, den, entropy, predicted


class SlabLinearCrossEntropyFunction(torch.autograd.Function):
    """cross_entropy(hidden @ weight.T + bias, target) by vocabulary slabs (the default plan).

    The forward keeps the per-row statistics of the whole rows; the backward recomputes each
    slab's logits with the per-row incoming gradient (the reduction's, over the "mean"
    denominator, times the token weight) over a power of two (:func:`row_scale`), and each
    gradient is rounded to its parameter's dtype once (d_weight in its product, then the power
    of two, exact). Never anything of size N x V, nor V x D beyond the weight gradient itself.

    ``rows(hidden, weight, bias, target, opts, reduction, backend, row_weight, return_stats) ->
    (loss, stats, den, entropy, predicted)`` is how the forward gets them (default
    :func:`_slab_forward`), and ``sum_hidden(acc)`` sums the float32 hidden-state accumulator over
    the ranks in place (a head sharded by rows: ``fused_xent.distributed``), as in
    :class:`LinearTokenLogprobFunction`; the rest is the same either way."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, opts, reduction, backend, row_weight=None,
                return_stats=False, rows=None, sum_hidden=None):  # fmt: skip
        loss, stats, den, entropy, predicted = (rows or _slab_forward)(
            hidden, weight, bias, target, opts, reduction, backend, row_weight, return_stats
        )
        ctx.opts, ctx.reduction, ctx.backend, ctx.sum_hidden = opts, reduction, backend, sum_hidden
        ctx.dtypes = _param_dtypes(hidden, weight, bias)
        ctx.save_for_backward(hidden, weight, bias, target, stats, den, row_weight)
        extra = (lse_of(stats), *((entropy, predicted) if return_stats else ()))
        ctx.mark_non_differentiable(*extra)
        return (_reduce(loss, reduction, den), *extra)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        refuse_double_backward()
        hidden, weight, bias, target, stats, den, row_weight = ctx.saved_tensors
        if ctx.reduction != "none":
            grad_loss = over_den(grad_loss, den).expand(hidden.shape[0])
        if row_weight is not None:
            grad_loss = grad_loss * row_weight.to(grad_loss.dtype)
        dloss, scale = row_scale(grad_loss)
        want_dt = ctx.needs_input_grad[3]
        d_target = _alloc.empty(target.shape, target.dtype, target.device) if want_dt else None
        grads = slab_grads(hidden, weight, bias, target, ctx.opts, ctx.backend,
                           ctx.needs_input_grad[:3], stats, dloss, scale, d_target)  # fmt: skip
        if d_target is not None:
            d_target.mul_(scale.to(d_target.dtype))  # a power of two: exact
        scales = sum_hidden_grad(grads, (scale, None, scale), ctx.sum_hidden)
        grads = finish_linear_grads(grads, scales, ctx.dtypes)
        return (*grads, d_target, None, None, None, None, None, None, None)


def sum_hidden_grad(grads, scales, sum_hidden):
    """The per-gradient scales still to apply (:func:`finish_linear_grads`), after the float32
    d_hidden accumulator, if any, is summed over the ranks by ``sum_hidden`` (None: unsharded,
    nothing to do): each rank's share at its own scale first (a power of two: exact; the ranks'
    incoming gradients may differ), then the sum, rounded once afterwards."""
    if sum_hidden is None:
        return scales
    if grads[0] is not None:
        if scales[0] is not None:
            grads[0].mul_(scales[0])
        sum_hidden(grads[0])
    return (None, *scales[1:])


def slab_forward_no_grad(hidden, weight, bias, target, opts, reduction, backend, row_weight=None,
                         return_stats=False, rows=None):  # fmt: skip
    """(loss, lse) alone (and entropy, predicted with ``return_stats``): one sweep (``rows`` as
    in :class:`SlabLinearCrossEntropyFunction`)."""
    loss, stats, den, entropy, predicted = (rows or _slab_forward)(
        hidden, weight, bias, target, opts, reduction, backend, row_weight, return_stats
    )
    extra = (entropy, predicted) if return_stats else ()
    return (_reduce(loss, reduction, den), lse_of(stats), *extra)


def logprob_outputs(loss, entropy, target, opts):
    """log p(target) and the entropy from whole rows' loss and entropy (of slices merged, or of
    ranks combined): log p <= 0 (a row whose target holds all the probability can round to
    -1e-8; NaN stays), 0 on ignored rows; the entropy masked like it (0 on ignored rows, NaN
    where the target is invalid), as the kernels' log-prob mode gives them."""
    logp = 0.0 - loss  # ignored rows: +0
    logp = torch.where(logp > 0, 0.0, logp)
    if entropy is not None:
        entropy = torch.where(target == opts.ignore_index, 0.0, entropy)
        entropy = torch.where(torch.isnan(loss), float("nan"), entropy)
    return logp, entropy


def slab_token_rows(hidden, weight, bias, target, opts, chunk_size, backend, return_entropy):
    """(log p(target), statistics, entropy or None) of hidden @ weight.T + bias by vocabulary
    slabs (``chunk_size`` unused: the rows of :class:`LinearTokenLogprobFunction`'s default)."""
    loss, stats, entropy, _ = slab_loss_rows(hidden, weight, bias, target, opts, backend,
                                             return_entropy)  # fmt: skip
    logp, entropy = logprob_outputs(loss, entropy, target, opts)
    return logp, stats, entropy


# The distillation by vocabulary slabs (the default of linear_distillation_loss): two heads, and
# the divergence needs both normalised softmaxes, so the forward sweeps the slabs twice (the
# log-sum-exps of both heads, then the divergence's sums from the whole rows' log-probabilities)
# and the backward a third time. Each slab's two logit matrices are float32 (float64) copies
# through torch's elementwise ops (reference.divergence_sums / divergence_grad: the reference's
# own math, on columns), so a slab is counted as the reference path's temporaries, for two heads.

_DISTILL_STATS = 6  # lse_s, lse_t (at the temperature), lse_1 (at 1), z[target], D, KL(P_s||M)


def _distill_slab(n_rows, vocab, dtype):
    """A half of the cross-entropy's slab (two heads), not below its least (2**14 logits)."""
    slab = pick_vocab_slab(n_rows, vocab, dtype, False)
    return slab if slab * n_rows <= _SLAB_MIN_LOGITS else max(8, slab // 2)


def _distill_rows_target(target, opts, vocab, backend):
    """(ignored or None, the hard term's column or None, invalid rows or None): a target outside
    [0, V) that is not ignored raises on the host paths (as the reference) and gives the row NaN
    on the kernels' (as kernels/distill.py, without a host read) and under torch.compile (where a
    host read would break the graph)."""
    host = backend.impl != "triton" and not torch.compiler.is_compiling()
    return reference.distill_target_rows(target, opts, vocab, host)


def _distill_slab_logits(heads, start, end, dtype, temperature):
    """The student's and the teacher's logits of classes [start, end) in ``dtype``: (z_s, z_s / T,
    z_t / T), the student's own-dtype product first (the backward turns it into its gradient)."""
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = heads
    raw = _slab_logits(s_hidden, s_weight, s_bias, start, end)
    z_t = _slab_logits(t_hidden, t_weight, t_bias, start, end).to(dtype)
    z_s = raw.to(dtype)
    if temperature != 1.0:
        return raw, z_s, z_s / temperature, z_t.div_(temperature)
    return raw, z_s, z_s, z_t


def slab_distill_rows(heads, target, opts, backend, entropy=False):
    """The per-row loss (0 on ignored rows) and the whole rows' statistics (``_DISTILL_STATS``
    rows) of the distillation of the student's head against the teacher's: two sweeps over the
    heads' slabs, neither logit matrix ever whole. With ``entropy`` also the student's entropy
    at the temperature (from the second sweep's log-probabilities; None otherwise)."""
    s_hidden, s_weight = heads[0], heads[1]
    n_rows, vocab = s_hidden.shape[0], s_weight.shape[0]
    dtype = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
    device, temperature = s_hidden.device, opts.temperature
    ignored, col, bad = _distill_rows_target(target, opts, vocab, backend)
    slab = _distill_slab(n_rows, vocab, s_hidden.dtype)
    stats = torch.full((_DISTILL_STATS, n_rows), float("-inf"), dtype=dtype, device=device)
    lse_s, lse_t, lse_1, z_y, div, kl_s = stats
    z_y.zero_(), div.zero_(), kl_s.zero_()
    ent = torch.zeros(n_rows, dtype=dtype, device=device) if entropy else None
    hard = col is not None
    slabs = _slabs(vocab, slab)
    for start, end in slabs:  # the log-sum-exps, and the target's logit
        _, z_s, zs_t, zt_t = _distill_slab_logits(heads, start, end, dtype, temperature)
        torch.logaddexp(lse_s, zs_t.logsumexp(dim=1), out=lse_s)
        torch.logaddexp(lse_t, zt_t.logsumexp(dim=1), out=lse_t)
        if hard:
            if temperature != 1.0:
                torch.logaddexp(lse_1, z_s.logsumexp(dim=1), out=lse_1)
            here = (col >= start) & (col < end)
            picked = z_s.gather(1, (col - start).clamp(0, end - start - 1)[:, None]).squeeze(1)
            z_y.copy_(torch.where(here, picked, z_y))
    if hard and temperature == 1.0:
        lse_1.copy_(lse_s)
    for start, end in slabs:  # the divergence, from the whole rows' lse
        if len(slabs) > 1:  # (one slab: the logits of the first sweep)
            _, _, zs_t, zt_t = _distill_slab_logits(heads, start, end, dtype, temperature)
        log_ps = zs_t - lse_s[:, None]
        d, k = reference.divergence_sums(log_ps, zt_t - lse_t[:, None], opts.beta)
        div.add_(d)
        if k is not None:
            kl_s.add_(k)
        if ent is not None:
            ent.sub_(reference._xlogy_diff(log_ps.exp(), log_ps, 0.0))
    loss = opts.soft_weight * div
    if hard:
        loss = loss - opts.hard_weight * (z_y - lse_1)
    if bad is not None:
        loss = torch.where(bad, float("nan"), loss)
    if ignored is not None:
        loss = loss.masked_fill(ignored, 0.0)
    if ent is not None:
        ent = ent.clamp_min(0.0).to(_loss_dtype(s_hidden))
        if ignored is not None:
            ent = ent.masked_fill(ignored, 0.0)
    return loss.to(_loss_dtype(s_hidden)), stats, ent


def slab_distill_grads(heads, target, opts, backend, need, stats, dloss, scale):
    """The backward sweep (:func:`slab_products`) of :func:`slab_distill_rows` for the per-row
    incoming gradient ``dloss * scale`` (:func:`row_scale`)."""
    s_hidden, s_weight = heads[0], heads[1]
    n_rows, vocab = s_hidden.shape[0], s_weight.shape[0]
    dtype, temperature = stats.dtype, opts.temperature
    ignored, col, bad = _distill_rows_target(target, opts, vocab, backend)
    lse_s, lse_t, lse_1, _, div, kl_s = stats
    dloss = dloss.to(dtype)
    soft = (opts.soft_weight / temperature * dloss)[:, None]
    zero = dloss == 0
    if ignored is not None:
        zero = zero | ignored
    zero = zero[:, None]

    def to_grad(logits, start, end):
        _, z_s, zs_t, zt_t = _distill_slab_logits(heads, start, end, dtype, temperature)
        log_ps, log_pt = zs_t - lse_s[:, None], zt_t - lse_t[:, None]
        grad = reference.divergence_grad(log_ps, log_pt, opts.beta, div, kl_s).mul_(soft)
        if col is not None:  # the hard term, at temperature 1
            p1 = (z_s - lse_1[:, None]).exp_()
            here = (col >= start) & (col < end)
            p1.scatter_add_(1, (col - start).clamp(0, end - start - 1)[:, None],
                            -here.to(dtype)[:, None])  # fmt: skip
            grad.add_(p1.mul_((opts.hard_weight * dloss)[:, None]))
            if bad is not None:
                grad.masked_fill_(bad[:, None], float("nan"))
        logits.copy_(grad.masked_fill_(zero, 0.0))

    slab = _distill_slab(n_rows, vocab, s_hidden.dtype)
    return slab_products(s_hidden, s_weight, heads[2], need, scale, slab, to_grad)


class SlabLinearDistillationFunction(torch.autograd.Function):
    """The distillation of the student's head against the teacher's by vocabulary slabs (the
    default plan): the forward keeps six floats a row, the backward recomputes each slab of both
    heads with the per-row incoming gradient over a power of two; gradients to the student's three
    tensors only, each rounded once to its parameter's dtype."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, target, opts,
                reduction, backend, return_entropy=False):  # fmt: skip
        heads = (s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)
        loss, stats, entropy = slab_distill_rows(heads, target, opts, backend, return_entropy)
        den = None
        if reduction == "mean":
            den = distill_denominator(target, opts, loss.shape[0], loss.dtype, loss.device)
        ctx.opts, ctx.reduction, ctx.backend = opts, reduction, backend
        ctx.dtypes = _param_dtypes(s_hidden, s_weight, s_bias)
        ctx.save_for_backward(*heads, target, stats, den)
        if entropy is None:
            return _reduce(loss, reduction, den)
        ctx.mark_non_differentiable(entropy)
        return _reduce(loss, reduction, den), entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy=None):
        refuse_double_backward()
        *heads, target, stats, den = ctx.saved_tensors
        if ctx.reduction != "none":
            grad_loss = over_den(grad_loss, den).expand(heads[0].shape[0])
        dloss, scale = row_scale(grad_loss)
        grads = slab_distill_grads(heads, target, ctx.opts, ctx.backend,
                                   ctx.needs_input_grad[:3], stats, dloss, scale)  # fmt: skip
        grads = finish_linear_grads(grads, (scale, None, scale), ctx.dtypes)
        return (*grads, None, None, None, None, None, None, None, None)
