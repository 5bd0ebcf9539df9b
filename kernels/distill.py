"""Triton kernels for knowledge-distillation losses, and their launchers (no autograd here).

The math, for one row: student logits ``x_s`` and teacher logits ``x_t`` (the same ``V``
classes), temperature ``T``, ``P_s = softmax(x_s / T)``, ``P_t = softmax(x_t / T)``:

    beta = 0      D = KL(P_t || P_s) = sum P_t (log P_t - log P_s)      dD/dx_s = (P_s - P_t) / T
    beta = 1      D = KL(P_s || P_t)                  dD/dx_s = P_s (log P_s - log P_t - D) / T
    0 < beta < 1  M = beta P_t + (1 - beta) P_s,  D = beta KL(P_t || M) + (1 - beta) KL(P_s || M)
                  dD/dx_s = P_s (g - sum_k P_s_k g_k) / T,        g = (1 - beta) log(P_s / M)
    hard term     CE = lse(x_s) - x_s[y] (temperature 1),  dCE/dx_s = softmax(x_s) - onehot(y)
    loss = soft_weight * D + hard_weight * CE        (no T**2 factor)

The teacher gets no gradient. A row whose target is ``ignore_index`` has loss 0 and gradient 0;
with the hard term a target outside ``[0, V)`` gives that row a NaN loss and gradient (it is never
used as an address).

How a row is computed. Everything runs in log2 units: ``A = x * log2(e) / T`` (one FMA with the
reference folded in), and each softmax keeps its own running reference ``r`` on the integer grid
(``xent._move_reference``: moving it rescales the running sums by a power of two built from bits,
no exponential), ``a = A - r``, ``e = 2**a``, ``S = sum e``, ``l = log2 S``, so ``log2 P = a - l``.
The divergences are taken so that the references cancel exactly and no two large numbers are
subtracted (logits offset by 1e4 lose nothing, and a nearly one-hot teacher is exact):

    beta = 0   D = ln2 * (U / S_t - l_t + l_s),   U = sum e_t (a_t - a_s)
    beta = 1   D = ln2 * (W / S_s - l_s + l_t),   W = sum e_s (a_s - a_t)
               dD/dz_s = ln2 * P_s ((a_s - a_t) - W / S_s)
    0<beta<1   D = ln2 * (beta sum P_t (log2 P_t - log2 M) + (1 - beta) sum P_s (log2 P_s - log2 M))

``U`` (``W``) moves with the references as the entropy sum of ``kernels/xent.py`` does
(``_move_entropy_sum``), by the exact integer difference of the two references' moves. A class
with no probability under the distribution that weighs it adds exactly 0: a ``-inf`` teacher logit
(masked vocabulary) gives ``e_t = 0`` and no ``0 * inf``. The generalized JSD needs ``log2 M`` per
class, so the normalised probabilities: one more pass over a long row (``M`` is floored at the
smallest normal float so that a denormal mixture never reaches ``log2`` as 0). The hard term's
softmax is ``P_s`` itself at ``T = 1``; at any other temperature it is a third online softmax of
the student (``HARD == 2``).

Kept per row for the backward (``stats``, (7, N) float32): ``r_s, l_s, r_t, l_t`` (references and
log2-sums), ``coef`` (``W / S_s`` for beta = 1; ``sum P_s g`` in nats for the JSD; 0 for beta = 0),
``r_1, l_1`` (the hard term's own softmax when ``T != 1``). The loss is a per-row float32 output;
"mean"/"sum" are a torch sum of it in the autograd layer (deterministic: no float atomics).

Passes and memory traffic per logit (``b_s``, ``b_t`` the bytes of a student and a teacher
logit). A row of at most ``BLOCK`` logits is read once and held in registers (every exponential
below computed once); a longer row is read block by block, once per pass, the first pass with
``evict_last`` so that the next pass may find it in L2:

    forward, no gradient    beta 0 or 1: 1 pass                  b_s + b_t
                            JSD: 2 passes (stats, then log M)    2 (b_s + b_t)  (short rows: 1)
    forward with gradient   + 1 gradient pass, writing b_s       KL: 2 (b_s + b_t) + b_s,
      ("mean"/"sum")                                             JSD: 3 (b_s + b_t) + b_s
                                                                 (short rows: b_s + b_t + b_s)
    backward                1 pass from the stats: b_s + b_t read, b_s written (in place
                            or not); after a forward with gradient nothing when g == 1

Exponentials per logit and pass (MUFU ops): the stats pass 2 ``ex2`` (+1 for the hard term at
``T != 1``); the JSD pass 2 ``ex2`` + 1 ``lg2``; the gradient pass 2 ``ex2`` (beta 0), 1 (beta 1:
``log P_t`` needs no exponential), 2 + 1 ``lg2`` (JSD), +1 ``ex2`` for the hard term at ``T != 1``.
The one-hot term of the hard gradient is not compared per logit: the target column is stored once
more, after a barrier, with its own value.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from . import xent
from ._launch import launch
from .xent import (
    LN2,
    LOG2E,
    _edge_cols,
    _entropy_terms,
    _exp2,
    _incoming_grad,
    _log2,
    _move_entropy_sum,
    _move_reference,
    _rcp,
    _row_layout,
    _to_out,
    _zero_row,
)

# The smallest normal float32: the JSD's mixture M is floored here before its log2, whose ftz form
# reads a denormal as 0 (log2 -> -inf, then P * (log P - log M) = inf).
TINY = tl.constexpr(1.1754943508222875e-38)

# Rows of the per-row statistics (``stats``) the forward keeps for the backward.
N_STATS = 7

# MODE: which divergence; HARD: the hard term (0 off, 1 sharing P_s at T = 1, 2 its own softmax).
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2

# --------------------------------------------------------------------------------------------
# Kernels: the pieces of a row
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_pair(s_ptr, t_ptr, cols, mask, MASKED: tl.constexpr, EVICT: tl.constexpr):
    """Student and teacher logits of some columns, in float32 (-inf where masked)."""
    if MASKED:
        xs = tl.load(s_ptr + cols, mask=mask, other=float("-inf"), eviction_policy=EVICT)
        xt = tl.load(t_ptr + cols, mask=mask, other=float("-inf"), eviction_policy=EVICT)
    else:
        xs = tl.load(s_ptr + cols, eviction_policy=EVICT)
        xt = tl.load(t_ptr + cols, eviction_policy=EVICT)
    return xs.to(tl.float32), xt.to(tl.float32)


@triton.jit
def _ref_of(row_max):
    """The reference of a row held whole: ceil(max * log2 e) (``row_max`` in z units), 0 for a
    row of -inf."""
    ref = tl.math.ceil(row_max * LOG2E)
    return tl.where(ref == float("-inf"), 0.0, ref)


@triton.jit
def _move(ref, s, block_max):
    """``_move_reference`` after one more block, plus the exact move ``d`` (an integer <= 0; 0
    before any finite logit) of the exponents already summed; the power of two it returns is
    clamped at 2**-127, ``d`` is not, so that a cross sum moves by the true difference."""
    ref_new, ref_safe, s, scale, _ = _move_reference(ref, s, block_max)
    d = tl.where(ref == float("-inf"), 0.0, ref - ref_safe)
    return ref_new, ref_safe, s, scale, d


@triton.jit
def _stats_block(xs, xt, rs, ss, rt, st, u, r1, s1, c, inv_t, MODE: tl.constexpr,
                 HARD: tl.constexpr):  # fmt: skip
    """The running sums of a long row after one more block (pass 1): the two softmaxes at T, the
    cross sum ``u`` of the KL (U or W of the module docstring) and the hard term's softmax."""
    rs, rs_safe, ss_moved, scale_s, ds = _move(rs, ss, tl.max(xs, axis=0) * inv_t)
    rt, rt_safe, st_moved, scale_t, dt = _move(rt, st, tl.max(xt, axis=0) * inv_t)
    a_s = tl.fma(xs, c, -rs_safe)
    a_t = tl.fma(xt, c, -rt_safe)
    e_s = _exp2(a_s)
    e_t = _exp2(a_t)
    if MODE == 0:
        u = _move_entropy_sum(u, st, scale_t, dt - ds) + _entropy_terms(e_t, a_t - a_s)
    elif MODE == 1:
        u = _move_entropy_sum(u, ss, scale_s, ds - dt) + _entropy_terms(e_s, a_s - a_t)
    ss = ss_moved + tl.sum(e_s, axis=0)
    st = st_moved + tl.sum(e_t, axis=0)
    if HARD == 2:
        r1, r1_safe, s1_moved, _, _ = _move_reference(r1, s1, tl.max(xs, axis=0))
        s1 = s1_moved + tl.sum(_exp2(tl.fma(xs, LOG2E, -r1_safe)), axis=0)
    return rs, ss, rt, st, u, r1, s1


