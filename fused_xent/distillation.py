"""Public API for knowledge distillation: KL, reverse KL and the generalized Jensen-Shannon
divergence between a student's and a teacher's softmax, plus an optional hard cross-entropy term.

``distillation_loss`` takes the two sets of logits; ``linear_distillation_loss`` takes the hidden
states and LM heads of both models and never holds either full logit matrix (vocabulary slabs; the
teacher's products run without autograd). The math and the memory traffic are in
``fused_xent.kernels.distill``'s docstring; the autograd Functions are in ``fused_xent.autograd``
(``DistillationFunction``, ``SlabLinearDistillationFunction``, ``LinearDistillationFunction``).
"""

from __future__ import annotations

import math

import torch

from . import ops
from ._options import DistillOptions
from .autograd import (
    DistillationFunction,
    LinearDistillationFunction,
    SlabLinearDistillationFunction,
    _reduce,
    distill_denominator,
    distill_no_grad,
    linear_distill_rows,
    slab_distill_rows,
)
from .functional import (
    _INPUT_DTYPES,
    _KERNEL_DTYPES,
    _TARGET_DTYPES,
    IMPLS,
    REDUCTIONS,
    _backend,
    _check_chunk_size,
    _check_float,
    all_finite,
    autocast_linear,
    check_inplace,
    guard_backward,
    small_cpu_call,
    upcast_kept,
)


def _options(beta, temperature, soft_weight, hard_weight, ignore_index, target) -> DistillOptions:
    beta = _check_float("beta", beta, 0.0, 1.0)
    temperature = _check_float("temperature", temperature)
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    soft_weight = _check_float("soft_weight", soft_weight, 0.0)
    hard_weight = _check_float("hard_weight", hard_weight, 0.0)
    if hard_weight > 0.0 and target is None:
        raise ValueError(
            f"hard_weight={hard_weight} > 0 needs a target (the hard cross-entropy's labels); "
            "pass target=..., or hard_weight=0"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return DistillOptions(beta, temperature, soft_weight, hard_weight, ignore_index)


def _check_tensor(name: str, value, device=None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _INPUT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16 (float64 on the reference path), "
            f"got {value.dtype}"
        )
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on the student's device {device}, got {value.device}")


def _refuse_teacher_grad(**tensors) -> None:
    """The teacher gets no gradient: a teacher tensor that requires one is refused (under
    no_grad nothing would flow, and it is accepted)."""
    if not torch.is_grad_enabled():
        return
    for name, value in tensors.items():
        if value is not None and value.requires_grad:
            raise ValueError(
                f"{name} requires grad, but the distillation losses give the teacher no gradient; "
                f"pass {name}.detach() (or compute the teacher under torch.no_grad())"
            )


def _check_target(target, lead: tuple, device, what: str) -> None:
    if target is None:
        return
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"target must hold int64 or int32 class indices, got {target.dtype}")
    if tuple(target.shape) != lead:
        raise ValueError(f"target must have shape {what} = {lead}, got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target must be on the student's device {device}, got {target.device}")


def _check_common(reduction, impl) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _pick_backend(impl, student, teacher):
    backend = _backend(impl, student)
    if backend is ops.TRITON and teacher.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"impl='triton' takes float32, float16 or bfloat16 teacher logits, got {teacher.dtype}"
        )
    return backend


def _unit_stride(rows: torch.Tensor, backend) -> torch.Tensor:
    """The kernels stride over rows, not over classes."""
    if backend is ops.TRITON and rows.shape[1] > 1 and rows.stride(1) != 1:
        return rows.contiguous()
    return rows


