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

How a row is computed (what ``bench/static.py`` counts in the compiled code):

* One ``exp2`` per logit and pass: a block's max first, then ``e = 2**((z - max) * log2(e))``
  (a subtraction that is exact near the max, a multiply and one ``ex2.approx.ftz``); the row's
  sum is ``sum(e)`` and ``p = e / sum``, so the gradient reuses ``e`` where the row is still in
  registers. The statistics kept for the backward are ``max``, ``log_sum = log(sum exp(z - max))``
  and ``A``, with ``lse = max + log_sum`` kept apart so that logits offset by 1e4 lose no accuracy
  (and a row of one class has a loss of exactly 0).
* The one-hot term is not compared per logit: the gradient of the target column is stored once
  more, after a barrier, with its own value.
* 16-byte loads and stores at every ``C``: a row is cut into a head (up to the first 16-byte
  boundary), a body (whole 16-byte vectors) and a tail; the head and tail (fewer than 16 bytes
  each) go through a small separate vector of ``2 * VEC`` lanes. The gradient buffers the
  package allocates have the logits' alignment (``grad_like``), so the cut is the same for both.
* Rows that fit one block are read once and written once from registers. Longer rows are read
  twice: once for the max and sum (blocks kept in L2 with ``evict_last``), then once more in
  reverse block order for the gradient, so the blocks read last are re-read first.
* Reductions ("mean", "sum") finish in the same launch: every program adds 1 to an int32 counter
  after storing its row's loss, and the program that arrives last sums the rows' losses in a fixed
  order (deterministic; no float atomics) and divides by the denominator. A one-program prologue
  (``_prologue_kernel``) zeroes the counter and computes the "mean" denominator first, because
  the gradient written in the forward needs it.

Memory traffic, per logit (``b`` = bytes of the logits dtype; probability targets add the same
again for the targets, class weights are a C-vector shared by all rows and live in L2):

* ``_xent_fwd_kernel`` without a gradient: one read, ``b`` bytes.
* ``_xent_fwd_kernel`` with ``WRITE_GRAD`` (forward of "mean"/"sum" when the gradient is wanted):
  the gradient for an incoming gradient of 1 is written in the same launch: one read (two for
  rows longer than a block), one write.
* ``_xent_bwd_kernel``: for "none" (and every in-place gradient) one read of the logits and one
  write of the gradient from the forward's three floats per row. After a ``WRITE_GRAD`` forward it
  reads the incoming gradient ``g`` on the GPU and does nothing when ``g == 1``; otherwise it
  recomputes the gradient from the logits with ``g`` applied, so the gradient is rounded to its
  dtype once, after every scale (a float16 gradient of a GradScaler-scaled loss does not
  underflow, a bfloat16 one is not rounded twice).
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl
from triton.runtime.driver import driver

from .._options import reduce_total
from ._launch import Prepared, launch

# Triton decides at decoration time whether a kernel is compiled or interpreted on the CPU.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# PTX's approximate ftz forms where compiled (one MUFU instruction each, without the four fix-up
# instructions of the non-ftz forms); the interpreter has no inline assembly.
_PTX_APPROX = tl.constexpr(not INTERPRET)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Reduction codes of the REDUCE meta-parameter.
NONE, SUM, MEAN = 0, 1, 2
_REDUCE_CODE = {"none": NONE, "sum": SUM, "mean": MEAN}

