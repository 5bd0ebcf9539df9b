"""The autograd Function behind ``fused_xent.cross_entropy``: no kernel code, no reference code.

It drives a *backend* (``fused_xent.kernels.xent`` or ``fused_xent.reference``), both of which
offer ``xent_prologue``, ``xent_forward``, ``xent_backward`` and ``scale_grad_`` with one
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

import torch

from . import _alloc


def _loss_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _mean_denominator(target, opts, n_cols, dtype) -> torch.Tensor:
    """What "mean" divides by, as torch does; stays on the device (no host synchronisation)."""
    if target.is_floating_point():
        return torch.full((), float(target.shape[0]), dtype=dtype, device=target.device)
    kept = target != opts.ignore_index
    if opts.weight is None:
        return kept.sum().to(dtype)
    # Out-of-range targets are clamped only to keep this gather in bounds; their loss is NaN.
    w_target = opts.weight.to(dtype).gather(0, target.long().clamp(0, n_cols - 1))
    return torch.where(kept, w_target, 0.0).sum()


def _row_outputs(logits):
    """The per-row loss, and the (3, N) statistics the backends write beside it."""
    dtype, n_rows = _loss_dtype(logits), logits.shape[0]
    return _alloc.empty((n_rows,), dtype, logits.device), _alloc.empty(
        (3, n_rows), dtype, logits.device
    )


def lse_of(stats):
    """The per-row log-sum-exp from the backends' statistics (max + log-sum)."""
    return stats[0] + stats[1]


def _forward(logits, target, opts, reduction, backend, grad=None):
    """The forward launches: (loss, per-row stats, "mean" denominator or None)."""
    loss, stats = _row_outputs(logits)
    if reduction == "none":
        backend.xent_forward(logits, target, opts, loss, stats, grad)
        return loss, stats, None
    device, dtype = logits.device, loss.dtype
    total, den = _alloc.empty((), dtype, device), _alloc.empty((), dtype, device)
    counter = torch.empty((), dtype=torch.int32, device=device)
    backend.xent_prologue(target, opts, logits.shape[1], reduction, den, counter)
    backend.xent_forward(logits, target, opts, loss, stats, grad, None, reduction, total, den,
                         counter)  # fmt: skip
    return total, stats, den if reduction == "mean" else None


def forward_no_grad(logits, target, opts, reduction, backend):
    """(loss, stats) alone: one read of the logits, no gradient written."""
    loss, stats, _ = _forward(logits, target, opts, reduction, backend)
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


def take_forward_grads(ctx, grad_loss, call: str) -> list:
    """Those gradients scaled by the incoming scalar on the device (nothing moves when it is 1);
    they are handed out once, so a second backward (retain_graph) is refused."""
    _refuse_second_backward(
        ctx, call, "its gradient is computed in the forward and handed out once. Call the loss "
        "again, or use reduction='none' without inplace_backward.",
    )  # fmt: skip
    saved = iter(ctx.saved_tensors)
    grads = [next(saved) if have else None for have in ctx.have]
    for g in grads:
        if g is not None:
            ctx.backend.scale_grad_(g if g.dim() == 2 else g[None], grad_loss)
    return grads


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, opts, reduction, inplace_backward, backend, return_lse):
        ctx.backend, ctx.opts, ctx.reduction = backend, opts, reduction
        ctx.inplace_backward, ctx.consumed = inplace_backward, False
        # The gradient in the forward: for a reduced loss, unless it goes into the logits (which
        # the backward still reads when the incoming gradient is not 1) or a probability target
        # wants one too (written in the backward, beside the logits').
        ctx.fused = reduction != "none" and not inplace_backward and not ctx.needs_input_grad[1]
        grad = _alloc.grad_like(logits) if ctx.fused else None
        loss, stats, den = _forward(logits, target, opts, reduction, backend, grad)
        ctx.save_for_backward(logits, target, stats, den, grad)
        # No zeros are made for the gradient of an output the caller did not use.
        ctx.set_materialize_grads(False)
        if not return_lse:
            return loss
        lse = lse_of(stats)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        refuse_double_backward()
        if grad_loss is None:
            return (None,) * 7
        if ctx.fused:
            why = "its gradient is computed in the forward and handed out once. Call the loss "
            why += "again, or use reduction='none'."
        else:
            why = "with inplace_backward=True the first backward overwrote the logits with their "
            why += "gradient. Use inplace_backward=False to backward twice."
        if ctx.fused or ctx.inplace_backward:
            _refuse_second_backward(ctx, "cross_entropy", why)
        logits, target, stats, den, grad = ctx.saved_tensors
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
                                  den, ctx.fused, target_grad)  # fmt: skip
        if ctx.inplace_backward and want_dx:
            torch.autograd.graph.increment_version(logits)
        return grad, target_grad, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# --------------------------------------------------------------------------------------------