@triton.jit
def _mixture(e_s, e_t, inv_ss, inv_st, beta):
    """P_s, P_t and log2 M of some classes (the JSD)."""
    p_s = e_s * inv_ss
    p_t = e_t * inv_st
    lm = _log2(tl.maximum(beta * p_t + (1.0 - beta) * p_s, TINY))
    return p_s, p_t, lm


@triton.jit
def _jsd_terms(a_s, a_t, p_s, p_t, lm, ls, lt):
    """sum P_t (log2 P_t - log2 M) and sum P_s (log2 P_s - log2 M) of some classes; a class of
    probability 0 adds 0."""
    kt = tl.sum(tl.where(p_t > 0.0, p_t * ((a_t - lt) - lm), 0.0), axis=0)
    ks = tl.sum(tl.where(p_s > 0.0, p_s * ((a_s - ls) - lm), 0.0), axis=0)
    return kt, ks


@triton.jit
def _jsd_block(s_ptr, t_ptr, cols, mask, rs, ls, rt, lt, inv_ss, inv_st, c, beta,
               MASKED: tl.constexpr, EVICT: tl.constexpr):  # fmt: skip
    """Pass 2 of a long row (the JSD): the two sums of ``_jsd_terms`` over some columns."""
    xs, xt = _load_pair(s_ptr, t_ptr, cols, mask, MASKED, EVICT)
    a_s = tl.fma(xs, c, -rs)
    a_t = tl.fma(xt, c, -rt)
    p_s, p_t, lm = _mixture(_exp2(a_s), _exp2(a_t), inv_ss, inv_st, beta)
    return _jsd_terms(a_s, a_t, p_s, p_t, lm, ls, lt)


