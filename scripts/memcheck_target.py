"""Class indices outside [0, C): the workload for compute-sanitizer's memcheck.

    compute-sanitizer --tool memcheck python scripts/memcheck_target.py   # on CUDA
    python scripts/memcheck_target.py   # without CUDA: the kernels under Triton's interpreter

C = 1001 (not a multiple of 8: unaligned rows, a partial last block). Targets -5, -1, C, C + 7 and
2^40 beside ignored and valid ones; forward + backward with every reduction, float32 and bfloat16,
plain and with class weights + label smoothing + softcap, in place and not. The kernels must never
use an invalid index as an address: such rows get a NaN loss and gradient, and the other rows
match the reference path (exit 1 otherwise). Run it under the sanitizer with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 (scripts/gpu_check.sh does), so that every tensor is its own
allocation and memcheck sees any access past one.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

import fused_xent  # noqa: E402

C = 1001
BAD = [-5, -1, C, C + 7, 2**40]


def run(x, t, reduction, inplace, opts):
    """(loss, gradient) of the kernels."""
    leaf = x.clone().requires_grad_(True)
    loss = fused_xent.cross_entropy(
        leaf, t, reduction=reduction, inplace_backward=inplace, impl="triton", **opts
    )
    loss.sum().backward()
    return loss.detach(), leaf.grad


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = 64 if device.type == "cuda" else 16
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, C, (n,), generator=gen)
    bad_rows = torch.arange(1, 2 * len(BAD), 2)
    t[bad_rows] = torch.tensor(BAD)
    t[0] = -100  # an ignored row beside them
    t = t.to(device)
    bad = torch.zeros(n, dtype=torch.bool, device=device)
    bad[bad_rows] = True
    weight = torch.rand(C, generator=gen).add_(0.5).to(device)
    configs = {"plain": {}, "options": dict(weight=weight, label_smoothing=0.1, softcap=20.0)}
    failures, runs = [], 0
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(n, C, generator=gen) * 3).to(device=device, dtype=dtype)
        for name, opts in configs.items():
            # The reference path on the rows whose target is valid, in float32.
            ref_x = x[~bad].float().requires_grad_(True)
            ref = fused_xent.cross_entropy(
                ref_x, t[~bad], reduction="none", impl="reference", **opts
            )
            ref.sum().backward()
            ref = ref.detach()
            for reduction in ("mean", "sum", "none"):
                for inplace in (False, True):
                    loss, grad = run(x, t, reduction, inplace, opts)
                    runs += 1
                    what = f"{dtype} {name} {reduction} inplace={inplace}"
                    if not bool(grad[bad].isnan().all()):
                        failures.append(f"{what}: a row with an invalid target has a number")
                    if reduction != "none":
                        if not bool(loss.isnan()):
                            failures.append(f"{what}: the {reduction} loss is not NaN")
                        continue
                    if not bool(loss[bad].isnan().all()):
                        failures.append(f"{what}: an invalid row's loss is not NaN")
                    err = float((loss[~bad] - ref).abs().max() / ref.abs().max())
                    g_err = float((grad[~bad].float() - ref_x.grad).norm() / ref_x.grad.norm())
                    if not (err <= 1e-5 and g_err <= (1e-5 if dtype == torch.float32 else 1e-2)):
                        failures.append(f"{what}: valid rows off by {err:.1e} (loss), {g_err:.1e}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    for f in failures:
        print("FAIL", f)
    print(f"{'OK' if not failures else 'FAIL'}: {runs} forward+backward runs, C = {C}, {device}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
