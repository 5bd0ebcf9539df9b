"""The kernels' fast launch (kernels/_launch.py) picks the kernel and the arguments Triton's own
launch would, for every specialisation the launchers make.

A child process compiles the real launchers' kernels for sm_90 with a stub driver whose launches
do nothing (``bench/host_time.py``'s, no interpreter), with ``FUSED_XENT_CHECK_LAUNCH=1``: every
launch after the first of its specialisation asks Triton for its kernel and bound arguments and
raises if they differ. The calls alternate what Triton specialises on (dtypes, 16-byte aligned
or not, class counts divisible by 16 or not, a single row, options on and off), so a key that
missed one of them would hand a kernel compiled for another specialisation and fail here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CUDA

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys
import warnings
# Every launch says its compile options (_launch.COMPILE_OPTIONS): Triton 3.9 warns where one
# leaves FMA contraction to its default, which turns off in 3.10.
warnings.filterwarnings("error", message=".*TRITON_DEFAULT_FP_FUSION")
sys.path.insert(0, "bench")
import host_time as H
import torch
import fused_xent
from fused_xent.kernels import _launch
H._driver.set_active(H.StubDriver())
H.xent._check_launchable = H._launchable
assert _launch.ENABLED and _launch.CHECK
g = torch.Generator().manual_seed(0)
seen = 0
for dtype in (torch.bfloat16, torch.float32):
    for cols in (256, 250, 1):
        base = torch.randn(5, cols + 3, generator=g).to(dtype)
        for offset in (0, 1):  # 16-byte aligned or not
            x = base[:, offset:offset + cols]
            x = x.contiguous() if offset == 0 else x
            # the target's pointer 16-byte aligned or not (the logits are re-based to an aligned
            # pointer by the launchers)
            t = torch.randint(0, cols, (6,), generator=g)[offset:offset + 5]
            for kw in ({}, {"label_smoothing": 0.1, "softcap": 5.0}, {"reduction": "none"},
                       {"reduction": "sum", "ignore_index": 3}):  # fmt: skip
                for scale in (1.0, 3.0, 3.0):  # the second launch takes the fast path, checked
                    xl = x.detach().requires_grad_()
                    loss = fused_xent.cross_entropy(xl, t, impl="triton", **kw)
                    # an incoming gradient of 1, then another (the backward's work)
                    (loss.sum() * scale).backward()
                    with torch.no_grad():
                        fused_xent.cross_entropy(x, t, impl="triton", **kw)
                    seen += 1
            # the plain route's target alignment and strides, and its single row
            tt = torch.randint(0, cols, (6, 2), generator=g)
            one = x[:1].detach().requires_grad_()
            flat = tt.flatten()  # (int64: element 1 is 8 bytes past a 16-byte boundary)
            for target in (tt[:5, 0], tt[:5, 1], flat[:5], flat[1:6]):
                for _ in range(2):
                    xl = x.detach().requires_grad_()
                    fused_xent.cross_entropy(xl, target, impl="triton").backward()
                    fused_xent.cross_entropy(one, target[:1], impl="triton").backward()
            for _ in range(2):
                logp, ent = fused_xent.token_logprobs(one, t[:1], return_entropy=True,
                                                      impl="triton")
                (logp.sum() + ent.sum()).backward()
                s = x.detach().requires_grad_()
                teacher = x.float().flip(0).to(dtype)
                fused_xent.distillation_loss(s, teacher, beta=0.5, impl="triton").backward()
print("launch checks", seen, "kept", len(_launch._KEPT))
"""


@pytest.mark.skipif(CUDA, reason="the stub driver replaces the CUDA one")
def test_fast_launch_picks_what_triton_picks():
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}  # fmt: skip
    env.update(FUSED_XENT_CHECK_LAUNCH="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1500)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "launch checks 144" in out.stdout
