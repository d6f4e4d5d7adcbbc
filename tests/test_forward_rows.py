"""The opt-in whole-row forward over kept logits (kernels/forward_rows.py) against float64 and
against the split kernel it may replace (the op with it switched on: tests/test_forward_lean.py,
beside the lean passes). Float32 on the interpreter."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import assert_forward_outputs, forward_oracle

# CPU tensors throughout: the interpreter's numerics (a GPU's are checked by gpu_parity.py).
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the kernels on the interpreter (TRITON_INTERPRET=1)")


def _logits(C: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows from flat to very peaked (target margins up to ~40 nats), targets on and off the max."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(C, V, generator=generator) * torch.linspace(0.1, 6.0, C)[:, None]
    targets = torch.randint(0, V, (C,), generator=generator)
    peaked = torch.arange(C) % 3 == 0
    logits[peaked, targets[peaked]] += torch.linspace(5.0, 40.0, int(peaked.sum()))
    return logits, targets


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("with_bias, temperature", [(False, 1.0), (True, 0.7)])
def test_row_forward_matches_float64_and_the_split_kernel(with_entropy, with_bias, temperature):
    from luffy_fast.kernels.forward import logsumexp_forward
    from luffy_fast.kernels.forward_rows import row_forward

    C, V, H = 13, 77, 4  # neither a multiple of the interpreter's 2 x 32 tiles
    logits, targets = _logits(C, V, seed=5)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(6)) if with_bias else None
    got = row_forward(logits, bias, targets, temperature, with_entropy)
    split = logsumexp_forward(torch.zeros(C, H), torch.zeros(V, H), bias, torch.arange(C), targets,
                              temperature, with_entropy, logits=logits)
    expected = forward_oracle(logits, bias, targets, temperature)
    assert (got[3] is None) == (not with_entropy)
    # relative to each value (log pi spans -1e-16 to -50): no worse than the split kernel, both
    # within FORWARD_BOUNDS
    assert_forward_outputs(got, split, expected, 2e-6)
    assert float(expected[1].max()) > -1e-6  # a near-certain target is among the rows


def test_row_forward_ignores_impossible_entries():
    """A -inf logit (a banned token, through the bias) takes no probability and leaves the entropy
    finite."""
    from luffy_fast.kernels.forward_rows import row_forward

    logits, targets = _logits(6, 50, seed=2)
    bias = torch.zeros(50)
    bias[[3, 31, 49]] = float("-inf")
    banned = (targets == 3) | (targets == 31) | (targets == 49)
    targets[banned] = 4
    got = row_forward(logits, bias, targets, 1.0, True)
    expected = forward_oracle(logits, bias, targets, 1.0)
    for value, oracle in zip(got, expected):
        assert bool(torch.isfinite(value).all())
        torch.testing.assert_close(value.double(), oracle, rtol=1e-5, atol=1e-6)
