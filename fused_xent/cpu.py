"""Fast pure-PyTorch cross-entropy for the CPU: the backend contract of ``reference.py``.

Same functions, same outputs (to float32 rounding) as ``fused_xent.reference``, which stays the
test oracle; this module is the fast fallback. The math is stated once, in the docstring of
``fused_xent.kernels.xent``. Computes in float32 (float64 for float64 logits).

Where the reference builds a dense (N, C) target matrix and makes a dozen passes, this makes the
fewest passes over the (N, C) logits that torch's CPU kernels allow. For a class-index target,
with ``d = z - max`` and ``p = softmax(z)``:

* forward: ``m = amax(z)``, ``p = softmax(z)`` (torch's fused kernel: its exp is several times
  faster than ``exp_``), ``log_sum = -log(max_c p_c)`` (the largest p is ``1 / sum exp(d)``), the
  target logit by a gather, and with label smoothing one sum of ``d`` (a float32 buffer, so that
  1e4 logit offsets cancel exactly, as the reference keeps lse as max + log_sum apart);
* gradient: ``p * (A * scale)`` in one pass (``addcmul`` with the smoothing row ``-eps/C * w``),
  written straight into the gradient's dtype (rounded once), the target column fixed by one
  ``index_put_`` of (N,) values computed in float32 (one index per row: deterministic);
* backward (from the forward's statistics): ``p`` from ``softmax(z)`` times
  ``exp(lse' - lse)``, lse' the row's own log-sum-exp, so statistics from elsewhere (the reference,
  another rank's combine) give exactly ``exp(z - max - log_sum)``.

Rows where the fast formulas meet a non-finite value (all -inf or NaN logits, +inf, -inf in a
class with weight 0, ...) are recomputed by the reference, so every edge case keeps its result.
Probability targets take the same passes with a float ``wt = w ((1 - eps) q + eps / C)`` per
chunk (loss = sum(wt) log_sum - sum(wt (z - max)), grad = (coef p - wt) * scale); with a softcap
they, and an empty class dimension, go to the reference, on chunks of rows.

The row max comes from one op over the logits where z is the logits or their upcast; float32
logits need no chunking at all when the gradient is computed (it is the float buffer), so each
pass is one parallel op over the whole input.
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._options import over_den, reduce_total


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _delegate(logits: torch.Tensor, target: torch.Tensor, opts) -> bool:
    """What the fast path leaves to the reference: probability targets with a softcap, C = 0."""
    return logits.shape[1] == 0 or (target.is_floating_point() and opts.softcap is not None)


class _Rows:
    """The class-index targets, checked as the reference checks them, and the per-row terms.

    ``col``: each row's target column here (0 where none: ignored, or another rank's class);
    ``ignored``: (N,) bool or None when no row is ignored; ``a``: the target's weight in the
    loss, ``(1 - eps) * w_y`` (0 where ignored or not among these columns), a tensor or a float;
    ``b``: ``eps / n_classes``; ``w``: the class weights in the compute dtype, or None;
    ``sum_wt``: ``a + b * sum(w)``, the coefficient of log_sum in the loss.
    """

    def __init__(self, logits: torch.Tensor, target: torch.Tensor, opts, dtype) -> None:
        n_cols = logits.shape[1]
        n_classes = opts.n_classes or n_cols
        t = target.long()
        lo, hi = torch.aminmax(t)
        lo, hi = int(lo), int(hi)
        ignore = opts.ignore_index
        self.ignored = None
        if lo < 0 or hi >= n_classes or lo <= ignore <= hi:
            ignored = t == ignore
            bad = ~ignored & ((t < 0) | (t >= n_classes))
            if bool(bad.any()):
                first = int(t[bad][0])
                raise IndexError(
                    f"target holds {first}, outside [0, {n_classes}) and not "
                    f"ignore_index={opts.ignore_index}"
                )
            if bool(ignored.any()):
                self.ignored = ignored
        col = t - opts.class_offset if opts.class_offset else t
        here = None  # None: every row's target is a column here
        if opts.class_offset != 0 or n_classes != n_cols:
            here = (col >= 0) & (col < n_cols)
            if self.ignored is not None:
                here &= ~self.ignored
        elif self.ignored is not None:
            here = ~self.ignored
        if here is not None:
            col = torch.where(here, col, 0)
        self.col = col
        eps = opts.label_smoothing
        self.w = None if opts.weight is None else opts.weight.to(dtype)
        a = 1.0 - eps
        if self.w is not None:
            a = _mul(self.w[col], a)
            if here is not None:
                a = torch.where(here, a, 0.0)
        elif here is not None:
            a = _mul(here.to(dtype), a)
        self.a = a
        self.b = eps / n_classes
        sum_w = float(n_cols) if self.w is None else float(self.w.sum())
        self.sum_wt = a + self.b * sum_w if eps else a

    def ignored_rows(self):
        return None if self.ignored is None else self.ignored.nonzero().squeeze(1)


# Rows are processed in chunks of about this many logits (4 MiB of float32): the several passes
# over a chunk (upcast, softmax, the gradient) then run in the cache, and the chunk's buffers are
# reused, where whole (N, C) float32 temporaries would be mapped afresh (page faults) on every
# call. Measured on a 2-core EPYC, one thread: 2^22 makes bf16 256 x 32000 ~1.5-2x slower
# (spills from the cache), though at 2 threads on a loaded machine fewer, larger chunks wait
# less (each op is a parallel region). Where the gradient is the float buffer itself (float32
# logits), all rows are one chunk (see ``_Chunks``).
CHUNK_ELEMENTS = 1 << 20


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _mul(x, y):
    """x * y, skipping a multiplication by the float 1.0."""
    if isinstance(y, float) and y == 1.0:
        return x
    return x * y


def _part(t, sl):
    """Rows ``sl`` of t (a per-row tensor), or t itself: sl is None for one chunk of all rows,
    and a float or 0-dim tensor is the same for every row."""
    if sl is None or not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return t[sl]


class _Chunks:
    """The row chunks of one call (None: all rows at once), and their reusable (rows, C) buffers
    in the compute dtype."""

    def __init__(self, logits: torch.Tensor, opts, dtype, into=None) -> None:
        """``into``: the gradient where it may serve as the one float buffer (see
        :func:`_p_in_grad`): then all rows make one chunk, z, z - max and p written there in
        place, and no (rows, C) temporary is made; each pass is one parallel op over the whole
        input (fewer parallel regions, each of which waits for every intra-op thread)."""
        self.logits, self.opts, self.dtype, self.into = logits, opts, dtype, into
        n_rows, n_cols = logits.shape
        self.rows = max(1, min(n_rows, CHUNK_ELEMENTS // max(n_cols, 1)))
        if into is not None:
            self.rows = n_rows
        self._buffers: dict[str, torch.Tensor] = {}

    def row_max(self):
        """(every row's max in the compute dtype, None) by one op over the logits where z is the
        logits or a plain upcast of them (the max of the upcast is the upcast of the max), else
        None: each chunk then takes its own. (``max(1)``'s argmax would spare the pass over p
        in :func:`_largest_p`, but its CPU kernel is scalar: 4-9x slower than ``amax``.)"""
        x, opts = self.logits, self.opts
        if opts.logit_scale != 1.0 or opts.softcap is not None:
            return None
        return x.amax(1).to(self.dtype), None

    def __iter__(self):
        n_rows = self.logits.shape[0]
        if self.rows == n_rows:
            yield None
            return
        for start in range(0, n_rows, self.rows):
            yield slice(start, min(start + self.rows, n_rows))

    def _buffer(self, name: str, n: int) -> torch.Tensor:
        if name not in self._buffers:
            shape = (self.rows, self.logits.shape[1])
            self._buffers[name] = self.logits.new_empty(shape, dtype=self.dtype)
        return self._buffers[name][:n]

    def z(self, sl) -> tuple[torch.Tensor, bool]:
        """The chunk's z (the logits themselves, or scaled / softcapped / upcast into a buffer),
        and whether it lives in a buffer of ours (so it may be overwritten)."""
        x, opts = _part(self.logits, sl), self.opts
        if x.dtype == self.dtype and opts.logit_scale == 1.0 and opts.softcap is None:
            return x, False
        if self.into is not None:
            z = self.into.copy_(x)
        elif sl is None:
            z = x.to(self.dtype, copy=True)
        else:
            z = self._buffer("z", x.shape[0]).copy_(x)
        if opts.logit_scale != 1.0:
            z.mul_(opts.logit_scale)
        if opts.softcap is not None:
            z.div_(opts.softcap).tanh_().mul_(opts.softcap)
        return z, True

    def wt(self, q: torch.Tensor, w, n_classes: int) -> torch.Tensor:
        """A chunk of probability targets' ``w * ((1 - eps) q + eps / C)``, as the reference
        rounds it (q itself where that is all)."""
        eps = self.opts.label_smoothing
        if q.dtype == self.dtype and not eps and w is None:
            return q
        wt = q.to(self.dtype, copy=True) if self.rows == self.logits.shape[0] else None
        if wt is None:
            wt = self._buffer("wt", q.shape[0]).copy_(q)
        if eps:
            wt.mul_(1.0 - eps).add_(eps / n_classes)
        return wt if w is None else wt.mul_(w)

    def d(self, z: torch.Tensor, m2: torch.Tensor, ours: bool) -> torch.Tensor:
        """z - max (m2: (rows, 1)), in place where z is ours and no softcap needs it later."""
        if ours and self.opts.softcap is None:
            return z.sub_(m2)
        if self.into is not None:
            return torch.sub(z, m2, out=self.into)
        if self.rows == self.logits.shape[0]:
            return z - m2
        return torch.sub(z, m2, out=self._buffer("d", z.shape[0]))

    def p(self, src: torch.Tensor, sl, grad: torch.Tensor | None) -> torch.Tensor:
        """softmax(src) into the chunk's rows of ``grad`` when it may hold it, else a buffer."""
        if grad is not None:
            out = _part(grad, sl)
            # torch 2.13's CPU softmax writes a strided out= as if it were contiguous.
            if out.is_contiguous():
                return torch._softmax(src, 1, False, out=out)
        if sl is None:
            return torch._softmax(src, 1, False)
        return torch._softmax(src, 1, False, out=self._buffer("p", src.shape[0]))


def _largest_p(p, row_max, sl, out) -> torch.Tensor:
    """Each row's largest p into ``out`` (rows,): at the max's column where ``row_max`` (from
    :meth:`_Chunks.row_max`) has it, else by a pass over p."""
    if row_max is None or row_max[1] is None:
        return torch.amax(p, 1, out=out)
    torch.gather(p, 1, _part(row_max[1], sl), out=out[:, None])
    return out


def _p_in_grad(grad, logits, opts, dtype) -> torch.Tensor | None:
    """``grad`` when p may be computed in it (same dtype, no softcap, not the logits), else None."""
    if grad is None or grad.dtype != dtype or opts.softcap is not None:
        return None
    return None if _shares_storage(grad, logits) else grad


class _Columns:
    """(N, 1) per-row values the gradient pass gathers or scales by: the target column ``col``,
    p there (``p_y``), (z / softcap)^2 there (``q_y``, with a softcap)."""

    def __init__(self, rows: _Rows, ref: torch.Tensor, softcap) -> None:
        self.col = rows.col[:, None]
        self.p_y = ref.new_empty((ref.shape[0], 1))
        self.q_y = None if softcap is None else torch.empty_like(self.p_y)


def _grad_chunk(p, z, rows: _Rows, cols: _Columns, sl, opts, r2, u2, v, grad) -> None:
    """One chunk of grad = (r p - u w) * dz/dx (the target column comes later), rounded once.

    ``r2``: A times the row's scale, (N, 1) or one 0-dim value; ``u2`` the smoothing term's
    scale, None without smoothing; ``v`` = -u w as a (C,) row when u is one value for all rows
    (the forward), else None. ``p`` is a float buffer or the chunk of ``grad`` itself.
    """
    col = _part(cols.col, sl)
    torch.gather(p, 1, col, out=_part(cols.p_y, sl))
    dst = _part(grad, sl) if opts.softcap is None else p
    r2 = _part(r2, sl)
    if u2 is None:
        torch.mul(p, r2, out=dst)
    elif v is not None:
        torch.addcmul(v, p, r2, out=dst)
    else:
        p.mul_(r2)
        if rows.w is None:
            torch.sub(p, _part(u2, sl), out=dst)
        else:
            torch.addcmul(p, _part(u2, sl), rows.w, value=-1.0, out=dst)
    if opts.softcap is not None:
        # dz/dx = logit_scale * (1 - (z / softcap)^2); logit_scale is in r and u already.
        q = z.div_(opts.softcap).square_()
        torch.gather(q, 1, col, out=_part(cols.q_y, sl))
        p.addcmul_(p, q, value=-1.0)
        _part(grad, sl).copy_(p)


def _target_column(grad, rows: _Rows, cols: _Columns, opts, r2, u2, t2, zero_rows) -> None:
    """The target column of every row, computed in float and rounded once; then exact zeros in
    ``zero_rows`` (ignored rows, rows of a zero scale). ``t2`` scales the target's ``a``."""
    g_y = cols.p_y * r2
    if u2 is not None:
        g_y -= u2 if rows.w is None else u2 * rows.w[cols.col]
    g_y -= _mul(t2, rows.a) if isinstance(rows.a, float) else t2 * rows.a[:, None]
    if opts.softcap is not None:
        g_y *= 1.0 - cols.q_y
    # index_put_ with one (row, column) pair per row: deterministic, and unlike scatter_ its cost
    # does not grow with the row length for a half-precision gradient.
    rows_idx = torch.arange(grad.shape[0], device=grad.device)
    grad.index_put_((rows_idx, rows.col), g_y.squeeze(1).to(grad.dtype))
    if zero_rows is not None and zero_rows.numel():
        grad.index_fill_(0, zero_rows, 0.0)


def _bad_rows(values: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows whose value is not finite, or None (one reduction when all are)."""
    if math.isfinite(float(values.sum())):
        return None
    bad = (~torch.isfinite(values)).nonzero().squeeze(1)
    return bad if bad.numel() else None


class _Fallback:
    """Rows the reference recomputes: their logits are copied when found, before the gradient
    (which may be the logits' own storage) is written."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []

    def check(self, values, logits, sl=None) -> None:
        bad = _bad_rows(values)
        if bad is not None:
            start = 0 if sl is None else sl.start
            self.rows.append(bad + start)
            self.logits.append(_part(logits, sl).index_select(0, bad))

    def take(self):
        """(row indices, their logits), or None."""
        if not self.rows:
            return None
        return torch.cat(self.rows), torch.cat(self.logits)


def _raw_loss(rows: _Rows, sl, opts, m, log_sum, z_y, sum_wd) -> torch.Tensor:
    """The loss of rows ``sl`` (ignored rows not yet zeroed); ``z_y`` is the target's z - max
    with smoothing, z itself without."""
    m, log_sum, z_y = _part(m, sl), _part(log_sum, sl), _part(z_y, sl)
    z_rel = z_y if sum_wd is not None else z_y - m
    loss = _mul(log_sum, _part(rows.sum_wt, sl)) - _mul(z_rel, _part(rows.a, sl))
    if sum_wd is not None:
        loss -= rows.b * _part(sum_wd, sl)
    if opts.lse_square_scale != 0.0:
        lse = m + log_sum
        loss += opts.lse_square_scale * lse * lse
    return loss


@torch.no_grad()
def _forward_rows(logits, target, opts, loss, stats, grad=None, grad_scale=None) -> None:
    """Per-row loss and statistics (max, log-sum, coefficient); the gradient if ``grad`` given."""
    if _delegate(logits, target, opts):
        for sl in _reference_chunks(logits):
            reference.xent_forward(logits[sl], target[sl], opts, loss[sl], stats[:, sl],
                                   _part(grad, sl), grad_scale)  # fmt: skip
        return
    if target.is_floating_point():
        _forward_probs(logits, target, opts, loss, stats, grad, grad_scale)
        return
    n_rows = logits.shape[0]
    if n_rows == 0:
        return
    dtype = _compute_dtype(logits.dtype)
    rows = _Rows(logits, target, opts, dtype)
    p_grad = _p_in_grad(grad, logits, opts, dtype)
    chunks = _Chunks(logits, opts, dtype, p_grad)
    smoothing, zloss = rows.b != 0.0, opts.lse_square_scale
    # Written in place, chunk by chunk; ``loss`` holds the target's z until the end.
    m, log_sum, coef = stats[0], stats[1], stats[2]
    m2, z_y2 = m[:, None], loss[:, None]
    sum_wd = torch.empty_like(m) if smoothing else None
    if not zloss:
        if isinstance(rows.sum_wt, float):
            coef.fill_(rows.sum_wt)
        else:
            coef.copy_(rows.sum_wt)
    if grad is not None:
        # No grad_scale: the gradient for an incoming gradient of 1 ("sum", the linear form).
        s = torch.ones((), dtype=dtype) if grad_scale is None else grad_scale.to(dtype)
        s = s.reshape(()) if s.dim() else s
        if opts.logit_scale != 1.0:
            s = s * opts.logit_scale
        u2 = s * rows.b if smoothing else None  # one value: the forward's scale is a scalar
        v = None if u2 is None else -u2 if rows.w is None else rows.w * -u2
        if zloss:
            r2 = torch.empty_like(m2)
        elif isinstance(rows.sum_wt, float):
            r2 = s * rows.sum_wt
        else:
            r2 = coef[:, None] * s
        cols = _Columns(rows, m2, opts.softcap)
    alias = grad is not None and _shares_storage(grad, logits)
    fallback = _Fallback()
    row_max = chunks.row_max()
    if row_max is not None:
        m.copy_(row_max[0])
    for sl in chunks:
        z, ours = chunks.z(sl)
        m_c, col = _part(m, sl), _part(rows.col, sl)[:, None]
        if row_max is None:
            torch.amax(z, 1, out=m_c)
        if smoothing:
            # sum_c w_c (z_c - max) on z - max in float: large logits cancel exactly.
            src = chunks.d(z, _part(m2, sl), ours)
            if rows.w is None:
                torch.sum(src, 1, out=_part(sum_wd, sl))
            else:
                torch.mv(src, rows.w, out=_part(sum_wd, sl))
        else:
            src = z
        torch.gather(src, 1, col, out=_part(z_y2, sl))
        p = chunks.p(src, sl, p_grad)
        ls_c = _part(log_sum, sl)
        _largest_p(p, row_max, sl, ls_c)  # the largest p is 1 / sum exp(z - max)
        ls_c.log_().neg_()
        if grad is None:
            continue
        if zloss:
            coef_c = torch.add(m_c, ls_c, out=_part(coef, sl)).mul_(2.0 * zloss)
            coef_c += _part(rows.sum_wt, sl)
            torch.mul(coef_c[:, None], s, out=_part(r2, sl))
        if alias:
            fallback.check(_raw_loss(rows, sl, opts, m, log_sum, loss, sum_wd), logits, sl)
        _grad_chunk(p, z, rows, cols, sl, opts, r2, u2, v, grad)
    row_loss = _raw_loss(rows, None, opts, m, log_sum, loss, sum_wd)
    if zloss and grad is None:
        torch.add(m, log_sum, out=coef).mul_(2.0 * zloss).add_(rows.sum_wt)
    if not alias:
        fallback.check(row_loss, logits)
    if rows.ignored is not None:
        row_loss.masked_fill_(rows.ignored, 0.0)
    loss.copy_(row_loss)
    if grad is not None:
        _target_column(grad, rows, cols, opts, r2, u2, s, rows.ignored_rows())
    redo = fallback.take()
    if redo is not None:
        bad, bad_logits = redo
        sub_loss, sub_stats = loss.new_empty(len(bad)), stats.new_empty((3, len(bad)))
        sub_grad = None if grad is None else grad.new_empty((len(bad), grad.shape[1]))
        reference.xent_forward(
            bad_logits, target.index_select(0, bad), opts, sub_loss, sub_stats, sub_grad,
            grad_scale,
        )  # fmt: skip
        loss.index_copy_(0, bad, sub_loss)
        stats.index_copy_(1, bad, sub_stats)
        if grad is not None:
            grad.index_copy_(0, bad, sub_grad)


@torch.no_grad()
def _backward_rows(logits, target, opts, stats, dloss, grad) -> None:
    """grad = d(sum_i dloss_i * loss_i) / d logits, from the forward's per-row statistics."""
    if _delegate(logits, target, opts):
        for sl in _reference_chunks(logits):
            reference.xent_backward(logits[sl], target[sl], opts, stats[:, sl], dloss[sl],
                                    grad[sl])  # fmt: skip
        return
    if target.is_floating_point():
        _backward_probs(logits, target, opts, stats, dloss, grad)
        return
    n_rows = logits.shape[0]
    if n_rows == 0:
        return
    dtype = _compute_dtype(logits.dtype)
    rows = _Rows(logits, target, opts, dtype)
    p_grad = _p_in_grad(grad, logits, opts, dtype)
    chunks = _Chunks(logits, opts, dtype, p_grad)
    row_max, log_sum, coef = stats.to(dtype)
    s = dloss.to(dtype)
    if opts.logit_scale != 1.0:
        s = s * opts.logit_scale
    s2 = s[:, None]
    u2 = s2 * rows.b if rows.b else None
    # p = exp(z - max - log_sum) from the statistics: softmax(z) times exp(own lse - lse), with
    # the row's own max and log_sum; ``shift`` holds own lse - lse, then r = A s exp(shift).
    shift, r2 = torch.empty_like(row_max), torch.empty_like(s2)
    cols = _Columns(rows, s2, opts.softcap)
    alias = _shares_storage(grad, logits)
    fallback = _Fallback()
    own_max = chunks.row_max()
    if own_max is not None:
        shift.copy_(own_max[0])
    for sl in chunks:
        z, _ = chunks.z(sl)
        shift_c = _part(shift, sl)
        if own_max is None:
            torch.amax(z, 1, out=shift_c)
        p = chunks.p(z, sl, p_grad)
        own_log_sum = _largest_p(p, own_max, sl, torch.empty_like(shift_c)).log_().neg_()
        shift_c.sub_(_part(row_max, sl)).add_(own_log_sum).sub_(_part(log_sum, sl))
        if alias:
            fallback.check(shift_c + _part(coef, sl), logits, sl)
        r_c = torch.mul(_part(coef, sl), _part(s, sl), out=_part(r2, sl)[:, 0])
        r_c.mul_(shift_c.exp_())
        _grad_chunk(p, z, rows, cols, sl, opts, r2, u2, None, grad)
    if not alias:
        fallback.check(shift + coef, logits)
    zero = (s == 0).nonzero().squeeze(1)
    if rows.ignored is not None:
        zero = torch.cat([zero, rows.ignored_rows()])
    _target_column(grad, rows, cols, opts, r2, u2, s2, zero)
    redo = fallback.take()
    if redo is not None:
        bad, bad_logits = redo
        sub_grad = grad.new_empty((len(bad), grad.shape[1]))
        reference.xent_backward(
            bad_logits, target.index_select(0, bad), opts, stats.index_select(1, bad),
            dloss.index_select(0, bad), sub_grad,
        )  # fmt: skip
        grad.index_copy_(0, bad, sub_grad)


def _probs_scale(s, opts, dtype):
    s = s.to(dtype)
    return s * opts.logit_scale if opts.logit_scale != 1.0 else s


@torch.no_grad()
def _forward_probs(logits, target, opts, loss, stats, grad=None, grad_scale=None) -> None:
    """:func:`_forward_rows` for probability targets q (no softcap): with ``wt = w ((1 - eps) q
    + eps / C)``, loss = sum(wt) log_sum - sum(wt (z - max)) (+ the z-loss), coef = sum(wt)
    (+ 2 zl lse), grad = (coef p - wt) * scale."""
    n_rows = logits.shape[0]
    if n_rows == 0:
        return
    dtype = _compute_dtype(logits.dtype)
    n_classes = opts.n_classes or logits.shape[1]
    w = None if opts.weight is None else opts.weight.to(dtype)
    chunks = _Chunks(logits, opts, dtype)  # wt and d want their own buffers
    p_grad = _p_in_grad(grad, logits, opts, dtype)
    m, log_sum, coef = stats[0], stats[1], stats[2]
    dot, sum_wt, zloss = torch.empty_like(m), torch.empty_like(m), opts.lse_square_scale
    if grad is not None:
        s = torch.ones((), dtype=dtype) if grad_scale is None else grad_scale.to(dtype)
        s = _probs_scale(s.reshape(()) if s.dim() else s, opts, dtype)
        r2 = torch.empty_like(m)[:, None]
    alias = grad is not None and _shares_storage(grad, logits)
    fallback = _Fallback()
    row_max = chunks.row_max()
    if row_max is not None:
        m.copy_(row_max[0])
    for sl in chunks:
        z, ours = chunks.z(sl)
        m_c, ls_c, coef_c = _part(m, sl), _part(log_sum, sl), _part(coef, sl)
        if row_max is None:
            torch.amax(z, 1, out=m_c)
        wt = chunks.wt(_part(target, sl), w, n_classes)
        torch.sum(wt, 1, out=_part(sum_wt, sl))
        d = chunks.d(z, m_c[:, None], ours)
        p = chunks.p(d, sl, p_grad)
        _largest_p(p, row_max, sl, ls_c).log_().neg_()
        torch.sum(d.mul_(wt), 1, out=_part(dot, sl))  # d is ours: a buffer, or z in place
        if grad is None:
            continue
        _probs_coef(coef_c, m_c, ls_c, _part(sum_wt, sl), zloss)
        if alias:
            fallback.check(_probs_loss(sl, opts, m, log_sum, sum_wt, dot), logits, sl)
        r_c = torch.mul(coef_c[:, None], s, out=_part(r2, sl))
        torch.addcmul(p.mul_(r_c), wt, s, value=-1.0, out=_part(grad, sl))
    row_loss = _probs_loss(None, opts, m, log_sum, sum_wt, dot)
    if grad is None:
        _probs_coef(coef, m, log_sum, sum_wt, zloss)
    if not alias:
        fallback.check(row_loss, logits)
    loss.copy_(row_loss)
    redo = fallback.take()
    if redo is not None:
        bad, bad_logits = redo
        sub_loss, sub_stats = loss.new_empty(len(bad)), stats.new_empty((3, len(bad)))
        sub_grad = None if grad is None else grad.new_empty((len(bad), grad.shape[1]))
        reference.xent_forward(
            bad_logits, target.index_select(0, bad), opts, sub_loss, sub_stats, sub_grad,
            grad_scale,
        )  # fmt: skip
        loss.index_copy_(0, bad, sub_loss)
        stats.index_copy_(1, bad, sub_stats)
        if grad is not None:
            grad.index_copy_(0, bad, sub_grad)


def _probs_coef(coef, m, log_sum, sum_wt, zloss) -> None:
    """coef = sum(wt) + 2 zl lse, into ``coef``."""
    if zloss:
        torch.add(m, log_sum, out=coef).mul_(2.0 * zloss).add_(sum_wt)
    else:
        coef.copy_(sum_wt)


def _probs_loss(sl, opts, m, log_sum, sum_wt, dot) -> torch.Tensor:
    """Rows ``sl`` of the probability targets' loss."""
    m, log_sum, sum_wt, dot = _part(m, sl), _part(log_sum, sl), _part(sum_wt, sl), _part(dot, sl)
    zloss = opts.lse_square_scale
    # No target mass here (another rank's slice): 0, even where log_sum is -inf.
    loss = torch.where(sum_wt == 0, 0.0, sum_wt * log_sum) - dot
    if zloss:
        lse = m + log_sum
        loss += zloss * lse * lse
    return loss


@torch.no_grad()
def _backward_probs(logits, target, opts, stats, dloss, grad) -> None:
    """:func:`_backward_rows` for probability targets: grad = (coef p - wt) * scale, p from the
    statistics as there."""
    n_rows = logits.shape[0]
    if n_rows == 0:
        return
    dtype = _compute_dtype(logits.dtype)
    n_classes = opts.n_classes or logits.shape[1]
    w = None if opts.weight is None else opts.weight.to(dtype)
    p_grad = _p_in_grad(grad, logits, opts, dtype)
    # wt wants a buffer of its own unless it is the targets themselves
    plain = opts.weight is None and not opts.label_smoothing and target.dtype == dtype
    chunks = _Chunks(logits, opts, dtype, p_grad if plain else None)
    row_max, log_sum, coef = stats.to(dtype)
    s2 = _probs_scale(dloss, opts, dtype)[:, None]
    shift, r2 = torch.empty_like(row_max), torch.empty_like(s2)
    alias = _shares_storage(grad, logits)
    fallback = _Fallback()
    own_max = chunks.row_max()
    if own_max is not None:
        shift.copy_(own_max[0])
    for sl in chunks:
        z, _ = chunks.z(sl)
        shift_c = _part(shift, sl)
        if own_max is None:
            torch.amax(z, 1, out=shift_c)
        p = chunks.p(z, sl, p_grad)
        own_log_sum = _largest_p(p, own_max, sl, torch.empty_like(shift_c)).log_().neg_()
        shift_c.sub_(_part(row_max, sl)).add_(own_log_sum).sub_(_part(log_sum, sl))
        if alias:
            fallback.check(shift_c + _part(coef, sl), logits, sl)
        s_c, r_c = _part(s2, sl), _part(r2, sl)
        torch.mul(_part(coef, sl)[:, None], s_c, out=r_c).mul_(shift_c.exp_()[:, None])
        wt = chunks.wt(_part(target, sl), w, n_classes)
        torch.addcmul(p.mul_(r_c), wt, s_c, value=-1.0, out=_part(grad, sl))
    if not alias:
        fallback.check(shift + coef, logits)
    zero = (s2[:, 0] == 0).nonzero().squeeze(1)
    if zero.numel():
        grad.index_fill_(0, zero, 0.0)
    redo = fallback.take()
    if redo is not None:
        bad, bad_logits = redo
        sub_grad = grad.new_empty((len(bad), grad.shape[1]))
        reference.xent_backward(
            bad_logits, target.index_select(0, bad), opts, stats.index_select(1, bad),
            dloss.index_select(0, bad), sub_grad,
        )  # fmt: skip
        grad.index_copy_(0, bad, sub_grad)


# --------------------------------------------------------------------------------------------
# The backend contract (kernels/xent.py's launchers): reductions and scales around the rows
# --------------------------------------------------------------------------------------------

xent_prologue = reference.xent_prologue

# The reference's dense temporaries (a dozen (rows, C) float32 tensors) fit the cache in chunks
# of this many logits, where whole (N, C) ones would be mapped afresh on every call.
REFERENCE_CHUNK_ELEMENTS = 1 << 18


def _reference_chunks(logits):
    n_rows, n_cols = logits.shape
    step = max(1, REFERENCE_CHUNK_ELEMENTS // max(n_cols, 1))
    return [slice(start, start + step) for start in range(0, n_rows, step)]


@torch.no_grad()
def xent_forward(
    logits, target, opts, loss, stats, grad=None, grad_scale=None, reduction="none",
    total=None, den=None, counter=None, entropy=None, predicted=None, row_weight=None,
    logprob=False,
) -> None:  # fmt: skip
    """As :func:`fused_xent.kernels.xent.xent_forward`. The per-token outputs and weights
    (entropy, argmax, token weight, log-prob) are left to the reference, on chunks of rows."""
    if entropy is not None or predicted is not None or row_weight is not None or logprob:
        if reduction != "none":
            reference.xent_forward(logits, target, opts, loss, stats, grad, grad_scale,
                                   reduction, total, den, counter, entropy, predicted,
                                   row_weight, logprob)  # fmt: skip
            return
        for sl in _reference_chunks(logits):
            reference.xent_forward(
                logits[sl], target[sl], opts, loss[sl], stats[:, sl], _part(grad, sl),
                grad_scale, "none", None, None, None, _part(entropy, sl), _part(predicted, sl),
                _part(row_weight, sl), logprob,
            )  # fmt: skip
        return
    del counter
    scale = grad_scale
    if grad is not None and reduction == "mean":
        one = torch.ones((), dtype=torch.float64)
        scale = over_den(one if scale is None else scale.to(torch.float64), den.to(torch.float64))
    _forward_rows(logits, target, opts, loss, stats, grad, scale)
    if reduction != "none":
        total.copy_(reduce_total(loss.sum(), den if reduction == "mean" else None))


@torch.no_grad()
def xent_backward(
    logits, target, opts, stats, dloss, grad, reduction="none", den=None, skip_if_one=False,
    target_grad=None, dentropy=None, entropy=None, row_weight=None, logprob=False,
) -> None:  # fmt: skip
    """As :func:`fused_xent.kernels.xent.xent_backward` (a host read of the incoming gradient
    costs nothing on the CPU)."""
    if target_grad is not None or grad is None or dentropy is not None or row_weight is not None:
        if reduction != "none":
            reference.xent_backward(logits, target, opts, stats, dloss, grad, reduction, den,
                                    skip_if_one, target_grad, dentropy, entropy, row_weight,
                                    logprob)  # fmt: skip
            return
        for sl in _reference_chunks(logits):
            reference.xent_backward(
                logits[sl], target[sl], opts, stats[:, sl], _part(dloss, sl), _part(grad, sl),
                "none", None, False, _part(target_grad, sl), _part(dentropy, sl),
                _part(entropy, sl), _part(row_weight, sl), logprob,
            )  # fmt: skip
        return
    if logprob:
        dloss = -dloss
    if skip_if_one and float(dloss) == 1.0:
        return
    if reduction != "none":
        g = dloss.reshape(()).to(torch.float64)
        dloss = (over_den(g, den) if reduction == "mean" else g).expand(logits.shape[0])
    _backward_rows(logits, target, opts, stats, dloss, grad)
