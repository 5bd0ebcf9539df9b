"""Train a tiny character-level transformer three times, once per loss, and compare the curves.

The same model (same seed, same initial weights) is trained on the same batches with:

- ``torch``:  ``F.cross_entropy(model.head(h), y)`` on the (B*T, V) logits;
- ``fused``:  ``fused_xent.cross_entropy(model.head(h), y)``, the plain drop-in;
- ``linear``: ``fused_xent.linear_cross_entropy(h, model.head.weight, y,
  linear_bias=model.head.bias)`` (torch's ``F.linear_cross_entropy`` signature), which takes the
  LM head's weight as ``linear_weight`` and computes the loss chunk by chunk, so the (B*T, V)
  logits never exist at once.

Here V is the character vocabulary of ``examples/data/public_domain.txt`` and h the final hidden
states, flattened to (B*T, D). The script prints the three losses per step, then checks that the
fused curves follow torch's to within the dtype's tolerance and exits with status 1 if they do not.

On a CPU (the default without CUDA) it trains for a few seconds in float32, where ``impl="auto"``
is the pure-PyTorch reference path. On a GPU it trains longer under bf16 autocast, with the Triton
kernels, and also prints tokens per second and peak memory for each loss.

    python examples/train_tiny_lm.py                       # CPU: 20 steps, float32
    python examples/train_tiny_lm.py --steps 300 --quiet   # only the summary
    python examples/train_tiny_lm.py --device cuda         # bf16 autocast, 300 steps
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_xent

DATA = Path(__file__).resolve().parent / "data" / "public_domain.txt"
LOSSES = ("torch", "fused", "linear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Largest relative difference |loss - torch_loss| / torch_loss allowed at any step, per training
# dtype. The three runs start from the same weights and see the same batches, so they differ only
# by rounding in the loss and its gradient, which the optimizer then carries forward and which
# grows as the runs drift apart. Measured on the CPU config (reference path): float32 agrees to
# 3.4e-7 over 20 steps and 2.3e-6 over 300; 1e-4 leaves a wide margin for the Triton kernels'
# different summation order and longer runs, and still fails a loss whose gradient is 1% off (a
# gradient scaled by 1.01 gives 2.2e-4 within 20 steps, one label-smoothed with epsilon 0.01
# gives 9e-4). bf16 autocast rounds every activation to 8 bits of mantissa, so the drift is larger
# and grows fast: measured under CPU bf16 autocast, 1e-4 over 20 steps, 2e-4 over 100, 5.8e-3
# over 300. 3e-2 is five times that at 300 steps (the GPU default); longer bf16 runs may need
# --rtol. (Not measured on a GPU, where SDPA's backward may also not be bitwise reproducible.)
RTOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@dataclass
class Config:
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 20
    lr: float = 3e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0


# CPU: a few seconds in float32 on two cores. GPU: a longer bf16 run with more tokens per step.
CPU_CONFIG = Config()
GPU_CONFIG = Config(n_layer=4, d_model=128, n_head=4, seq_len=256, batch_size=64, steps=300)


# ---------------------------------------------------------------------------------------------
# Data


def load_text(path: Path = DATA) -> str:
    """The training text, without the header lines (those starting with '#')."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith("#")).strip() + "\n"


def encode(text: str) -> tuple[torch.Tensor, list[str]]:
    """(N,) int64 character ids and the vocabulary (sorted characters): V = len(vocab)."""
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.int64), vocab


def batch_starts(n_tokens: int, cfg: Config) -> torch.Tensor:
    """(steps, B) random window starts, drawn once so that every run sees the same batches."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randint(0, n_tokens - cfg.seq_len - 1, (cfg.steps, cfg.batch_size), generator=gen)


def get_batch(data: torch.Tensor, starts: torch.Tensor, seq_len: int, device):
    """Inputs x and next-character targets y, both (B, T)."""
    idx = starts[:, None] + torch.arange(seq_len)
    return data[idx].to(device), data[idx + 1].to(device)


# ---------------------------------------------------------------------------------------------
# Model


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """Character-level decoder: embeddings, blocks, final LayerNorm, and an LM head (V, D)."""

    def __init__(self, vocab_size: int, cfg: Config):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) final hidden states, the LM head's input."""
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)


