"""Split-row forward with gradient: a long row read from DRAM once, over K co-resident programs.

The math is ``kernels/xent.py``'s (its module docstring), for the subset this kernel supports:
class-index targets with ``ignore_index``, label smoothing and the z-loss (``lse_square_scale``);
no class weights, probability targets, softcap, logit scale or sharded vocabulary (those keep
``xent_forward``). With ``lse = log(sum_c exp(x_c))`` and ``p = exp(x - lse)``:

    loss = (1 - eps) * (lse - x_y) + eps / C * sum_c (lse - x_c)  (+ lse_square_scale * lse**2)
    dx   = (A * p - (1 - eps) * onehot(y) - eps / C) * scale,     A = 1 (+ 2 lse_square_scale lse)

**Why.** At 128256 / 256000 classes a bfloat16 row is 256-512 KB. ``_xent_fwd_kernel`` then
reads it twice (max and sum, then the gradient) and, with a program per row and hundreds of rows
in flight, the second read misses L2 and comes from DRAM again: three row-sized transfers where
two would do. Here a row is cut into ``K`` segments of about 32 KB (``_SEGMENT_BYTES``; K = 8 for
bfloat16 rows of 128256) and each segment gets a program. A segment is small enough to stay in
L2 between its two reads, because a program re-reads it as soon as the row's K statistics are in.

**One row, K programs** (``PHASE == 0``, one launch):

1. A program claims a work item with an atomic ticket (``work[0]``), not by its program id: item
   ``w`` is segment ``w % K`` of row ``w // K``.
2. It reads its segment once (``evict_last``) and computes the segment's max ``m_k`` and sum of
   exponentials ``s_k`` relative to ``r_k = ceil(m_k * log2(e))`` (log2 units, an integer, as
   ``_xent_fwd_kernel``'s pass 1: one ``exp2`` per logit, the running sum moved by powers of two
   built from bits), the sum of ``x - x_0`` for smoothing, and ``x_y`` where the target is in its
   segment. It stores them in ``partials[row, k]``, adds 1 to the row's arrival counter
   (``work[1 + row]``, release) and spins until the counter reaches K (acquire).
3. Every program of the row combines the K partials the same way (one vector load, a reduction
   tree fixed by the compiled code: deterministic, bitwise the same in the K programs, no float
   atomics): ``R = max r_k``, ``S = sum_k s_k * 2**(r_k - R)`` (exact powers of two),
   ``log_sum = log(S) - (max_k m_k * log2(e) - R) * ln(2)``. Statistics as ``_xent_fwd_kernel``'s.
4. Segment 0's program stores the loss and the (3, N) statistics ``max``, ``log_sum``, ``A`` that
   ``xent_backward`` reads, and takes part in the "mean" / "sum" reduction exactly as
   ``_xent_fwd_kernel`` (``_finish_reduction``: the last row to arrive sums the rows' losses in
   order).
5. Every program reads its segment again (an L2 hit, ``evict_first``) and stores the gradient
   (``evict_first``) with ``_xent_fwd_kernel``'s scale (the gradient of the reduced loss for an
   incoming gradient of 1, over ``den`` for "mean", times ``grad_scale``) and rounding.

**Deadlock freedom** (the spin in step 2). Tickets are handed out in order and only to programs
that have started, and a started program stays resident until it exits. A program waits only for
the other items of its own row. Let ``w`` be the newest ticket claimed: every row below ``w``'s
has all K items claimed by running programs, each of which arrives without waiting for anything
(step 2 waits after arriving), so every such row completes and its programs exit. Only the
newest row can have unclaimed items; its running programs are at most K - 1. If at least K
programs of this kernel can be resident at once, some slot is therefore free or held by a program
of an older row, which exits; the next program to start claims ticket ``w + 1``, and by induction
every item is claimed and every row completes. The launcher checks K against the device's SM count
(at least one program fits an SM, or the launch fails; half the SMs, for margin against other
work sharing the device) and uses two launches otherwise (``split_plan`` then declines, since two
launches read a row twice anyway). The counters are zeroed by one ``torch.zeros`` before the
launch; nothing synchronises with the host.

**Two launches** (``PHASE`` 1 then 2). Triton's CPU interpreter runs programs one after another
in program-id order, where the spin of a program would wait for programs that never start. There
the same code runs as two launches: phase 1 stores the partials, phase 2 combines them and writes
the loss and gradient (item = program id, no counters). This also is the fallback where K
programs cannot be argued co-resident, and the gradient may then overwrite the logits (in place)
safely: ``x_y`` and ``x_0`` travel through the partials, not re-read in phase 2.

**Memory traffic**, per logit (``b`` bytes of the logits dtype): one DRAM read (``b``), one L2
re-read (``b``), one write (``b``); plus ``_NP`` floats per segment of partials and one int32
per row of counters (260 bytes per 256 KB row). Two launches read the row from DRAM twice unless
it stays in L2 between them. Nothing here has been timed: no GPU was at hand when it was written.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .._options import reduce_total
from . import xent
from ._launch import launch
from .xent import (
    _RBLOCK,
    _REDUCE_CODE,
    INTERPRET,
    LN2,
    LOG2E,
    MEAN,
    _class_row_scale,
    _edge_cols,
    _exp2,
    _finish_reduction,
    _log2,
    _mean_rcp,
    _move_reference,
    _round_bf16,
    _row_args,
    _row_layout,
    _to_out,
    _write_target_grad,
    _zero_row,
)

# A segment's bytes: small enough that a row's K segments stay in L2 between their two reads with
# every SM's programs in flight (132 SMs x 4 programs x 32 KB = 17 MB of H100's 50 MB), large
# enough that the partials and the wait are a small part of a program's work. Not measured.
_SEGMENT_BYTES = 32 << 10
# Rows shorter than this keep _xent_fwd_kernel: their second read still hits L2 (264 rows of
# 128 KB in flight = 34 MB). Chosen from that arithmetic, not measured.
_SPLIT_MIN_ROW_BYTES = 128 << 10
# A block is 16 KB (bfloat16: 8192 logits), 8 warps: four 16-byte loads a thread, two blocks a
# segment. bench/static.py, sm_90: 64 registers (4 programs an SM), no spills, 7.7 + 6.8
# instructions a logit for bfloat16 (8 KB blocks: 32 registers, but 9.8 + 7.2: the block's max and
# sum cross 8 warps through shared memory once per 16 logits a thread instead of 32). Smoothing
# takes half a block (91 registers, 2 programs an SM, at 16 KB).
_BLOCK_BYTES = 16 << 10
_SPLIT_WARPS = 8
# Floats per work item in the partials: m, r, s, sum(x - x_0), x_y, x_0 (8: 32-byte items).
_NP = 8


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _stats_block(x_ptr, cols, mask, shift, m, ref, s, sz, MASKED: tl.constexpr,
                 HAS_SMOOTHING: tl.constexpr):  # fmt: skip
    """A segment's max, sum of exp2(x log2(e) - ref) and sum(x - shift) after one more block."""
    if MASKED:
        x = tl.load(x_ptr + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last")
    else:
        x = tl.load(x_ptr + cols, eviction_policy="evict_last")
    z = x.to(tl.float32)
    bm = tl.max(z, axis=0)
    m = tl.maximum(m, bm)
    ref, ref_safe, s, _, _ = _move_reference(ref, s, bm)
    s += tl.sum(_exp2(tl.fma(z, LOG2E, -ref_safe)), axis=0)
    if HAS_SMOOTHING:
        if MASKED:
            sz += tl.sum(tl.where(mask, z - shift, 0.0), axis=0)
        else:
            sz += tl.sum(z - shift, axis=0)
    return m, ref, s, sz


@triton.jit
def _grad_block(x_ptr, g_ptr, cols, mask, row_max, k, smooth_term, MASKED: tl.constexpr,
                HAS_SMOOTHING: tl.constexpr, ROUND_BF16: tl.constexpr):  # fmt: skip
    """Read a block once more (an L2 hit) and store its gradient without the one-hot term:
    ``_xent_fwd_kernel``'s formula (``_grad``), operation for operation."""
    if MASKED:
        x = tl.load(x_ptr + cols, mask=mask, other=float("-inf"), eviction_policy="evict_first")
    else:
        x = tl.load(x_ptr + cols, eviction_policy="evict_first")
    dx = _exp2((x.to(tl.float32) - row_max) * LOG2E) * k
    if HAS_SMOOTHING:
        dx -= smooth_term
    dx = _to_out(dx, g_ptr, ROUND_BF16)
    if MASKED:
        tl.store(g_ptr + cols, dx, mask=mask, eviction_policy="evict_first")
    else:
        tl.store(g_ptr + cols, dx, eviction_policy="evict_first")


@triton.jit
def _xent_split_kernel(
    # pointers
    logits_ptr,
    target_ptr,
    loss_ptr,
    stats_ptr,
    grad_ptr,
    grad_scale_ptr,
    total_ptr,
    den_ptr,
    counter_ptr,
    work_ptr,  # int32 (1 + N): the ticket, then each row's arrivals; zeroed before PHASE 0
    partials_ptr,  # float32 (N * K, _NP)
    # sizes
    n_rows,
    n_cols,
    n_seg,  # K
    offset0,
    # strides
    stride_logits_row,
    stride_target_row,
    stride_stats,
    stride_grad_row,
    # options
    ignore_index,
    label_smoothing,
    lse_square_scale,
    # meta-parameters
    SEGMENT: tl.constexpr,
    BLOCK: tl.constexpr,
    KP: tl.constexpr,  # K rounded up to a power of two
    NP: tl.constexpr,
    VEC: tl.constexpr,
    EDGES: tl.constexpr,
    PHASE: tl.constexpr,  # 0: one launch, programs wait for their row; 1, 2: two launches
    WRITE_GRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    REDUCE: tl.constexpr,
    RBLOCK: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    if PHASE == 0:
        # In ticket order, not program-id order (module docstring: deadlock freedom).
        item = tl.atomic_add(work_ptr, 1, sem="relaxed")
    else:
        item = tl.program_id(0)
    row = (item // n_seg).to(tl.int64)
    seg = item % n_seg
    seg_start = seg * SEGMENT
    seg_len = tl.minimum(n_cols - seg_start, SEGMENT)
    row_start = offset0 + row * stride_logits_row
    start = row_start + seg_start
    body0, head, body, tail = _row_layout(start, seg_len, VEC, EDGES)
    x_seg = logits_ptr + start
    x_body = logits_ptr + body0
    p_row = partials_ptr + row * n_seg * NP
    p_item = p_row + seg * NP

    target = tl.load(target_ptr + row * stride_target_row).to(tl.int64)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < n_cols) & (~ignored)
    col = tl.where(valid, target, 0)
    t_seg = (col // SEGMENT).to(tl.int32)
    in_seg = valid & (t_seg == seg)

    offs = tl.arange(0, BLOCK)
    n_full = body // BLOCK
    rem = body - n_full * BLOCK
    if PHASE != 2:
        # Pass 1: the segment's partials, read once and kept in L2 for pass 2.
        zero = tl.sum(tl.zeros([VEC], tl.float32), axis=0)
        shift = zero
        if HAS_SMOOTHING:
            # The smoothing sum is taken relative to the row's first logit (as _xent_fwd_kernel),
            # so that sum(lse - x) does not cancel away at large logits.
            shift = tl.load(logits_ptr + row_start).to(tl.float32)
            shift = tl.where(shift == float("-inf"), 0.0, shift)
        m = zero + float("-inf")
        ref = zero + float("-inf")
        s = zero
        sz = zero
        for i in range(0, n_full):
            m, ref, s, sz = _stats_block(x_body + i * BLOCK, offs, True, shift, m, ref, s, sz,
                                         False, HAS_SMOOTHING)  # fmt: skip
        if rem != 0:
            m, ref, s, sz = _stats_block(x_body + n_full * BLOCK, offs, offs < rem, shift, m,
                                         ref, s, sz, True, HAS_SMOOTHING)  # fmt: skip
        if EDGES:
            ecols, emask = _edge_cols(head, body, tail, VEC)
            m, ref, s, sz = _stats_block(x_seg, ecols, emask, shift, m, ref, s, sz, True,
                                         HAS_SMOOTHING)  # fmt: skip
        x_t = tl.load(logits_ptr + row_start + col, mask=in_seg, other=0.0).to(tl.float32)
        tl.store(p_item, m)
        tl.store(p_item + 1, ref)
        tl.store(p_item + 2, s)
        if HAS_SMOOTHING:
            tl.store(p_item + 3, sz)
            tl.store(p_item + 5, shift, mask=seg == 0)
        tl.store(p_item + 4, x_t, mask=in_seg)
        if PHASE == 0:
            # Every thread's stores before the release; then wait for the row's other items.
            tl.debug_barrier()
            arrived = tl.atomic_add(work_ptr + 1 + row, 1, sem="acq_rel") + 1
            while arrived < n_seg:
                arrived = tl.atomic_add(work_ptr + 1 + row, 0, sem="acquire")
            tl.debug_barrier()

    if PHASE != 1:
        # The row's statistics from its K partials (.cg: from L2, where the releases put them),
        # in one vector load: K dependent scalar loads would cost K L2 round trips, about as long
        # as reading the segment.
        ks = tl.arange(0, KP)
        kmask = ks < n_seg
        pk = p_row + ks * NP
        pm = tl.load(pk, mask=kmask, other=float("-inf"), cache_modifier=".cg")
        pref = tl.load(pk + 1, mask=kmask, other=float("-inf"), cache_modifier=".cg")
        ps = tl.load(pk + 2, mask=kmask, other=0.0, cache_modifier=".cg")
        m = tl.max(pm, axis=0)
        big = tl.max(pref, axis=0)
        ref_safe = tl.where(big == float("-inf"), 0.0, big)
        # 2**(r_k - R) from its bits (0 below 2**-126, and for a segment with no finite logit).
        kk = tl.maximum(tl.where(pref == float("-inf"), -127.0, pref - ref_safe), -127.0)
        s = tl.sum(ps * ((kk.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True), axis=0)
        row_max = tl.where(m == float("-inf"), 0.0, m)
        log2_shift = tl.fma(row_max, LOG2E, -ref_safe)
        log_sum = (_log2(s) - log2_shift) * LN2
        # As _xent_fwd_kernel: >= 0 (s holds the max's own term), kept at 0 where rounding of a
        # long row made it -1e-8; -inf and NaN stay.
        log_sum = tl.where(log_sum < 0.0, tl.where(s > 0.0, 0.0, log_sum), log_sum)
        lse = row_max + log_sum

        smooth_c = label_smoothing / n_cols
        # The coefficient A of p in the gradient; coef_t: the target's share of it.
        coef_t = tl.where(valid, 1.0 - label_smoothing, 0.0)
        coef = coef_t
        if HAS_SMOOTHING:
            coef += smooth_c * n_cols
        if lse_square_scale != 0.0:
            coef += 2.0 * lse_square_scale * lse
        z_t = tl.load(p_row + t_seg * NP + 4, mask=valid, other=0.0, cache_modifier=".cg")

        if seg == 0:
            # No target share (label_smoothing 1) adds exactly 0, even at a -inf logit.
            loss = tl.where(coef_t == 0.0, 0.0, coef_t * ((row_max - z_t) + log_sum))
            if HAS_SMOOTHING:
                shift = tl.load(p_item + 5, cache_modifier=".cg")
                sz = tl.sum(tl.load(pk + 3, mask=kmask, other=0.0, cache_modifier=".cg"), axis=0)
                loss += smooth_c * (n_cols * ((row_max - shift) + log_sum) - sz)
            if lse_square_scale != 0.0:
                loss += lse_square_scale * lse * lse
            loss = tl.where(valid, loss, float("nan"))
            loss = tl.where(ignored, 0.0, loss)
            tl.store(loss_ptr + row, loss)
            tl.store(stats_ptr + row, row_max)
            tl.store(stats_ptr + stride_stats + row, log_sum)
            tl.store(stats_ptr + 2 * stride_stats + row, coef)
            if REDUCE != 0:
                _finish_reduction(loss_ptr, total_ptr, den_ptr, counter_ptr, n_rows, REDUCE,
                                  RBLOCK)  # fmt: skip

        if WRITE_GRAD:
            # Pass 2: the segment again, from L2, and its gradient.
            row_scale = 1.0
            if HAS_GRAD_SCALE:
                row_scale = tl.load(grad_scale_ptr).to(tl.float32)
            if REDUCE == 2:
                row_scale = row_scale * _mean_rcp(tl.load(den_ptr))
            row_scale = _class_row_scale(row_scale, valid, ignored)
            g_row = grad_ptr + offset0 + row * stride_grad_row
            g_seg = g_row + seg_start
            g_body = grad_ptr + _row_layout(offset0 + row * stride_grad_row + seg_start, seg_len,
                                            VEC, EDGES)[0]  # fmt: skip
            k = coef * row_scale * _exp2(-log_sum * LOG2E)
            smooth_term = smooth_c * row_scale
            if row_scale == 0.0:
                _zero_row(g_seg, g_body, head, body, tail, BLOCK, VEC, EDGES, False)
            else:
                for i in range(0, n_full):
                    _grad_block(x_body + i * BLOCK, g_body + i * BLOCK, offs, True, row_max, k,
                                smooth_term, False, HAS_SMOOTHING, ROUND_BF16)  # fmt: skip
                if rem != 0:
                    _grad_block(x_body + n_full * BLOCK, g_body + n_full * BLOCK, offs,
                                offs < rem, row_max, k, smooth_term, True, HAS_SMOOTHING,
                                ROUND_BF16)  # fmt: skip
                if EDGES:
                    ecols, emask = _edge_cols(head, body, tail, VEC)
                    _grad_block(x_seg, g_seg, ecols, emask, row_max, k, smooth_term, True,
                                HAS_SMOOTHING, ROUND_BF16)  # fmt: skip
            _write_target_grad(
                g_row, col, in_seg, z_t, row_max, k, 0.0, row_scale, 1.0, label_smoothing,
                smooth_c, 1.0, False, False, ROUND_BF16,
            )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _block(segment: int, itemsize: int, smoothing: bool) -> int:
    """Logits per block: _BLOCK_BYTES (half with smoothing), at most the largest power of two
    <= the segment (tests' small segments get whole blocks too, so the loops run)."""
    block = (_BLOCK_BYTES // itemsize) >> smoothing
    return min(1 << (segment.bit_length() - 1), block)


def _supported(opts, prob_target: bool) -> bool:
    return (
        not prob_target
        and opts.weight is None
        and opts.softcap is None
        and opts.logit_scale == 1.0
        and opts.class_offset == 0
        and opts.n_classes is None
    )


def _co_resident(device: torch.device, n_seg: int) -> bool:
    """Can K programs be argued resident at once (module docstring)? One program fits an SM
    (else no launch would run), so with the device to ourselves the SM count can; half of it
    leaves room for other work sharing the device (streams, an MPS client's share)."""
    if device.type != "cuda":
        return False
    return 2 * n_seg <= torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(
    n_rows: int,
    n_cols: int,
    dtype: torch.dtype,
    device: torch.device,
    opts,
    *,
    prob_target: bool = False,
    write_grad: bool = True,
) -> tuple[int, int] | None:
    """(K, segment) for splitting rows of ``n_cols`` logits over K programs of ``segment``
    logits, or None where :func:`xent_forward_split` should not be used: short rows (their second
    read hits L2), no gradient wanted (one read already), options it does not support (class
    weights, probability targets, softcap, logit scale, a sharded vocabulary), no rows, or on a
    GPU where K programs cannot be argued co-resident. Under the interpreter a plan is returned
    (the launcher then runs two launches)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    if n_rows == 0 or not write_grad or not _supported(opts, prob_target):
        return None
    if n_cols * dtype.itemsize < _SPLIT_MIN_ROW_BYTES:
        return None
    segment = _SEGMENT_BYTES // dtype.itemsize
    n_seg = triton.cdiv(n_cols, segment)
    if n_rows * n_seg >= 2**31:  # int32 tickets
        return None
    if not INTERPRET and not _co_resident(torch.device(device), n_seg):
        return None
    return n_seg, segment


def xent_forward_split(
    logits, target, opts, loss, stats, grad=None, reduction="none", total=None, den=None,
    counter=None, segment=None, wait=None, grad_scale=None,
) -> None:  # fmt: skip
    """:func:`kernels.xent.xent_forward` for long rows, each split over K programs.

    Args:
        logits, target, opts, loss, stats, grad, reduction, total, den, counter, grad_scale: as
            for ``xent_forward`` (``den`` and ``counter`` from ``xent_prologue``, run just
            before, for "mean" / "sum"), for the subset :func:`split_plan` accepts: a (N,)
            int64 / int32 class-index target, no class weight, softcap, logit scale or sharded
            vocabulary.
        segment: logits per program (a multiple of 16 bytes of the dtype); None: the plan's.
        wait: one launch whose programs wait for their row's other segments (True), or two
            launches (False); None: one launch on a GPU where K programs are co-resident, two
            under the interpreter (where one would hang unless K is 1).
    """
    xent._check_launchable(logits)  # through the module: bench/static.py patches it
    n_rows, n_cols = logits.shape
    if target.is_floating_point() or not _supported(opts, False):
        raise ValueError("xent_forward_split: options it does not support (see split_plan)")
    if n_rows == 0:
        if reduction != "none":
            zero = torch.zeros((), dtype=total.dtype, device=total.device)
            total.copy_(reduce_total(zero, den if reduction == "mean" else None))
        return
    if segment is None:
        segment = _SEGMENT_BYTES // logits.element_size()
    if segment <= 0 or (segment * logits.element_size()) % 16:
        raise ValueError(f"segment {segment}: must be a positive multiple of 16 bytes")
    n_seg = triton.cdiv(n_cols, segment)
    if wait is None:
        wait = not INTERPRET and _co_resident(logits.device, n_seg)
    if wait and INTERPRET and n_seg > 1:
        raise ValueError("the interpreter runs programs one at a time: wait=True would hang")
    write_grad = grad is not None
    x_base, g_base, lead, vec, edges = _row_args(logits, grad)
    reduce = _REDUCE_CODE[reduction]
    partials = torch.empty(n_rows * n_seg * _NP, dtype=torch.float32, device=logits.device)
    # The ticket and the arrival counters, zeroed on the device (no host synchronisation).
    work = torch.zeros(1 + n_rows, dtype=torch.int32, device=logits.device) if wait else partials
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        for phase in (0,) if wait else (1, 2):
            launch(
                _xent_split_kernel,
                (n_rows * n_seg,),
                x_base,
                target,
                loss,
                stats,
                g_base if write_grad else loss,  # unread without WRITE_GRAD
                grad_scale if grad_scale is not None else loss,
                total if reduce else loss,
                den if reduce == MEAN else loss,
                counter if reduce else loss,
                work,  # unused in two launches
                partials,
                n_rows,
                n_cols,
                n_seg,
                lead,
                logits.stride(0),
                target.stride(0),
                stats.stride(0),
                grad.stride(0) if write_grad else 0,
                opts.ignore_index,
                opts.label_smoothing,
                opts.lse_square_scale,
                SEGMENT=segment,
                BLOCK=_block(segment, logits.element_size(), opts.label_smoothing > 0.0),
                KP=triton.next_power_of_2(n_seg),
                NP=_NP,
                VEC=vec,
                EDGES=edges,
                PHASE=phase,
                WRITE_GRAD=write_grad,
                HAS_GRAD_SCALE=grad_scale is not None,
                REDUCE=reduce,
                RBLOCK=_RBLOCK,
                HAS_SMOOTHING=opts.label_smoothing > 0.0,
                ROUND_BF16=write_grad and _round_bf16(grad),
                num_warps=_SPLIT_WARPS,
            )
