"""Triton kernels for softmax cross-entropy, and their launchers (no autograd here).

The math, for one row of ``C`` logits ``x``. The logits are first transformed,
``z = softcap * tanh(logit_scale * x / softcap)`` (``z = logit_scale * x`` without a softcap), and
with ``lse = log(sum_c exp(z_c))`` and ``p = softmax(z) = exp(z - lse)``:

    class-index target y, class weights w (all 1 without), smoothing eps:
        loss = (1 - eps) * w_y * (lse - z_y) + eps / C * sum_c w_c * (lse - z_c)
        dz   = A * p - (1 - eps) * w_y * onehot(y) - eps / C * w
        A    = (1 - eps) * w_y + eps / C * sum_c w_c
    probability target t (smoothed: t' = (1 - eps) * t + eps / C):
        loss = sum_c w_c * t'_c * (lse - z_c)
        dz   = A * p - w * t'                       A = sum_c w_c * t'_c
    z-loss: loss += lse_square_scale * lse**2, so A += 2 * lse_square_scale * lse
    dx   = dz * dz/dx * dloss,   dz/dx = logit_scale * (1 - (z / softcap)**2)  (logit_scale alone)

Rows whose class-index target equals ``ignore_index`` have loss 0 and gradient 0. A target outside
``[0, C)`` that is not ``ignore_index`` is never used as an address: that row gets a NaN loss and a
NaN gradient, so the error shows up in the loss instead of as an out-of-bounds access.

Memory traffic, per logit element (``b`` = bytes of the logits dtype; probability targets add the
same again for the targets, class weights are a C-vector shared by all rows and live in L2):

* ``_xent_fwd_kernel`` with ``WRITE_GRAD=False`` (forward only): one read, ``b`` bytes.
  ``lse`` is kept as ``max + log(sum(exp(z - max)))`` with its two parts apart, and the loss is
  ``(max - z_y) + log(...)``, so that large logits (1e4) lose no accuracy to a rounded ``lse``.
* ``_xent_fwd_kernel`` with ``WRITE_GRAD=True`` (forward of a "mean"/"sum" loss that needs a
  gradient): the gradient is written in the same launch, scaled by ``grad_scale`` (``1/denominator``
  for "mean", ``1`` for "sum"). A row that fits one block is read once and written once from
  registers; a longer row is read twice (the second read of a recently read row is mostly served
  by L2) and written once.
* ``_scale_grad_kernel`` (backward of that loss): reads the incoming scalar gradient ``g`` on the
  GPU and touches the gradient only when ``g != 1``, so ``loss.backward()`` costs no extra pass
  and no host synchronisation.
* ``_xent_bwd_kernel`` (backward of a "none" loss, whose per-row incoming gradient is unknown at
  forward time): one read of the logits and one write of the gradient; the forward stored three
  floats per row for it (max, log of the shifted sum, and ``A``).

So a forward plus ``loss.backward()`` reads the logits at most twice and writes them once.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether a kernel is compiled or interpreted on the CPU.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _to_out(x, out_ptr, ROUND_BF16: tl.constexpr):
    """float32 -> the output's dtype, rounding to nearest even."""
    if ROUND_BF16:
        # Triton's CPU interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest
        # even; round here first (the cast then only drops zero bits), so CI tests GPU numerics.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _tanh(u):
    # Not every Triton version has tl.tanh. Near 0 an odd Taylor polynomial (truncation below
    # 1e-8 relative for |u| < 0.25); beyond, (1 - e) / (1 + e) with e = exp(-2|u|), which never
    # overflows and has lost little to cancellation there. Relative accuracy near 0 matters with
    # a large softcap, where z = softcap * tanh(x / softcap) would otherwise carry an absolute
    # error proportional to the softcap.
    u2 = u * u
    series = u * (
        1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0))))
    )
    e = tl.exp(-2.0 * tl.abs(u))
    th = (1.0 - e) / (1.0 + e)
    th = tl.where(u < 0, -th, th)
    return tl.where(tl.abs(u) < 0.25, series, th)