# --------------------------------------------------------------------------------------------
# Kernels: elementwise helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _ptx_unary(x, ASM: tl.constexpr):
    """One approximate PTX instruction on float32 (one MUFU op where compiled)."""
    return tl.inline_asm_elementwise(ASM, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _exp2(x):
    if _PTX_APPROX:
        return _ptx_unary(x, "ex2.approx.ftz.f32 $0, $1;")
    else:
        return tl.exp2(x)


@triton.jit
def _log2(x):
    if _PTX_APPROX:
        return _ptx_unary(x, "lg2.approx.ftz.f32 $0, $1;")
    else:
        return tl.log2(x)


@triton.jit
def _rcp(x):
    if _PTX_APPROX:
        return _ptx_unary(x, "rcp.approx.ftz.f32 $0, $1;")
    else:
        return 1.0 / x


@triton.jit
def _mean_rcp(den):
    """1 / den of "mean", 0 where den is 0: the gradient of a mean over nothing is exactly 0
    (``fused_xent._options.over_den``, which decides this for every route)."""
    return tl.where(den == 0.0, 0.0, _rcp(den))


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
    e = _exp2(tl.abs(u) * (-2.0 * LOG2E))
    th = (1.0 - e) * _rcp(1.0 + e)
    th = tl.where(u < 0, -th, th)
    return tl.where(tl.abs(u) < 0.25, series, th)


@triton.jit
def _transform(x, mask, logit_scale, softcap, inv_softcap, SCALE: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """z of loaded logits (masked lanes were loaded as -inf and stay -inf)."""
    z = x.to(tl.float32)
    if HAS_SOFTCAP:
        if SCALE:
            z = z * (logit_scale * inv_softcap)
        else:
            z = z * inv_softcap
        z = softcap * _tanh(z)
        if MASKED:
            # -inf through the tanh would come out as -softcap and leak probability mass into
            # lanes that do not exist.
            z = tl.where(mask, z, float("-inf"))
    elif SCALE:
        z = z * logit_scale
    return z


@triton.jit
def _dz_dx(z, inv_softcap):
    """dz/dx without logit_scale (folded into the row's factor): 1 - (z / softcap)**2."""
    # |z| <= softcap on real lanes; the clamp keeps lanes past the row (z = -inf) at 0, not NaN.
    zc = tl.minimum(tl.abs(z * inv_softcap), 1.0)
    return 1.0 - zc * zc


# --------------------------------------------------------------------------------------------
# Kernels: the pieces of a row
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_layout(start, n_cols, VEC: tl.constexpr, EDGES: tl.constexpr):
    """Cut a row starting ``start`` elements past a 16-byte aligned base into head, body, tail.

    The body starts at a multiple of VEC elements (16 bytes) and holds whole vectors, so Triton
    can prove its loads and stores 16-byte aligned; head and tail have fewer than VEC elements.
    Returns (body start, head length, body length, tail length)."""
    if EDGES:
        a = (start + (VEC - 1)) // VEC * VEC
        head = tl.minimum(a - start, n_cols)
        body = (n_cols - head) // VEC * VEC
        return a, head, body, n_cols - head - body
    else:
        return start, 0, n_cols, 0


@triton.jit
def _edge_cols(head, body, tail, VEC: tl.constexpr):
    """The 2*VEC lanes of a row's head and tail: their columns in the row, and the lanes that
    exist."""
    lanes = tl.arange(0, 2 * VEC)
    in_head = lanes < VEC
    cols = tl.where(in_head, lanes, head + body + lanes - VEC)
    mask = tl.where(in_head, lanes < head, lanes - VEC < tail)
    return cols, mask


@triton.jit
def _load_opts(w_ptr, t_ptr, cols, mask, HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr):
    """Class weights and probability targets of some columns (0 where masked)."""
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    if PROB_TARGET:
        t = tl.load(t_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        t = w
    return w, t


@triton.jit
def _option_sums(z, w, t, mask, shift, sum_w, sum_wz, sum_wt, sum_wtz,
                 HAS_SMOOTHING: tl.constexpr, PROB_TARGET: tl.constexpr):  # fmt: skip
    """Add a block to the sums the options need, taken of ``z - shift`` (shift: a logit of the
    row) so that at large logits ``sum_w * lse - sum_wz`` does not cancel away the loss."""
    z_finite = tl.where(mask, z - shift, 0.0)
    if HAS_SMOOTHING:
        sum_w += tl.sum(w, axis=0)
        # A class of weight 0 adds nothing to the smoothing term, even at a -inf logit.
        sum_wz += tl.sum(tl.where(w == 0.0, 0.0, w * z_finite), axis=0)
    if PROB_TARGET:
        wt = w * t
        sum_wt += tl.sum(wt, axis=0)
        # A class with no target mass adds nothing, even where its logit is -inf (masked vocab).
        sum_wtz += tl.sum(tl.where(wt == 0.0, 0.0, wt * z_finite), axis=0)
    return sum_w, sum_wz, sum_wt, sum_wtz


@triton.jit
def _finite_below(d):
    """z - max with -inf (a masked class: e = 0) raised to -1e4, where e is 0 all the same, so
    that e * (k + k2 * d) is 0 and not 0 * inf; NaN stays NaN in e."""
    return tl.maximum(d, -1.0e4)


@triton.jit
def _grad(e, z, w, t, k, label_smoothing, smooth_c, row_scale, inv_softcap, row_max, k2,
          HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, PROB_TARGET: tl.constexpr,
          HAS_WEIGHT: tl.constexpr, ENT_GRAD: tl.constexpr):  # fmt: skip
    """dx of a block without the one-hot term: ``e * k`` is ``A * p`` times the row's scale.

    ``k`` = A * row_scale * logit_scale / sum; ``row_scale * logit_scale`` is ``row_scale`` here.
    With the entropy's gradient (``ENT_GRAD``) ``e * (k + k2 * (z - max))``, ``k`` then holding
    the entropy's constant term as well.
    """
    if ENT_GRAD:
        dx = e * tl.fma(k2, _finite_below(z - row_max), k)
    else:
        dx = e * k
    if PROB_TARGET:
        if HAS_SMOOTHING:
            t = (1.0 - label_smoothing) * t + smooth_c
        dx -= (w * t) * row_scale
    elif HAS_SMOOTHING:
        if HAS_WEIGHT:
            dx -= w * (smooth_c * row_scale)
        else:
            dx -= smooth_c * row_scale
    if HAS_SOFTCAP:
        dx *= _dz_dx(z, inv_softcap)
    return dx


@triton.jit
def _move_reference(ref, s, block_max):
    """The running reference (log2 units, an integer: ceil(max * log2(e)), -inf before any finite
    logit) after one more block, the shift the block's exponentials use (0 while the reference is
    -inf), and the running sum of exp2(z * log2(e) - ref) moved to the new reference: a power of
    two, built from its bits (0 below 2**-126). Also that power of two and its exponent (<= 0),
    for sums that move with it (``_move_entropy_sum``)."""
    ref_new = tl.maximum(ref, tl.math.ceil(block_max * LOG2E))
    ref_safe = tl.where(ref_new == float("-inf"), 0.0, ref_new)
    k = tl.maximum(tl.where(ref == float("-inf"), -127.0, ref - ref_safe), -127.0).to(tl.int32)
    scale = ((k + 127) << 23).to(tl.float32, bitcast=True)  # 2**k, 0 for k = -127
    return ref_new, ref_safe, s * scale, scale, k.to(tl.float32)


@triton.jit
def _entropy_terms(e, a):
    """sum(e * a) of a block, ``a`` the exponent of ``e = 2**a`` (log2 units from the reference):
    lanes with e = 0 (-inf logits, masked lanes) add 0, not 0 * -inf."""
    return tl.sum(tl.where(e > 0.0, e * a, 0.0), axis=0)


@triton.jit
def _move_entropy_sum(u, s_old, scale, k):
    """u = sum(e * a) moved to a reference ``-k`` units higher: every a grows by k (exactly, on
    the integer grid) and every e shrinks by ``scale = 2**k``."""
    return (u + k * s_old) * scale


@triton.jit
def _move_argmax(idx, m, block_idx, block_max):
    """The lowest column holding the row's max so far, after a block whose max is ``block_max``
    at its lowest column ``block_idx``; ``m`` the max before the block."""
    idx = tl.where(block_max == m, tl.minimum(idx, block_idx), idx)
    return tl.where(block_max > m, block_idx, idx)


@triton.jit
def _row_target(x_row_ptr, t_row_ptr, weight_ptr, n_cols, class_offset, n_classes, ignore_index,
                HAS_WEIGHT: tl.constexpr):  # fmt: skip
    """A class-index row's target: its column in this row (0 when not here), whether it is here,
    ignored, valid, x[target] and weight[target] (0 when elsewhere).

    The row holds classes [class_offset, class_offset + n_cols) of n_classes: all of them, or
    one rank's slice of a sharded vocabulary.
    """
    target = tl.load(t_row_ptr).to(tl.int64)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < n_classes) & (~ignored)
    col = target - class_offset
    here = valid & (col >= 0) & (col < n_cols)
    # Scalar loads, only at a valid address.
    col = tl.where(here, col, 0)
    x_target = tl.load(x_row_ptr + col, mask=here, other=0.0)
    if HAS_WEIGHT:
        w_target = tl.load(weight_ptr + col, mask=here, other=0.0).to(tl.float32)
    else:
        w_target = tl.where(here, 1.0, 0.0)
    return col, here, ignored, valid, x_target, w_target


@triton.jit
def _class_row_scale(scale, valid, ignored):
    """A class-index row's gradient scale: 0 when ignored, NaN when its target is invalid."""
    scale = tl.where(valid, scale, float("nan"))
    return tl.where(ignored, 0.0, scale)


@triton.jit
def _write_target_grad(g_row_ptr, col, here, z_t, row_max, k, k2, row_scale, w_target,
                       label_smoothing, smooth_c, inv_softcap, HAS_SOFTCAP: tl.constexpr,
                       ENT_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr):  # fmt: skip
    """The target column's gradient, stored over what the block store wrote there: the block's
    formula (``k``, ``k2`` as in ``_grad``) and the one-hot term."""
    e_t = _exp2((z_t - row_max) * LOG2E)
    if ENT_GRAD:
        e_t = e_t * tl.fma(k2, _finite_below(z_t - row_max), k)
    else:
        e_t = e_t * k
    dx_t = e_t - ((1.0 - label_smoothing) * w_target + smooth_c * w_target) * row_scale
    if HAS_SOFTCAP:
        dx_t *= _dz_dx(z_t, inv_softcap)
    # The block stores of other threads to this address come first.
    tl.debug_barrier()
    tl.store(g_row_ptr + col, _to_out(dx_t, g_row_ptr, ROUND_BF16), mask=here)


@triton.jit
def _grad_block(x_ptr, g_ptr, dt_ptr, w_ptr, t_ptr, cols, mask, row_max, lse, k, k2, dt_scale,
                label_smoothing, smooth_c, row_scale, logit_scale, softcap, inv_softcap,
                MASKED: tl.constexpr, EVICT: tl.constexpr, SCALE: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, PROB_TARGET: tl.constexpr,
                HAS_WEIGHT: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DT: tl.constexpr,
                ENT_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr):  # fmt: skip
    """Read some columns of a row and write their gradient (without the one-hot term), and the
    probability target's gradient ``-(1 - eps) * w * log p`` times the row's scale."""
    if MASKED:
        x = tl.load(x_ptr + cols, mask=mask, other=float("-inf"), eviction_policy=EVICT)
    else:
        x = tl.load(x_ptr + cols, eviction_policy=EVICT)
    z = _transform(x, mask, logit_scale, softcap, inv_softcap, SCALE, HAS_SOFTCAP, MASKED)
    w, t = _load_opts(w_ptr, t_ptr, cols, mask, HAS_WEIGHT, PROB_TARGET)
    if WRITE_DX:
        e = _exp2((z - row_max) * LOG2E)
        dx = _grad(e, z, w, t, k, label_smoothing, smooth_c, row_scale, inv_softcap, row_max, k2,
                   HAS_SOFTCAP, HAS_SMOOTHING, PROB_TARGET, HAS_WEIGHT, ENT_GRAD)  # fmt: skip
        if MASKED:
            tl.store(g_ptr + cols, _to_out(dx, g_ptr, ROUND_BF16), mask=mask)
        else:
            tl.store(g_ptr + cols, _to_out(dx, g_ptr, ROUND_BF16))
    if WRITE_DT:
        dt = w * (z - lse) * dt_scale
        tl.store(dt_ptr + cols, dt.to(dt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_pass(x_row, g_row, dt_row, x_body, g_body, w_row, t_row, head, body, tail, row_max,
               lse, k, k2, dt_scale, label_smoothing, smooth_c, row_scale, logit_scale, softcap,
               inv_softcap, BLOCK: tl.constexpr, VEC: tl.constexpr, EDGES: tl.constexpr,
               SINGLE_BLOCK: tl.constexpr, SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_SMOOTHING: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               WRITE_DX: tl.constexpr, WRITE_DT: tl.constexpr, ENT_GRAD: tl.constexpr,
               ROUND_BF16: tl.constexpr):  # fmt: skip
    """Read a row once more and write its gradients: the partial block first, then the whole
    blocks from the last to the first (the blocks read last are the likeliest still in L2), then
    the head and tail."""
    offs = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        n_full = 0
    else:
        n_full = body // BLOCK
    cols = n_full * BLOCK + offs
    _grad_block(
        x_body, g_body, dt_row + head, w_row + head, t_row + head, cols, cols < body, row_max,
        lse, k, k2, dt_scale, label_smoothing, smooth_c, row_scale, logit_scale, softcap,
        inv_softcap, True, "evict_first", SCALE, HAS_SOFTCAP, HAS_SMOOTHING, PROB_TARGET,
        HAS_WEIGHT, WRITE_DX, WRITE_DT, ENT_GRAD, ROUND_BF16,
    )  # fmt: skip
    if not SINGLE_BLOCK:
        for i in range(0, n_full):
            _grad_block(
                x_body, g_body, dt_row + head, w_row + head, t_row + head,
                (n_full - 1 - i) * BLOCK + offs, offs >= 0, row_max, lse, k, k2, dt_scale,
                label_smoothing, smooth_c, row_scale, logit_scale, softcap, inv_softcap, False,
                "evict_first", SCALE, HAS_SOFTCAP, HAS_SMOOTHING, PROB_TARGET, HAS_WEIGHT,
                WRITE_DX, WRITE_DT, ENT_GRAD, ROUND_BF16,
            )  # fmt: skip
    if EDGES:
        cols, mask = _edge_cols(head, body, tail, VEC)
        _grad_block(
            x_row, g_row, dt_row, w_row, t_row, cols, mask, row_max, lse, k, k2, dt_scale,
            label_smoothing, smooth_c, row_scale, logit_scale, softcap, inv_softcap, True, "",
            SCALE, HAS_SOFTCAP, HAS_SMOOTHING, PROB_TARGET, HAS_WEIGHT, WRITE_DX, WRITE_DT,
            ENT_GRAD, ROUND_BF16,
        )  # fmt: skip


@triton.jit
def _zero_row(g_row, g_body, head, body, tail, BLOCK: tl.constexpr, VEC: tl.constexpr,
              EDGES: tl.constexpr, SINGLE_BLOCK: tl.constexpr):  # fmt: skip
    """A gradient row of exact zeros (ignored row, zero incoming gradient), even where the
    logits are -inf or NaN, without reading them (again)."""
    offs = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], tl.float32).to(g_body.dtype.element_ty)
    if SINGLE_BLOCK:
        tl.store(g_body + offs, zero, mask=offs < body)
    else:
        for start in range(0, body, BLOCK):
            tl.store(g_body + start + offs, zero, mask=start + offs < body)
    if EDGES:
        cols, mask = _edge_cols(head, body, tail, VEC)
        tl.store(g_row + cols, tl.zeros([2 * VEC], tl.float32).to(g_body.dtype.element_ty),
                 mask=mask)  # fmt: skip


@triton.jit
def _incoming_grad(dloss_ptr, row, stride_dloss, REDUCE: tl.constexpr):
    """The row's incoming gradient: its own for "none", the reduced loss's one value otherwise."""
    if REDUCE == 0:
        return tl.load(dloss_ptr + row * stride_dloss).to(tl.float32)
    else:
        return tl.load(dloss_ptr).to(tl.float32)


@triton.jit
def _finish_reduction(loss_ptr, total_ptr, den_ptr, counter_ptr, n_rows, REDUCE: tl.constexpr,
                      RBLOCK: tl.constexpr):  # fmt: skip
    """The program that stores the last row's loss adds them all up (fixed order) into total."""
    # Every thread's stores of this program come before the counter's release.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if arrived == n_rows - 1:
        offs = tl.arange(0, RBLOCK)
        acc = tl.zeros([RBLOCK], tl.float32)
        for start in range(0, n_rows, RBLOCK):
            rows = start + offs
            acc += tl.load(loss_ptr + rows, mask=rows < n_rows, other=0.0, cache_modifier=".cg")
        total = tl.sum(acc, axis=0)
        if REDUCE == 2:
            # NaN over a zero denominator, whatever the rows' sum (fused_xent._options).
            den = tl.load(den_ptr)
            total = tl.where(den == 0.0, float("nan"), total / den)
        tl.store(total_ptr, total)


@triton.jit
def _packed(work_ptr, stride_stats):
    """The small outputs' places in one float32 buffer (``PACKED``, ``PlainXent``): (3, N)
    statistics of row stride ``stride_stats`` (= N), the rows' losses, then the "mean"
    denominator and the int32 arrival counter. -> (loss, den, counter)."""
    den_ptr = work_ptr + 4 * stride_stats
    counter_ptr = (den_ptr + 1).to(tl.pointer_type(tl.int32), bitcast=True)
    return work_ptr + 3 * stride_stats, den_ptr, counter_ptr


@triton.jit
def _prologue_kernel(
    # pointers
    target_ptr,
    weight_ptr,
    den_ptr,
    counter_ptr,
    # sizes
    n_rows,
    n_cols,
    # strides
    stride_target_row,
    # options
    ignore_index,
    # meta-parameters
    REDUCE: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    RBLOCK: tl.constexpr,
    PACKED: tl.constexpr = False,
):
    """One program: zero the reduction's arrival counter and, for "mean", write the denominator
    (torch's: the kept rows, or the sum of weight[target] over them; the rows with probability
    targets). ``PACKED``: both in the buffer ``den_ptr`` points to (``_packed``)."""
    if PACKED:
        _, den_ptr, counter_ptr = _packed(den_ptr, n_rows)
    tl.store(counter_ptr, 0)
    if REDUCE == 2:
        offs = tl.arange(0, RBLOCK)
        acc = tl.zeros([RBLOCK], tl.float32)
        if PROB_TARGET:
            den = tl.sum(acc, axis=0) + n_rows
        else:
            for start in range(0, n_rows, RBLOCK):
                rows = start + offs
                t = tl.load(target_ptr + rows.to(tl.int64) * stride_target_row,
                            mask=rows < n_rows, other=ignore_index).to(tl.int64)  # fmt: skip
                kept = t != ignore_index
                if HAS_WEIGHT:
                    # Out-of-range targets are clamped only to keep this load in bounds; their
                    # rows' loss is NaN.
                    col = tl.minimum(tl.maximum(t, 0), n_cols - 1)
                    acc += tl.where(kept, tl.load(weight_ptr + col).to(tl.float32), 0.0)
                else:
                    acc += tl.where(kept, 1.0, 0.0)
            den = tl.sum(acc, axis=0)
        tl.store(den_ptr, den)


# --------------------------------------------------------------------------------------------
# Kernels: forward and backward
# --------------------------------------------------------------------------------------------


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
    total_ptr,
    den_ptr,
    counter_ptr,
    entropy_ptr,
    predicted_ptr,
    row_weight_ptr,
    # sizes
    n_rows,
    n_cols,
    class_offset,
    n_classes,
    offset0,
    # strides
    stride_logits_row,
    stride_target_row,
    stride_stats,
    stride_grad_row,
    stride_row_weight,
    # options
    ignore_index,
    label_smoothing,
    lse_square_scale,
    logit_scale,
    softcap,
    inv_softcap,
    # meta-parameters
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    EDGES: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    REDUCE: tl.constexpr,
    RBLOCK: tl.constexpr,
    SCALE: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    PREDICT: tl.constexpr,
    ROW_WEIGHT: tl.constexpr,
    LOGPROB: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PACKED: tl.constexpr = False,
):
    if PACKED:  # the small outputs but the reduced loss in the statistics' buffer (PlainXent)
        loss_ptr, den_ptr, counter_ptr = _packed(stats_ptr, stride_stats)
    row = tl.program_id(0).to(tl.int64)
    # The logits pointer and offset0 (< VEC) locate the row on 16-byte boundaries.
    start = offset0 + row * stride_logits_row
    body0, head, body, tail = _row_layout(start, n_cols, VEC, EDGES)
    x_body = logits_ptr + body0
    x_row_ptr = logits_ptr + start
    t_row_ptr = target_ptr + row * stride_target_row
    if PROB_TARGET:
        t_cols_ptr = t_row_ptr
    else:
        t_cols_ptr = weight_ptr  # unread
        col, here, ignored, valid, x_t, w_target = _row_target(
            x_row_ptr, t_row_ptr, weight_ptr, n_cols, class_offset, n_classes, ignore_index,
            HAS_WEIGHT,
        )  # fmt: skip
        z_t = _transform(x_t, True, logit_scale, softcap, inv_softcap, SCALE, HAS_SOFTCAP, False)
    if HAS_SMOOTHING or PROB_TARGET:
        # The option sums are taken relative to the row's first logit (any finite one would do).
        shift = _transform(tl.load(x_row_ptr), True, logit_scale, softcap, inv_softcap, SCALE,
                           HAS_SOFTCAP, False)  # fmt: skip
        shift = tl.where(shift == float("-inf"), 0.0, shift)
    else:
        shift = 0.0
    zero = tl.sum(tl.zeros([VEC], tl.float32), axis=0)
    sum_w, sum_wz, sum_wt, sum_wtz = zero, zero, zero, zero
    u = zero  # the entropy's sum(e * a), a = log2(e)
    no_col = n_cols + 0 * row  # (int64) past every column: the argmax before any candidate
    idx = no_col

    offs = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        # The whole row fits one block and stays in registers for the gradient: one read.
        bmask = offs < body
        x = tl.load(x_body + offs, mask=bmask, other=float("-inf"), eviction_policy="evict_first")
        z = _transform(x, bmask, logit_scale, softcap, inv_softcap, SCALE, HAS_SOFTCAP, True)
        w, t = _load_opts(weight_ptr + head, t_cols_ptr + head, offs, bmask, HAS_WEIGHT,
                          PROB_TARGET)  # fmt: skip
        m = tl.max(z, axis=0)
        if EDGES:
            ecols, emask = _edge_cols(head, body, tail, VEC)
            ex = tl.load(x_row_ptr + ecols, mask=emask, other=float("-inf"))
            ez = _transform(ex, emask, logit_scale, softcap, inv_softcap, SCALE, HAS_SOFTCAP,
                            True)  # fmt: skip
            ew, et = _load_opts(weight_ptr, t_cols_ptr, ecols, emask, HAS_WEIGHT,
                                PROB_TARGET)  # fmt: skip
            m = tl.maximum(m, tl.max(ez, axis=0))
        row_max = tl.where(m == float("-inf"), 0.0, m)
        e = _exp2((z - row_max) * LOG2E)
        s = tl.sum(e, axis=0)
        log2_shift = 0.0
        if ENTROPY != 0:
            u = _entropy_terms(e, (z - row_max) * LOG2E)
        if PREDICT:
            idx = tl.min(tl.where(bmask & (z == m), head + offs, no_col), axis=0)
        if HAS_SMOOTHING or PROB_TARGET:
            sum_w, sum_wz, sum_wt, sum_wtz = _option_sums(
                z, w, t, bmask, shift, sum_w, sum_wz, sum_wt, sum_wtz, HAS_SMOOTHING, PROB_TARGET
            )
        if EDGES:
            ee = _exp2((ez - row_max) * LOG2E)
            s += tl.sum(ee, axis=0)
            if ENTROPY != 0:
                u += _entropy_terms(ee, (ez - row_max) * LOG2E)
            if PREDICT:
                idx = tl.minimum(idx, tl.min(tl.where(emask & (ez == m), ecols, no_col), axis=0))
            if HAS_SMOOTHING or PROB_TARGET:
                sum_w, sum_wz, sum_wt, sum_wtz = _option_sums(
                    ez, ew, et, emask, shift, sum_w, sum_wz, sum_wt, sum_wtz, HAS_SMOOTHING,
                    PROB_TARGET,
                )  # fmt: skip
    else:
        # Pass 1 over the blocks: a block's max, then its exponentials relative to a running
        # reference on the integer grid of log2 units, so that moving it rescales the running
        # sum by a power of two built from bits (no exp per block) and the exponent is one FMA.
        m = zero + float("-inf")
        ref = zero + float("-inf")
        s = zero
        n_full = body // BLOCK
        for i in range(0, n_full):
            x = tl.load(x_body + i * BLOCK + offs, eviction_policy="evict_last")
            z = _transform(x, True, logit_scale, softcap, inv_softcap, SCALE, HAS_SOFTCAP, False)
            bm = tl.max(z, axis=0)
            if PREDICT:
                bi = tl.min(tl.where(z == bm, head + i * BLOCK + offs, no_col), axis=0)
                idx = _move_argmax(idx, m, bi, bm)
            m = tl.maximum(m, bm)
            ref, ref_safe, s_new, scale, kk = _move_reference(ref, s, bm)
            a = tl.fma(z, LOG2E, -ref_safe)
            e = _exp2(a)
            if ENTROPY != 0:
                u = _move_entropy_sum(u, s, scale, kk) + _entropy_terms(e, a)
            s = s_new + tl.sum(e, axis=0)
            if HAS_SMOOTHING or PROB_TARGET:
                w, t = _load_opts(weight_ptr + head, t_cols_ptr + head, i * BLOCK + offs,
                                  offs >= 0, HAS_WEIGHT, PROB_TARGET)  # fmt: skip
                sum_w, sum_wz, sum_wt, sum_wtz = _option_sums(
                    z, w, t, offs >= 0, shift, sum_w, sum_wz, sum_wt, sum_wtz, HAS_SMOOTHING,
                    PROB_TARGET,
                )  # fmt: skip
        # The partial last block, then the head and tail, all masked.
        cols = n_full * BLOCK + offs
        bmask = cols < body
        x = tl.load(x_body + cols, mask=bmask, other=float("-inf"), eviction_policy="evict_last")
        z = _transform(x, bmask, logit_scale, softcap, inv_softcap, SCALE, HAS_SOFTCAP, True)
        bm = tl.max(z, axis=0)
        if EDGES:
            ecols, emask = _edge_cols(head, body, tail, VEC)
            ex = tl.load(x_row_ptr + ecols, mask=emask, other=float("-inf"))
            ez = _transform(ex, emask, logit_scale, softcap, inv_softcap, SCALE, HAS_SOFTCAP,
                            True)  # fmt: skip
            bm = tl.maximum(bm, tl.max(ez, axis=0))
        if PREDICT:
            bi = tl.min(tl.where(bmask & (z == bm), head + cols, no_col), axis=0)
            if EDGES:
                bi = tl.minimum(bi, tl.min(tl.where(emask & (ez == bm), ecols, no_col), axis=0))
            idx = _move_argmax(idx, m, bi, bm)
        m = tl.maximum(m, bm)
        ref, ref_safe, s_new, scale, kk = _move_reference(ref, s, bm)
        a = tl.fma(z, LOG2E, -ref_safe)
        e = _exp2(a)
        if ENTROPY != 0:
            u = _move_entropy_sum(u, s, scale, kk) + _entropy_terms(e, a)
        s = s_new + tl.sum(e, axis=0)
        if EDGES:
            ea = tl.fma(ez, LOG2E, -ref_safe)
            ee = _exp2(ea)
            s += tl.sum(ee, axis=0)
            if ENTROPY != 0:
                u += _entropy_terms(ee, ea)
        row_max = tl.where(m == float("-inf"), 0.0, m)
        # The sum was taken relative to ref_safe, not to the max: this much, exactly (FMA).
        log2_shift = tl.fma(row_max, LOG2E, -ref_safe)
        if HAS_SMOOTHING or PROB_TARGET:
            w, t = _load_opts(weight_ptr + head, t_cols_ptr + head, cols, bmask, HAS_WEIGHT,
                              PROB_TARGET)  # fmt: skip
            sum_w, sum_wz, sum_wt, sum_wtz = _option_sums(
                z, w, t, bmask, shift, sum_w, sum_wz, sum_wt, sum_wtz, HAS_SMOOTHING, PROB_TARGET
            )
            if EDGES:
                ew, et = _load_opts(weight_ptr, t_cols_ptr, ecols, emask,
                                    HAS_WEIGHT, PROB_TARGET)  # fmt: skip
                sum_w, sum_wz, sum_wt, sum_wtz = _option_sums(
                    ez, ew, et, emask, shift, sum_w, sum_wz, sum_wt, sum_wtz, HAS_SMOOTHING,
                    PROB_TARGET,
                )  # fmt: skip

    log_sum = (_log2(s) - log2_shift) * LN2
    # log_sum >= 0 (s holds the max's own term, 1), but the approximate log2 and the shift of a
    # long row can round it to -1e-8: that would make log p(target) > 0 where the target holds
    # all the probability. Kept at 0 then; -inf (no finite logit) and NaN stay.
    log_sum = tl.where(log_sum < 0.0, tl.where(s > 0.0, 0.0, log_sum), log_sum)
    lse = row_max + log_sum
    lse_rel = (row_max - shift) + log_sum  # lse - shift, without rounding lse first

    # The row's loss and the coefficient A of p in its gradient (module docstring).
    smooth_c = label_smoothing / n_classes
    if PROB_TARGET:
        if HAS_SMOOTHING:
            sum_wt = (1.0 - label_smoothing) * sum_wt + smooth_c * sum_w
            # At label_smoothing 1 the targets take no share, even at a -inf logit.
            kept = tl.where(label_smoothing == 1.0, 0.0, (1.0 - label_smoothing) * sum_wtz)
            sum_wtz = kept + smooth_c * sum_wz
        loss = sum_wt * lse_rel - sum_wtz
        coef = sum_wt
    else:
        # No target share (weight 0, or the target in another rank's slice) adds exactly 0,
        # even where this row's logits are all -inf.
        # (label_smoothing 1 leaves the target no share either: 0 * inf is not a NaN here.)
        coef = (1.0 - label_smoothing) * w_target
        loss = tl.where(coef == 0.0, 0.0, coef * ((row_max - z_t) + log_sum))
        if HAS_SMOOTHING:
            loss += smooth_c * (sum_w * lse_rel - sum_wz)
            coef += smooth_c * sum_w
    # Without a z-loss nothing is added, even where lse is -inf (a rank's slice of a sharded
    # vocabulary whose logits are all -inf: 0 * inf would be NaN).
    if lse_square_scale != 0.0:
        loss += lse_square_scale * lse * lse
        coef += 2.0 * lse_square_scale * lse
    if ROW_WEIGHT:
        token_weight = tl.load(row_weight_ptr + row * stride_row_weight).to(tl.float32)
        loss = loss * token_weight
    if not PROB_TARGET:
        loss = tl.where(valid, loss, float("nan"))
        loss = tl.where(ignored, 0.0, loss)
    if LOGPROB:
        loss = 0.0 - loss  # log p(target); 0.0 - 0.0 is +0 on ignored rows
    tl.store(loss_ptr + row, loss)
    if ENTROPY != 0:
        # entropy = lse - sum(p z) = log_sum - sum(p (z - max)), sum(p (z - max)) from u.
        entropy = log_sum - (u * _rcp(s) - log2_shift) * LN2
        entropy = tl.where(entropy < 0.0, 0.0, entropy)  # >= 0, as log_sum (NaN stays)
        entropy = tl.where(s == 0.0, 0.0, entropy)  # no finite logit: 0, as the reference
        if ENTROPY == 2 and not PROB_TARGET:
            entropy = tl.where(valid, entropy, float("nan"))
            entropy = tl.where(ignored, 0.0, entropy)
        tl.store(entropy_ptr + row, entropy)
    if PREDICT:
        tl.store(predicted_ptr + row, tl.minimum(idx, n_cols - 1) + class_offset)
    tl.store(stats_ptr + row, row_max)
    tl.store(stats_ptr + stride_stats + row, log_sum)
    tl.store(stats_ptr + 2 * stride_stats + row, coef)

    if WRITE_GRAD:
        row_scale = 1.0
        if HAS_GRAD_SCALE:
            row_scale = tl.load(grad_scale_ptr).to(tl.float32)
        if REDUCE == 2:
            row_scale = row_scale * _mean_rcp(tl.load(den_ptr))
        if ROW_WEIGHT:
            row_scale = row_scale * token_weight
        if LOGPROB:
            row_scale = -row_scale
        if not PROB_TARGET:
            row_scale = _class_row_scale(row_scale, valid, ignored)
        gstart = offset0 + row * stride_grad_row
        g_body = grad_ptr + _row_layout(gstart, n_cols, VEC, EDGES)[0]
        row_scale = row_scale * logit_scale
        inv_sum = _exp2(-log_sum * LOG2E)
        k = coef * row_scale * inv_sum
        if row_scale == 0.0:
            _zero_row(grad_ptr + gstart, g_body, head, body, tail, BLOCK, VEC, EDGES,
                      SINGLE_BLOCK)  # fmt: skip
        elif SINGLE_BLOCK:
            dx = _grad(e, z, w, t, k, label_smoothing, smooth_c, row_scale, inv_softcap, row_max,
                       0.0, HAS_SOFTCAP, HAS_SMOOTHING, PROB_TARGET, HAS_WEIGHT, False)  # fmt: skip
            tl.store(g_body + offs, _to_out(dx, g_body, ROUND_BF16), mask=bmask)
            if EDGES:
                dx = _grad(ee, ez, ew, et, k, label_smoothing, smooth_c, row_scale, inv_softcap,
                           row_max, 0.0, HAS_SOFTCAP, HAS_SMOOTHING, PROB_TARGET, HAS_WEIGHT,
                           False)  # fmt: skip
                tl.store(grad_ptr + gstart + ecols, _to_out(dx, grad_ptr, ROUND_BF16), mask=emask)
        else:
            _grad_pass(
                x_row_ptr, grad_ptr + gstart, grad_ptr, x_body, g_body, weight_ptr, t_cols_ptr,
                head, body, tail, row_max, lse, k, 0.0, 0.0, label_smoothing, smooth_c, row_scale,
                logit_scale, softcap, inv_softcap, BLOCK, VEC, EDGES, False, SCALE,
                HAS_SOFTCAP, HAS_SMOOTHING, PROB_TARGET, HAS_WEIGHT, True, False, False,
                ROUND_BF16,
            )  # fmt: skip
        if not PROB_TARGET:
            _write_target_grad(
                grad_ptr + gstart, col, here, z_t, row_max, k, 0.0, row_scale, w_target,
                label_smoothing, smooth_c, inv_softcap, HAS_SOFTCAP, False, ROUND_BF16,
            )  # fmt: skip

    if REDUCE != 0:
        _finish_reduction(loss_ptr, total_ptr, den_ptr, counter_ptr, n_rows, REDUCE, RBLOCK)


@triton.jit
def _xent_bwd_kernel(
    # pointers
    logits_ptr,
    target_ptr,
    weight_ptr,
    stats_ptr,
    dloss_ptr,
    den_ptr,
    grad_ptr,
    target_grad_ptr,
    dentropy_ptr,
    entropy_ptr,
    row_weight_ptr,
    # sizes
    n_cols,
    class_offset,
    n_classes,
    offset0,
    # strides
    stride_logits_row,
    stride_target_row,
    stride_stats,
    stride_dloss,
    stride_grad_row,
    stride_target_grad_row,
    stride_dentropy,
    stride_row_weight,
    # options
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    inv_softcap,
    # meta-parameters
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    EDGES: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    REDUCE: tl.constexpr,
    SKIP_IF_ONE: tl.constexpr,
    SCALE: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_DX: tl.constexpr,
    WRITE_DT: tl.constexpr,
    ENT_GRAD: tl.constexpr,
    ROW_WEIGHT: tl.constexpr,
    LOGPROB: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PACKED: tl.constexpr = False,
):
    if PACKED:  # the denominator in the statistics' buffer (PlainXent)
        _, den_ptr, _ = _packed(stats_ptr, stride_stats)
    row = tl.program_id(0).to(tl.int64)
    g = _incoming_grad(dloss_ptr, row, stride_dloss, REDUCE)
    # After a forward that wrote the gradient for g == 1, g == 1 leaves it as it is; the branch is
    # taken on the GPU, so the host never waits for g.
    if (not SKIP_IF_ONE) or (g != 1.0):
        row_scale = g
        if REDUCE == 2:
            row_scale = row_scale * _mean_rcp(tl.load(den_ptr))
        if ROW_WEIGHT:
            row_scale = row_scale * tl.load(row_weight_ptr + row * stride_row_weight).to(tl.float32)
        if LOGPROB:
            row_scale = -row_scale  # the loss is -log p
        # The entropy's incoming gradient, masked like the loss's.
        hs = 0.0
        if ENT_GRAD:
            hs = tl.load(dentropy_ptr + row * stride_dentropy).to(tl.float32)
        start = offset0 + row * stride_logits_row
        body0, head, body, tail = _row_layout(start, n_cols, VEC, EDGES)
        x_row_ptr = logits_ptr + start
        if PROB_TARGET:
            t_cols_ptr = target_ptr + row * stride_target_row
        else:
            t_cols_ptr = weight_ptr  # unread
            col, here, ignored, valid, x_t, w_target = _row_target(
                x_row_ptr, target_ptr + row * stride_target_row, weight_ptr, n_cols,
                class_offset, n_classes, ignore_index, HAS_WEIGHT,
            )  # fmt: skip
            row_scale = _class_row_scale(row_scale, valid, ignored)
            if ENT_GRAD:
                hs = _class_row_scale(hs, valid, ignored)
        gstart = offset0 + row * stride_grad_row
        g_body = grad_ptr + _row_layout(gstart, n_cols, VEC, EDGES)[0]
        row_max = tl.load(stats_ptr + row)
        log_sum = tl.load(stats_ptr + stride_stats + row)
        coef = tl.load(stats_ptr + 2 * stride_stats + row)
        # d loss / d t = -(1 - eps) * w * log p, times the row's incoming gradient.
        dt_scale = -(1.0 - label_smoothing) * row_scale
        row_scale = row_scale * logit_scale
        inv_sum = _exp2(-log_sum * LOG2E)
        k = tl.where(row_scale == 0.0, 0.0, coef * row_scale * inv_sum)
        zero_row = row_scale == 0.0
        k2 = 0.0
        if ENT_GRAD:
            # d entropy / dz = -p (z - lse + entropy) = -p ((z - max) + entropy - log_sum)
            hs = hs * logit_scale
            k2 = -hs * inv_sum
            entropy = tl.load(entropy_ptr + row)
            k += tl.where(hs == 0.0, 0.0, k2 * (entropy - log_sum))
            zero_row = zero_row & (hs == 0.0)
        if zero_row and (not WRITE_DT):
            _zero_row(grad_ptr + gstart, g_body, head, body, tail, BLOCK, VEC, EDGES,
                      SINGLE_BLOCK)  # fmt: skip
        else:
            _grad_pass(
                x_row_ptr, grad_ptr + gstart, target_grad_ptr + row * stride_target_grad_row,
                logits_ptr + body0, g_body, weight_ptr, t_cols_ptr, head, body, tail, row_max,
                row_max + log_sum, k, k2, dt_scale, label_smoothing, label_smoothing / n_classes,
                row_scale, logit_scale, softcap, inv_softcap, BLOCK, VEC, EDGES, SINGLE_BLOCK,
                SCALE, HAS_SOFTCAP, HAS_SMOOTHING, PROB_TARGET, HAS_WEIGHT, WRITE_DX, WRITE_DT,
                ENT_GRAD, ROUND_BF16,
            )  # fmt: skip
        if not PROB_TARGET:
            z_t = _transform(x_t, True, logit_scale, softcap, inv_softcap, SCALE, HAS_SOFTCAP,
                             False)  # fmt: skip
            _write_target_grad(
                grad_ptr + gstart, col, here, z_t, row_max, k, k2, row_scale, w_target,
                label_smoothing, label_smoothing / n_classes, inv_softcap, HAS_SOFTCAP, ENT_GRAD,
                ROUND_BF16,
            )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

# Rows up to this many logits are held in registers whole (read once, gradient from registers);
# longer rows take two passes over blocks of _LONG_ROW_BLOCK. Chosen from the sm_90 build
# (bench/static.py): at most 16 logits a thread keep two programs resident per SM.
_SINGLE_BLOCK_MAX = 8192
_LONG_ROW_BLOCK = 8192
# With probability targets, class weights, smoothing, a softcap or a logit scale a block carries
# more live arrays; half the block and half the logits a thread keep those builds from spilling.
_OPTIONS_BLOCK_MAX = 4096
# Rows read per step by the one program that finishes a reduction (and by the prologue): many
# loads in flight, since that program's loop is serial (an H200 spent 125 us summing 32768 row
# losses 32 at a time).
_RBLOCK = 2048


# Long rows split over several co-resident programs each (kernels/split.py: one DRAM read of a
# row where the two-pass kernel reads it twice): opt-in, FUSED_XENT_SPLIT_ROWS=1, until a GPU
# measures it against the two-pass kernel (no GPU has run it yet; README, "Long rows").
SPLIT_ROWS = os.environ.get("FUSED_XENT_SPLIT_ROWS", "0") == "1"


def split_wanted(n_cols: int, dtype: torch.dtype) -> bool:
    """Whether rows of ``n_cols`` logits of ``dtype`` are long enough for the split kernel, where
    it is switched on (``SPLIT_ROWS``); its ``split_plan`` decides the rest."""
    if not SPLIT_ROWS:
        return False
    from .split import _SPLIT_MIN_ROW_BYTES

    return n_cols * dtype.itemsize >= _SPLIT_MIN_ROW_BYTES


def _launch_config(n_cols: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``n_cols`` logits of ``dtype``: 64 logits a thread (the
    per-row work, reductions and target, spread over as many logits as the registers allow),
    32 for float32's long rows (64 spills in Triton 3.6's two-pass build)."""
    block = min(max(1 << max(n_cols - 1, 0).bit_length(), 32), _LONG_ROW_BLOCK)
    per_thread = 32 if dtype == torch.float32 and n_cols > block else 64
    return block, max(block // (32 * per_thread), 1)


def _row_config(n_cols: int, dtype: torch.dtype, consts: dict) -> tuple[int, int]:
    # (_launch_config in the key: tests replace it to force small blocks.)
    return _row_config_of(n_cols, dtype, any(consts.values()), _launch_config)


@functools.lru_cache(maxsize=4096)
def _row_config_of(n_cols: int, dtype: torch.dtype, options: bool, config) -> tuple[int, int]:
    block, num_warps = config(n_cols, dtype)
    if options:
        # Options carry more live arrays a logit: half the block, 16 logits a thread (8 for
        # float32, whose softcap two-pass build spills at 16).
        block = min(block, _OPTIONS_BLOCK_MAX)
        per_thread = 8 if dtype == torch.float32 else 16
        num_warps = min(max(block // (32 * per_thread), 1), 16)
    return block, num_warps


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def vector_width(dtype: torch.dtype) -> int:
    """Elements in 16 bytes."""
    return 16 // dtype.itemsize


def _aligned_base(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A view of ``t``'s storage that starts on the 16-byte boundary at or before ``t``, and how
    many elements before ``t`` it starts (< the vector width)."""
    size, ptr = t.element_size(), t.data_ptr()
    lead = (ptr % 16) // size
    if ptr % size or lead > t.storage_offset():
        return t, 0  # an odd storage: correct, without 16-byte vectors
    if lead == 0 and not INTERPRET:
        return t, 0  # already on the boundary: a kernel reads only its address (no view made)
    return t.as_strided((1,), (1,), t.storage_offset() - lead), lead


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
        SCALE=opts.logit_scale != 1.0,
        PROB_TARGET=target.is_floating_point(),
        HAS_WEIGHT=opts.weight is not None,
        HAS_SMOOTHING=opts.label_smoothing > 0.0,
        HAS_SOFTCAP=opts.softcap is not None,
    )


