"""Pure-PyTorch cross-entropy: the CPU fallback and the test oracle.

Same contract as the launchers in ``fused_xent.kernels.xent`` (outputs are passed in and written),
so the autograd layer drives either one; the math is stated once, in that module's docstring.
Computes in float32 (float64 for float64 logits). Unlike the kernels, a class-index target outside
``[0, C)`` that is not ``ignore_index`` raises ``IndexError`` here (which reads the targets on the
host).
"""

from __future__ import annotations

import math

import torch

from ._options import mean_denominator, over_den, reduce_total


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(logits: torch.Tensor, target: torch.Tensor, opts):
    """z, the weighted (smoothed) target distribution wt (N, C), and the ignored-row mask."""
    dtype = _compute_dtype(logits.dtype)
    n_cols = logits.shape[1]
    z = logits.to(dtype) * opts.logit_scale
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    w = (
        opts.weight.to(dtype)
        if opts.weight is not None
        else torch.ones(n_cols, dtype=dtype, device=z.device)
    )
    eps = opts.label_smoothing
    # The logits may hold one rank's slice [class_offset, class_offset + n_cols) of n_classes.
    n_classes = opts.n_classes or n_cols
    if target.is_floating_point():
        # Probability targets: every row counts; wt = w * ((1 - eps) t + eps / C).
        wt = w * ((1.0 - eps) * target.to(dtype) + eps / n_classes)
        ignored = torch.zeros(len(z), dtype=torch.bool, device=z.device)
        return z, wt, ignored
    target = target.long()
    ignored = target == opts.ignore_index
    bad = ~ignored & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        first = int(target[bad][0])
        raise IndexError(
            f"target holds {first}, outside [0, {n_classes}) and not "
            f"ignore_index={opts.ignore_index}"
        )
    col = target - opts.class_offset
    here = ~ignored & (col >= 0) & (col < n_cols)
    safe = torch.where(here, col, torch.zeros_like(col))
    # wt = (1 - eps) w_y onehot(y) + eps / C w, as a dense (N, C) matrix (onehot only where the
    # target is among these columns).
    onehot = torch.zeros_like(z).scatter_(
        1, safe[:, None], torch.where(here, (1.0 - eps) * w[safe], 0.0)[:, None]
    )  # scatter_ with one index per row: deterministic under use_deterministic_algorithms
    return z, (eps / n_classes) * w + onehot, ignored


def _stats(z):
    """Row max (0 where the row is all -inf) and log of the sum of exp(z - max)."""
    row_max = z.max(dim=1).values
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
    return row_max, torch.log(torch.exp(z - row_max[:, None]).sum(dim=1))


def _loss_and_coef(z, wt, row_max, log_sum, opts):
    # sum_c wt_c (lse - z_c), shifted by the row max so that large logits do not cancel; a class
    # with no target mass adds nothing, even where its logit is -inf.
    z_rel = torch.where(wt == 0, 0.0, z - row_max[:, None])
    sum_wt = wt.sum(dim=1)
    lse = row_max + log_sum
    # A row with no target mass here (sum_wt = 0: the target in another rank's slice) adds 0,
    # even where log_sum is -inf; likewise no z-loss adds 0.
    loss = torch.where(sum_wt == 0, 0.0, sum_wt * log_sum) - (wt * z_rel).sum(dim=1)
    coef = sum_wt
    if opts.lse_square_scale != 0.0:
        loss = loss + opts.lse_square_scale * lse * lse
        coef = coef + 2.0 * opts.lse_square_scale * lse
    return loss, coef


def _probs(z, row_max, log_sum):
    return torch.exp((z - row_max[:, None]) - log_sum[:, None])


def _entropy(z, row_max, log_sum):
    """lse - sum(p z), as log_sum - sum(p (z - max)); -inf logits (p = 0) add nothing."""
    p = _probs(z, row_max, log_sum)
    h = log_sum - torch.where(p > 0, p * (z - row_max[:, None]), 0.0).sum(dim=1)
    return torch.where(h < 0, 0.0, h)  # >= 0; rounding can take a one-hot row's below (NaN stays)


