"""Long rows: today's two-pass forward with gradient against the split-row kernel
(``kernels/split.py``), side by side, checked against float64 and timed.

For each shape, forward + backward of a "mean" loss (``fused_xent.cross_entropy``, the default
route) with the split kernel off, then on (``kernels.xent.SPLIT_ROWS``, what
``FUSED_XENT_SPLIT_ROWS=1`` sets): the median of ``triton.testing.do_bench``, and that time as a
fraction of one read + one write of the logits at the copy bandwidth measured in the same run
(``y.copy_(x)`` of the same bytes). Each result is checked first: the loss against float64 torch
(row blocks of ``logsumexp``), the first rows' gradient against float64 ``softmax - onehot``.
The two-pass runs come first and every line is printed as it comes, so a split kernel that hung
(the step's timeout kills it) still leaves the baseline.

    python bench/long_rows.py [--dry] [--out FILE.json]

``--dry``: small shapes under Triton's interpreter (set here), long rows shrunk so that the split
route is taken: a check that the script runs, no timing worth reading.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import benchlib  # noqa: E402
import torch  # noqa: E402
from fused_xent.kernels import split, xent  # noqa: E402

SHAPES = [(8192, 128256, torch.bfloat16), (4096, 256000, torch.bfloat16),
          (8192, 128256, torch.float32)]  # fmt: skip
DRY_SHAPES = [(6, 1000, torch.bfloat16), (5, 1000, torch.float32)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="small shapes under the interpreter")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = "cpu" if args.dry else "cuda"
    if args.dry:
        split._SPLIT_MIN_ROW_BYTES, split._SEGMENT_BYTES = 256, 512
    shapes = DRY_SHAPES if args.dry else SHAPES
    calls = []
    real = split.xent_forward_split
    split.xent_forward_split = lambda *a, **k: calls.append(1) or real(*a, **k)
    results = []
    gen = torch.Generator(device=device).manual_seed(0)
    for on in (False, True):
        xent.SPLIT_ROWS = on
        for n, c, dtype in shapes:
            x = (torch.randn(n, c, generator=gen, device=device) * 3).to(dtype)
            t = torch.randint(0, c, (n,), generator=gen, device=device)
            calls.clear()
            loss, grad = benchlib.plain_step(x, t)
            loss_err, grad_err = benchlib.check_plain_step(x, t, loss, grad)
            row = dict(kernel="split" if on else "two-pass", n=n, c=c, dtype=str(dtype),
                       split_taken=bool(calls), loss_err=loss_err, grad_err=grad_err)  # fmt: skip
            del grad
            if not args.dry:
                row.update(benchlib.time_vs_copy(x, lambda: benchlib.plain_step(x, t)))  # noqa: B023
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if not args.dry else "cpu",
                           results=results), f, indent=1)  # fmt: skip
    bad = [r for r in results if r["loss_err"] > 1e-5 or r["grad_err"] > 1e-2]
    bad += [r for r in results if r["split_taken"] != (r["kernel"] == "split")]
    for r in bad:
        print("long_rows: FAILED", r)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
