"""Vocabulary-parallel cross-entropy over ``torch.distributed`` (tensor-parallel LM heads).

Each rank of ``process_group`` holds a contiguous slice of the vocabulary, in rank order: logits
(rows, C_r) for :func:`fused_xent.cross_entropy`, rows (C_r, D) of the head ``linear_weight``
(and ``linear_bias``) for :func:`fused_xent.linear_cross_entropy`. Slices may differ in size.
Targets are global class indices, the same on every rank; class weights and probability targets
come as each rank's slice.

How a loss is put together from the slices. Each rank runs the same kernel as the unsharded loss
on its slice (with the slice's place in the vocabulary, so a target in another slice adds no
one-hot term there and smoothing divides by the whole vocabulary), which gives per row its
``lse_r`` and, at that ``lse_r``, its share ``loss_r`` and its softmax coefficient ``A_r``. A row's
loss is affine in the log-sum-exp with slope ``A``, so with ``L`` the global log-sum-exp::

    L    = M + log(sum_r exp(lse_r - M)),          M = max_r lse_r
    loss = sum_r (loss_r - A_r (lse_r - M)) + (sum_r A_r)(L - M) + lse_square_scale * L**2
    A    = sum_r A_r + 2 * lse_square_scale * L

exactly the unsharded result (label smoothing over the whole vocabulary included). Over the wire,
per forward: one all-reduce (max) of N floats and one all-reduce (sum) of 3 x N floats (4 x N with
class weights under "mean"), plus a check of the layout: an all-gather of a few numbers per rank,
read on the host, so that ranks that disagree on the rows, the options or the slices get a clear
``ValueError`` on every rank instead of a hang. Nothing of size N x C is ever sent. The backward of
``cross_entropy`` needs no communication (every rank has the global row statistics and writes the
gradient of its own slice); the backward of ``linear_cross_entropy`` sums the hidden-state
gradient over the ranks (one all-reduce of N x D).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from . import _alloc
from .autograd import (
    _chunk_logits,
    _chunks,
    _row_outputs,
    accumulate_chunk_grads,
    cast_linear_grads,
    linear_grad_buffers,
    refuse_double_backward,
    save_forward_grads,
    take_forward_grads,
)

_REDUCTION_CODE = {"mean": 0.0, "sum": 1.0, "none": 2.0}


def shard_options(
    opts, group, n_rows: int, n_local: int, prob_target: bool, reduction: str, device
):
    """``opts`` with this rank's place in the vocabulary, after checking every rank agrees.

    Raises ValueError on every rank alike when the ranks disagree on the number of rows, the
    target kind, the reduction or the options, or when a rank holds no class.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    fingerprint = [
        float(n_rows),
        float(prob_target),
        _REDUCTION_CODE[reduction],
        float(opts.ignore_index),
        opts.label_smoothing,
        opts.lse_square_scale,
        opts.logit_scale,
        opts.softcap if opts.softcap is not None else -1.0,
        float(opts.weight is not None),
    ]
    mine = torch.tensor([float(n_local), *fingerprint], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()  # the one host read: the layout must be known here
    sizes = [int(v) for v in table[:, 0].tolist()]
    if (table[:, 1] != table[0, 1]).any():
        raise ValueError(
            "process_group: the ranks disagree on the number of rows (tokens): "
            f"{[int(v) for v in table[:, 1].tolist()]}; every rank must pass the same rows"
        )
    if (table[:, 2:] != table[0, 2:]).any():
        raise ValueError(
            "process_group: the ranks disagree on the target kind, the reduction or the loss "
            "options (ignore_index, label_smoothing, lse_square_scale, logit_scale, softcap, "
            "weight given or not); every rank must pass the same ones"
        )
    if min(sizes) < 1:
        raise ValueError(
            f"process_group: every rank must hold at least one class of the vocabulary; the "
            f"slices are {sizes}"
        )
    return dataclasses.replace(opts, class_offset=sum(sizes[:rank]), n_classes=sum(sizes))


def _target_weight_here(target, opts, n_local):
    """weight[target] on the rank that holds the target, 0 elsewhere and on ignored rows."""
    col = target.long() - opts.class_offset
    here = (target != opts.ignore_index) & (col >= 0) & (col < n_local)
    return torch.where(here, opts.weight.float().gather(0, col.clamp(0, n_local - 1)), 0.0)


def combine(loss_r, stats_r, target, opts, group, n_local):
    """Global per-row loss, statistics (max, log-sum, coefficient) and "mean" denominator.

    ``loss_r`` and ``stats_r`` are this rank's kernel outputs for its slice, computed with
    ``lse_square_scale = 0`` (the z-loss is added once, here).
    """
    lse_r = stats_r[0] + stats_r[1]
    m = lse_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(m == float("-inf"), 0.0, m)
    rel = (stats_r[0] - m) + stats_r[1]  # lse_r - M
    # A slice with no share in the row (A_r = 0) adds nothing, even if its logits are all -inf.
    parts = [rel.exp(), loss_r - torch.where(stats_r[2] == 0, 0.0, stats_r[2] * rel), stats_r[2]]
    class_index = not target.is_floating_point()
    with_weight_sum = class_index and opts.weight is not None
    if with_weight_sum:
        parts.append(_target_weight_here(target, opts, n_local).to(loss_r.dtype))
    packed = torch.stack(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    log_sum = packed[0].log()
    lse = m + log_sum
    z2 = opts.lse_square_scale
    loss = packed[1] + packed[2] * log_sum + z2 * lse * lse
    coef = packed[2] + 2.0 * z2 * lse
    if class_index:
        kept = target != opts.ignore_index
        loss = torch.where(kept, loss, 0.0)
        if with_weight_sum:
            denominator = torch.where(kept, packed[3], 0.0).sum()
        else:
            denominator = kept.sum().to(loss.dtype)
    else:
        denominator = torch.full((), float(target.shape[0]), dtype=loss.dtype, device=loss.device)
    return loss, torch.stack([m, log_sum, coef]), denominator


def _reduced(loss, denominator, reduction):
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / denominator


def _local_forward(logits, target, opts, backend):
    loss_r, stats_r = _row_outputs(logits)
    backend.xent_forward(
        logits, target, dataclasses.replace(opts, lse_square_scale=0.0), loss_r, stats_r
    )
    return loss_r, stats_r


def _incoming_per_row(grad_loss, denominator, reduction, n_rows):
    """The incoming gradient as one value per row (no host synchronisation)."""
    if reduction == "none":
        return grad_loss
    g = grad_loss / denominator if reduction == "mean" else grad_loss
    return g.expand(n_rows)


class ShardedCrossEntropyFunction(torch.autograd.Function):
    """cross_entropy over one rank's vocabulary slice; forward communicates, backward does not."""

    @staticmethod
    def forward(ctx, logits, target, opts, reduction, inplace_backward, backend, group):
        loss_r, stats_r = _local_forward(logits, target, opts, backend)
        loss, stats, denominator = combine(loss_r, stats_r, target, opts, group, logits.shape[1])
        ctx.save_for_backward(logits, target, stats, denominator)
        ctx.opts, ctx.reduction, ctx.backend = opts, reduction, backend
        ctx.inplace_backward = inplace_backward
        lse = stats[0] + stats[1]
        ctx.mark_non_differentiable(lse)
        return _reduced(loss, denominator, reduction), lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        del grad_lse
        refuse_double_backward()
        logits, target, stats, denominator = ctx.saved_tensors
        dloss = _incoming_per_row(grad_loss, denominator, ctx.reduction, logits.shape[0])
        grad = logits if ctx.inplace_backward else _alloc.grad_like(logits)
        ctx.backend.xent_backward(logits, target, ctx.opts, stats, dloss, grad)
        if ctx.inplace_backward:
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None


def sharded_forward_no_grad(logits, target, opts, reduction, backend, group):
    loss_r, stats_r = _local_forward(logits, target, opts, backend)
    loss, stats, denominator = combine(loss_r, stats_r, target, opts, group, logits.shape[1])
    return _reduced(loss, denominator, reduction), stats[0] + stats[1]


# --------------------------------------------------------------------------------------------
# Fused linear + cross-entropy with the LM head's rows sharded
# --------------------------------------------------------------------------------------------


def _sharded_linear_pass(hidden, weight, bias, target, opts, chunk_size, backend, group, grads):
    """One pass over the chunks: the global per-row loss and statistics, and, when ``grads`` is
    given as (d_hidden, d_weight, d_bias, per-row incoming gradient or None), this rank's
    gradients (d_hidden still to be summed over the ranks)."""
    n_rows, n_local = hidden.shape[0], weight.shape[0]
    loss, stats = _row_outputs(hidden)
    denominator = torch.zeros((), dtype=loss.dtype, device=hidden.device)
    for start, end in _chunks(n_rows, chunk_size):
        rows = slice(start, end)
        logits = _chunk_logits(hidden, weight, bias, start, end)
        loss_r, stats_r = _local_forward(logits, target[rows], opts, backend)
        loss[rows], stats[:, rows], den = combine(
            loss_r, stats_r, target[rows], opts, group, n_local
        )
        denominator += den
        if grads is None:
            continue
        *bufs, dloss = grads
        backend.xent_backward(logits, target[rows], opts, stats[:, rows], dloss[rows], logits)
        accumulate_chunk_grads(bufs, logits, hidden, weight, rows)
    return loss, stats, denominator


def _finish_grads(d_hidden, d_weight, d_bias, weight, bias, group):
    """The hidden gradient summed over the ranks; the accumulators in the parameters' dtypes."""
    if d_hidden is not None:
        dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=group)
    return cast_linear_grads(d_hidden, d_weight, d_bias, weight, bias)


class ShardedLinearCrossEntropyFunction(torch.autograd.Function):
    """linear_cross_entropy with this rank's rows of the LM head.

    "mean"/"sum": the forward makes one pass over the chunks; after each chunk's statistics are
    combined across ranks the same logits become this rank's gradient, so all gradients are
    ready after the forward (the hidden gradient summed over ranks) and the backward only scales
    them. "none": the forward keeps the per-row statistics and the backward recomputes the chunks.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, target, opts, reduction, chunk_size, fp32_wgrad, backend, group
    ):
        need = tuple(ctx.needs_input_grad[:3])
        ctx.opts, ctx.reduction, ctx.backend, ctx.group = opts, reduction, backend, group
        ctx.chunk_size, ctx.fp32_wgrad = chunk_size, fp32_wgrad
        ctx.fused = reduction != "none"
        if ctx.fused:
            # The denominator is only known after the pass, so the gradients are computed with
            # an incoming gradient of 1 per row and divided by it afterwards, on the device.
            bufs = linear_grad_buffers(hidden, weight, bias, need, fp32_wgrad)
            ones = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            loss, stats, denominator = _sharded_linear_pass(
                hidden, weight, bias, target, opts, chunk_size, backend, group, (*bufs, ones)
            )
            grads = list(_finish_grads(*bufs, weight, bias, group))
            if reduction == "mean":
                for g in grads:
                    if g is not None:
                        g.div_(denominator.to(g.dtype))
            save_forward_grads(ctx, grads)
        else:
            loss, stats, denominator = _sharded_linear_pass(
                hidden, weight, bias, target, opts, chunk_size, backend, group, None
            )
            ctx.save_for_backward(hidden, weight, bias, target)
        lse = stats[0] + stats[1]
        ctx.mark_non_differentiable(lse)
        return _reduced(loss, denominator, reduction), lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        del grad_lse
        refuse_double_backward()
        if ctx.fused:
            grads = take_forward_grads(ctx, grad_loss, "linear_cross_entropy")
            return (*grads, None, None, None, None, None, None, None)
        hidden, weight, bias, target = ctx.saved_tensors
        bufs = linear_grad_buffers(hidden, weight, bias, ctx.needs_input_grad[:3], ctx.fp32_wgrad)
        _sharded_linear_pass(
            hidden, weight, bias, target, ctx.opts, ctx.chunk_size, ctx.backend, ctx.group,
            (*bufs, grad_loss),
        )  # fmt: skip
        grads = _finish_grads(*bufs, weight, bias, ctx.group)
        return (*grads, None, None, None, None, None, None, None)


def sharded_linear_forward_no_grad(
    hidden, weight, bias, target, opts, reduction, chunk, backend, group
):
    loss, stats, denominator = _sharded_linear_pass(
        hidden, weight, bias, target, opts, chunk, backend, group, None
    )
    return _reduced(loss, denominator, reduction), stats[0] + stats[1]