def _row_args(logits: torch.Tensor, grad: torch.Tensor | None):
    """(logits base, grad base, offset0, VEC, EDGES): how the kernels find 16-byte boundaries."""
    vec = vector_width(logits.dtype)
    x_base, lead = _aligned_base(logits)
    n_rows, n_cols = logits.shape
    x_stride = logits.stride(0) if n_rows > 1 else 0
    if grad is None or grad is logits:
        g_base = x_base
    else:
        g_base, g_lead = _aligned_base(grad)
        g_stride = grad.stride(0) if n_rows > 1 else 0
        if g_lead != lead or (g_stride - x_stride) % vec:
            # Rows cut differently (a gradient buffer not made by grad_like): element-wise.
            return logits, grad, 0, 1, False
    edges = bool(lead or x_stride % vec or n_cols % vec)
    return x_base, g_base, lead, vec, edges


def _common_args(logits, target, opts, consts, per_row=None):
    """``consts``: the option constexprs, which pick the launch configuration; ``per_row``:
    constexprs that do not (a token weight, the sign of a log-prob, the entropy, the argmax)."""
    block, num_warps = _row_config(logits.shape[1], logits.dtype, consts)
    softcap = opts.softcap if opts.softcap is not None else 1.0
    meta = dict(BLOCK=block, num_warps=num_warps, **consts, **(per_row or {}))
    return block, softcap, meta


