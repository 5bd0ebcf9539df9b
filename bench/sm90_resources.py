"""Registers and spills of the forward kernel's launch configurations on sm_90, without a GPU.

    python bench/sm90_resources.py

Compiles ``_xent_fwd_kernel`` for an H100 (``GPUTarget("cuda", 90, 32)``) at the (BLOCK, warps)
the launch table picks for a few shapes and option sets, and prints what ``cuobjdump -res-usage``
(shipped in Triton's package) reports. 16 warps leave 128 registers a thread; LOCAL > 0 means
spills. This is how the 8192 block cap for rows with options (_OPTIONS_BLOCK_MAX) was chosen.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import torch
import triton
from fused_xent.kernels import xent
from triton.backends.compiler import GPUTarget

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
OPTION_SETS = {
    "plain": {},
    "softcap": {"HAS_SOFTCAP": True},
    "weight+smoothing+softcap": {"HAS_WEIGHT": True, "HAS_SMOOTHING": True, "HAS_SOFTCAP": True},
    "all, probability targets": {
        "PROB_TARGET": True,
        "HAS_WEIGHT": True,
        "HAS_SMOOTHING": True,
        "HAS_SOFTCAP": True,
    },
}


def resources(dtype: str, n_cols: int, options: dict, write_grad: bool = True) -> str:
    block, num_warps = xent._launch_config(n_cols, DTYPES[dtype])
    if options:
        block = min(block, xent._OPTIONS_BLOCK_MAX)
    signature = {
        "logits_ptr": f"*{dtype}",
        "target_ptr": "*fp32" if options.get("PROB_TARGET") else "*i64",
        "weight_ptr": "*fp32",
        "loss_ptr": "*fp32",
        "stats_ptr": "*fp32",
        "grad_ptr": f"*{dtype}",
        "grad_scale_ptr": "*fp32",
        "n_cols": "i32",
        "class_offset": "i64",
        "n_classes": "i32",
        "stride_logits_row": "i64",
        "stride_target_row": "i64",
        "stride_stats": "i32",
        "stride_grad_row": "i64",
        "ignore_index": "i32",
        "label_smoothing": "fp32",
        "lse_square_scale": "fp32",
        "logit_scale": "fp32",
        "softcap": "fp32",
    }
    constexprs = {
        "BLOCK": block,
        "SINGLE_BLOCK": n_cols <= block,
        "WRITE_GRAD": write_grad,
        "PROB_TARGET": False,
        "HAS_WEIGHT": False,
        "HAS_SMOOTHING": False,
        "HAS_SOFTCAP": False,
        "ROUND_BF16": False,
        **options,
    }
    signature.update({name: "constexpr" for name in constexprs})
    source = triton.compiler.ASTSource(
        fn=xent._xent_fwd_kernel, signature=signature, constexprs=constexprs
    )
    kernel = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True)
    line = next(x for x in out.stdout.splitlines() if "REG" in x).split()
    usage = " ".join(x for x in line if x.startswith(("REG", "STACK", "LOCAL")))
    return f"BLOCK {block:>5} x {num_warps:>2} warps  {usage}"


def main() -> None:
    for dtype, n_cols in (("bf16", 2048), ("bf16", 16384), ("bf16", 128256), ("fp32", 128256)):
        for name, options in OPTION_SETS.items():
            print(f"{dtype} C={n_cols:<7} {name:<26} {resources(dtype, n_cols, options)}")


if __name__ == "__main__":
    main()