# The logits of one chunk of rows: about this many bytes (128 MiB), so a chunk never holds more
# than a sliver of the (N, V) logits while its matrix products stay large enough to run at speed.
CHUNK_BYTES = 128 << 20
_CHUNK_ROW_MULTIPLE = 128  # keeps the matrix products on tile-friendly sizes


def pick_chunk_size(
    n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, reference: bool = False
) -> int:
    """Rows per chunk: the chunk's (rows, V) logits take about ``CHUNK_BYTES`` (less on a GPU with
    little free memory: at most a sixteenth of it; an eighth of it on the reference path, which
    keeps several float32 copies of a chunk), rounded down to a multiple of 128 rows, at least
    128 rows (or all of them)."""
    budget = CHUNK_BYTES // 8 if reference else CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 16)
    row_bytes = vocab * torch.empty((), dtype=dtype).element_size()
    rows = budget // row_bytes // _CHUNK_ROW_MULTIPLE * _CHUNK_ROW_MULTIPLE
    return max(min(rows, n_rows), min(_CHUNK_ROW_MULTIPLE, n_rows), 1)


_OUT_DTYPE_MM: bool | None = None  # whether torch.addmm(..., out_dtype=, out=) runs on CUDA here


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, accumulating in acc's dtype (float32 for a low-precision weight gradient)."""
    global _OUT_DTYPE_MM
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _OUT_DTYPE_MM is not False:
        try:  # cuBLAS: low-precision inputs, float32 accumulator, no upcast copies
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _OUT_DTYPE_MM = True
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_MM = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunks(n_rows: int, chunk_size: int):
    return [(s, min(s + chunk_size, n_rows)) for s in range(0, n_rows, chunk_size)]


def _chunk_logits(hidden, weight, bias, start, end):
    if bias is None:
        return hidden[start:end] @ weight.t()
    return torch.addmm(bias, hidden[start:end], weight.t())


def linear_loss_rows(hidden, weight, bias, target, opts, chunk_size, backend):
    """Per-row loss and statistics of hidden @ weight.T + bias, one chunk of logits at a time."""
    loss, stats = _row_outputs(hidden)
    for start, end in _chunks(hidden.shape[0], chunk_size):
        logits = _chunk_logits(hidden, weight, bias, start, end)
        backend.xent_forward(logits, target[start:end], opts, loss[start:end], stats[:, start:end])
    return loss, stats