def xent_prologue(target, opts, n_cols, reduction, den, counter) -> None:
    """Zero ``counter`` (int32, 1 element) and, for "mean", write torch's denominator to ``den``
    (float32, 1 element) for targets of rows of ``n_cols`` classes: the reduction that
    :func:`xent_forward` finishes needs both."""
    n_rows = target.shape[0]
    with torch.cuda.device(target.device) if target.is_cuda else nullcontext():
        launch(
            _prologue_kernel,
            (1,),
            target,
            opts.weight if opts.weight is not None else den,  # unread without a weight
            den,
            counter,
            n_rows,
            n_cols,
            target.stride(0) if n_rows else 0,
            opts.ignore_index,
            REDUCE=_REDUCE_CODE[reduction],
            PROB_TARGET=target.is_floating_point(),
            HAS_WEIGHT=opts.weight is not None,
            RBLOCK=_RBLOCK,
            num_warps=4,
        )


def xent_forward(
    logits, target, opts, loss, stats, grad=None, grad_scale=None, reduction="none",
    total=None, den=None, counter=None, entropy=None, predicted=None, row_weight=None,
    logprob=False,
) -> None:  # fmt: skip
    """Per-row loss and statistics; the gradient when ``grad`` is given; the reduced loss when
    ``reduction`` is "mean" or "sum".

    Args:
        logits: (N, C) float32 / float16 / bfloat16, unit stride along C.
        target: (N,) int64 / int32 class indices, or (N, C) probabilities (unit stride along C).
        opts: the loss options (``fused_xent._options.LossOptions``).
        loss: (N,) float32 output, the per-row loss.
        stats: (3, N) float32 output: the row's max, log of its sum of exp(z - max) (so
            lse = max + that), and the softmax coefficient A of the gradient, kept for
            :func:`xent_backward`.
        grad: optional (N, C) output of the logits dtype (``grad_like``, or ``logits`` itself).
            Receives the gradient of the reduced loss ("none": of the per-row losses) for an
            incoming gradient of 1, times ``grad_scale`` when given (a one-element float32
            tensor on the logits' device).
        reduction: with "mean" / "sum", ``total`` (float32, 1 element) receives the reduced
            loss; ``den`` and ``counter`` come from :func:`xent_prologue`, run just before.
        entropy: optional (N,) float32 output, each row's entropy ``lse - sum(p z)``; with
            ``logprob`` masked like the loss (0 on ignored rows, NaN on invalid targets).
        predicted: optional (N,) int64 output, each row's argmax class (lowest on ties; plus
            ``opts.class_offset``).
        row_weight: optional (N,) floating per-row weight of the loss (and of its gradient).
        logprob: the per-row output is ``log p(target) = -loss`` (a class-index target, no
            smoothing), its gradient that of ``log p``.
    """
    _check_launchable(logits)
    n_rows, n_cols = logits.shape
    if n_rows == 0:  # no program runs to reduce: the reduction of no rows
        if reduction != "none":
            zero = torch.zeros((), dtype=total.dtype, device=total.device)
            total.copy_(reduce_total(zero, den if reduction == "mean" else None))
        return
    if (
        SPLIT_ROWS
        and grad is not None
        and entropy is None
        and predicted is None
        and row_weight is None
        and not logprob
        and split_wanted(n_cols, logits.dtype)
    ):
        from . import split

        plan = split.split_plan(n_rows, n_cols, logits.dtype, logits.device, opts,
                                prob_target=target.is_floating_point())  # fmt: skip
        if plan is not None:
            split.xent_forward_split(logits, target, opts, loss, stats, grad, reduction, total,
                                     den, counter, segment=plan[1],
                                     grad_scale=grad_scale)  # fmt: skip
            return
    consts = _option_constexprs(target, opts)
    # The entropy's sum and the argmax add a few registers, not the options' live arrays: the
    # plain launch configuration (bench/static.py: no spills, fewer instructions per logit).
    per_row = dict(ROW_WEIGHT=row_weight is not None, LOGPROB=logprob,
                   ENTROPY=0 if entropy is None else 2 if logprob else 1,
                   PREDICT=predicted is not None)  # fmt: skip
    block, softcap, meta = _common_args(logits, target, opts, consts, per_row)
    write_grad = grad is not None
    x_base, g_base, lead, vec, edges = _row_args(logits, grad)
    reduce = _REDUCE_CODE[reduction]
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        launch(
            _xent_fwd_kernel,
            (n_rows,),
            x_base,
            target,
            opts.weight if opts.weight is not None else loss,  # unread without a weight
            loss,
            stats,
            g_base if write_grad else loss,  # unread without WRITE_GRAD
            grad_scale if grad_scale is not None else loss,
            total if reduce else loss,
            den if reduce == MEAN else loss,
            counter if reduce else loss,
            entropy if entropy is not None else loss,  # unwritten without ENTROPY
            predicted if predicted is not None else loss,  # unwritten without PREDICT
            row_weight if row_weight is not None else loss,  # unread without ROW_WEIGHT
            n_rows,
            n_cols,
            opts.class_offset,
            opts.n_classes or n_cols,
            lead,
            logits.stride(0),
            target.stride(0),
            stats.stride(0),
            grad.stride(0) if write_grad else 0,
            row_weight.stride(0) if row_weight is not None and n_rows > 1 else 0,
            opts.ignore_index,
            opts.label_smoothing,
            opts.lse_square_scale,
            opts.logit_scale,
            softcap,
            1.0 / softcap,
            VEC=vec,
            EDGES=edges,
            SINGLE_BLOCK=n_cols <= block,
            WRITE_GRAD=write_grad,
            HAS_GRAD_SCALE=grad_scale is not None,
            REDUCE=reduce,
            RBLOCK=_RBLOCK,
            ROUND_BF16=write_grad and _round_bf16(grad),
            **meta,
        )