def _divergence(z, log_pt, beta: float, guarded: bool):
    """(D per row, the tensor the student's gradient flows through) from ``z``, the student's
    logits over the temperature (under autograd), and the teacher's log-probabilities.

    Each term is ``p * (log p - log q)``, the difference taken before the product, so that close
    distributions lose nothing to cancellation. The gradient is the reference's closed form: the
    forward KL's flows through ``log_softmax(z)`` (``P_s - P_t``); for the others only the
    student's probabilities carry it, ``D = c + sum P_s g`` with ``g`` detached, so that the
    softmax's backward forms ``P_s (g - sum P_s g)`` itself (through ``log P_s`` as well, autograd
    adds terms that cancel only to rounding: for a student within 1e-2 to 1e-3 of its teacher,
    1.5 to 5 times the reference's float32 error, which this form matches).

    The plain form makes 0 * inf = NaN only where a student's logit is -inf at a class the teacher
    leaves empty (a -inf teacher alone is handled: clamped to the lowest float where its
    probability is 0); ``guarded`` sets each such difference to 0 before the product, so that
    neither the value nor the gradient sees a NaN, at a few more passes.
    """
    if beta < 1.0:
        with torch.no_grad():
            p_t = log_pt.exp()
            # 0 * this = 0 where P_t = 0 (in place: the caller's own temporary, as for logaddexp
            # the lowest float is -inf)
            log_pt = log_pt.clamp_min_(torch.finfo(log_pt.dtype).min)
    if beta == 0.0:  # KL(P_t || P_s)
        log_ps = torch.log_softmax(z, dim=-1)
        diff = log_pt - log_ps
        if guarded:
            diff = torch.where(p_t > 0, diff, 0.0)
        return (p_t * diff).sum(-1), log_ps
    p_s = torch.softmax(z, dim=-1)
    const = None
    with torch.no_grad():
        g = torch.log_softmax(z, dim=-1)
        if beta == 1.0:  # KL(P_s || P_t): infinite where P_t = 0 < P_s, as it is
            g.sub_(log_pt)
        else:  # beta KL(P_t || M) + (1 - beta) KL(P_s || M), log M stable at any logits
            log_m = torch.logaddexp(g + math.log1p(-beta), log_pt + math.log(beta))
            diff = log_pt - log_m
            if guarded:
                diff = torch.where(p_t > 0, diff, 0.0)
            const = beta * (p_t * diff).sum(-1)
            g.sub_(log_m).mul_(1.0 - beta)
        if guarded:
            g.masked_fill_(p_s == 0, 0.0)
    div = (p_s * g).sum(-1)
    return (div if const is None else div + const), p_s


