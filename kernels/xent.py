"""Triton kernels for softmax cross-entropy, and their launchers (no autograd here).

The math, for one row ``x`` of ``C`` logits with class-index target ``y``::

    lse  = log(sum_c exp(x_c))                  (online: running max m and sum s, in float32)
    loss = lse - x[y]
    dx   = (softmax(x) - onehot(y)) * dloss      softmax(x)_c = exp(x_c - lse)

Rows whose target equals ``ignore_index`` have loss 0 and gradient 0. A target outside ``[0, C)``
that is not ``ignore_index`` is never used as an address: that row gets a NaN loss and a NaN
gradient, so the error shows up in the loss instead of as an out-of-bounds access.

Memory traffic, per logit element (``b`` = bytes of the logits dtype):

* ``_xent_fwd_kernel`` with ``WRITE_GRAD=False`` (forward only): one read, ``b`` bytes.
* ``_xent_fwd_kernel`` with ``WRITE_GRAD=True`` (forward of a "mean"/"sum" loss that needs a
  gradient): the gradient is written in the same launch, scaled by ``grad_scale`` (``1/n_valid``
  for "mean", ``1`` for "sum"). A row that fits one block is read once and written once from
  registers; a longer row is read twice (the second read of a recently read row is mostly served
  by L2) and written once.
* ``_scale_grad_kernel`` (backward of that loss): reads the incoming scalar gradient ``g`` on the
  GPU and touches the gradient only when ``g != 1``, so ``loss.backward()`` costs no extra pass
  and no host synchronisation.
* ``_xent_bwd_kernel`` (backward of a "none" loss, whose per-row incoming gradient is unknown at
  forward time): one read of the logits and one write of the gradient; the forward stored the
  per-row ``lse`` for it.

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
def _row_lse(
    x_row_ptr,
    n_cols,
    BLOCK: tl.constexpr,
):
    """Log-sum-exp of one row that spans several blocks: one read, per-lane online max and sum."""
    cols = tl.arange(0, BLOCK)
    m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        x = tl.load(x_row_ptr + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        # A lane that has seen only -inf keeps m = -inf; shifting by 0 there avoids -inf - -inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_vec = s_vec * tl.exp(m_vec - m_shift) + tl.exp(x - m_shift)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(s_vec * tl.exp(m_vec - m_shift), axis=0)
    return m_shift + tl.log(s)


@triton.jit
def _write_row_grad(
    x_row_ptr,
    dx_row_ptr,
    target,
    lse,
    row_scale,
    n_cols,
    BLOCK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """dx = (exp(x - lse) - onehot(target)) * row_scale over a row of several blocks."""
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(x_row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        dx = tl.exp(x - lse) * row_scale
        dx = tl.where(offs == target, dx - row_scale, dx)
        tl.store(dx_row_ptr + offs, _to_out(dx, dx_row_ptr, ROUND_BF16), mask=mask)


@triton.jit
def _row_target(
    target_ptr,
    row,
    stride_target,
    ignore_index,
    n_cols,
):
    """The row's target (int64) and whether it is ignored / a valid class index."""
    target = tl.load(target_ptr + row * stride_target).to(tl.int64)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < n_cols) & (~ignored)
    return target, ignored, valid