@triton.jit
def _jsd_pass(s_row, t_row, s_body, t_body, head, body, tail, rs, ls, rt, lt, inv_ss, inv_st,
              c, beta, BLOCK: tl.constexpr, VEC: tl.constexpr, EDGES: tl.constexpr,
              EVICT: tl.constexpr):  # fmt: skip
    """sum P_t (log2 P_t - log2 M), sum P_s (log2 P_s - log2 M) of a long row: one more pass."""
    offs = tl.arange(0, BLOCK)
    kt = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    ks = kt
    n_full = body // BLOCK
    for i in range(0, n_full):
        bt, bs = _jsd_block(s_body, t_body, i * BLOCK + offs, offs >= 0, rs, ls, rt, lt, inv_ss,
                            inv_st, c, beta, False, EVICT)  # fmt: skip
        kt += bt
        ks += bs
    cols = n_full * BLOCK + offs
    bt, bs = _jsd_block(s_body, t_body, cols, cols < body, rs, ls, rt, lt, inv_ss, inv_st, c,
                        beta, True, EVICT)  # fmt: skip
    kt += bt
    ks += bs
    if EDGES:
        ecols, emask = _edge_cols(head, body, tail, VEC)
        bt, bs = _jsd_block(s_row, t_row, ecols, emask, rs, ls, rt, lt, inv_ss, inv_st, c, beta,
                            True, "")  # fmt: skip
        kt += bt
        ks += bs
    return kt, ks


@triton.jit
def _grad_consts(g, ls, lt, l1, coef, beta, inv_t, soft_weight, hard_weight, MODE: tl.constexpr,
                 HARD: tl.constexpr):  # fmt: skip
    """A row's factors of its gradient for the incoming gradient ``g`` (``_dx``):
    (k_s, k_t, k_h, kh, inv_ss, inv_st), kh = hard_weight * g (the one-hot term's)."""
    ks = soft_weight * inv_t * g  # d loss / dD, times the chain factor 1 / T
    kh = hard_weight * g
    inv_ss = _exp2(-ls)
    inv_st = _exp2(-lt)
    k_h = 0.0
    if MODE == 0:
        k_s = ks * inv_ss
        k_t = ks * inv_st
        if HARD == 1:
            k_s += kh * inv_ss  # the hard softmax is P_s: one term
    elif MODE == 1:
        k_s = ks * LN2 * inv_ss
        k_t = coef
        if HARD == 1:
            k_h = kh * inv_ss
    else:
        k_s = ks * ((1.0 - beta) * LN2)
        k_t = ks * coef
        if HARD == 1:
            k_t -= kh  # P_s (k_s (...) - k_t) + kh P_s
    if HARD == 2:
        k_h = kh * _exp2(-l1)
    return k_s, k_t, k_h, kh, inv_ss, inv_st


@triton.jit
def _dx(a_s, e_s, a_t, e_t, e_1, p_s, lm, ls, k_s, k_t, k_h, MODE: tl.constexpr,
        HARD: tl.constexpr):  # fmt: skip
    """The gradient of some classes without the one-hot term. ``e_t`` is unread for beta = 1,
    ``p_s`` and ``lm`` only for the JSD, ``e_1`` only with ``HARD == 2``."""
    if MODE == 0:
        dx = e_s * k_s - e_t * k_t  # ks (P_s - P_t)
    elif MODE == 1:
        # ks ln2 P_s ((a_s - a_t) - W / S_s); a class of P_s = 0 adds 0 even where P_t = 0.
        dx = tl.where(e_s > 0.0, (e_s * k_s) * ((a_s - a_t) - k_t), 0.0)
        if HARD == 1:
            dx += e_s * k_h
    else:
        # ks P_s (g - G) with g = (1 - beta) ln2 (log2 P_s - log2 M), G = coef
        dx = tl.where(p_s > 0.0, p_s * (k_s * ((a_s - ls) - lm) - k_t), 0.0)
    if HARD == 2:
        dx += e_1 * k_h
    return dx


@triton.jit
def _grad_block(s_ptr, t_ptr, g_ptr, cols, mask, rs, ls, rt, r1, c, inv_ss, inv_st, beta, k_s,
                k_t, k_h, MASKED: tl.constexpr, EVICT: tl.constexpr, MODE: tl.constexpr,
                HARD: tl.constexpr, ROUND_BF16: tl.constexpr):  # fmt: skip
    """Read some columns of both rows and write the student's gradient (no one-hot term)."""
    xs, xt = _load_pair(s_ptr, t_ptr, cols, mask, MASKED, EVICT)
    a_s = tl.fma(xs, c, -rs)
    a_t = tl.fma(xt, c, -rt)
    e_s = _exp2(a_s)
    if MODE == 1:
        e_t = e_s  # unread: log P_t needs no exponential
    else:
        e_t = _exp2(a_t)
    e_1 = e_s
    if HARD == 2:
        e_1 = _exp2(tl.fma(xs, LOG2E, -r1))
    p_s = e_s
    lm = e_s
    if MODE == 2:
        p_s, _, lm = _mixture(e_s, e_t, inv_ss, inv_st, beta)
    dx = _dx(a_s, e_s, a_t, e_t, e_1, p_s, lm, ls, k_s, k_t, k_h, MODE, HARD)
    if MASKED:
        tl.store(g_ptr + cols, _to_out(dx, g_ptr, ROUND_BF16), mask=mask)
    else:
        tl.store(g_ptr + cols, _to_out(dx, g_ptr, ROUND_BF16))


