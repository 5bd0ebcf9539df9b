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
gradient of its own slice); ``linear_cross_entropy`` sums the hidden-state gradient over the ranks
(one all-reduce of N x D float32, its accumulator).

The linear forms (``linear_cross_entropy``, ``linear_token_logprobs``) take the unsharded forms'
plans on each rank's rows of the head. By default (no ``chunk_size``) vocabulary slabs: the
forward sweeps the slice in slabs, merges their statistics into the slice's
(``fused_xent.autograd.slab_sweep``: each slab one slice of the whole vocabulary at the rank's
offset plus its own) and combines those across the ranks as above (once per call); the backward
sweeps the slabs again with the global statistics (``fused_xent.autograd.slab_grads``), writes this
rank's weight gradient a slab at a time and sums the hidden-state gradient over the ranks; never
more than one slab of logits nor a V x D float32 accumulator. With ``chunk_size`` rows, the row
chunks: each chunk's logits of the slice combined across the ranks (once per chunk), the gradients
accumulated in float32 (in the forward for "mean"/"sum", the hidden-state gradient summed there;
in the backward for "none").
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist

from . import _alloc
from ._options import over_den, reduce_total
from .autograd import (
    LinearTokenLogprobFunction,
    SlabLinearCrossEntropyFunction,
    _chunk_logits,
    _chunks,
    _param_dtypes,
    _row_outputs,
    accumulate_chunk_grads,
    finish_linear_grads,
    linear_grad_buffers,
    logprob_outputs,
    refuse_double_backward,
    row_scale,
    save_forward_grads,
    slab_forward_no_grad,
    slab_sweep,
    take_forward_grads,
    token_stats_outputs,
    weight_sum_scale,
    zero_unwritten,
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


def _target_weight_here(target, opts, n_local, dtype):
    """weight[target] on the rank that holds the target, 0 elsewhere and on ignored rows, in
    ``dtype`` (the loss's: float64 weights are not rounded to float32, as unsharded)."""
    col = target.long() - opts.class_offset
    here = (target != opts.ignore_index) & (col >= 0) & (col < n_local)
    return torch.where(here, opts.weight.to(dtype).gather(0, col.clamp(0, n_local - 1)), 0.0)


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
        parts.append(_target_weight_here(target, opts, n_local, loss_r.dtype))
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
    return reduce_total(loss.sum(), denominator if reduction == "mean" else None)


def _local_forward(logits, target, opts, backend, token_stats=None):
    """This slice's loss share and statistics (and its entropy and argmax into ``token_stats``)."""
    loss_r, stats_r = _row_outputs(logits)
    entropy_r, predicted_r = token_stats if token_stats is not None else (None, None)
    backend.xent_forward(
        logits, target, dataclasses.replace(opts, lse_square_scale=0.0), loss_r, stats_r,
        entropy=entropy_r, predicted=predicted_r,
    )  # fmt: skip
    return loss_r, stats_r


def combine_entropy(stats_r, entropy_r, stats, group):
    """The whole vocabulary's entropy from the slices' own: with ``w_r = exp(lse_r - L)`` (the
    slice's share of the probability), ``H = sum_r w_r (L - lse_r + H_r)``. One all-reduce of N
    floats; a slice without probability (all -inf) adds 0."""
    rel = (stats[0] - stats_r[0]) + (stats[1] - stats_r[1])  # L - lse_r
    w = torch.exp(-rel)
    part = torch.where(w > 0, w * (rel + entropy_r), 0.0)
    dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
    return torch.where(part < 0, 0.0, part)  # >= 0, as each slice's (NaN stays)


def slice_max(stats_r):
    """A slice's largest logit from its kernel statistics: -inf where none is finite."""
    return torch.where(stats_r[1] == float("-inf"), float("-inf"), stats_r[0])


def combine_argmax(local_max, predicted_r, group):
    """The global argmax (lowest class on ties) from the slices' own (global indices) and their
    largest logits (:func:`slice_max`): the slices holding the global max offer theirs, the
    lowest wins. Two all-reduces of N values."""
    top = local_max.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    offer = torch.where(local_max == top, predicted_r, torch.iinfo(torch.int64).max)
    dist.all_reduce(offer, op=dist.ReduceOp.MIN, group=group)
    return offer


def _global_rows(local, target, opts, group, n_local, return_stats, entropy_only):
    """Global per-row loss, statistics, denominator, and (entropy, predicted) or None from this
    slice's ``local`` = (loss_r, stats_r, entropy_r, predicted_r, its largest logit), as the
    kernel gives them with ``lse_square_scale = 0`` (``entropy_only``: no argmax combined)."""
    loss_r, stats_r, entropy_r, predicted_r, max_r = local
    loss, stats, denominator = combine(loss_r, stats_r, target, opts, group, n_local)
    token_stats = None
    if return_stats:
        token_stats = (
            combine_entropy(stats_r, entropy_r, stats, group),
            None if entropy_only else combine_argmax(max_r, predicted_r, group),
        )
    return loss, stats, denominator, token_stats


def _sharded_rows(logits, target, opts, backend, group, return_stats, entropy_only=False):
    """Global per-row loss, statistics, denominator, and (entropy, predicted) or None
    (``entropy_only``: (entropy, None), no argmax computed or combined)."""
    token_stats = (None, None)
    if return_stats:
        token_stats = token_stats_outputs(logits)
        if entropy_only:
            token_stats = (token_stats[0], None)
    loss_r, stats_r = _local_forward(logits, target, opts, backend, token_stats)
    local = (loss_r, stats_r, *token_stats, slice_max(stats_r))
    return _global_rows(local, target, opts, group, logits.shape[1], return_stats, entropy_only)


def _slab_rows(hidden, weight, bias, target, opts, backend, group, return_stats,
               entropy_only=False):  # fmt: skip
    """:func:`_sharded_rows` of ``hidden @ weight.T + bias`` with this rank's rows of the head,
    by vocabulary slabs: the slice's loss share and statistics are its slabs' merged
    (``fused_xent.autograd.slab_sweep``, each slab a slice of the whole vocabulary at the rank's
    offset plus its own; the z-loss 0, added once in :func:`combine`), its entropy the slice's
    own and its argmax the slice's, as the kernel gives them for the slice's logits; never more
    than one slab of logits."""
    local_opts = dataclasses.replace(opts, lse_square_scale=0.0)
    merge = slab_sweep(hidden, weight, bias, target, local_opts, backend, return_stats,
                       return_stats and not entropy_only)  # fmt: skip
    local = (*merge.finish(target, local_opts), merge.best)
    return _global_rows(local, target, opts, group, weight.shape[0], return_stats, entropy_only)


def _incoming_per_row(grad_loss, denominator, reduction, n_rows):
    """The incoming gradient as one value per row (no host synchronisation)."""
    if reduction == "none":
        return grad_loss
    g = over_den(grad_loss, denominator) if reduction == "mean" else grad_loss
    return g.expand(n_rows)


class ShardedCrossEntropyFunction(torch.autograd.Function):
    """cross_entropy over one rank's vocabulary slice; forward communicates, backward does not."""

    @staticmethod
    def forward(ctx, logits, target, opts, reduction, inplace_backward, backend, group,
                row_weight=None, return_stats=False):  # fmt: skip
        """(loss, lse) or, with ``return_stats``, (loss, lse, entropy, predicted)."""
        loss, stats, denominator, token_stats = _sharded_rows(
            logits, target, opts, backend, group, return_stats
        )
        if row_weight is not None:
            loss = loss * row_weight
        ctx.save_for_backward(logits, target, stats, denominator, row_weight)
        ctx.opts, ctx.reduction, ctx.backend = opts, reduction, backend
        ctx.inplace_backward = inplace_backward
        ctx.set_materialize_grads(False)
        extra = (stats[0] + stats[1], *(token_stats or ()))
        ctx.mark_non_differentiable(*extra)
        return (_reduced(loss, denominator, reduction), *extra)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        refuse_double_backward()
        if grad_loss is None:
            return (None,) * 9
        logits, target, stats, denominator, row_weight = ctx.saved_tensors
        dloss = _incoming_per_row(grad_loss, denominator, ctx.reduction, logits.shape[0])
        grad = logits if ctx.inplace_backward else _alloc.grad_like(logits)
        ctx.backend.xent_backward(logits, target, ctx.opts, stats, dloss, grad,
                                  row_weight=row_weight)  # fmt: skip
        if ctx.inplace_backward:
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None, None, None


def sharded_forward_no_grad(logits, target, opts, reduction, backend, group, row_weight=None,
                            return_stats=False):  # fmt: skip
    loss, stats, denominator, token_stats = _sharded_rows(
        logits, target, opts, backend, group, return_stats
    )
    if row_weight is not None:
        loss = loss * row_weight
    return (_reduced(loss, denominator, reduction), stats[0] + stats[1], *(token_stats or ()))


def _logprob_rows(rows, target, opts, return_entropy):
    """(log p(target), global statistics, entropy or None) from :func:`_global_rows`' outputs:
    the entropy masked like the log-prob (0 on ignored rows, NaN where the target is invalid)."""
    loss, stats, _, token_stats = rows
    logp, entropy = logprob_outputs(loss, token_stats[0] if return_entropy else None, target, opts)
    return logp, stats, entropy


def sharded_token_rows(logits, target, opts, backend, return_entropy, group):
    """(log p(target), global statistics, entropy or None) of one slice's rows."""
    rows = _sharded_rows(logits, target, opts, backend, group, return_entropy, entropy_only=True)
    return _logprob_rows(rows, target, opts, return_entropy)


# --------------------------------------------------------------------------------------------
# Fused linear + cross-entropy with the LM head's rows sharded
# --------------------------------------------------------------------------------------------


def _sharded_linear_pass(hidden, weight, bias, target, opts, chunk_size, backend, group, grads,
                         row_weight=None, token_stats=None):  # fmt: skip
    """One pass over the chunks: the global per-row loss and statistics, and, when ``grads`` is
    given as (accumulators from ``linear_grad_buffers``, d_weight's ``weight_sum_scale``, per-row
    incoming gradient), this rank's accumulated gradients (d_hidden still to be summed over the
    ranks), as the unsharded pass: the chunk gradients are not divided by the denominator.
    ``row_weight`` weighs the rows' losses; ``token_stats``: (entropy, predicted) outputs."""
    n_rows = hidden.shape[0]
    loss, stats = _row_outputs(hidden)
    denominator = torch.zeros((), dtype=loss.dtype, device=hidden.device)
    for start, end in _chunks(n_rows, chunk_size):
        rows = slice(start, end)
        logits = _chunk_logits(hidden, weight, bias, start, end)
        loss[rows], stats[:, rows], den, chunk_stats = _sharded_rows(
            logits, target[rows], opts, backend, group, token_stats is not None
        )
        chunk_weight = None if row_weight is None else row_weight[rows]
        if chunk_weight is not None:
            loss[rows] *= chunk_weight
        if token_stats is not None:
            token_stats[0][rows], token_stats[1][rows] = chunk_stats
        denominator += den
        if grads is None:
            continue
        bufs, w_scale, dloss = grads
        backend.xent_backward(logits, target[rows], opts, stats[:, rows], dloss[rows], logits,
                              row_weight=chunk_weight)  # fmt: skip
        accumulate_chunk_grads(bufs, logits, hidden, weight, rows, start == 0, w_scale)
    if grads is not None and n_rows == 0:
        zero_unwritten(grads[0])
    return loss, stats, denominator


def _sum_hidden_grad(bufs, group):
    """The hidden-state gradient summed over the ranks, in its float32 accumulator (the sum of
    the ranks' unrounded shares, rounded once afterwards)."""
    if bufs[0] is not None:
        _hidden_sum(group)(bufs[0])


def _hidden_sum(group):
    """``sum_hidden`` of the autograd Functions: a float32 accumulator summed over the ranks."""
    return functools.partial(dist.all_reduce, op=dist.ReduceOp.SUM, group=group)


def _slab_sharded_forward(hidden, weight, bias, target, opts, reduction, backend, row_weight,
                          return_stats, group):  # fmt: skip
    """The ``rows`` of ``SlabLinearCrossEntropyFunction`` with this rank's rows of the head:
    the global per-row loss (times the token weight), statistics, "mean" denominator (None
    otherwise), entropy and argmax (None without ``return_stats``)."""
    loss, stats, denominator, token_stats = _slab_rows(hidden, weight, bias, target, opts,
                                                       backend, group, return_stats)  # fmt: skip
    if row_weight is not None:
        loss = loss * row_weight.to(loss.dtype)
    den = denominator if reduction == "mean" else None
    return (loss, stats, den, *(token_stats or (None, None)))


def sharded_slab_linear_cross_entropy(hidden, weight, bias, target, opts, reduction, backend,
                                      group, row_weight, return_stats, wants_grad):  # fmt: skip
    """What ``linear_cross_entropy`` runs with a ``process_group`` by default (no
    ``chunk_size``): vocabulary slabs of this rank's rows of the head. The forward sweeps them
    (their statistics merged into the slice's, then combined across the ranks: one max and one
    sum all-reduce of a few floats a row) and keeps the global row statistics; the backward
    sweeps them again with those (``fused_xent.autograd.slab_grads``: this rank's weight and bias
    gradients, its share of the hidden-state gradient) and sums the hidden-state gradient's
    float32 accumulator over the ranks (one all-reduce of N x D floats), rounded once. Never
    more than one slab of logits, nor a V x D float32 accumulator."""
    rows = functools.partial(_slab_sharded_forward, group=group)
    if wants_grad:
        return SlabLinearCrossEntropyFunction.apply(
            hidden, weight, bias, target, opts, reduction, backend, row_weight, return_stats,
            rows, _hidden_sum(group),
        )  # fmt: skip
    return slab_forward_no_grad(hidden, weight, bias, target, opts, reduction, backend,
                                row_weight, return_stats, rows)  # fmt: skip


class ShardedLinearCrossEntropyFunction(torch.autograd.Function):
    """linear_cross_entropy with this rank's rows of the LM head, by chunks of rows (an explicit
    ``chunk_size``; the default is :func:`sharded_slab_linear_cross_entropy`).

    "mean"/"sum": the forward makes one pass over the chunks; after each chunk's statistics are
    combined across ranks the same logits become this rank's gradient of the per-row losses,
    accumulated in float32 as in the unsharded form; the hidden gradient's accumulator is summed
    over the ranks (one all-reduce of N x D floats) and the accumulators wait for the backward,
    which makes each gradient as ``acc * (g / den)`` rounded once. "none": the forward keeps the
    per-row statistics and the backward recomputes the chunks (then sums the hidden gradient).
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, target, opts, reduction, chunk_size, fp32_wgrad, backend, group,
        row_weight=None, return_stats=False,
    ):  # fmt: skip
        need = tuple(ctx.needs_input_grad[:3])
        token_stats = token_stats_outputs(hidden) if return_stats else None
        ctx.opts, ctx.reduction, ctx.backend, ctx.group = opts, reduction, backend, group
        ctx.chunk_size, ctx.fp32_wgrad = chunk_size, fp32_wgrad
        ctx.dtypes = _param_dtypes(hidden, weight, bias)
        ctx.fused = reduction != "none"
        if ctx.fused:
            # The denominator is only known after the pass; the gradients wait for it (and for
            # the incoming gradient) in their accumulators.
            bufs = linear_grad_buffers(hidden, weight, bias, need, fp32_wgrad)
            ctx.w_scale = weight_sum_scale(bufs[1], hidden.shape[0])
            ones = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            loss, stats, denominator = _sharded_linear_pass(
                hidden, weight, bias, target, opts, chunk_size, backend, group,
                (bufs, ctx.w_scale, ones), row_weight, token_stats,
            )  # fmt: skip
            _sum_hidden_grad(bufs, group)
            save_forward_grads(ctx, (*bufs, denominator if reduction == "mean" else None))
        else:
            loss, stats, denominator = _sharded_linear_pass(
                hidden, weight, bias, target, opts, chunk_size, backend, group, None, row_weight,
                token_stats,
            )  # fmt: skip
            ctx.save_for_backward(hidden, weight, bias, target, row_weight)
        extra = (stats[0] + stats[1], *(token_stats or ()))
        ctx.mark_non_differentiable(*extra)
        return (_reduced(loss, denominator, reduction), *extra)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        refuse_double_backward()
        if ctx.fused:
            *bufs, den = take_forward_grads(ctx, "linear_cross_entropy")
            scale = over_den(grad_loss, den)
        else:
            hidden, weight, bias, target, row_weight = ctx.saved_tensors
            bufs = linear_grad_buffers(
                hidden, weight, bias, ctx.needs_input_grad[:3], ctx.fp32_wgrad
            )
            ctx.w_scale = weight_sum_scale(bufs[1], hidden.shape[0])
            dloss, scale = row_scale(grad_loss)
            _sharded_linear_pass(
                hidden, weight, bias, target, ctx.opts, ctx.chunk_size, ctx.backend, ctx.group,
                (bufs, ctx.w_scale, dloss), row_weight,
            )  # fmt: skip
            if bufs[0] is not None:
                # Each rank's share at its own scale (a power of two: exact) before the sum, in
                # case the ranks' incoming gradients differ.
                bufs[0].mul_(scale)
                _sum_hidden_grad(bufs, ctx.group)
            scale = (None, scale, scale)
        grads = finish_linear_grads(bufs, scale, ctx.dtypes, ctx.w_scale)
        return (*grads, None, None, None, None, None, None, None, None, None)


def sharded_linear_forward_no_grad(
    hidden, weight, bias, target, opts, reduction, chunk, backend, group, row_weight=None,
    return_stats=False,
):  # fmt: skip
    token_stats = token_stats_outputs(hidden) if return_stats else None
    loss, stats, denominator = _sharded_linear_pass(
        hidden, weight, bias, target, opts, chunk, backend, group, None, row_weight, token_stats
    )
    return (_reduced(loss, denominator, reduction), stats[0] + stats[1], *(token_stats or ()))


# --------------------------------------------------------------------------------------------
# Token log-probs with the LM head's rows sharded
# --------------------------------------------------------------------------------------------


def _sharded_linear_token_rows(hidden, weight, bias, target, opts, chunk_size, backend,
                               return_entropy, group):  # fmt: skip
    """(log p(target), global statistics, entropy or None) with this rank's rows of the head:
    by vocabulary slabs (``chunk_size`` None, the default) or by chunks of rows."""
    if chunk_size is None:
        rows = _slab_rows(hidden, weight, bias, target, opts, backend, group, return_entropy,
                          entropy_only=True)  # fmt: skip
        return _logprob_rows(rows, target, opts, return_entropy)
    n_rows = hidden.shape[0]
    logp, stats = _row_outputs(hidden)
    entropy = _alloc.empty((n_rows,), logp.dtype, hidden.device) if return_entropy else None
    for start, end in _chunks(n_rows, chunk_size):
        rows = slice(start, end)
        logits = _chunk_logits(hidden, weight, bias, start, end)
        logp[rows], stats[:, rows], ent = sharded_token_rows(
            logits, target[rows], opts, backend, return_entropy, group
        )
        if return_entropy:
            entropy[rows] = ent
    return logp, stats, entropy


def sharded_linear_token_logprobs(hidden, weight, bias, target, opts, chunk_size, fp32_wgrad,
                                  backend, group, return_entropy, wants_grad):  # fmt: skip
    """What ``linear_token_logprobs`` runs with a ``process_group``: the statistics (and
    entropy) of each vocabulary slab of this rank's rows of the head merged and combined across
    the ranks in the forward (with ``chunk_size``: of each chunk of rows); the backward
    recomputes the slabs (chunks), writes this rank's gradients and sums the hidden-state
    gradient over the ranks (one all-reduce of N x D float32)."""
    rows = functools.partial(_sharded_linear_token_rows, group=group)
    if wants_grad:
        return LinearTokenLogprobFunction.apply(
            hidden, weight, bias, target, opts, chunk_size, fp32_wgrad, backend, return_entropy,
            rows, _hidden_sum(group),
        )  # fmt: skip
    logp, _, entropy = rows(hidden, weight, bias, target, opts, chunk_size, backend,
                            return_entropy)  # fmt: skip
    return (logp, entropy) if return_entropy else logp