@triton.jit
def _xent_fwd_kernel(
    # pointers
    logits_ptr,
    target_ptr,
    loss_ptr,
    lse_ptr,
    grad_ptr,
    grad_scale_ptr,
    # sizes
    n_cols,
    # strides
    stride_logits_row,
    stride_target,
    stride_grad_row,
    # options
    ignore_index,
    # meta-parameters
    BLOCK: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = logits_ptr + row * stride_logits_row
    target, ignored, valid = _row_target(target_ptr, row, stride_target, ignore_index, n_cols)
    # A scalar load of x[target], only at a valid address.
    x_target = tl.load(x_row_ptr + tl.where(valid, target, 0), mask=valid, other=0.0)
    x_target = x_target.to(tl.float32)

    if SINGLE_BLOCK:
        # The whole row lives in registers: one read, and the gradient comes from them.
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        m_shift = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(x - m_shift)
        s = tl.sum(e, axis=0)
        lse = m_shift + tl.log(s)
    else:
        lse = _row_lse(x_row_ptr, n_cols, BLOCK)

    loss = tl.where(valid, lse - x_target, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)

    if WRITE_GRAD:
        scale = tl.load(grad_scale_ptr).to(tl.float32)
        row_scale = tl.where(valid, scale, float("nan"))
        row_scale = tl.where(ignored, 0.0, row_scale)
        dx_row_ptr = grad_ptr + row * stride_grad_row
        if SINGLE_BLOCK:
            dx = e * (row_scale / s)
            dx = tl.where(cols == target, dx - row_scale, dx)
            dx = tl.where(ignored, 0.0, dx)
            tl.store(dx_row_ptr + cols, _to_out(dx, dx_row_ptr, ROUND_BF16), mask=mask)
        else:
            _write_row_grad(
                x_row_ptr, dx_row_ptr, target, lse, row_scale, n_cols, BLOCK, ROUND_BF16
            )


@triton.jit
def _xent_bwd_kernel(
    # pointers
    logits_ptr,
    target_ptr,
    lse_ptr,
    dloss_ptr,
    grad_ptr,
    # sizes
    n_cols,
    # strides
    stride_logits_row,
    stride_target,
    stride_dloss,
    stride_grad_row,
    # options
    ignore_index,
    # meta-parameters
    BLOCK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target, ignored, valid = _row_target(target_ptr, row, stride_target, ignore_index, n_cols)
    lse = tl.load(lse_ptr + row)
    dloss = tl.load(dloss_ptr + row * stride_dloss).to(tl.float32)
    row_scale = tl.where(valid, dloss, float("nan"))
    row_scale = tl.where(ignored, 0.0, row_scale)
    _write_row_grad(
        logits_ptr + row * stride_logits_row,
        grad_ptr + row * stride_grad_row,
        target,
        lse,
        row_scale,
        n_cols,
        BLOCK,
        ROUND_BF16,
    )


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
    if logits.stride(1) != 1:
        raise ValueError("the kernels need unit stride along the class dimension")


def xent_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    loss: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """Per-row loss and lse of ``logits`` (N, C), and the gradient when ``grad`` is given.

    Args:
        logits: (N, C) float32 / float16 / bfloat16, unit stride along C.
        target: (N,) int64 / int32 class indices.
        ignore_index: rows with this target get loss 0 and gradient 0.
        loss, lse: (N,) float32 outputs.
        grad: optional (N, C) output of the logits dtype, unit stride along C; may be ``logits``
            itself (in-place). Receives ``(softmax - onehot) * grad_scale``.
        grad_scale: one-element float32 tensor on the logits' device (no host synchronisation).
    """
    _check_launchable(logits)
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block_size, num_warps = _launch_config(n_cols, logits.dtype)
    write_grad = grad is not None
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        _xent_fwd_kernel[(n_rows,)](
            logits,
            target,
            loss,
            lse,
            grad if write_grad else loss,
            grad_scale if write_grad else loss,
            n_cols,
            logits.stride(0),
            target.stride(0),
            grad.stride(0) if write_grad else 0,
            ignore_index,
            BLOCK=block_size,
            SINGLE_BLOCK=n_cols <= block_size,
            WRITE_GRAD=write_grad,
            ROUND_BF16=_round_bf16(grad) if write_grad else False,
            num_warps=num_warps,
        )


def xent_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    dloss: torch.Tensor,
    ignore_index: int,
    grad: torch.Tensor,
) -> None:
    """grad = (softmax(logits) - onehot(target)) * dloss[:, None], from the forward's lse.

    Args:
        logits: (N, C), as given to :func:`xent_forward`.
        target: (N,) class indices.
        lse: (N,) float32 from :func:`xent_forward`.
        dloss: (N,) incoming gradient of the per-row loss (any float dtype, any stride).
        grad: (N, C) output of the logits dtype; may be ``logits`` itself (in-place).
    """
    _check_launchable(logits)
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block_size, num_warps = _launch_config(n_cols, logits.dtype)
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        _xent_bwd_kernel[(n_rows,)](
            logits,
            target,
            lse,
            dloss,
            grad,
            n_cols,
            logits.stride(0),
            target.stride(0),
            dloss.stride(0),
            grad.stride(0),
            ignore_index,
            BLOCK=block_size,
            ROUND_BF16=_round_bf16(grad),
            num_warps=num_warps,
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