@triton.jit
def _grad_pass(s_row, t_row, g_row, s_body, t_body, g_body, head, body, tail, rs, ls, rt, r1, c,
               inv_ss, inv_st, beta, k_s, k_t, k_h, BLOCK: tl.constexpr, VEC: tl.constexpr,
               EDGES: tl.constexpr, SINGLE_BLOCK: tl.constexpr, MODE: tl.constexpr,
               HARD: tl.constexpr, ROUND_BF16: tl.constexpr):  # fmt: skip
    """Read both rows once more and write the gradient: the partial block first, then the whole
    blocks from the last to the first (the blocks read last are the likeliest still in L2), then
    the head and tail. Each block is read before it is written, so ``g`` may be the student."""
    offs = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        n_full = 0
    else:
        n_full = body // BLOCK
    cols = n_full * BLOCK + offs
    _grad_block(s_body, t_body, g_body, cols, cols < body, rs, ls, rt, r1, c, inv_ss, inv_st, beta,
                k_s, k_t, k_h, True, "evict_first", MODE, HARD, ROUND_BF16)  # fmt: skip
    if not SINGLE_BLOCK:
        for i in range(0, n_full):
            _grad_block(
                s_body, t_body, g_body, (n_full - 1 - i) * BLOCK + offs, offs >= 0, rs, ls, rt, r1,
                c, inv_ss, inv_st, beta, k_s, k_t, k_h, False, "evict_first", MODE, HARD,
                ROUND_BF16,
            )  # fmt: skip
    if EDGES:
        ecols, emask = _edge_cols(head, body, tail, VEC)
        _grad_block(s_row, t_row, g_row, ecols, emask, rs, ls, rt, r1, c, inv_ss, inv_st, beta,
                    k_s, k_t, k_h, True, "", MODE, HARD, ROUND_BF16)  # fmt: skip


@triton.jit
def _write_target_grad(g_row, col, valid, xs_y, xt_y, rs, ls, rt, r1, c, inv_ss, inv_st, beta,
                       k_s, k_t, k_h, kh, MODE: tl.constexpr, HARD: tl.constexpr,
                       ROUND_BF16: tl.constexpr):  # fmt: skip
    """The target column's gradient, stored over what the block store wrote there: the block's
    formula and the one-hot term, from the two logits loaded before any store."""
    a_s = tl.fma(xs_y, c, -rs)
    a_t = tl.fma(xt_y, c, -rt)
    e_s = _exp2(a_s)
    e_t = _exp2(a_t)
    e_1 = _exp2(tl.fma(xs_y, LOG2E, -r1))
    p_s, _, lm = _mixture(e_s, e_t, inv_ss, inv_st, beta)
    dx = _dx(a_s, e_s, a_t, e_t, e_1, p_s, lm, ls, k_s, k_t, k_h, MODE, HARD) - kh
    # The block stores of other threads to this address come first.
    tl.debug_barrier()
    tl.store(g_row + col, _to_out(dx, g_row, ROUND_BF16), mask=valid)


@triton.jit
def _row_target(target_ptr, s_row, t_row, n_cols, ignore_index, HAS_TARGET: tl.constexpr,
                HARD: tl.constexpr):  # fmt: skip
    """(ignored, valid, col, x_s[y], x_t[y]): whether the row is ignored; with the hard term
    whether its target is a class, that class (0 otherwise) and the two logits there (loaded
    before any store, so the gradient may go over the student)."""
    ignored = n_cols < 0  # False, as a scalar tensor
    valid = n_cols >= 0
    col = n_cols * 0
    xs_y = 0.0
    xt_y = 0.0
    if HAS_TARGET:
        y = tl.load(target_ptr).to(tl.int64)
        ignored = y == ignore_index
        if HARD != 0:
            valid = (y >= 0) & (y < n_cols) & (~ignored)
            col = tl.where(valid, y, 0)
            xs_y = tl.load(s_row + col, mask=valid, other=0.0).to(tl.float32)
            xt_y = tl.load(t_row + col, mask=valid, other=0.0).to(tl.float32)
    return ignored, valid, col, xs_y, xt_y