def _reduce(loss, target, opts, n_cols, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / _mean_denominator(target, opts, n_cols, loss.dtype)


def linear_forward_no_grad(hidden, weight, bias, target, opts, reduction, chunk_size, backend):
    """(loss, lse) alone: each chunk's logits are read once, no gradient written."""
    loss, stats = linear_loss_rows(hidden, weight, bias, target, opts, chunk_size, backend)
    return _reduce(loss, target, opts, weight.shape[0], reduction), lse_of(stats)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """cross_entropy(hidden @ weight.T + bias, target) over chunks of rows.

    For "mean"/"sum" with gradients wanted, everything happens in the forward, one chunk at a
    time: the chunk's logits (one matrix product), the kernel turning them in place into the
    gradient of the loss, then that gradient's products into d_hidden (complete per chunk) and
    d_weight / d_bias (accumulated over chunks, in float32 when the weight is half precision
    and ``fp32_weight_grad``). The backward scales them by the incoming scalar on the device.
    For "none" the forward keeps only per-row statistics and the backward recomputes each chunk's
    logits once more.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, target, opts, reduction, chunk_size, fp32_wgrad, backend
    ):
        vocab = weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.backend, ctx.opts, ctx.chunk_size, ctx.fp32_wgrad = (
            backend,
            opts,
            chunk_size,
            fp32_wgrad,
        )
        ctx.fused = reduction != "none"
        if ctx.fused:
            loss, stats = _row_outputs(hidden)
            if reduction == "mean":
                grad_scale = 1.0 / _mean_denominator(target, opts, vocab, loss.dtype)
            else:
                grad_scale = torch.ones((), dtype=loss.dtype, device=hidden.device)
            grads = _linear_xent_grads(
                hidden, weight, bias, target, opts, chunk_size, fp32_wgrad, backend, need_h,
                need_w, need_b, loss=loss, stats=stats, grad_scale=grad_scale,
            )  # fmt: skip
            save_forward_grads(ctx, grads)
        else:
            loss, stats = linear_loss_rows(hidden, weight, bias, target, opts, chunk_size, backend)
            ctx.save_for_backward(hidden, weight, bias, target, stats)
        lse = lse_of(stats)
        ctx.mark_non_differentiable(lse)
        return _reduce(loss, target, opts, vocab, reduction), lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        del grad_lse
        refuse_double_backward()
        if ctx.fused:
            grads = take_forward_grads(ctx, grad_loss, "linear_cross_entropy")
        else:
            hidden, weight, bias, target, stats = ctx.saved_tensors
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            grads = _linear_xent_grads(
                hidden, weight, bias, target, ctx.opts, ctx.chunk_size, ctx.fp32_wgrad,
                ctx.backend, need_h, need_w, need_b, stats=stats, dloss=grad_loss,
            )  # fmt: skip
        return (*grads, None, None, None, None, None, None)


def linear_grad_buffers(hidden, weight, bias, need, fp32_wgrad):
    """d_hidden (row-major whatever the input's layout: the kernels scale it row by row), and the
    d_weight / d_bias accumulators (float32 for a half-precision weight when ``fp32_wgrad``; the
    bias, V floats, always), each None where not wanted."""
    need_h, need_w, need_b = need
    low_precision = weight.dtype in (torch.float16, torch.bfloat16)
    acc_dtype = torch.float32 if (low_precision and fp32_wgrad) else weight.dtype
    d_hidden = _alloc.empty(hidden.shape, hidden.dtype, hidden.device) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
    d_bias = None
    if need_b and bias is not None:
        bias_dtype = torch.float32 if low_precision else weight.dtype
        d_bias = torch.zeros(weight.shape[:1], dtype=bias_dtype, device=weight.device)
    return d_hidden, d_weight, d_bias


def accumulate_chunk_grads(grads, chunk_grad, hidden, weight, rows) -> None:
    """Add one chunk's d(loss)/d(logits) to d_hidden (its rows), d_weight and d_bias."""
    d_hidden, d_weight, d_bias = grads
    if d_hidden is not None:
        torch.mm(chunk_grad, weight, out=d_hidden[rows])
    if d_weight is not None:
        _accumulate_mm(d_weight, chunk_grad.t(), hidden[rows])
    if d_bias is not None:
        d_bias += chunk_grad.sum(dim=0, dtype=d_bias.dtype)


def cast_linear_grads(d_hidden, d_weight, d_bias, weight, bias):
    """The accumulators rounded once to the parameters' dtypes."""
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    if d_bias is not None:
        d_bias = d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias


def _linear_xent_grads(
    hidden, weight, bias, target, opts, chunk_size, fp32_wgrad, backend, need_h, need_w, need_b,
    *, loss=None, stats=None, grad_scale=None, dloss=None,
):  # fmt: skip
    """d_hidden, d_weight, d_bias over chunks of rows.

    With ``loss`` given (the fused forward) each chunk's loss and statistics are written and the
    gradient is scaled by ``grad_scale``; otherwise (the backward of "none") the forward's
    ``stats`` and the incoming per-row ``dloss`` give it.
    """
    grads = linear_grad_buffers(hidden, weight, bias, (need_h, need_w, need_b), fp32_wgrad)
    for start, end in _chunks(hidden.shape[0], chunk_size):
        logits = _chunk_logits(hidden, weight, bias, start, end)
        rows = slice(start, end)
        if loss is not None:
            backend.xent_forward(
                logits, target[rows], opts, loss[rows], stats[:, rows], logits, grad_scale
            )
        else:
            backend.xent_backward(logits, target[rows], opts, stats[:, rows], dloss[rows], logits)
        # logits now hold d(loss)/d(logits) of this chunk.
        accumulate_chunk_grads(grads, logits, hidden, weight, rows)
    return cast_linear_grads(*grads, weight, bias)
