"""``python -m fused_xent``: the seed example, a short self-check, and (on a GPU) a timing table."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

# The seed document's example: logits [[1, 2, 3]] * 3, one-hot labels at columns 2, 1, 0.
SEED_LOGITS = [[1.0, 2.0, 3.0]] * 3
SEED_LABELS = [2, 1, 0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def seed_example(impl: str, device: str) -> None:
    import fused_xent

    print(f"Seed example (impl={impl!r}, {device}): logits [[1,2,3]]*3, labels {SEED_LABELS}")
    rows = []
    for name, fn in (
        ("fused_xent", lambda x, y: fused_xent.cross_entropy(x, y, impl=impl)),
        ("torch", F.cross_entropy),
    ):
        x = torch.tensor(SEED_LOGITS, device=device, requires_grad=True)
        y = torch.tensor(SEED_LABELS, device=device)
        loss = fn(x, y)
        loss.backward()
        rows.append((name, loss, x.grad))
    for name, loss, grad in rows:
        grid = "; ".join(" ".join(f"{v:7.4f}" for v in r) for r in grad.tolist())
        print(f"  {name:<10} loss {float(loss.detach()):.4f}  grad [{grid}]")


def self_check(impl: str, device: str, sizes: list[tuple[int, int]]) -> bool:
    """Loss and gradient against torch on float64 copies; True when all are within tolerance."""
    import fused_xent

    tol_grad = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
    gen = torch.Generator(device="cpu").manual_seed(0)
    ok = True
    print(f"Self-check against torch float64 (impl={impl!r}, {device}):")
    for n, c in sizes:
        for dtype in tol_grad:
            x = (torch.randn(n, c, generator=gen) * 4).to(device=device, dtype=dtype)
            y = torch.randint(0, c, (n,), generator=gen).to(device)
            y[0] = -100  # one ignored row
            ref_x = x.double().requires_grad_()
            ref = F.cross_entropy(ref_x, y)
            ref.backward()
            ours_x = x.clone().requires_grad_()
            ours = fused_xent.cross_entropy(ours_x, y, impl=impl)
            ours.backward()
            e_loss, e_grad = _rel(ours.detach(), ref.detach()), _rel(ours_x.grad, ref_x.grad)
            good = e_loss <= 1e-5 and e_grad <= tol_grad[dtype]
            ok &= good
            print(
                f"  {n:>5} x {c:<7} {str(dtype)[6:]:<9} loss err {e_loss:.1e}  "
                f"grad err {e_grad:.1e}  {'ok' if good else 'FAIL'}"
            )
    return ok


def _time_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def gpu_table(n: int = 8192, c: int = 128256, dtype: torch.dtype = torch.bfloat16) -> None:
    import fused_xent

    logits = torch.randn(n, c, device="cuda", dtype=dtype) * 4
    target = torch.randint(0, c, (n,), device="cuda")
    bytes_moved = 2 * logits.numel() * logits.element_size()  # read the logits + write the grad
    name = torch.cuda.get_device_name()
    print(f"\nForward+backward of a mean loss, {n} x {c} {str(dtype)[6:]}, {name}")
    print("| implementation | ms | GB/s (read + write of the logits) | peak extra GB |")
    print("|---|---|---|---|")
    impls = {
        "torch eager": lambda x: F.cross_entropy(x, target),
        "fused_xent": lambda x: fused_xent.cross_entropy(x, target),
        "fused_xent inplace": lambda x: fused_xent.cross_entropy(x, target, inplace_backward=True),
    }
    for name, fn in impls.items():
        x = logits.clone().requires_grad_()

        def step(x=x, fn=fn):
            # In place, x itself becomes the gradient; the kernels' time does not depend on values.
            x.grad = None
            fn(x).backward()

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = _time_ms(step)
        extra = (torch.cuda.max_memory_allocated() - base) / 1e9
        print(f"| {name} | {ms:.3f} | {bytes_moved / ms / 1e6:.0f} | {extra:.2f} |")
        del x


def main() -> int:
    cuda = torch.cuda.is_available()
    if not cuda:
        # Must be set before fused_xent.kernels is imported (Triton reads it at decoration time).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print(
        f"fused_xent on torch {torch.__version__}; device: "
        f"{torch.cuda.get_device_name() if cuda else 'CPU only (no CUDA device found)'}"
    )
    if cuda:
        seed_example("auto", "cuda")
        ok = self_check("auto", "cuda", [(64, 32000), (16, 128256), (256, 2048)])
        gpu_table()
    else:
        print(
            "No GPU: 'auto' (the default) runs torch's own F.cross_entropy on a float32 copy for "
            "calls of at most 2^18 logits, and fused_xent/cpu.py above that; the reference is "
            "the test oracle; the Triton kernels run under TRITON_INTERPRET=1 (slow, tiny sizes)."
        )
        seed_example("auto", "cpu")
        seed_example("triton", "cpu")
        start = time.perf_counter()
        # 8 x 1000: auto's small-call route; 16 x 32000 (over 2^18 logits): fused_xent/cpu.py.
        ok = self_check("auto", "cpu", [(8, 1000), (16, 32000)])
        ok &= self_check("reference", "cpu", [(4, 1000)])
        ok &= self_check("triton", "cpu", [(4, 100), (2, 20000)])
        print(f"  ({time.perf_counter() - start:.1f} s on the CPU)")
    print("\nself-check:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