def _torch_cpu(student, teacher, target, opts, reduction):
    """Small CPU calls: torch's softmaxes on float32 copies under autograd, where the reference's
    dense passes cost several times more at these sizes (their temporaries, each paged in afresh,
    more than their arithmetic). The same contract and numbers: a float32 loss (float64 for
    float64 logits), the gradient rounded once into the student's dtype by the copy's backward,
    no gradient to the teacher, 0 and no gradient at ignored positions, "mean" over the kept
    positions, an out-of-range target of the hard term raising ``IndexError``, double backward
    refused. Host reads of per-row values cost nothing here."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    temperature = opts.temperature
    # Ignored positions' rows zeroed in the copy: their gradient is exactly 0 even where the
    # student's row holds NaN or -inf (as every route; README, "Edge cases").
    s = upcast_kept(student, None if target is None else target.long() == opts.ignore_index)
    z = s if temperature == 1.0 else s / temperature
    with torch.no_grad():
        t = teacher.to(dtype)
        log_pt = torch.log_softmax(t if temperature == 1.0 else t / temperature, dim=-1)
    div, carrier = _divergence(z, log_pt, opts.beta, guarded=False)
    if bool(div.isnan().any()):  # a -inf student logit (see _divergence), or NaN logits
        div, carrier = _divergence(z, log_pt, opts.beta, guarded=True)
    loss = div if opts.soft_weight == 1.0 else opts.soft_weight * div
    if target is not None:
        y = target.long()
        ignored = y == opts.ignore_index
        if opts.hard_weight != 0.0:  # the cross-entropy at temperature 1, as the reference
            n_cols = student.shape[-1]
            bad = ~ignored & ((y < 0) | (y >= n_cols))
            if bool(bad.any()):  # as the reference
                raise IndexError(
                    f"target holds {int(y[bad][0])}, outside [0, {n_cols}) and not "
                    f"ignore_index={opts.ignore_index}"
                )
            shared = opts.beta == 0.0 and temperature == 1.0  # log_softmax(s) is the carrier
            log_p1 = carrier if shared else torch.log_softmax(s, dim=-1)
            col = torch.where(ignored, 0, y).unsqueeze(-1)
            loss = loss - opts.hard_weight * log_p1.gather(-1, col).squeeze(-1)
        if carrier.requires_grad and bool((ignored & ~div.isfinite()).any()):
            # An ignored position whose divergence is infinite would pass 0 * inf = NaN back
            # through its terms: its gradient is set to the exact zeros the reference gives.
            carrier.register_hook(lambda g: g.masked_fill(ignored.unsqueeze(-1), 0.0))
        loss = torch.where(ignored, 0.0, loss)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        n_kept = loss.numel() if target is None else (target != opts.ignore_index).sum()
        loss = loss.sum() / n_kept
    if not all_finite(loss):
        return None  # decided by the general route
    guard_backward(loss, once=reduction != "none")
    return loss


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    inplace_backward: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Knowledge distillation of a student's logits towards a teacher's, without materialising
    either softmax.

    Per position, with ``P_s = softmax(student_logits / temperature)`` and
    ``P_t = softmax(teacher_logits / temperature)``: ``beta = 0`` gives the forward KL
    ``D = KL(P_t || P_s)``, ``beta = 1`` the reverse KL ``KL(P_s || P_t)``, and ``0 < beta < 1``
    the generalized Jensen-Shannon divergence ``beta * KL(P_t || M) + (1 - beta) * KL(P_s || M)``
    with ``M = beta * P_t + (1 - beta) * P_s`` (the GKD paper's parameterisation, as TRL's
    ``generalized_jsd_loss``). The loss is ``soft_weight * D + hard_weight * CE``, ``CE`` the
    cross-entropy of the student's logits at temperature 1 against ``target``. There is no
    ``temperature**2`` factor: multiply ``soft_weight`` by it for Hinton's scaling.

    Args:
        student_logits: (..., V) float32 / float16 / bfloat16 (float64 on the reference path).
            Receives the gradient.
        teacher_logits: (..., V) with the student's shape, any of those dtypes; only read (never
            written, no gradient: one that requires grad is refused, detach it).
        target: optional (...) int64 / int32 class indices, ``student_logits.shape[:-1]``.
            Needed when ``hard_weight > 0``; when given, positions whose target is
            ``ignore_index`` leave both terms and the "mean" denominator.
        beta: in [0, 1], as above.
        temperature: > 0, divides both sets of logits in ``D`` (not in the hard term).
        soft_weight, hard_weight: >= 0, the weights of ``D`` and of the hard cross-entropy.
        ignore_index: the target value of positions to leave out.
        reduction: "mean" (the average over the kept positions: NaN when none is kept, with zero
            gradients, as torch), "sum", or "none" (the leading shape, 0 at ignored positions).
        inplace_backward: write the gradient into ``student_logits``' own storage, so that no
            second (..., V) buffer exists; its version counter is bumped, so autograd raises where
            anything saved those logits for its own backward.
        impl: "auto" (the Triton kernels for CUDA tensors; elsewhere, calls of at most 2^18
            logits without ``inplace_backward`` run torch's own log-softmax on float32 copies
            under autograd, with the reference's numbers, and larger ones the reference), "triton"
            (on CPU tensors it needs ``TRITON_INTERPRET=1``), "reference".

    Returns:
        The float32 loss (float64 for float64 logits): 0-dim, or ``student_logits.shape[:-1]``
        for "none".
    """
    _check_tensor("student_logits", student_logits)
    _check_tensor("teacher_logits", teacher_logits, student_logits.device)
    _check_common(reduction, impl)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have a vocabulary dimension (..., V)")
    s_shape, t_shape = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if t_shape[-1:] != s_shape[-1:]:
        raise ValueError(
            f"teacher_logits must have the student's vocabulary: V = {s_shape[-1]} in "
            f"student_logits {s_shape}, got teacher_logits {t_shape}"
        )
    if t_shape != s_shape:
        raise ValueError(
            f"teacher_logits must have the student's leading shape {s_shape[:-1]}, got "
            f"{t_shape[:-1]} (teacher_logits {t_shape})"
        )
    vocab = s_shape[-1]
    if vocab == 0:
        raise ValueError("student_logits must have at least one class (V >= 1)")
    _check_target(target, s_shape[:-1], student_logits.device, "student_logits.shape[:-1]")
    _refuse_teacher_grad(teacher_logits=teacher_logits)
    check_inplace("student_logits", student_logits, inplace_backward)
    opts = _options(beta, temperature, soft_weight, hard_weight, ignore_index, target)
    backend = _pick_backend(impl, student_logits, teacher_logits)
    if small_cpu_call(backend, student_logits) and not inplace_backward:
        loss = _torch_cpu(student_logits, teacher_logits, target, opts, reduction)
        if loss is not None:
            return loss
    student = _unit_stride(student_logits.reshape(-1, vocab), backend)
    teacher = _unit_stride(teacher_logits.reshape(-1, vocab), backend)
    rows_target = None if target is None else target.reshape(-1)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        loss = DistillationFunction.apply(
            student, teacher, rows_target, opts, reduction, bool(inplace_backward), backend
        )
    else:
        loss = distill_no_grad(student, teacher, rows_target, opts, reduction, backend)
    return loss.reshape(s_shape[:-1]) if reduction == "none" else loss