def _grad(z, wt, ignored, row_max, log_sum, coef, row_scale, opts, ent_scale=None, entropy=None):
    p = _probs(z, row_max, log_sum)
    dz = (coef[:, None] * p - wt) * (row_scale * opts.logit_scale)[:, None]
    zero = row_scale == 0
    if ent_scale is not None:
        # d entropy / dz = -p (z - lse + entropy)
        term = (z - row_max[:, None]) - (log_sum - entropy)[:, None]
        dz = dz - torch.where(p > 0, p * term, 0.0) * (ent_scale * opts.logit_scale)[:, None]
        zero = zero & (ent_scale == 0)
    if opts.softcap is not None:
        dz = dz * (1.0 - (z / opts.softcap) ** 2)
    # A zero scale (ignored row, zero incoming gradient) gives exact zeros, as in the kernels.
    return dz.masked_fill_(ignored[:, None] | zero[:, None], 0.0)


def xent_prologue(target, opts, n_cols, reduction, den, counter) -> None:
    """The "mean" denominator into ``den`` (``counter`` is the kernels' workspace, unused)."""
    del counter
    if reduction == "mean":
        den.copy_(mean_denominator(target, opts, n_cols, den.dtype))


def xent_forward(
    logits, target, opts, loss, stats, grad=None, grad_scale=None, reduction="none",
    total=None, den=None, counter=None, entropy=None, predicted=None, row_weight=None,
    logprob=False,
) -> None:  # fmt: skip
    """Per-row loss and statistics (max, log-sum, coefficient); the gradient if ``grad`` given
    (for an incoming gradient of 1, times ``grad_scale``); the reduced loss into ``total``; the
    rows' entropy, argmax, token weight and log-prob sign as in the kernels' launcher."""
    del counter
    z, wt, ignored = _rows(logits, target, opts)
    row_max, log_sum = _stats(z)
    row_loss, coef = _loss_and_coef(z, wt, row_max, log_sum, opts)
    if row_weight is not None:
        row_loss = row_loss * row_weight.to(z.dtype)
    row_loss = row_loss.masked_fill(ignored, 0.0)
    loss.copy_(0.0 - row_loss if logprob else row_loss)
    stats.copy_(torch.stack([row_max, log_sum, coef]))
    if entropy is not None:
        h = _entropy(z, row_max, log_sum)
        entropy.copy_(h.masked_fill(ignored, 0.0) if logprob else h)
    if predicted is not None:
        predicted.copy_(z.argmax(dim=1) + opts.class_offset)
    if grad is not None:
        scale = torch.ones((), dtype=z.dtype, device=z.device)
        if grad_scale is not None:
            scale = scale * grad_scale.to(z.dtype).reshape(())
        if reduction == "mean":
            scale = over_den(scale, den.to(z.dtype))
        row_scale = _row_scale(scale.expand(len(z)), row_weight, logprob)
        grad.copy_(_grad(z, wt, ignored, row_max, log_sum, coef, row_scale, opts))
    if reduction != "none":
        total.copy_(reduce_total(loss.sum(), den if reduction == "mean" else None))


def _row_scale(row_scale, row_weight, logprob):
    if row_weight is not None:
        row_scale = row_scale * row_weight.to(row_scale.dtype)
    return -row_scale if logprob else row_scale