# --------------------------------------------------------------------------------------------
# Kernels: forward and backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _distill_fwd_kernel(
    # pointers
    student_ptr,
    teacher_ptr,
    target_ptr,
    loss_ptr,
    stats_ptr,
    grad_ptr,
    grad_scale_ptr,
    # sizes
    n_cols,
    offset0,
    # strides
    stride_student_row,
    stride_teacher_row,
    stride_target,
    stride_stats,
    stride_grad_row,
    # options
    ignore_index,
    beta,
    inv_t,
    c,  # log2(e) / T
    soft_weight,
    hard_weight,
    # meta-parameters
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    EDGES: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    MODE: tl.constexpr,
    HARD: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # The pointers and offset0 (< VEC) locate the rows on 16-byte boundaries; both rows (and the
    # gradient's) are cut the same way (the launcher checks).
    s_start = offset0 + row * stride_student_row
    t_start = offset0 + row * stride_teacher_row
    g_start = offset0 + row * stride_grad_row
    s_body0, head, body, tail = _row_layout(s_start, n_cols, VEC, EDGES)
    s_row = student_ptr + s_start
    t_row = teacher_ptr + t_start
    g_row = grad_ptr + g_start
    s_body = student_ptr + s_body0
    t_body = teacher_ptr + _row_layout(t_start, n_cols, VEC, EDGES)[0]
    g_body = grad_ptr + _row_layout(g_start, n_cols, VEC, EDGES)[0]
    ignored, valid, col, xs_y, xt_y = _row_target(
        target_ptr + row * stride_target, s_row, t_row, n_cols, ignore_index, HAS_TARGET, HARD
    )
    zero = tl.sum(tl.zeros([VEC], tl.float32), axis=0)
    if ignored:
        # No work for an ignored row (prompt tokens): loss 0, statistics 0, gradient 0.
        tl.store(loss_ptr + row, zero)
        for k in range(0, 7):  # the N_STATS rows
            tl.store(stats_ptr + k * stride_stats + row, zero)
        if WRITE_GRAD:
            _zero_row(g_row, g_body, head, body, tail, BLOCK, VEC, EDGES, SINGLE_BLOCK)
    else:
        offs = tl.arange(0, BLOCK)
        u = zero
        r1 = zero
        s1 = zero
        kt = zero
        ks = zero
        if SINGLE_BLOCK:
            # The whole row fits one block and stays in registers: one read of each, and the
            # gradient from the exponentials of the statistics.
            bmask = offs < body
            xs, xt = _load_pair(s_body, t_body, offs, bmask, True, "evict_first")
            ms = tl.max(xs, axis=0)
            mt = tl.max(xt, axis=0)
            if EDGES:
                ecols, emask = _edge_cols(head, body, tail, VEC)
                exs, ext = _load_pair(s_row, t_row, ecols, emask, True, "")
                ms = tl.maximum(ms, tl.max(exs, axis=0))
                mt = tl.maximum(mt, tl.max(ext, axis=0))
            rs = _ref_of(ms * inv_t)
            rt = _ref_of(mt * inv_t)
            a_s = tl.fma(xs, c, -rs)
            a_t = tl.fma(xt, c, -rt)
            e_s = _exp2(a_s)
            e_t = _exp2(a_t)
            ss = tl.sum(e_s, axis=0)
            st = tl.sum(e_t, axis=0)
            if MODE == 0:
                u = _entropy_terms(e_t, a_t - a_s)
            elif MODE == 1:
                u = _entropy_terms(e_s, a_s - a_t)
            e_1 = e_s
            if HARD == 2:
                r1 = _ref_of(ms)
                e_1 = _exp2(tl.fma(xs, LOG2E, -r1))
                s1 = tl.sum(e_1, axis=0)
            if EDGES:
                ea_s = tl.fma(exs, c, -rs)
                ea_t = tl.fma(ext, c, -rt)
                ee_s = _exp2(ea_s)
                ee_t = _exp2(ea_t)
                ss += tl.sum(ee_s, axis=0)
                st += tl.sum(ee_t, axis=0)
                if MODE == 0:
                    u += _entropy_terms(ee_t, ea_t - ea_s)
                elif MODE == 1:
                    u += _entropy_terms(ee_s, ea_s - ea_t)
                ee_1 = ee_s
                if HARD == 2:
                    ee_1 = _exp2(tl.fma(exs, LOG2E, -r1))
                    s1 += tl.sum(ee_1, axis=0)
            ls = _log2(ss)
            lt = _log2(st)
            inv_ss = _exp2(-ls)
            inv_st = _exp2(-lt)
            p_s = e_s
            lm = e_s
            if MODE == 2:
                p_s, p_t, lm = _mixture(e_s, e_t, inv_ss, inv_st, beta)
                kt, ks = _jsd_terms(a_s, a_t, p_s, p_t, lm, ls, lt)
                if EDGES:
                    ep_s, ep_t, elm = _mixture(ee_s, ee_t, inv_ss, inv_st, beta)
                    bt, bs = _jsd_terms(ea_s, ea_t, ep_s, ep_t, elm, ls, lt)
                    kt += bt
                    ks += bs
        else:
            # Pass 1 over the blocks: both softmaxes (and the cross sum) against running
            # references, then the partial last block and the head and tail, all masked.
            ninf = zero + float("-inf")
            rs = ninf
            rt = ninf
            r1 = ninf
            ss = zero
            st = zero
            n_full = body // BLOCK
            for i in range(0, n_full):
                xs, xt = _load_pair(s_body, t_body, i * BLOCK + offs, offs >= 0, False,
                                    "evict_last")  # fmt: skip
                rs, ss, rt, st, u, r1, s1 = _stats_block(xs, xt, rs, ss, rt, st, u, r1, s1, c,
                                                         inv_t, MODE, HARD)  # fmt: skip
            cols = n_full * BLOCK + offs
            xs, xt = _load_pair(s_body, t_body, cols, cols < body, True, "evict_last")
            rs, ss, rt, st, u, r1, s1 = _stats_block(xs, xt, rs, ss, rt, st, u, r1, s1, c, inv_t,
                                                     MODE, HARD)  # fmt: skip
            if EDGES:
                ecols, emask = _edge_cols(head, body, tail, VEC)
                xs, xt = _load_pair(s_row, t_row, ecols, emask, True, "")
                rs, ss, rt, st, u, r1, s1 = _stats_block(xs, xt, rs, ss, rt, st, u, r1, s1, c,
                                                         inv_t, MODE, HARD)  # fmt: skip
            # An all -inf row keeps a -inf reference: 0 as the rows held whole have.
            rs = tl.where(rs == float("-inf"), 0.0, rs)
            rt = tl.where(rt == float("-inf"), 0.0, rt)
            r1 = tl.where(r1 == float("-inf"), 0.0, r1)
            ls = _log2(ss)
            lt = _log2(st)
            inv_ss = _exp2(-ls)
            inv_st = _exp2(-lt)
            if MODE == 2:
                # log M needs the normalised probabilities: one more pass.
                if WRITE_GRAD:
                    kt, ks = _jsd_pass(s_row, t_row, s_body, t_body, head, body, tail, rs, ls, rt,
                                       lt, inv_ss, inv_st, c, beta, BLOCK, VEC, EDGES,
                                       "evict_last")  # fmt: skip
                else:
                    kt, ks = _jsd_pass(s_row, t_row, s_body, t_body, head, body, tail, rs, ls, rt,
                                       lt, inv_ss, inv_st, c, beta, BLOCK, VEC, EDGES,
                                       "evict_first")  # fmt: skip

        # The divergence (log2 units, then nats) and the gradient's row coefficient.
        if MODE == 0:
            coef = zero
            d2 = u * _rcp(st) + (ls - lt)
        elif MODE == 1:
            coef = u * _rcp(ss)
            d2 = coef + (lt - ls)
        else:
            d2 = beta * kt + (1.0 - beta) * ks
            coef = ((1.0 - beta) * LN2) * ks
        loss = soft_weight * (d2 * LN2)
        l1 = zero
        if HARD == 1:
            loss += hard_weight * ((ls - tl.fma(xs_y, c, -rs)) * LN2)
        elif HARD == 2:
            l1 = _log2(s1)
            loss += hard_weight * ((l1 - tl.fma(xs_y, LOG2E, -r1)) * LN2)
        if HARD != 0:
            loss = tl.where(valid, loss, float("nan"))
        tl.store(loss_ptr + row, loss)
        tl.store(stats_ptr + row, rs)
        tl.store(stats_ptr + stride_stats + row, ls)
        tl.store(stats_ptr + 2 * stride_stats + row, rt)
        tl.store(stats_ptr + 3 * stride_stats + row, lt)
        tl.store(stats_ptr + 4 * stride_stats + row, coef)
        tl.store(stats_ptr + 5 * stride_stats + row, r1)
        tl.store(stats_ptr + 6 * stride_stats + row, l1)

        if WRITE_GRAD:
            g = 1.0
            if HAS_GRAD_SCALE:
                g = tl.load(grad_scale_ptr).to(tl.float32)
            if HARD != 0:
                g = tl.where(valid, g, float("nan"))
            k_s, k_t, k_h, kh, inv_ss, inv_st = _grad_consts(
                g, ls, lt, l1, coef, beta, inv_t, soft_weight, hard_weight, MODE, HARD
            )
            if SINGLE_BLOCK:
                dx = _dx(a_s, e_s, a_t, e_t, e_1, p_s, lm, ls, k_s, k_t, k_h, MODE, HARD)
                tl.store(g_body + offs, _to_out(dx, g_body, ROUND_BF16), mask=bmask)
                if EDGES:
                    ep_s = ee_s
                    elm = ee_s
                    if MODE == 2:
                        ep_s, _, elm = _mixture(ee_s, ee_t, inv_ss, inv_st, beta)
                    dx = _dx(ea_s, ee_s, ea_t, ee_t, ee_1, ep_s, elm, ls, k_s, k_t, k_h, MODE,
                             HARD)  # fmt: skip
                    tl.store(g_row + ecols, _to_out(dx, g_row, ROUND_BF16), mask=emask)
            else:
                _grad_pass(s_row, t_row, g_row, s_body, t_body, g_body, head, body, tail, rs, ls,
                           rt, r1, c, inv_ss, inv_st, beta, k_s, k_t, k_h, BLOCK, VEC, EDGES,
                           False, MODE, HARD, ROUND_BF16)  # fmt: skip
            if HARD != 0:
                _write_target_grad(g_row, col, valid, xs_y, xt_y, rs, ls, rt, r1, c, inv_ss,
                                   inv_st, beta, k_s, k_t, k_h, kh, MODE, HARD,
                                   ROUND_BF16)  # fmt: skip