def xent_backward(
    logits, target, opts, stats, dloss, grad, reduction="none", den=None, skip_if_one=False,
    target_grad=None, dentropy=None, entropy=None, row_weight=None, logprob=False,
) -> None:  # fmt: skip
    """grad = d(loss) / d logits, from the forward's per-row statistics, rounded once.

    Args:
        logits, target, opts: as given to :func:`xent_forward`.
        stats: (3, N) float32 from :func:`xent_forward`.
        dloss: "none": (N,) incoming gradient of the per-row losses (any float dtype, any
            stride); "mean" / "sum": the one-element incoming gradient of the reduced loss
            ("mean" divides it by ``den``, the prologue's denominator).
        grad: (N, C) output of the logits dtype (``grad_like``, or ``logits`` itself).
        skip_if_one: the forward wrote ``grad`` for an incoming gradient of 1; leave it as it
            is when ``dloss`` is 1 (decided on the GPU).
        target_grad: optional (N, C) output for the gradient with respect to a probability
            target, ``-(1 - eps) * w * log p`` times the incoming gradient. ``grad`` may then be
            None (the logits need no gradient).
        dentropy, entropy: optional (N,) incoming gradient of the rows' entropies and the
            entropies from :func:`xent_forward` (``logprob`` mode: masked): their gradient is
            added, ``-p (z - lse + entropy)`` per row.
        row_weight, logprob: as given to :func:`xent_forward`.
    """
    _check_launchable(logits)
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    consts = _option_constexprs(target, opts)
    per_row = dict(ROW_WEIGHT=row_weight is not None, LOGPROB=logprob,
                   ENT_GRAD=dentropy is not None)  # fmt: skip
    block, softcap, meta = _common_args(logits, target, opts, consts, per_row)
    x_base, g_base, lead, vec, edges = _row_args(logits, grad)
    reduce = _REDUCE_CODE[reduction]
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        launch(
            _xent_bwd_kernel,
            (n_rows,),
            x_base,
            target,
            opts.weight if opts.weight is not None else stats,  # unread without a weight
            stats,
            dloss,
            den if reduce == MEAN else stats,
            g_base if grad is not None else logits,  # unwritten without WRITE_DX
            target_grad if target_grad is not None else stats,  # unwritten without WRITE_DT
            dentropy if dentropy is not None else stats,  # unread without ENT_GRAD
            entropy if entropy is not None else stats,
            row_weight if row_weight is not None else stats,  # unread without ROW_WEIGHT
            n_cols,
            opts.class_offset,
            opts.n_classes or n_cols,
            lead,
            logits.stride(0),
            target.stride(0),
            stats.stride(0),
            dloss.stride(0) if dloss.dim() else 0,
            grad.stride(0) if grad is not None else 0,
            target_grad.stride(0) if target_grad is not None else 0,
            dentropy.stride(0) if dentropy is not None and n_rows > 1 else 0,
            row_weight.stride(0) if row_weight is not None and n_rows > 1 else 0,
            opts.ignore_index,
            opts.label_smoothing,
            opts.logit_scale,
            softcap,
            1.0 / softcap,
            VEC=vec,
            EDGES=edges,
            SINGLE_BLOCK=n_cols <= block,
            REDUCE=reduce,
            SKIP_IF_ONE=skip_if_one,
            WRITE_DX=grad is not None,
            WRITE_DT=target_grad is not None,
            ROUND_BF16=grad is not None and _round_bf16(grad),
            **meta,
        )


