"""Public API for reinforcement learning: per-token log-probabilities and entropy.

``token_logprobs`` is the cross-entropy's own row pass read the other way round: with the
transformed logits ``z`` (``softcap * tanh(logit_scale * x / softcap) / temperature``), the pass
that gives ``loss = lse - z[target]`` gives ``log p(target) = -loss``, and one more sum over the row
(``sum p z``) gives the entropy ``lse - sum p z``. The temperature folds into the options
(``logit_scale / T``, ``softcap / T``), so the kernels know nothing of it. The math of the
gradients is in ``fused_xent.kernels.xent``'s docstring; the autograd Functions are in
``fused_xent.autograd`` (``TokenLogprobFunction``, ``LinearTokenLogprobFunction``) and
``fused_xent.distributed`` (the vocabulary-parallel forms).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from . import _dtensor, distributed, ops
from .autograd import (
    LinearTokenLogprobFunction,
    TokenLogprobFunction,
    linear_loss_rows,
    plain_token_rows,
    slab_token_rows,
    token_rows,
    token_stats_outputs,
)
from .functional import (
    _INPUT_DTYPES,
    _TARGET_DTYPES,
    _backend,
    _check_chunk_size,
    _check_float,
    _dtensor_call,
    _dtensor_linear_call,
    _options,
    _plain_plan,
    all_finite,
    autocast_linear,
    check_inplace,
    guard_backward,
    option_off,
    small_cpu_call,
    upcast_kept,
)


def _check_logits(name: str, logits, target, impl, sharded: bool) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be one of ('auto', 'triton', 'reference'), got {impl!r}")
    if logits.dtype not in _INPUT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16 (float64 on the reference path), "
            f"got {logits.dtype}"
        )
    if logits.dim() < 1:
        raise ValueError(f"{name} must have a last dimension, got a 0-dim tensor")
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"target must hold int64 or int32 token ids, got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"target must be on {name}'s device {logits.device}, got {target.device}")


def _token_options(ignore_index, temperature, logit_scale, softcap):
    """The loss options with the temperature folded in: z / T is ``(softcap / T) *
    tanh((logit_scale / T) * x / (softcap / T))`` (``(logit_scale / T) * x`` without a softcap)."""
    temperature = _check_float("temperature", temperature)
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    opts = _options(ignore_index, None, 0.0, 0.0, softcap, logit_scale)
    return dataclasses.replace(
        opts,
        logit_scale=opts.logit_scale / temperature,
        softcap=None if opts.softcap is None else opts.softcap / temperature,
    )


def _torch_cpu(logits, target, opts, return_entropy):
    """Small CPU calls: torch's log-softmax on a float32 copy (the kernel path's contract: float32
    outputs, 0 and no gradient at ignored positions, the gradient rounded once into the logits'
    dtype by the copy's backward, double backward refused), where the reference's dense passes
    would cost several times more at these sizes; None where the general route must decide."""
    t = target.long()
    ignored = t == opts.ignore_index
    z = upcast_kept(logits, ignored)
    if opts.logit_scale != 1.0:
        z = z * opts.logit_scale
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    logsm = torch.log_softmax(z, dim=-1)
    bad = ~ignored & ((t < 0) | (t >= logits.shape[-1]))
    if bool(bad.any()):  # as the reference: a host read costs nothing here
        raise IndexError(
            f"target holds {int(t[bad][0])}, outside [0, {logits.shape[-1]}) and not "
            f"ignore_index={opts.ignore_index}"
        )
    logp = logsm.gather(-1, torch.where(ignored, 0, t).unsqueeze(-1)).squeeze(-1)
    outputs = [torch.where(ignored, 0.0, logp)]
    if return_entropy:
        # -sum p log p; a class of probability 0 (a -inf logit) adds 0, and no NaN gradient.
        finite = torch.where(torch.isinf(logsm), 0.0, logsm)
        outputs.append(torch.where(ignored, 0.0, -(logsm.exp() * finite).sum(-1)))
    if not all_finite(*outputs):
        return None
    for out in outputs:
        guard_backward(out)
    return tuple(outputs) if return_entropy else outputs[0]


def token_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    process_group=None,
    impl: str = "auto",
):
    """Log-probability of each target token, and optionally the entropy at each position.

    With ``z = softcap * tanh(logit_scale * logits / softcap) / temperature`` (without a softcap
    ``logit_scale * logits / temperature``): ``logp = z[target] - logsumexp(z)`` and
    ``entropy = logsumexp(z) - sum(softmax(z) * z)``, both float32 (float64 for float64 logits),
    of the target's shape, both differentiable with respect to the logits (for any mix of incoming
    gradients). The drop-in for the usual ``selective_log_softmax`` + ``entropy_from_logits``
    pair of RL trainers, without any (N, V) float32 buffer.

    Args:
        logits: (..., V), the vocabulary last, as a language model emits them; float32 /
            float16 / bfloat16 (float64 on the reference path).
        target: (...) int64 / int32 token ids, ``logits.shape[:-1]``.
        temperature: > 0, applied last (trainers divide the logits by the sampling temperature).
        logit_scale, softcap: as in :func:`fused_xent.cross_entropy`.
        ignore_index: positions with this target give 0 for both outputs and no gradient.
        return_entropy: also return the entropy.
        inplace_backward: write the logits' gradient into their own storage (as in
            :func:`fused_xent.cross_entropy`); one backward only.
        process_group: vocabulary-parallel, as in :func:`fused_xent.cross_entropy`: this rank's
            ``logits`` hold its slice of the vocabulary (rank order, uneven slices allowed),
            ``target`` holds global ids; the outputs are those of the whole vocabulary.
        impl: "auto", "triton" or "reference", as in :func:`fused_xent.cross_entropy`.

    Returns:
        ``logp``, or ``(logp, entropy)`` with ``return_entropy``.

    On the kernel path a target outside [0, V) that is not ``ignore_index`` gives NaN at that
    position (no out-of-bounds access); the reference raises ``IndexError``.
    """
    if (
        softcap is None
        and option_off(temperature, 1.0)
        and option_off(logit_scale, 1.0)
        and not inplace_backward
        and process_group is None
        and type(logits) is torch.Tensor
        and type(target) is torch.Tensor
        and logits.dim() >= 2
        and logits.shape[-1] > 0  # (V = 0: the general route's error)
        and logits.is_contiguous()
        and target.shape == logits.shape[:-1]
    ):
        rows = logits.view(-1, logits.shape[-1])
        plan = _plain_plan(rows, target.reshape(-1), ignore_index, "logprob", impl)
        if plan is not None:
            return _token_outputs(rows, target.reshape(-1), None, plan, return_entropy, False,
                                  target.shape, plain_token_rows)  # fmt: skip
    if _dtensor.any_dtensor(logits, target):
        return _dtensor_call(
            token_logprobs, "logits", logits, -1, process_group, dict(target=target),
            dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                 ignore_index=ignore_index, return_entropy=return_entropy,
                 inplace_backward=inplace_backward, impl=impl),
        )  # fmt: skip
    sharded = process_group is not None
    _check_logits("logits", logits, target, impl, sharded)
    check_inplace("logits", logits, inplace_backward)
    vocab = logits.shape[-1]
    if vocab == 0 and not sharded:
        raise ValueError("logits must have at least one class (V >= 1), got V = 0")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got "
            f"{tuple(target.shape)}"
        )
    opts = _token_options(ignore_index, temperature, logit_scale, softcap)
    backend = _backend(impl, logits)
    if small_cpu_call(backend, logits) and not (sharded or inplace_backward):
        out = _torch_cpu(logits, target, opts, return_entropy)
        if out is not None:
            return out
    rows, row_target = logits.reshape(-1, vocab), target.reshape(-1)
    if backend is ops.TRITON and vocab > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    rows_fn = token_rows
    if sharded:
        opts = distributed.shard_options(
            opts, process_group, rows.shape[0], vocab, False, "none", rows.device
        )
        rows_fn = functools.partial(distributed.sharded_token_rows, group=process_group)
    return _token_outputs(rows, row_target, opts, backend, return_entropy, inplace_backward,
                          target.shape, rows_fn)  # fmt: skip


def _token_outputs(rows, row_target, opts, backend, return_entropy, inplace_backward, shape,
                   rows_fn=token_rows):  # fmt: skip
    """log p (and the entropy) of (N, V) rows, differentiable where the logits want a gradient,
    in ``shape``. A plain call (``functional._plain_plan``) passes its plan as the backend and
    ``plain_token_rows`` as ``rows_fn``."""
    if torch.is_grad_enabled() and rows.requires_grad:
        out = TokenLogprobFunction.apply(rows, row_target, opts, backend, return_entropy,
                                         inplace_backward, rows_fn)  # fmt: skip
    else:
        logp, _, entropy = rows_fn(rows, row_target, opts, backend, return_entropy)
        out = (logp, entropy) if return_entropy else logp
    if return_entropy:
        return out[0].reshape(shape), out[1].reshape(shape)
    return out.reshape(shape)


def linear_token_logprobs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    fp32_weight_grad: bool = True,
    process_group=None,
    impl: str = "auto",
):
    """:func:`token_logprobs` of ``linear(input, linear_weight, linear_bias)`` without ever
    holding the (N, V) logits: vocabulary slabs by default (or chunks of rows), each slab's
    logits one matrix product, turned in place into their gradient in the backward (rounded
    once), as :func:`fused_xent.linear_cross_entropy`.

    Args:
        input: (..., D) hidden states; float32 / float16 / bfloat16 (float64 on the reference
            path).
        linear_weight: (V, D), the LM head's weight, ``input``'s dtype (under autocast both
            are cast to the autocast dtype first, as F.linear does); with ``process_group``
            this rank's rows of it (its slice of the vocabulary, in rank order).
        target: (...) int64 / int32 token ids, ``input.shape[:-1]``.
        linear_bias: optional (V,).
        chunk_size: None (the default): vocabulary slabs, as ``linear_cross_entropy``'s default
            (with ``process_group`` too); an int: rows per chunk of the row-chunk plan.
        fp32_weight_grad: as in :func:`fused_xent.linear_cross_entropy`.
        The other arguments as in :func:`token_logprobs`.

    Returns:
        ``logp``, or ``(logp, entropy)`` with ``return_entropy``: float32, ``target``'s shape.
    """
    if _dtensor.any_dtensor(input, linear_weight, linear_bias, target):
        return _dtensor_linear_call(
            linear_token_logprobs, input, linear_weight, linear_bias, process_group,
            dict(target=target),
            dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                 ignore_index=ignore_index, return_entropy=return_entropy,
                 chunk_size=chunk_size, fp32_weight_grad=fp32_weight_grad, impl=impl),
        )  # fmt: skip
    sharded = process_group is not None
    input, linear_weight, linear_bias = autocast_linear(input, linear_weight, linear_bias)
    _check_logits("input", input, target, impl, sharded)
    for name, value in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if value is None and name == "linear_bias":
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype != input.dtype:
            raise TypeError(f"{name} must have the input's dtype {input.dtype}, got {value.dtype}")
        if value.device != input.device:
            raise ValueError(f"{name} must be on the input's device {input.device}")
    dim = input.shape[-1]
    if linear_weight.dim() != 2 or linear_weight.shape[1] != dim:
        raise ValueError(
            f"linear_weight must have shape (V, D) with D = input.shape[-1] = {dim}, got "
            f"{tuple(linear_weight.shape)}"
        )
    vocab = linear_weight.shape[0]
    if vocab == 0 and not sharded:
        raise ValueError("linear_weight must have at least one class (V >= 1)")
    if linear_bias is not None and tuple(linear_bias.shape) != (vocab,):
        raise ValueError(f"linear_bias must have shape ({vocab},), got {tuple(linear_bias.shape)}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target must have shape input.shape[:-1] = {tuple(input.shape[:-1])}, got "
            f"{tuple(target.shape)}"
        )
    _check_chunk_size(chunk_size)
    opts = _token_options(ignore_index, temperature, logit_scale, softcap)
    backend = _backend(impl, input)
    hidden, row_target = input.reshape(-1, dim), target.reshape(-1)
    n_rows = hidden.shape[0]
    if sharded:
        opts = distributed.shard_options(
            opts, process_group, n_rows, vocab, False, "none", hidden.device
        )
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, linear_weight, linear_bias)
    )
    if sharded:
        out = distributed.sharded_linear_token_logprobs(
            hidden, linear_weight, linear_bias, row_target, opts, chunk_size,
            bool(fp32_weight_grad), backend, process_group, return_entropy, wants_grad,
        )  # fmt: skip
    elif wants_grad:
        out = LinearTokenLogprobFunction.apply(
            hidden, linear_weight, linear_bias, row_target, opts, chunk_size,
            bool(fp32_weight_grad), backend, return_entropy,
        )  # fmt: skip
    elif chunk_size is None:  # the default: vocabulary slabs
        logp, _, entropy = slab_token_rows(hidden, linear_weight, linear_bias, row_target, opts,
                                           None, backend, return_entropy)  # fmt: skip
        out = (logp, entropy) if return_entropy else logp
    else:
        entropy = token_stats_outputs(hidden)[0] if return_entropy else None
        logp, _ = linear_loss_rows(hidden, linear_weight, linear_bias, row_target, opts,
                                   chunk_size, backend, entropy, logprob=True)  # fmt: skip
        out = (logp, entropy) if return_entropy else logp
    shape = target.shape
    if return_entropy:
        return out[0].reshape(shape), out[1].reshape(shape)
    return out.reshape(shape)