def _check_head(name: str, weight, bias, input, bias_name: str) -> None:
    _check_tensor(name, weight, input.device)
    if weight.dtype != input.dtype:
        raise TypeError(f"{name} must have its input's dtype {input.dtype}, got {weight.dtype}")
    dim = input.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != dim:
        raise ValueError(
            f"{name} must have shape (V, D) with D = {dim} (its input's last dimension), got "
            f"{tuple(weight.shape)}"
        )
    if bias is not None:
        _check_tensor(bias_name, bias, input.device)
        if bias.dtype != input.dtype:
            raise TypeError(f"{bias_name} must have its input's dtype {input.dtype}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"{bias_name} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )


def linear_distillation_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    return_entropy: bool = False,
    impl: str = "auto",
):
    """:func:`distillation_loss` of ``linear(student_input, student_weight, student_bias)``
    against ``linear(teacher_input, teacher_weight, teacher_bias)``, without either full logit
    matrix.

    The default plan sweeps the two heads by vocabulary slabs (a few thousand classes, a slab of
    both logit matrices at most a sixteenth of one and 64 MiB): the forward twice (both heads'
    log-sum-exps, then the divergence's sums), the backward once more, each slab's student logits
    turned into their gradient and taken by two products into d_weight[slab] (one product over all
    rows, rounded once) and a float32 d_hidden. Beyond the inputs and the gradients it holds six
    floats a row and one slab. ``chunk_size=`` spends memory for speed: chunks of rows, each
    chunk's two logit matrices one product each (the teacher's without autograd), the student's
    turned in place into its gradient and accumulated in float32 (a V x D accumulator); each
    gradient is rounded once to its parameter's dtype either way.

    Args:
        student_input: (..., D_s) hidden states; float32 / float16 / bfloat16 (float64 on the
            reference path).
        student_weight: (V, D_s), the student's LM head; the input's dtype.
        teacher_input: (..., D_t) with the student's leading shape (D_t may differ from D_s);
            read only, no gradient (one that requires grad is refused).
        teacher_weight: (V, D_t), the teacher's head: the same V; the teacher input's dtype.
        target: optional (...) int64 / int32 class indices, the inputs' leading shape.
        student_bias, teacher_bias: optional (V,).
        chunk_size: None (the default): vocabulary slabs; rows per chunk for the row-chunk
            plan (memory for speed), as :func:`fused_xent.linear_cross_entropy`'s.
        return_entropy: also return the student's entropy at the temperature per position
            (the inputs' leading shape, float32, 0 at ignored positions, no gradient: TRL's
            distillation trainer logs it), from the loss's own sweeps; the default plan only.
        The other arguments as in :func:`distillation_loss`.

    Returns:
        The float32 loss: 0-dim, or the inputs' leading shape for "none"; with
        ``return_entropy`` the tuple (loss, entropy).
    """
    _check_tensor("student_input", student_input)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    if return_entropy and chunk_size is not None:
        raise ValueError("return_entropy=True needs the default plan (chunk_size=None)")
    device = student_input.device
    # As F.linear under autocast (and linear_cross_entropy): the products in the autocast dtype,
    # the loss in float32.
    student_input, student_weight, student_bias = autocast_linear(
        student_input, student_weight, student_bias
    )
    teacher_input, teacher_weight, teacher_bias = autocast_linear(
        teacher_input, teacher_weight, teacher_bias
    )
    _check_tensor("teacher_input", teacher_input, device)
    _check_common(reduction, impl)
    if student_input.dim() < 1 or teacher_input.dim() < 1:
        raise ValueError("student_input and teacher_input must have a hidden dimension (..., D)")
    _check_head("student_weight", student_weight, student_bias, student_input, "student_bias")
    _check_head("teacher_weight", teacher_weight, teacher_bias, teacher_input, "teacher_bias")
    vocab = student_weight.shape[0]
    if teacher_weight.shape[0] != vocab:
        raise ValueError(
            f"teacher_weight must have the student's vocabulary: V = {vocab} rows in "
            f"student_weight, got teacher_weight {tuple(teacher_weight.shape)}"
        )
    if vocab == 0:
        raise ValueError("student_weight must have at least one class (V >= 1)")
    lead = tuple(student_input.shape[:-1])
    if tuple(teacher_input.shape[:-1]) != lead:
        raise ValueError(
            f"teacher_input must have the student's leading shape {lead}, got "
            f"{tuple(teacher_input.shape[:-1])} (teacher_input {tuple(teacher_input.shape)})"
        )
    _check_target(target, lead, device, "student_input.shape[:-1]")
    _refuse_teacher_grad(
        teacher_input=teacher_input, teacher_weight=teacher_weight, teacher_bias=teacher_bias
    )
    _check_chunk_size(chunk_size)
    opts = _options(beta, temperature, soft_weight, hard_weight, ignore_index, target)
    backend = _pick_backend(impl, student_input, teacher_input)
    hidden = student_input.reshape(-1, student_input.shape[-1])
    t_hidden = teacher_input.reshape(-1, teacher_input.shape[-1])
    rows_target = None if target is None else target.reshape(-1)
    n_rows = hidden.shape[0]
    args = (hidden, student_weight, student_bias, t_hidden, teacher_weight, teacher_bias,
            rows_target, opts)  # fmt: skip
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_input, student_weight, student_bias)
    )
    den = entropy = None
    if chunk_size is None:  # the default: vocabulary slabs
        if wants_grad:
            loss = SlabLinearDistillationFunction.apply(*args, reduction, backend, return_entropy)
            if return_entropy:
                loss, entropy = loss
        else:
            loss, _, entropy = slab_distill_rows(args[:6], rows_target, opts, backend,
                                                 return_entropy)  # fmt: skip
    elif wants_grad:
        loss = LinearDistillationFunction.apply(*args, reduction, chunk_size, backend)
    else:
        loss, _ = linear_distill_rows(*args, chunk_size, backend)
    if not wants_grad and reduction == "mean":
        den = distill_denominator(rows_target, opts, n_rows, loss.dtype, loss.device)
    if not wants_grad:
        loss = _reduce(loss, reduction, den)
    loss = loss.reshape(lead) if reduction == "none" else loss
    return (loss, entropy.reshape(lead)) if return_entropy else loss
