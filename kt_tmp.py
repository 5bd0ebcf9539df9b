import torch, triton, fused_xent
from fused_xent.kernels import xent
from fused_xent._options import LossOptions
from fused_xent import _alloc
from triton.testing import do_bench
o = LossOptions()
for n, c in ((32768, 2048), (16384, 8192), (8192, 128256)):
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16) * 3
    t = torch.randint(0, c, (n,), device="cuda")
    loss = torch.empty(n, device="cuda"); st = torch.empty(3, n, device="cuda")
    tot = torch.empty((), device="cuda"); den = torch.empty((), device="cuda"); cnt = torch.empty((), dtype=torch.int32, device="cuda")
    g = _alloc.grad_like(x)
    f = {
      "prologue": lambda: xent.xent_prologue(t, o, c, "mean", den, cnt),
      "fwd none nograd": lambda: xent.xent_forward(x, t, o, loss, st),
      "fwd mean nograd": lambda: (xent.xent_prologue(t, o, c, "mean", den, cnt), xent.xent_forward(x, t, o, loss, st, None, None, "mean", tot, den, cnt)),
      "fwd none +grad": lambda: xent.xent_forward(x, t, o, loss, st, g),
      "fwd mean +grad": lambda: (xent.xent_prologue(t, o, c, "mean", den, cnt), xent.xent_forward(x, t, o, loss, st, g, None, "mean", tot, den, cnt)),
      "bwd none": lambda: xent.xent_backward(x, t, o, st, torch.ones(n, device="cuda"), g),
      "api mean fwd+bwd": lambda: torch.autograd.grad(fused_xent.cross_entropy(x.requires_grad_(), t), x),
    }
    floor = 2 * x.numel() * 2 / 4.27e12 * 1e3
    for k, fn in f.items():
        ms = do_bench(fn, warmup=10, rep=40)
        print(f"{n}x{c} {k:18s} {ms*1000:8.1f} us  (floor rw {floor*1000:.0f} us)", flush=True)
    x.requires_grad_(False)