def compute_loss(model: TinyLM, x, y, loss_name: str, impl: str, chunk_size):
    """Mean next-character loss of one batch by one of the three losses (a float32 scalar)."""
    h = model.hidden(x)
    h = h.reshape(-1, h.shape[-1])  # (B*T, D)
    y = y.reshape(-1)  # (B*T,)
    vocab = model.head.weight.shape[0]
    if loss_name == "linear":
        # Under autocast linear_cross_entropy runs its chunked products in the autocast dtype,
        # as F.linear would; the float32 master weight gets its gradient through the cast.
        return fused_xent.linear_cross_entropy(
            h, model.head.weight, y, linear_bias=model.head.bias, chunk_size=chunk_size, impl=impl
        )
    logits = model.head(h)
    assert logits.shape == (y.shape[0], vocab), logits.shape  # (B*T, V)
    if loss_name == "torch":
        return F.cross_entropy(logits, y)  # autocast runs it in float32
    return fused_xent.cross_entropy(logits, y, impl=impl)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class Run:
    loss_name: str
    losses: list[float]
    seconds: float  # timed steps only (the first ones warm up)
    timed_tokens: int
    peak_mib: float | None  # torch.cuda.max_memory_allocated, CUDA only

    @property
    def tokens_per_s(self) -> float:
        return self.timed_tokens / self.seconds if self.seconds > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(
    loss_name, init_state, data, starts, vocab_size, cfg, device, amp_dtype, impl, chunk_size
) -> Run:
    """Train from ``init_state`` on the batches ``starts``; the per-step losses and timings."""
    model = TinyLM(vocab_size, cfg).to(device)
    model.load_state_dict(init_state)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    warmup = min(3, cfg.steps // 4)  # steps left out of the timing (allocator, kernel compiles)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        x, y = get_batch(data, starts[step], cfg.seq_len, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = compute_loss(model, x, y, loss_name, impl, chunk_size)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # no host sync inside the timed loop
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Run(
        loss_name=loss_name,
        losses=torch.stack(losses).float().tolist(),
        seconds=seconds,
        timed_tokens=(cfg.steps - warmup) * cfg.batch_size * cfg.seq_len,
        peak_mib=peak,
    )


@dataclass
class Result:
    runs: dict[str, Run]
    dtype: torch.dtype
    rtol: float
    vocab_size: int
    cfg: Config

    def rel_diff(self, loss_name: str) -> list[float]:
        """|loss - torch's loss| / |torch's loss| at each step."""
        ref = self.runs["torch"].losses
        return [abs(a - b) / abs(b) for a, b in zip(self.runs[loss_name].losses, ref, strict=True)]

    def max_rel_diff(self) -> dict[str, float]:
        return {name: max(self.rel_diff(name)) for name in LOSSES[1:]}

    @property
    def ok(self) -> bool:
        finite = all(math.isfinite(v) for run in self.runs.values() for v in run.losses)
        return finite and all(d <= self.rtol for d in self.max_rel_diff().values())


def train(
    steps=None,
    device=None,
    dtype=None,
    impl="auto",
    quiet=False,
    chunk_size=None,
    rtol=None,
    cfg: Config | None = None,
) -> Result:
    """Train the three runs and return their curves (printing the table unless ``quiet``).

    ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 (autocast) on CUDA and
    float32 elsewhere; ``cfg`` to the GPU or CPU config; ``chunk_size`` to a quarter of the
    B*T rows, so that the linear loss runs in four chunks.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = cfg or (GPU_CONFIG if device.type == "cuda" else CPU_CONFIG)
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    if chunk_size is None:
        chunk_size = max(1, cfg.batch_size * cfg.seq_len // 4)
    rtol = RTOL[dtype] if rtol is None else rtol
    if impl == "triton" and device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported
    amp_dtype = None if dtype == torch.float32 else dtype

    data, vocab = encode(load_text())
    starts = batch_starts(len(data), cfg)
    torch.manual_seed(cfg.seed)
    init_state = {k: v.clone() for k, v in TinyLM(len(vocab), cfg).state_dict().items()}
    runs = {}
    for name in LOSSES:
        runs[name] = train_one(
            name, init_state, data, starts, len(vocab), cfg, device, amp_dtype, impl, chunk_size
        )
    result = Result(runs=runs, dtype=dtype, rtol=rtol, vocab_size=len(vocab), cfg=cfg)
    report(result, device, impl, chunk_size, quiet)
    return result


def report(result: Result, device, impl, chunk_size, quiet: bool) -> None:
    cfg, runs = result.cfg, result.runs
    rows = cfg.batch_size * cfg.seq_len
    dtype_name = str(result.dtype).removeprefix("torch.")
    if not quiet:
        n_params = sum(v.numel() for v in TinyLM(result.vocab_size, cfg).state_dict().values())
        print(
            f"tiny char LM: {cfg.n_layer} layers, d_model {cfg.d_model}, {n_params:,} params; "
            f"logits ({rows} = B*T {cfg.batch_size}x{cfg.seq_len}, V {result.vocab_size}); "
            f"{device.type}, {dtype_name}, impl={impl}, linear chunk_size={chunk_size}"
        )
        every = max(1, cfg.steps // 50)  # at most ~50 rows on long runs
        diffs = {name: result.rel_diff(name) for name in LOSSES[1:]}
        print(
            f"{'step':>5} {'torch':>10} {'fused':>10} {'linear':>10} {'rel fused':>10} "
            f"{'rel linear':>10}"
        )
        for i in range(cfg.steps):
            if i % every and i != cfg.steps - 1:
                continue
            losses = " ".join(f"{runs[n].losses[i]:10.6f}" for n in LOSSES)
            print(f"{i:5d} {losses} {diffs['fused'][i]:10.2e} {diffs['linear'][i]:10.2e}")
        for name in LOSSES:
            run = runs[name]
            mem = f", peak memory {run.peak_mib:8.1f} MiB" if run.peak_mib is not None else ""
            print(f"{name:>6}: {run.tokens_per_s:12,.0f} tokens/s{mem}")
    first, last = runs["torch"].losses[0], runs["torch"].losses[-1]
    worst = ", ".join(f"{k} {v:.2e}" for k, v in result.max_rel_diff().items())
    verdict = "OK" if result.ok else "FAIL"
    print(
        f"{verdict}: {cfg.steps} steps, loss {first:.4f} -> {last:.4f}; largest relative "
        f"difference from torch: {worst} (tolerance {result.rtol:.0e}, {dtype_name})"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: 20 on CPU, 300 on CUDA)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="float32, or bfloat16 autocast (default: bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--impl",
        choices=("auto", "triton", "reference"),
        default="auto",
        help="fused_xent backend (auto: Triton on CUDA, reference on CPU)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="rows per chunk of linear_cross_entropy (default: B*T/4)",
    )
    parser.add_argument(
        "--rtol", type=float, default=None, help="override the per-step relative tolerance"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the final summary")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    result = train(
        steps=args.steps,
        device=args.device,
        dtype=args.dtype,
        impl=args.impl,
        quiet=args.quiet,
        chunk_size=args.chunk_size,
        rtol=args.rtol,
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