def xent_backward(
    logits, target, opts, stats, dloss, grad, reduction="none", den=None, skip_if_one=False,
    target_grad=None, dentropy=None, entropy=None, row_weight=None, logprob=False,
) -> None:  # fmt: skip
    """grad = d(loss) / d logits from the forward's per-row statistics: ``dloss`` per row for
    "none", else the reduced loss's incoming gradient ("mean" divides it by ``den``). With
    ``skip_if_one`` ``grad`` already holds the gradient for an incoming gradient of 1.
    ``target_grad`` (optional) receives d(loss) / d(probability target), ``grad`` may be None."""
    if skip_if_one and not dloss.is_cuda and float(dloss) == 1.0:
        return  # a host read costs nothing on the CPU
    z, wt, ignored = _rows(logits, target, opts)
    row_max, log_sum, coef = stats.to(z.dtype)
    if reduction == "none":
        row_scale = dloss.to(z.dtype)
    else:
        g = dloss.to(z.dtype).reshape(())
        row_scale = (over_den(g, den.to(z.dtype)) if reduction == "mean" else g).expand(len(z))
    row_scale = _row_scale(row_scale, row_weight, logprob)
    if target_grad is not None:
        # loss = sum_c w_c t'_c (lse - z_c) with t' = (1 - eps) t + eps / C.
        w = opts.weight.to(z.dtype) if opts.weight is not None else 1.0
        log_p = z - (row_max + log_sum)[:, None]
        target_grad.copy_(-(1.0 - opts.label_smoothing) * w * log_p * row_scale[:, None])
    if grad is None:
        return
    ent_scale = None if dentropy is None else dentropy.to(z.dtype).masked_fill(ignored, 0.0)
    new = _grad(z, wt, ignored, row_max, log_sum, coef, row_scale, opts, ent_scale,
                None if entropy is None else entropy.to(z.dtype))  # fmt: skip
    if skip_if_one:
        # Decided on the device, as the kernels do: no host synchronisation.
        new = torch.where(dloss.reshape(()) == 1, grad, new)
    grad.copy_(new)


# --------------------------------------------------------------------------------------------
# Knowledge distillation (the math in fused_xent/kernels/distill.py's docstring)
# --------------------------------------------------------------------------------------------


def _distill_target(target, opts, n_cols):
    """(ignored rows, the hard term's safe target column) of a class-index target or None; a
    target outside [0, V) that is not ignore_index raises where the hard term would use it."""
    ignored, col, _ = distill_target_rows(target, opts, n_cols, host=True)
    return ignored, col


def distill_target_rows(target, opts, n_cols, host: bool):
    """(ignored rows, the hard term's safe column, rows whose target is outside [0, V) and not
    ignored), each None where there is none to give (no target; no hard term). With ``host`` a
    target outside [0, V) raises ``IndexError`` (a host read: the reference's and the CPU
    routes' answer) and the third is None; without, nothing is read on the host (the kernels'
    routes give those rows NaN)."""
    if target is None:
        return None, None, None
    target = target.long()
    ignored = target == opts.ignore_index
    if opts.hard_weight == 0.0:
        return ignored, None, None
    bad = ~ignored & ((target < 0) | (target >= n_cols))
    if not host:
        return ignored, torch.where(ignored | bad, 0, target), bad
    if bool(bad.any()):
        raise IndexError(
            f"target holds {int(target[bad][0])}, outside [0, {n_cols}) and not "
            f"ignore_index={opts.ignore_index}"
        )
    return ignored, torch.where(ignored, 0, target), None


def _xlogy_diff(p, log_p, log_q):
    """sum p (log p - log q) per row; a class with p = 0 adds 0 (no 0 * inf)."""
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=1)


def _log_m(log_ps, log_pt, beta):
    """log M, M = beta P_t + (1 - beta) P_s, in log space: a probability that is subnormal (or 0)
    in float32 keeps its log there."""
    return torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))


def divergence_sums(log_ps, log_pt, beta):
    """(D, KL(P_s || M) or None) summed over these columns per row, from the student's and the
    teacher's log-probabilities (at the temperature) of whole rows: additive over slices of the
    vocabulary. KL(P_s || M) is kept for the JSD's gradient (beta strictly between 0 and 1)."""
    ps, pt = log_ps.exp(), log_pt.exp()
    if beta == 0.0:  # KL(P_t || P_s)
        return _xlogy_diff(pt, log_pt, log_ps), None
    if beta == 1.0:  # KL(P_s || P_t)
        return _xlogy_diff(ps, log_ps, log_pt), None
    # beta KL(P_t || M) + (1 - beta) KL(P_s || M)
    log_m = _log_m(log_ps, log_pt, beta)
    kl_s = _xlogy_diff(ps, log_ps, log_m)
    return beta * _xlogy_diff(pt, log_pt, log_m) + (1.0 - beta) * kl_s, kl_s


