"""examples/train_tiny_lm.py: the three losses train the tiny LM along the same curve on the CPU.

Imports the script as a module and runs its CPU config (float32, impl="auto" = the reference path)
for 20 steps: a few seconds on two cores.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_lm.py"
STEPS = 20
# The script's float32 tolerance (1e-4) is meant for runs of any length; over these 20 steps the
# curves agree to ~3e-7 (measured), so the test also holds them to a tighter bound.
TIGHT_RTOL = 1e-5


def _load_script():
    spec = importlib.util.spec_from_file_location("train_tiny_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: same losses, and about twice as fast when other jobs share the CPUs
    (two threads on a busy two-core machine spend their time waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def result(script):
    return script.train(steps=STEPS, device="cpu", dtype="float32", impl="auto", quiet=True)


def test_curves_agree(result):
    assert result.ok
    assert set(result.runs) == {"torch", "fused", "linear"}
    for name in ("fused", "linear"):
        diffs = result.rel_diff(name)
        assert len(diffs) == STEPS
        assert max(diffs) <= TIGHT_RTOL, (name, max(diffs))
    # Same weights and batch at step 0: the losses agree to float32 rounding.
    first = [run.losses[0] for run in result.runs.values()]
    assert max(first) - min(first) <= 1e-6 * first[0]


def test_it_trains(result):
    vocab = result.vocab_size
    for run in result.runs.values():
        losses = run.losses
        assert all(math.isfinite(v) for v in losses)
        # A near-uniform prediction at initialisation (weights ~ N(0, 0.02^2)) ...
        assert abs(losses[0] - math.log(vocab)) < 0.05, losses[0]
        # ... that has learnt the character statistics after 20 steps (4.28 -> ~2.8).
        assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses


def test_vocabulary_is_the_texts_characters(script, result):
    text = script.load_text()
    assert len(text) > 30_000
    assert not any(line.startswith("#") for line in text.splitlines())
    assert result.vocab_size == len(set(text))


def test_cli_exit_status(script, capsys):
    assert script.main(["--steps", "2", "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("OK: 2 steps")


def test_cli_fails_on_a_wrong_gradient(script, monkeypatch, capsys):
    """The check has teeth: a loss whose value is right but whose gradient is label-smoothed
    (epsilon 0.1) moves the curve past the tolerance within 8 steps, and main() returns 1."""
    compute_loss = script.compute_loss

    def wrong_gradient(model, x, y, loss_name, *args):
        if loss_name != "fused":
            return compute_loss(model, x, y, loss_name, *args)
        h = model.hidden(x)
        logits = model.head(h.reshape(-1, h.shape[-1]))
        loss = F.cross_entropy(logits, y.reshape(-1))
        smoothed = F.cross_entropy(logits, y.reshape(-1), label_smoothing=0.1)
        return loss.detach() + (smoothed - smoothed.detach())

    monkeypatch.setattr(script, "compute_loss", wrong_gradient)
    assert script.main(["--steps", "8", "--device", "cpu", "--quiet"]) == 1
    assert capsys.readouterr().out.startswith("FAIL: 8 steps")


def test_logits_shape(script):
    """The head and both plain losses see (B*T, V) logits; the linear loss (B*T, D) hiddens."""
    cfg = script.CPU_CONFIG
    data, vocab = script.encode(script.load_text())
    torch.manual_seed(0)
    model = script.TinyLM(len(vocab), cfg)
    starts = script.batch_starts(len(data), cfg)
    x, y = script.get_batch(data, starts[0], cfg.seq_len, "cpu")
    assert x.shape == y.shape == (cfg.batch_size, cfg.seq_len)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one character
    h = model.hidden(x)
    assert h.shape == (cfg.batch_size, cfg.seq_len, cfg.d_model)
    rows = cfg.batch_size * cfg.seq_len
    assert model.head(h.reshape(rows, cfg.d_model)).shape == (rows, len(vocab))
    with torch.no_grad():
        losses = [
            script.compute_loss(model, x, y, name, "auto", 256).item() for name in script.LOSSES
        ]
    assert max(losses) - min(losses) <= 1e-6 * losses[0]