# --------------------------------------------------------------------------------------------
# The plain loss, launched with the least host work


def current_device() -> int:
    """The device Triton launches on (its driver's)."""
    return driver.active.get_current_device()


def plain_rows(logits: torch.Tensor) -> bool:
    """Whether ``PlainXent`` takes these logits: contiguous rows starting on a 16-byte boundary
    (no head to cut, a gradient buffer made by ``torch.empty_like`` is cut the same way)."""
    return logits.is_contiguous() and logits.data_ptr() % 16 == 0


def _plain_meta(n_cols: int, dtype, target_dtype, **flags) -> dict:
    """The row constexprs of a plain call (``plain_rows`` logits, class indices, no option
    on), as ``xent_forward`` and ``xent_backward`` pick them, and ``flags``."""
    from .._options import LossOptions

    consts = _option_constexprs(torch.empty(0, dtype=target_dtype), LossOptions())
    vec = vector_width(dtype)
    block, num_warps = _row_config(n_cols, dtype, consts)
    return dict(VEC=vec, EDGES=n_cols % vec != 0, SINGLE_BLOCK=n_cols <= block, BLOCK=block,
                num_warps=num_warps, ROW_WEIGHT=False,
                ROUND_BF16=INTERPRET and dtype == torch.bfloat16, **consts, **flags)  # fmt: skip


