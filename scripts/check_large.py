"""Cross-entropy on logits of more than 2^31 elements, checked row by row against torch.

    python scripts/check_large.py                      # CUDA: bf16 16400 x 131072 (2.15e9 logits)
    python scripts/check_large.py --rows 6 --cols 300  # tiny; on a CPU, under Triton's interpreter

An element offset computed in 32 bits wraps past 2^31, so the rows at the end of such logits are
the ones at risk. Every row is compared with torch in float32, a block of rows at a time: the
"none" losses, the gradient of a weighted sum of them (the two-pass schedule), and the gradient of
the mean (produced in the forward). Needs about 14 GB of GPU memory at the default shape. Exits 1
on a mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

import fused_xent  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOSS_TOL = 1e-4  # |loss - ref| / max(|ref|, 1), per row: the loss is float32 either way
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}  # per-row, norm-wise


def reference_rows(x, t, r0, r1, scale):
    """float32 loss and gradient (softmax - onehot) * scale of rows r0:r1; 0 on ignored rows."""
    z = x[r0:r1].to(torch.float32, copy=True)
    tb = t[r0:r1]
    valid = tb != -100
    safe = torch.where(valid, tb, 0)[:, None]
    lse = torch.logsumexp(z, dim=1)
    loss = torch.where(valid, lse - z.gather(1, safe).squeeze(1), 0.0)
    grad = torch.exp(z.sub_(lse[:, None]))
    grad.scatter_add_(1, safe, torch.full_like(lse[:, None], -1.0))
    grad.mul_((scale[r0:r1] * valid)[:, None])
    return loss, grad


def compare(x, t, loss, grad, scale, rows_per_block):
    """Worst per-row loss and gradient errors over all rows; an ignored row's gradient must be 0."""
    worst_loss = worst_grad = 0.0
    for r0 in range(0, x.shape[0], rows_per_block):
        r1 = min(r0 + rows_per_block, x.shape[0])
        ref_loss, ref_grad = reference_rows(x, t, r0, r1, scale)
        if loss is not None:
            err = (loss[r0:r1] - ref_loss).abs() / ref_loss.abs().clamp_min(1.0)
            worst_loss = max(worst_loss, float(err.nan_to_num(float("inf")).max()))
        diff = (grad[r0:r1].float() - ref_grad).norm(dim=1)
        err = diff / ref_grad.norm(dim=1).clamp_min(1e-30)
        worst_grad = max(worst_grad, float(err.nan_to_num(float("inf")).max()))
        del ref_grad, diff
    return worst_loss, worst_grad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16400)
    ap.add_argument("--cols", type=int, default=131072)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, c, dtype = args.rows, args.cols, DTYPES[args.dtype]
    print(f"{args.dtype} {n} x {c} on {device}: {n * c:,} logits ({n * c / 2**31:.3f} x 2^31)")

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c, generator=gen, device=device, dtype=dtype).mul_(2)
    t = torch.randint(0, c, (n,), generator=gen, device=device)
    t[::97] = -100  # a few ignored rows
    t[-1] = c - 1  # the last row's target is the highest address of all
    x.requires_grad_(True)
    rows_per_block = max(1, (1 << 27) // c)  # 512 MiB of float32 per block
    ok = True

    # "none": the losses, then the backward kernel with one incoming gradient per row.
    t0 = time.perf_counter()
    loss = fused_xent.cross_entropy(x, t, reduction="none", impl="triton")
    g = torch.rand(n, generator=gen, device=device).add_(0.5)
    loss.backward(g)
    worst = compare(x.detach(), t, loss.detach(), x.grad, g, rows_per_block)
    line = f"none: loss err {worst[0]:.1e}, grad err {worst[1]:.1e}"
    ok &= worst[0] <= LOSS_TOL and worst[1] <= GRAD_TOL[dtype]
    print(f"{line} ({time.perf_counter() - t0:.1f} s)")
    x.grad = None

    # "mean": the gradient is written during the forward.
    t0 = time.perf_counter()
    mean = fused_xent.cross_entropy(x, t, impl="triton")
    mean.backward()
    n_valid = int((t != -100).sum())
    worst = compare(x.detach(), t, None, x.grad, torch.full_like(g, 1.0 / n_valid), rows_per_block)
    ref_mean = float(loss.detach().double().sum()) / n_valid  # the "none" losses, checked above
    mean_err = abs(float(mean.detach()) - ref_mean) / abs(ref_mean)
    ok &= mean_err <= LOSS_TOL and worst[1] <= GRAD_TOL[dtype]
    line = f"mean: loss err {mean_err:.1e}, grad err {worst[1]:.1e}"
    print(f"{line} ({time.perf_counter() - t0:.1f} s)")
    print(("OK" if ok else "FAIL") + f": {args.dtype} {n} x {c}, every row against torch float32")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