@triton.jit
def _distill_bwd_kernel(
    # pointers
    student_ptr,
    teacher_ptr,
    target_ptr,
    stats_ptr,
    dloss_ptr,
    den_ptr,
    grad_ptr,
    # sizes
    n_cols,
    offset0,
    # strides
    stride_student_row,
    stride_teacher_row,
    stride_target,
    stride_stats,
    stride_dloss,
    stride_grad_row,
    # options
    ignore_index,
    beta,
    inv_t,
    c,  # log2(e) / T
    soft_weight,
    hard_weight,
    # meta-parameters
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    EDGES: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    MODE: tl.constexpr,
    HARD: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    REDUCE: tl.constexpr,
    SKIP_IF_ONE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = _incoming_grad(dloss_ptr, row, stride_dloss, REDUCE)
    # After a forward that wrote the gradient for g == 1, g == 1 leaves it as it is; the branch is
    # taken on the GPU, so the host never waits for g.
    if (not SKIP_IF_ONE) or (g != 1.0):
        if REDUCE == 2:
            g = g * xent._mean_rcp(tl.load(den_ptr))
        s_start = offset0 + row * stride_student_row
        t_start = offset0 + row * stride_teacher_row
        g_start = offset0 + row * stride_grad_row
        s_body0, head, body, tail = _row_layout(s_start, n_cols, VEC, EDGES)
        s_row = student_ptr + s_start
        t_row = teacher_ptr + t_start
        g_row = grad_ptr + g_start
        s_body = student_ptr + s_body0
        t_body = teacher_ptr + _row_layout(t_start, n_cols, VEC, EDGES)[0]
        g_body = grad_ptr + _row_layout(g_start, n_cols, VEC, EDGES)[0]
        ignored, valid, col, xs_y, xt_y = _row_target(
            target_ptr + row * stride_target, s_row, t_row, n_cols, ignore_index, HAS_TARGET, HARD
        )
        if HARD != 0:
            g = tl.where(valid, g, float("nan"))
        if ignored or g == 0.0:
            _zero_row(g_row, g_body, head, body, tail, BLOCK, VEC, EDGES, SINGLE_BLOCK)
        else:
            rs = tl.load(stats_ptr + row)
            ls = tl.load(stats_ptr + stride_stats + row)
            rt = tl.load(stats_ptr + 2 * stride_stats + row)
            lt = tl.load(stats_ptr + 3 * stride_stats + row)
            coef = tl.load(stats_ptr + 4 * stride_stats + row)
            r1 = tl.load(stats_ptr + 5 * stride_stats + row)
            l1 = tl.load(stats_ptr + 6 * stride_stats + row)
            k_s, k_t, k_h, kh, inv_ss, inv_st = _grad_consts(
                g, ls, lt, l1, coef, beta, inv_t, soft_weight, hard_weight, MODE, HARD
            )
            _grad_pass(s_row, t_row, g_row, s_body, t_body, g_body, head, body, tail, rs, ls, rt,
                       r1, c, inv_ss, inv_st, beta, k_s, k_t, k_h, BLOCK, VEC, EDGES,
                       SINGLE_BLOCK, MODE, HARD, ROUND_BF16)  # fmt: skip
            if HARD != 0:
                _write_target_grad(g_row, col, valid, xs_y, xt_y, rs, ls, rt, r1, c, inv_ss,
                                   inv_st, beta, k_s, k_t, k_h, kh, MODE, HARD,
                                   ROUND_BF16)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

# Two rows (student and teacher) are live per lane, and the JSD keeps a few more arrays of a row
# held whole: blocks of at most 4096 logits (2048 in float32), 32 logits a thread (16 in float32),
# so 4 warps. From the sm_90 build (bench/static.py, Triton 3.9, fwd+grad at 128256 classes):
# 16 logits a thread (8 warps) took 37 / 40 / 69 instructions a logit over the passes of beta
# 0 / 1 / 0.5 in bf16, 32 take 31 / 34 / 63 (the per-block reductions amortised over twice the
# logits) with 96-128 registers, 4-5 programs (16-20 warps) per SM and twice the bytes in flight
# a thread, no spills; float32 at 4096 x 16 warps left the JSD one program per SM, 2048 x 4 warps
# keeps five (31 / 34 / 60 instructions a logit).
_DISTILL_BLOCK_MAX = {torch.float32: 2048}
_DISTILL_BLOCK_MAX_16BIT = 4096


def _launch_config(n_cols: int, dtype: torch.dtype, mode: int = 0) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``n_cols`` logits of ``dtype`` (the wider of the two)."""
    block, _ = xent._launch_config(n_cols, dtype)  # the tests' small_blocks fixture patches this
    block = min(block, _DISTILL_BLOCK_MAX.get(dtype, _DISTILL_BLOCK_MAX_16BIT))
    per_thread = 16 if dtype == torch.float32 else 32
    if mode == JSD and n_cols > block:
        # The JSD's three passes at 32 a thread reach 128 registers and spill 8 bytes with
        # Triton 3.6 (bf16, fwd+grad): 16 a thread (bench/static.py, both versions).
        per_thread //= 2
    return block, min(max(block // (32 * per_thread), 1), 16)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def mode_of(beta: float) -> int:
    return FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else JSD


def hard_of(target, opts) -> int:
    if target is None or opts.hard_weight == 0.0:
        return 0
    return 1 if opts.temperature == 1.0 else 2


def _pair_args(student, teacher, grad):
    """(student base, teacher base, grad base, offset0, VEC, EDGES): one cut of every row into
    16-byte vectors for the three tensors, or element by element where they would differ (another
    dtype, alignment or row stride of the teacher)."""
    s_base, g_base, lead, vec, edges = xent._row_args(student, grad)
    if vec == 1:
        return student, teacher, g_base, 0, 1, False
    t_base, t_lead = xent._aligned_base(teacher)
    n_rows = student.shape[0]
    s_stride = student.stride(0) if n_rows > 1 else 0
    t_stride = teacher.stride(0) if n_rows > 1 else 0
    if teacher.dtype != student.dtype or t_lead != lead or (t_stride - s_stride) % vec:
        return student, teacher, student if grad is None else grad, 0, 1, False
    return s_base, t_base, g_base, lead, vec, edges


def _common(student, teacher, target, opts, grad):
    xent._check_launchable(student)
    xent._check_launchable(teacher)
    n_cols = student.shape[1]
    wide = student.dtype if student.element_size() >= teacher.element_size() else teacher.dtype
    block, num_warps = _launch_config(n_cols, wide, mode_of(opts.beta))
    s_base, t_base, g_base, lead, vec, edges = _pair_args(student, teacher, grad)
    args = dict(
        ignore_index=opts.ignore_index,
        beta=opts.beta,
        inv_t=1.0 / opts.temperature,
        c=1.4426950408889634 / opts.temperature,
        soft_weight=opts.soft_weight,
        hard_weight=opts.hard_weight,
        BLOCK=block,
        VEC=vec,
        EDGES=edges,
        SINGLE_BLOCK=n_cols <= block,
        MODE=mode_of(opts.beta),
        HARD=hard_of(target, opts),
        HAS_TARGET=target is not None,
        num_warps=num_warps,
    )
    return s_base, t_base, g_base, lead, args


def distill_forward(student, teacher, target, opts, loss, stats, grad=None, grad_scale=None):
    """Per-row loss and statistics; the gradient when ``grad`` is given.

    Args:
        student: (N, V) float32 / float16 / bfloat16 logits, unit stride along V.
        teacher: (N, V) logits of any of those dtypes, unit stride along V; only read.
        target: None, or (N,) int64 / int32 class indices (``ignore_index`` rows are skipped; the
            hard term's class with ``opts.hard_weight > 0``).
        opts: the distillation options (``fused_xent._options.DistillOptions``).
        loss: (N,) float32 output, ``soft_weight * D + hard_weight * CE`` per row (0 if ignored).
        stats: (7, N) float32 output, kept for :func:`distill_backward` (module docstring).
        grad: optional (N, V) output of the student's dtype (``grad_like``, or the student
            itself): the gradient of the per-row losses for an incoming gradient of 1, times
            ``grad_scale`` (a one-element float32 tensor on the device) when given.
    """
    n_rows = student.shape[0]
    if n_rows == 0:
        return
    s_base, t_base, g_base, lead, args = _common(student, teacher, target, opts, grad)
    write_grad = grad is not None
    with torch.cuda.device(student.device) if student.is_cuda else nullcontext():
        launch(
            _distill_fwd_kernel,
            (n_rows,),
            s_base,
            t_base,
            target if target is not None else loss,  # unread without a target
            loss,
            stats,
            g_base if write_grad else loss,  # unwritten without WRITE_GRAD
            grad_scale if grad_scale is not None else loss,
            student.shape[1],
            lead,
            student.stride(0),
            teacher.stride(0),
            target.stride(0) if target is not None and n_rows > 1 else 0,
            stats.stride(0),
            grad.stride(0) if write_grad else 0,
            WRITE_GRAD=write_grad,
            HAS_GRAD_SCALE=grad_scale is not None,
            ROUND_BF16=write_grad and xent._round_bf16(grad),
            **args,
        )


def distill_backward(student, teacher, target, opts, stats, dloss, grad, reduction="none",
                     den=None, skip_if_one=False) -> None:  # fmt: skip
    """grad = d(loss) / d student from the forward's statistics, rounded once.

    Args:
        student, teacher, target, opts: as given to :func:`distill_forward`.
        stats: (7, N) float32 from :func:`distill_forward`.
        dloss: "none": (N,) incoming gradient of the per-row losses (any float dtype, any
            stride); "mean" / "sum": the one-element incoming gradient of the reduced loss
            ("mean" divides it by ``den``, the number of kept rows, a device tensor).
        grad: (N, V) output of the student's dtype (``grad_like``, or the student itself).
        skip_if_one: the forward wrote ``grad`` for an incoming gradient of 1; leave it as it
            is when ``dloss`` is 1 (decided on the device).
    """
    n_rows = student.shape[0]
    if n_rows == 0:
        return
    s_base, t_base, g_base, lead, args = _common(student, teacher, target, opts, grad)
    reduce = xent._REDUCE_CODE[reduction]
    with torch.cuda.device(student.device) if student.is_cuda else nullcontext():
        launch(
            _distill_bwd_kernel,
            (n_rows,),
            s_base,
            t_base,
            target if target is not None else stats,  # unread without a target
            stats,
            dloss,
            den if reduce == xent.MEAN else stats,
            g_base,
            student.shape[1],
            lead,
            student.stride(0),
            teacher.stride(0),
            target.stride(0) if target is not None and n_rows > 1 else 0,
            stats.stride(0),
            dloss.stride(0) if dloss.dim() else 0,
            grad.stride(0),
            REDUCE=reduce,
            SKIP_IF_ONE=skip_if_one,
            ROUND_BF16=xent._round_bf16(grad),
            **args,
        )