def _plain_spec(n_rows: int, target: torch.Tensor, t_stride: int) -> tuple:
    """What Triton specialises on among a plain call's arguments that change from call to call
    (``Prepared``'s ``spec``): the row count (also the statistics' stride), the target's stride
    and its pointer's alignment; a backward adds its incoming gradients'."""
    return (n_rows == 1, n_rows % 16 == 0, n_rows > 0x7FFFFFFF, t_stride,
            target.data_ptr() % 16 == 0)  # fmt: skip


class PlainXent:
    """What :func:`xent_prologue`, :func:`xent_forward` and :func:`xent_backward` launch for a
    plain call: (N, C) logits with ``plain_rows``, class-index targets, no option but
    ``ignore_index``, a "mean" or "sum" reduction. The same kernels with the same constexprs (so
    the same numbers, bit for bit); the arguments that stay the same from call to call (the row
    length, the dtypes, the options, the placeholders of the outputs a plain call has not) are
    built once per plan instead of per call, and each launch goes through a ``Prepared``
    launch: a short row's step is bound by the host (bench/host_time.py), and this is most of
    what a training loop calls.

    Outputs are the caller's, as for the other launchers: ``total`` (float32, one element, the
    reduced loss), ``work``, one float32 buffer of ``4 * N + 2`` elements for the others
    (``PACKED``: the (3, N) statistics, the rows' losses, the denominator and the counter: one
    allocation where there were four), and ``grad`` like the logits (``torch.empty_like``).
    All are fresh allocations (16-byte aligned, as the caching allocator's always are); the
    logits are aligned by ``plain_rows``; the target's alignment and stride, the incoming
    gradient's alignment and the row count are each call's ``spec``."""

    def __init__(self, n_cols: int, dtype, target_dtype, ignore_index: int, reduction: str,
                 device: int) -> None:  # fmt: skip
        self.n_cols, self.ignore_index, self.device = n_cols, ignore_index, device
        self.reduce = _REDUCE_CODE[reduction]
        rows = _plain_meta(n_cols, dtype, target_dtype, LOGPROB=False, PACKED=True)
        fwd = dict(HAS_GRAD_SCALE=False, REDUCE=self.reduce, RBLOCK=_RBLOCK, ENTROPY=0,
                   PREDICT=False, **rows)  # fmt: skip
        self.prologue = Prepared(_prologue_kernel, device, REDUCE=self.reduce, PROB_TARGET=False,
                                 HAS_WEIGHT=False, RBLOCK=_RBLOCK, PACKED=True,
                                 num_warps=4)  # fmt: skip
        self.fwd_grad = Prepared(_xent_fwd_kernel, device, WRITE_GRAD=True, **fwd)
        self.fwd = Prepared(_xent_fwd_kernel, device, WRITE_GRAD=False, **fwd)
        self.bwd = Prepared(_xent_bwd_kernel, device, REDUCE=self.reduce, SKIP_IF_ONE=True,
                            WRITE_DX=True, WRITE_DT=False, ENT_GRAD=False, **rows)  # fmt: skip

    def forward(self, logits, target, total, work, grad=None) -> None:
        """The reduced loss into ``total`` (the rows' and their statistics into ``work``), and
        with ``grad`` the gradient for an incoming gradient of 1."""
        n_rows, n_cols, t_stride = logits.shape[0], self.n_cols, target.stride(0)
        spec = _plain_spec(n_rows, target, t_stride)
        self.prologue(1, spec, target, work, work, work, n_rows, n_cols, t_stride,
                      self.ignore_index)  # fmt: skip
        w = work  # (every small output's pointer: PACKED finds each one in it)
        (self.fwd if grad is None else self.fwd_grad)(
            n_rows, spec, logits, target, w, w, w, w if grad is None else grad, w, total, w, w, w,
            w, w, n_rows, n_cols, 0, n_cols, 0, n_cols, t_stride, n_rows,
            0 if grad is None else n_cols, 0, self.ignore_index, 0.0, 0.0, 1.0, 1.0, 1.0,
        )  # fmt: skip

    def backward(self, logits, target, work, dloss, grad) -> None:
        """``grad`` (written by the forward for an incoming gradient of 1) for ``dloss``: left
        as it is where ``dloss`` is 1 (decided on the GPU)."""
        n_rows, n_cols, t_stride = logits.shape[0], self.n_cols, target.stride(0)
        spec = _plain_spec(n_rows, target, t_stride) + (dloss.data_ptr() % 16 == 0, dloss.dtype)
        w = work
        self.bwd(
            n_rows, spec, logits, target, w, w, dloss, w, grad, w, w, w, w, n_cols, 0, n_cols, 0,
            n_cols, t_stride, n_rows, 0, n_cols, 0, 0, 0, self.ignore_index, 0.0, 1.0, 1.0, 1.0,
        )  # fmt: skip