@triton.jit
def _transform(x, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = softcap * tanh(logit_scale * x / softcap), or logit_scale * x without a softcap."""
    z = x.to(tl.float32) * logit_scale
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _class_row_scale(scale, valid, ignored):
    """A class-index row's gradient scale: 0 when ignored, NaN when its target is invalid."""
    scale = tl.where(valid, scale, float("nan"))
    return tl.where(ignored, 0.0, scale)


@triton.jit
def _load_block(
    x_row_ptr,
    t_row_ptr,
    weight_ptr,
    offs,
    n_cols,
    logit_scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
):
    """One block of a row: z (lanes past the row are -inf, after the softcap), w, t and the mask."""
    mask = offs < n_cols
    z = _transform(
        tl.load(x_row_ptr + offs, mask=mask, other=0.0), logit_scale, softcap, HAS_SOFTCAP
    )
    # Masked lanes become -inf only now: -inf through the tanh would come out as -softcap and
    # leak probability mass into lanes that do not exist.
    z = tl.where(mask, z, float("-inf"))
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    if PROB_TARGET:
        t = tl.load(t_row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        t = tl.zeros_like(z)
    return z, w, t, mask


@triton.jit
def _block_grad(
    z,
    w,
    t,
    offs,
    target,
    row_max,
    log_sum,
    coef,
    row_scale,
    w_target,
    label_smoothing,
    smooth_c,
    logit_scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    PROB_TARGET: tl.constexpr,
):
    """dx of one block (see the module docstring), already multiplied by row_scale.

    ``smooth_c`` is ``label_smoothing / C`` with C the whole vocabulary (not this block's row
    slice, when the vocabulary is sharded across ranks).
    """
    # p = exp(z - lse) with lse = row_max + log_sum kept apart: at large logits a rounded lse
    # would cost the gradient its accuracy.
    dz = coef * tl.exp((z - row_max) - log_sum)
    if PROB_TARGET:
        if HAS_SMOOTHING:
            t = (1.0 - label_smoothing) * t + smooth_c
        dz -= w * t
    else:
        if HAS_SMOOTHING:
            dz -= smooth_c * w
        dz = tl.where(offs == target, dz - (1.0 - label_smoothing) * w_target, dz)
    dz *= row_scale * logit_scale
    if HAS_SOFTCAP:
        # |z| <= softcap on real lanes; the clamp keeps lanes past the row (z = -inf) at 0, not NaN.
        zc = tl.minimum(tl.abs(z / softcap), 1.0)
        dz *= 1.0 - zc * zc
    # A zero scale (ignored row, zero incoming gradient) gives exact zeros, even where the
    # logits are -inf or NaN.
    return tl.where(row_scale == 0.0, 0.0, dz)


@triton.jit
def _accumulate(
    z,
    w,
    t,
    mask,
    shift,
    m_vec,
    s_vec,
    sum_w,
    sum_wz,
    sum_wt,
    sum_wtz,
    HAS_SMOOTHING: tl.constexpr,
    PROB_TARGET: tl.constexpr,
):
    """Fold one block into the per-lane online max / sum and the option sums of the row.

    The option sums take ``z - shift`` (shift: a logit of the same row), so that at large logits
    ``sum_w * lse - sum_wz`` does not cancel away the loss.
    """
    m_new = tl.maximum(m_vec, z)
    # A lane that has seen only -inf keeps m = -inf; shifting by 0 there avoids -inf - -inf.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_vec = s_vec * tl.exp(m_vec - m_shift) + tl.exp(z - m_shift)
    z_finite = tl.where(mask, z - shift, 0.0)
    if HAS_SMOOTHING:
        sum_w += tl.sum(w, axis=0)
        sum_wz += tl.sum(w * z_finite, axis=0)
    if PROB_TARGET:
        wt = w * t
        sum_wt += tl.sum(wt, axis=0)
        # A class with no target mass adds nothing, even where its logit is -inf (masked vocab).
        sum_wtz += tl.sum(tl.where(wt == 0.0, 0.0, wt * z_finite), axis=0)
    return m_new, s_vec, sum_w, sum_wz, sum_wt, sum_wtz


@triton.jit
def _row_target(
    x_row_ptr,
    t_row_ptr,
    weight_ptr,
    n_cols,
    class_offset,
    n_classes,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
):
    """A class-index row's target, as a column of this row (-1 when it is not in this row's
    columns), whether it is ignored / valid, x[target] and weight[target] (0 when elsewhere).

    The row holds classes [class_offset, class_offset + n_cols) of n_classes: all of them, or
    one rank's slice of a sharded vocabulary.
    """
    target = tl.load(t_row_ptr).to(tl.int64)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < n_classes) & (~ignored)
    col = target - class_offset
    here = valid & (col >= 0) & (col < n_cols)
    # Scalar loads, only at a valid address.
    safe_col = tl.where(here, col, 0)
    x_target = tl.load(x_row_ptr + safe_col, mask=here, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w_target = tl.load(weight_ptr + safe_col, mask=here, other=0.0).to(tl.float32)
    else:
        w_target = tl.where(here, 1.0, 0.0)
    return tl.where(here, col, -1), ignored, valid, x_target, w_target


@triton.jit
def _write_row_grad(
    x_row_ptr,
    t_row_ptr,
    weight_ptr,
    dx_row_ptr,
    target,
    row_max,
    log_sum,
    coef,
    row_scale,
    w_target,
    n_cols,
    label_smoothing,
    smooth_c,
    logit_scale,
    softcap,
    BLOCK: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """The gradient of a row that spans several blocks: one more read, one write."""
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z, w, t, mask = _load_block(
            x_row_ptr, t_row_ptr, weight_ptr, offs, n_cols, logit_scale, softcap,
            HAS_SOFTCAP, HAS_WEIGHT, PROB_TARGET,
        )  # fmt: skip
        dx = _block_grad(
            z, w, t, offs, target, row_max, log_sum, coef, row_scale, w_target,
            label_smoothing, smooth_c, logit_scale, softcap, HAS_SOFTCAP, HAS_SMOOTHING,
            PROB_TARGET,
        )  # fmt: skip
        tl.store(dx_row_ptr + offs, _to_out(dx, dx_row_ptr, ROUND_BF16), mask=mask)


@triton.jit
def _xent_fwd_kernel(
    # pointers
    logits_ptr,
    target_ptr,
    weight_ptr,
    loss_ptr,
    stats_ptr,
    grad_ptr,
    grad_scale_ptr,
    # sizes
    n_cols,
    class_offset,
    n_classes,
    # strides
    stride_logits_row,
    stride_target_row,
    stride_stats,
    stride_grad_row,
    # options
    ignore_index,
    label_smoothing,
    lse_square_scale,
    logit_scale,
    softcap,
    # meta-parameters
    BLOCK: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = logits_ptr + row * stride_logits_row
    t_row_ptr = target_ptr + row * stride_target_row
    if PROB_TARGET:
        target = -1  # no class index, and every row counts
        w_target = 0.0
    else:
        target, ignored, valid, z_target, w_target = _row_target(
            x_row_ptr,
            t_row_ptr,
            weight_ptr,
            n_cols,
            class_offset,
            n_classes,
            ignore_index,
            HAS_WEIGHT,
        )
        z_target = _transform(z_target, logit_scale, softcap, HAS_SOFTCAP)
    # The option sums are taken relative to the row's first logit (any finite logit would do).
    shift = _transform(tl.load(x_row_ptr), logit_scale, softcap, HAS_SOFTCAP)
    shift = tl.where(shift == float("-inf"), 0.0, shift)

    # Pass 1: per-lane online max and sum of exponentials, and the sums the options need.
    m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    sum_w = tl.sum(s_vec, axis=0)
    sum_wz = sum_w
    sum_wt = sum_w
    sum_wtz = sum_w
    if SINGLE_BLOCK:
        # The whole row fits one block and stays in registers for the gradient: one read.
        offs = tl.arange(0, BLOCK)
        z, w, t, mask = _load_block(
            x_row_ptr, t_row_ptr, weight_ptr, offs, n_cols, logit_scale, softcap,
            HAS_SOFTCAP, HAS_WEIGHT, PROB_TARGET,
        )  # fmt: skip
        m_vec, s_vec, sum_w, sum_wz, sum_wt, sum_wtz = _accumulate(
            z, w, t, mask, shift, m_vec, s_vec, sum_w, sum_wz, sum_wt, sum_wtz,
            HAS_SMOOTHING, PROB_TARGET,
        )  # fmt: skip
    else:
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z, w, t, mask = _load_block(
                x_row_ptr, t_row_ptr, weight_ptr, offs, n_cols, logit_scale, softcap,
                HAS_SOFTCAP, HAS_WEIGHT, PROB_TARGET,
            )  # fmt: skip
            m_vec, s_vec, sum_w, sum_wz, sum_wt, sum_wtz = _accumulate(
                z, w, t, mask, shift, m_vec, s_vec, sum_w, sum_wz, sum_wt, sum_wtz,
                HAS_SMOOTHING, PROB_TARGET,
            )  # fmt: skip
    row_max = tl.max(m_vec, axis=0)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    log_sum = tl.log(tl.sum(s_vec * tl.exp(m_vec - row_max), axis=0))
    lse = row_max + log_sum
    lse_rel = (row_max - shift) + log_sum  # lse - shift, without rounding lse first

    # The row's loss and the coefficient A of p in its gradient (module docstring).
    eps_c = label_smoothing / n_classes
    if PROB_TARGET:
        if HAS_SMOOTHING:
            sum_wt = (1.0 - label_smoothing) * sum_wt + eps_c * sum_w
            sum_wtz = (1.0 - label_smoothing) * sum_wtz + eps_c * sum_wz
        loss = sum_wt * lse_rel - sum_wtz
        coef = sum_wt
    else:
        # No target share (weight 0, or the target in another rank's slice) adds exactly 0,
        # even where this row's logits are all -inf.
        loss = tl.where(
            w_target == 0.0,
            0.0,
            (1.0 - label_smoothing) * w_target * ((row_max - z_target) + log_sum),
        )
        coef = (1.0 - label_smoothing) * w_target
        if HAS_SMOOTHING:
            loss += eps_c * (sum_w * lse_rel - sum_wz)
            coef += eps_c * sum_w
    # Without a z-loss nothing is added, even where lse is -inf (a rank's slice of a sharded
    # vocabulary whose logits are all -inf: 0 * inf would be NaN).
    if lse_square_scale != 0.0:
        loss += lse_square_scale * lse * lse
        coef += 2.0 * lse_square_scale * lse
    if not PROB_TARGET:
        loss = tl.where(valid, loss, float("nan"))
        loss = tl.where(ignored, 0.0, loss)
    tl.store(loss_ptr + row, loss)
    tl.store(stats_ptr + row, row_max)
    tl.store(stats_ptr + stride_stats + row, log_sum)
    tl.store(stats_ptr + 2 * stride_stats + row, coef)

    if WRITE_GRAD:
        row_scale = tl.load(grad_scale_ptr).to(tl.float32)
        if not PROB_TARGET:
            row_scale = _class_row_scale(row_scale, valid, ignored)
        dx_row_ptr = grad_ptr + row * stride_grad_row
        if SINGLE_BLOCK:
            dx = _block_grad(
                z, w, t, offs, target, row_max, log_sum, coef, row_scale, w_target,
                label_smoothing, eps_c, logit_scale, softcap, HAS_SOFTCAP, HAS_SMOOTHING,
                PROB_TARGET,
            )  # fmt: skip
            tl.store(dx_row_ptr + offs, _to_out(dx, dx_row_ptr, ROUND_BF16), mask=mask)
        else:
            _write_row_grad(
                x_row_ptr, t_row_ptr, weight_ptr, dx_row_ptr, target, row_max, log_sum, coef,
                row_scale, w_target, n_cols, label_smoothing, eps_c, logit_scale, softcap,
                BLOCK, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ROUND_BF16,
            )  # fmt: skip


@triton.jit
def _xent_bwd_kernel(
    # pointers
    logits_ptr,
    target_ptr,
    weight_ptr,
    stats_ptr,
    dloss_ptr,
    grad_ptr,
    # sizes
    n_cols,
    class_offset,
    n_classes,
    # strides
    stride_logits_row,
    stride_target_row,
    stride_stats,
    stride_dloss,
    stride_grad_row,
    # options
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    # meta-parameters
    BLOCK: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = logits_ptr + row * stride_logits_row
    t_row_ptr = target_ptr + row * stride_target_row
    row_scale = tl.load(dloss_ptr + row * stride_dloss).to(tl.float32)
    if PROB_TARGET:
        target = -1
        w_target = 0.0
    else:
        target, ignored, valid, _, w_target = _row_target(
            x_row_ptr,
            t_row_ptr,
            weight_ptr,
            n_cols,
            class_offset,
            n_classes,
            ignore_index,
            HAS_WEIGHT,
        )
        row_scale = _class_row_scale(row_scale, valid, ignored)
    row_max = tl.load(stats_ptr + row)
    log_sum = tl.load(stats_ptr + stride_stats + row)
    coef = tl.load(stats_ptr + 2 * stride_stats + row)
    _write_row_grad(
        x_row_ptr, t_row_ptr, weight_ptr, grad_ptr + row * stride_grad_row, target, row_max,
        log_sum, coef, row_scale, w_target, n_cols, label_smoothing,
        label_smoothing / n_classes, logit_scale, softcap,
        BLOCK, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ROUND_BF16,
    )  # fmt: skip


@triton.jit
def _scale_grad_kernel(
    # pointers
    grad_ptr,
    g_ptr,
    # sizes
    n_rows,
    n_cols,
    # strides
    stride_grad_row,
    # meta-parameters
    BLOCK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # The branch is taken on the GPU: with g == 1 (plain loss.backward()) nothing is read or
    # written beyond g itself, and the host never waits for g.
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        # int64 loop bounds make `row` int64, so row * stride cannot overflow.
        pid = tl.program_id(0).to(tl.int64)
        n_programs = tl.num_programs(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        for row in range(pid, n_rows, n_programs):
            row_ptr = grad_ptr + row * stride_grad_row
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                mask = offs < n_cols
                dx = tl.load(row_ptr + offs, mask=mask).to(tl.float32) * g
                tl.store(row_ptr + offs, _to_out(dx, row_ptr, ROUND_BF16), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

# Rows up to this many logits are held in registers whole (read once, gradient from registers).
# The rows come from the H100 feasibility probe in shared/anchors-h100.md, not yet re-tuned here:
_SINGLE_BLOCK_MAX = 16384
_LONG_ROW_BLOCK = {torch.float32: 8192, torch.float16: 16384, torch.bfloat16: 16384}


def _launch_config(n_cols: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``n_cols`` logits of ``dtype``."""
    if n_cols <= 2048:
        return max(triton.next_power_of_2(n_cols), 16), 4  # whole row in registers: 84% at 2048
    if n_cols <= _SINGLE_BLOCK_MAX:
        block = triton.next_power_of_2(n_cols)
        return block, 8 if block <= 8192 else 16
    return _LONG_ROW_BLOCK[dtype], 16  # two-pass row: 90% at bf16 8192 x 32000, block 16384


# With probability targets, class weights, smoothing or a softcap a block carries more live
# arrays; sm_90 builds (cuobjdump -res-usage) spill at 16384 x 16 warps and fit at 8192.
_OPTIONS_BLOCK_MAX = 8192


def _row_config(n_cols: int, dtype: torch.dtype, target: torch.Tensor, opts) -> tuple[int, int]:
    block, num_warps = _launch_config(n_cols, dtype)
    consts = _option_constexprs(target, opts)
    if any(consts.values()):
        block = min(block, _OPTIONS_BLOCK_MAX)
    return block, num_warps


_SCALE_BLOCK = 4096
_SCALE_PROGRAMS = 1024  # enough to fill any current GPU; each loops over its share of rows


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _round_bf16(out: torch.Tensor) -> bool:
    return INTERPRET and out.dtype == torch.bfloat16


def _check_launchable(logits: torch.Tensor) -> None:
    if logits.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton kernels need a CUDA tensor, got one on {logits.device}; to run them on "
            "the CPU, set TRITON_INTERPRET=1 before fused_xent.kernels is first imported"
        )
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError("the kernels need unit stride along the class dimension")


def _option_constexprs(target: torch.Tensor, opts) -> dict:
    """The constexprs that switch the options' code on (off costs nothing)."""
    return dict(
        PROB_TARGET=target.is_floating_point(),
        HAS_WEIGHT=opts.weight is not None,
        HAS_SMOOTHING=opts.label_smoothing > 0.0,
        HAS_SOFTCAP=opts.softcap is not None,
    )


def xent_forward(logits, target, opts, loss, stats, grad=None, grad_scale=None) -> None:
    """Per-row loss and statistics, and the gradient when ``grad`` is given.

    Args:
        logits: (N, C) float32 / float16 / bfloat16, unit stride along C.
        target: (N,) int64 / int32 class indices, or (N, C) probabilities (unit stride along C).
        opts: the loss options (``fused_xent._options.LossOptions``).
        loss: (N,) float32 output, the per-row loss.
        stats: (3, N) float32 output: the row's max, log of its sum of exp(z - max) (so
            lse = max + that), and the softmax coefficient A of the gradient, kept for
            :func:`xent_backward`.
        grad: optional (N, C) output of the logits dtype, unit stride along C; may be ``logits``
            itself (in-place). Receives the gradient of the per-row losses times ``grad_scale``.
        grad_scale: one-element float32 tensor on the logits' device (no host synchronisation).
    """
    _check_launchable(logits)
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block, num_warps = _row_config(n_cols, logits.dtype, target, opts)
    write_grad = grad is not None
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        _xent_fwd_kernel[(n_rows,)](
            logits,
            target,
            opts.weight if opts.weight is not None else loss,  # unread without a weight
            loss,
            stats,
            grad if write_grad else loss,  # unread without WRITE_GRAD
            grad_scale if write_grad else loss,
            n_cols,
            opts.class_offset,
            opts.n_classes or n_cols,
            logits.stride(0),
            target.stride(0),
            stats.stride(0),
            grad.stride(0) if write_grad else 0,
            opts.ignore_index,
            opts.label_smoothing,
            opts.lse_square_scale,
            opts.logit_scale,
            opts.softcap if opts.softcap is not None else 1.0,
            BLOCK=block,
            SINGLE_BLOCK=n_cols <= block,
            WRITE_GRAD=write_grad,
            ROUND_BF16=write_grad and _round_bf16(grad),
            num_warps=num_warps,
            **_option_constexprs(target, opts),
        )


def xent_backward(logits, target, opts, stats, dloss, grad) -> None:
    """grad = d(sum_i dloss_i * loss_i) / d logits, from the forward's per-row statistics.

    Args:
        logits, target, opts: as given to :func:`xent_forward`.
        stats: (3, N) float32 from :func:`xent_forward`.
        dloss: (N,) incoming gradient of the per-row loss (any float dtype, any stride).
        grad: (N, C) output of the logits dtype; may be ``logits`` itself (in-place).
    """
    _check_launchable(logits)
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block, num_warps = _row_config(n_cols, logits.dtype, target, opts)
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        _xent_bwd_kernel[(n_rows,)](
            logits,
            target,
            opts.weight if opts.weight is not None else stats,  # unread without a weight
            stats,
            dloss,
            grad,
            n_cols,
            opts.class_offset,
            opts.n_classes or n_cols,
            logits.stride(0),
            target.stride(0),
            stats.stride(0),
            dloss.stride(0),
            grad.stride(0),
            opts.ignore_index,
            opts.label_smoothing,
            opts.logit_scale,
            opts.softcap if opts.softcap is not None else 1.0,
            BLOCK=block,
            ROUND_BF16=_round_bf16(grad),
            num_warps=num_warps,
            **_option_constexprs(target, opts),
        )


def scale_grad_(grad: torch.Tensor, g: torch.Tensor) -> None:
    """grad *= g in place, decided on the device: nothing moves when g == 1.

    Args:
        grad: (N, C), unit stride along C.
        g: one-element tensor on grad's device.
    """
    _check_launchable(grad)
    n_rows, n_cols = grad.shape
    if n_rows == 0:
        return
    with torch.cuda.device(grad.device) if grad.is_cuda else nullcontext():
        _scale_grad_kernel[(min(n_rows, _SCALE_PROGRAMS),)](
            grad,
            g,
            n_rows,
            n_cols,
            grad.stride(0),
            BLOCK=min(_SCALE_BLOCK, max(triton.next_power_of_2(n_cols), 16)),
            ROUND_BF16=_round_bf16(grad),
            num_warps=8,
        )
