"""The seed example (shared/seed.txt): torch's printed loss and gradient for logits [1, 2, 3].

Each check is made twice: against the values the seed prints (4 decimals, atol 1e-4) and against
the seed's own formula, mean(-sum(onehot * log(softmax(x)))), evaluated in float64 (tight).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import IMPLS

from fused_xent import cross_entropy

# The seed's batch: three identical rows, one-hot labels at columns 2, 1, 0.
SEED_LABEL_COLS = (2, 1, 0)
SEED_LOSS = 1.4076
SEED_GRAD = [
    [0.0300, 0.0816, -0.1116],
    [0.0300, -0.2518, 0.2217],
    [-0.3033, 0.0816, 0.2217],
]
# The seed's three single-row groups: (label column, printed loss, printed gradient).
SEED_GROUPS = [
    (0, 2.4076, [-0.9100, 0.2447, 0.6652]),
    (1, 1.4076, [0.0900, -0.7553, 0.6652]),
    (2, 0.4076, [0.0900, 0.2447, -0.3348]),
]
PRINTED = dict(rtol=0.0, atol=1e-4)  # the seed prints 4 decimals
TIGHT = dict(rtol=1e-6, atol=1e-7)  # float32 outputs against the float64 formula


def _seed_formula_float64(logits: torch.Tensor, label: torch.Tensor):
    """The seed's own computation, in float64: (loss, gradient)."""
    data = logits.detach().to(torch.float64).requires_grad_()
    loss = torch.mean(-torch.sum(label.to(torch.float64) * torch.log(F.softmax(data, dim=1)), 1))
    loss.backward()
    return loss.detach(), data.grad


def _one_hot(cols, n_classes=3) -> torch.Tensor:
    label = torch.zeros(len(cols), n_classes)
    label[torch.arange(len(cols)), torch.tensor(cols)] = 1
    return label


def _run(impl, logits, target):
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, impl=impl)
    loss.backward()
    return loss.detach().cpu(), x.grad.cpu()


@pytest.mark.parametrize("impl", IMPLS)
def test_seed_batch(impl, device):
    logits = torch.tensor([[1.0, 2.0, 3.0]] * 3)
    label = _one_hot(SEED_LABEL_COLS)
    target = label.argmax(1)  # class indices, as the seed's NLLLoss version does

    loss, grad = _run(impl, logits.to(device), target.to(device))

    torch.testing.assert_close(loss, torch.tensor(SEED_LOSS), **PRINTED)
    torch.testing.assert_close(grad, torch.tensor(SEED_GRAD), **PRINTED)
    want_loss, want_grad = _seed_formula_float64(logits, label)
    torch.testing.assert_close(loss.double(), want_loss, **TIGHT)
    torch.testing.assert_close(grad.double(), want_grad, **TIGHT)


@pytest.mark.parametrize("col, printed_loss, printed_grad", SEED_GROUPS, ids=["y0", "y1", "y2"])
@pytest.mark.parametrize("impl", IMPLS)
def test_seed_single_row(impl, col, printed_loss, printed_grad, device):
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    label = _one_hot([col])

    loss, grad = _run(impl, logits.to(device), label.argmax(1).to(device))

    torch.testing.assert_close(loss, torch.tensor(printed_loss), **PRINTED)
    torch.testing.assert_close(grad, torch.tensor([printed_grad]), **PRINTED)
    want_loss, want_grad = _seed_formula_float64(logits, label)
    torch.testing.assert_close(loss.double(), want_loss, **TIGHT)
    torch.testing.assert_close(grad.double(), want_grad, **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_seed_batch_one_hot_probability_target(impl, dtype, device):
    """The seed in its own form: its float one-hot labels passed straight in, as a probability
    target (no argmax), give its printed loss and gradient (float64 labels: the seed's
    torch.zeros(...) default would be float32; both are probability targets)."""
    logits = torch.tensor([[1.0, 2.0, 3.0]] * 3)
    label = _one_hot(SEED_LABEL_COLS).to(dtype)
    assert label.is_floating_point() and label.shape == logits.shape

    loss, grad = _run(impl, logits.to(device), label.to(device))

    torch.testing.assert_close(loss, torch.tensor(SEED_LOSS), **PRINTED)
    torch.testing.assert_close(grad, torch.tensor(SEED_GRAD), **PRINTED)
    want_loss, want_grad = _seed_formula_float64(logits, label)
    torch.testing.assert_close(loss.double(), want_loss, **TIGHT)
    torch.testing.assert_close(grad.double(), want_grad, **TIGHT)
    # and the same numbers as the class-index form of test_seed_batch
    idx_loss, idx_grad = _run(impl, logits.to(device), label.argmax(1).to(device))
    torch.testing.assert_close(loss, idx_loss, **TIGHT)
    torch.testing.assert_close(grad, idx_grad, **TIGHT)