class PlainLogprob:
    """What :func:`xent_forward` and :func:`xent_backward` launch for a plain ``token_logprobs``
    call (``plain_rows`` logits, class indices, no temperature, scale or softcap), with the
    arguments that stay the same built once, as ``PlainXent`` does for the loss. Outputs are the
    caller's: ``logp`` and ``entropy`` (N,) and ``stats`` (3, N) float32, ``grad`` like the
    logits (fresh allocations); the pointers and strides that come from the caller's tensors
    are each call's ``spec``."""

    def __init__(self, n_cols: int, dtype, target_dtype, ignore_index: int, device: int) -> None:
        self.n_cols, self.ignore_index, self.device = n_cols, ignore_index, device
        rows = _plain_meta(n_cols, dtype, target_dtype, LOGPROB=True)
        fwd = dict(WRITE_GRAD=False, HAS_GRAD_SCALE=False, REDUCE=NONE, RBLOCK=_RBLOCK,
                   PREDICT=False, **rows)  # fmt: skip
        bwd = dict(REDUCE=NONE, SKIP_IF_ONE=False, WRITE_DX=True, WRITE_DT=False, **rows)
        # by whether the entropy is asked for (forward) or has a gradient (backward)
        self.fwd = {e: Prepared(_xent_fwd_kernel, device, ENTROPY=2 if e else 0, **fwd)
                    for e in (False, True)}  # fmt: skip
        self.bwd = {e: Prepared(_xent_bwd_kernel, device, ENT_GRAD=e, **bwd) for e in (False, True)}

    def forward(self, logits, target, logp, stats, entropy=None) -> None:
        """log p(target) into ``logp``, the statistics into ``stats``, with ``entropy`` the
        rows' entropies (0 on ignored rows)."""
        n_rows, n_cols, t_stride = logits.shape[0], self.n_cols, target.stride(0)
        spec = _plain_spec(n_rows, target, t_stride)
        e = logp if entropy is None else entropy
        self.fwd[entropy is not None](
            n_rows, spec, logits, target, logp, logp, stats, logp, logp, logp, logp, logp, e,
            logp, logp, n_rows, n_cols, 0, n_cols, 0, n_cols, t_stride, n_rows, 0, 0,
            self.ignore_index, 0.0, 0.0, 1.0, 1.0, 1.0,
        )  # fmt: skip

    def xent_backward(self, logits, target, opts, stats, dlogp, grad, dentropy=None,
                      entropy=None, logprob=True) -> None:  # fmt: skip
        """:func:`xent_backward` of a plain call (``opts`` and ``logprob`` are the plan's): the
        logits' gradient into ``grad`` for incoming gradients ``dlogp`` (N,) and, with
        ``dentropy`` (N,), of the entropies (``entropy``: the forward's)."""
        n_rows, n_cols, t_stride = logits.shape[0], self.n_cols, target.stride(0)
        d_stride = dlogp.stride(0)
        e_stride = 0 if dentropy is None or n_rows == 1 else dentropy.stride(0)
        spec = _plain_spec(n_rows, target, t_stride) + (
            d_stride, dlogp.data_ptr() % 16 == 0, dlogp.dtype, e_stride,
            dentropy is None or dentropy.data_ptr() % 16 == 0, dentropy is None or dentropy.dtype,
        )  # fmt: skip
        de = stats if dentropy is None else dentropy
        self.bwd[dentropy is not None](
            n_rows, spec, logits, target, stats, stats, dlogp, stats, grad, stats, de,
            stats if entropy is None else entropy, stats, n_cols, 0, n_cols, 0, n_cols, t_stride,
            n_rows, d_stride, n_cols, 0, e_stride, 0, self.ignore_index, 0.0, 1.0, 1.0, 1.0,
        )  # fmt: skip
