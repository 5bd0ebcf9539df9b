"""Fine-tune a tiny Llama-style model with transformers' Trainer, unpatched and patched.

The two lines a user adds to a training script:

    import fused_xent.hf
    fused_xent.hf.patch(model)  # before Trainer(model=model, ...)

The model is ``LlamaForCausalLM`` built from a ``LlamaConfig`` (randomly initialised from a fixed
seed; nothing is downloaded) and trained on ``examples/data/public_domain.txt``, one token per
byte. The vocabulary is 32000 by default (Llama 2's): the bytes use its first 256 ids and the
rest are never a target, but every logit of every row is computed, stored and differentiated as
with a real tokenizer, which is what the patch saves. Both runs start from the same weights and
see the same batches with ``gradient_accumulation_steps=2`` (so the loss goes through
``num_items_in_batch``); the script prints both loss curves, then each run's peak memory and step
time, and exits with status 1 if the curves differ by more than the dtype's tolerance.

Memory: on CUDA the peak allocated by torch during training (``torch.cuda.max_memory_allocated``);
on the CPU the peak resident set size above what the process held when training started, sampled
every millisecond, with each run in a fresh process so that memory one run freed does not hide
the other's.

    python examples/hf_finetune.py                    # CPU: 12 steps, float32, under a minute
    python examples/hf_finetune.py --vocab 128256     # Llama 3's vocabulary
    python examples/hf_finetune.py --device cuda --vocab 128256 --steps 50   # bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data" / "public_domain.txt"
VARIANTS = ("unpatched", "patched")
# Largest relative difference between the two loss curves at any step. The runs differ only by
# rounding in the loss and its gradient (the patched one sums the logits' gradient chunk by chunk),
# which the optimizer carries forward: float32 agrees to ~1e-6 over these runs (measured on the
# CPU), bf16 autocast rounds every activation to 8 bits and drifts more.
RTOL = {"float32": 1e-4, "bfloat16": 3e-2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (>= 256)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=128, help="tokens per row")
    p.add_argument("--batch", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=tuple(RTOL), default=None, help="cuda: bfloat16 autocast")
    p.add_argument(
        "--same-process",
        action="store_true",
        help="run both variants in this process (CPU memory figures are then not comparable)",
    )
    p.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)  # one run, JSON out
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    args = p.parse_args(argv)
    if args.vocab < 256:
        p.error("--vocab must be at least 256 (one id per byte)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


class ByteRows(torch.utils.data.Dataset):
    """Consecutive windows of the text, one byte a token; labels are the inputs (the model
    shifts them)."""

    def __init__(self, seq: int):
        data = torch.tensor(list(DATA.read_bytes()), dtype=torch.long)
        self.rows = data[: len(data) // seq * seq].view(-1, seq)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class _RssSampler:
    """Peak resident set size (Linux /proc/self/statm) above the level at start, in a thread."""

    def __init__(self, period_s: float = 1e-3):
        self.period_s, self.page = period_s, os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._rss()) - self.start


def train(variant: str, args: argparse.Namespace) -> dict:
    """One run; returns its losses (one per optimizer step), peak memory (bytes) and step time."""
    import transformers

    import fused_xent.hf

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if variant == "patched":
        fused_xent.hf.patch(model)  # the one line

    step_times = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            if args.device == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out_dir:
        training = transformers.TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=2,
            max_steps=args.steps,
            learning_rate=args.lr,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=args.device == "cpu",
            bf16=args.dtype == "bfloat16",
            seed=0,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=model, args=training, train_dataset=ByteRows(args.seq), callbacks=[Timer()]
        )
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            trainer.train()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            sampler = _RssSampler()
            trainer.train()
            peak = sampler.stop()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    timed = sorted(step_times[1:] or step_times)  # the first step warms up
    return {"losses": losses, "peak_bytes": peak, "step_s": timed[len(timed) // 2]}


def _run_isolated(variant: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--only", variant]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(runs: dict, args: argparse.Namespace) -> bool:
    want, got = runs["unpatched"]["losses"], runs["patched"]["losses"]
    diffs = [abs(a - b) / abs(b) for a, b in zip(got, want, strict=True)]
    if not args.quiet:
        print(f"{'step':>4}  {'unpatched':>10}  {'patched':>10}  {'rel. diff':>9}")
        for step, (a, b, d) in enumerate(zip(want, got, diffs, strict=True), 1):
            print(f"{step:4d}  {a:10.4f}  {b:10.4f}  {d:9.1e}")
    memory = "peak allocated (CUDA)" if args.device == "cuda" else "peak resident above start"
    print(
        f"LlamaForCausalLM: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, "
        f"{args.batch} x {args.seq} tokens x 2 accumulated, {args.device} {args.dtype}"
    )
    for name, run in runs.items():
        print(
            f"  {name:9s}  loss {run['losses'][0]:.4f} -> {run['losses'][-1]:.4f}   "
            f"{memory} {run['peak_bytes'] / 2**20:8.1f} MiB   step {run['step_s'] * 1e3:7.1f} ms"
        )
    worst, rtol = max(diffs, default=math.inf), RTOL[args.dtype]
    print(f"  curves agree to {worst:.1e} (tolerance {rtol:.0e})")
    ok = len(got) == len(want) and worst <= rtol
    return ok


def main(argv: list[str] | None = None) -> dict:
    """Both runs; returns {variant: {"losses", "peak_bytes", "step_s"}} (printed unless --only)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.only:
        print(json.dumps(train(args.only, args)))
        return {}
    isolate = args.device == "cpu" and not args.same_process
    runs = {v: _run_isolated(v, argv) if isolate else train(v, args) for v in VARIANTS}
    runs["ok"] = report(runs, args)
    return runs


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result.get("ok", True) else 1)