def divergence_grad(log_ps, log_pt, beta, div, kl_s):
    """dD / d(student logits over the temperature) on these columns, from the whole rows' D and
    KL(P_s || M) (:func:`divergence_sums`)."""
    ps = log_ps.exp()
    if beta == 0.0:
        return ps - log_pt.exp()
    if beta == 1.0:
        g, row = log_ps - log_pt, div
    else:
        g, row = (1.0 - beta) * (log_ps - _log_m(log_ps, log_pt, beta)), (1.0 - beta) * kl_s
    return torch.where(ps > 0, ps * (g - row[:, None]), 0.0)


def _distill(student, teacher, target, opts, row_scale=None):
    """Per-row loss, and with ``row_scale`` (N,) the student's gradient (float32; float64 for
    float64 logits). Ignored rows give 0 (and a zero gradient), as does a zero row scale."""
    dtype = _compute_dtype(student.dtype)
    n_cols = student.shape[1]
    ignored, col = _distill_target(target, opts, n_cols)
    log_ps = torch.log_softmax(student.to(dtype) / opts.temperature, dim=1)
    log_pt = torch.log_softmax(teacher.to(dtype) / opts.temperature, dim=1)
    div, kl_s = divergence_sums(log_ps, log_pt, opts.beta)
    loss = opts.soft_weight * div
    if col is not None:  # the hard term, at temperature 1
        log_p1 = torch.log_softmax(student.to(dtype), dim=1)
        loss = loss - opts.hard_weight * log_p1.gather(1, col[:, None]).squeeze(1)
    if ignored is not None:
        loss = loss.masked_fill(ignored, 0.0)
    if row_scale is None:
        return loss, None
    row_scale = row_scale.to(dtype)
    d_div = divergence_grad(log_ps, log_pt, opts.beta, div, kl_s)
    grad = d_div * (opts.soft_weight / opts.temperature * row_scale)[:, None]
    if col is not None:
        onehot = torch.zeros_like(log_p1).scatter_(1, col[:, None], 1.0)
        grad = grad + (log_p1.exp() - onehot) * (opts.hard_weight * row_scale)[:, None]
    zero = row_scale == 0
    if ignored is not None:
        zero = zero | ignored
    # An ignored row or a zero incoming gradient gives exact zeros, as in the kernels.
    return loss, grad.masked_fill_(zero[:, None], 0.0)


def distill_forward(student, teacher, target, opts, loss, stats, grad=None, grad_scale=None):
    """The per-row loss (and the gradient of the per-row losses times ``grad_scale`` when
    ``grad`` is given), as ``kernels/distill.py``'s launcher. ``stats`` is filled with zeros:
    the backward here recomputes everything from the logits."""
    scale = None
    if grad is not None:
        scale = torch.ones(student.shape[0], dtype=loss.dtype, device=student.device)
        if grad_scale is not None:
            scale = scale * grad_scale.to(loss.dtype).reshape(())
    row_loss, row_grad = _distill(student, teacher, target, opts, scale)
    loss.copy_(row_loss)
    stats.zero_()
    if grad is not None:
        grad.copy_(row_grad)


def distill_backward(student, teacher, target, opts, stats, dloss, grad, reduction="none",
                     den=None, skip_if_one=False) -> None:  # fmt: skip
    """grad = d(loss) / d student for the incoming gradient ``dloss`` (per row for "none", else
    of the reduced loss, "mean" divided by ``den``); with ``skip_if_one`` ``grad`` already holds
    the gradient for an incoming gradient of 1 (kept when ``dloss`` is 1, decided on the
    device)."""
    del stats
    dtype = _compute_dtype(student.dtype)
    if reduction == "none":
        row_scale = dloss.to(dtype)
    else:
        g = dloss.to(dtype).reshape(())
        row_scale = (g / den.to(dtype) if reduction == "mean" else g).expand(student.shape[0])
    _, new = _distill(student, teacher, target, opts, row_scale)
    if skip_if_one:
        new = torch.where(dloss.reshape(()) == 1, grad, new)
    grad.copy_(new)
