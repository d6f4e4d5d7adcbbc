"""The opt-in lean forward over kept logits (kernels/forward_lean.py) against float64 and against
the split kernel it may replace, and the op with both lean passes on (LUFFY_FAST_LEAN=1: this
forward and kernels/backward_lean.py's dL/dz), or with the whole-row forward, against the
reference. Float32 on the
interpreter, where its tiles are 4 x 32 and the vocabulary is cut into 2-3 splits."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import assert_forward_outputs, compare_backends, forward_oracle, random_batch
from luffy_fast import LuffyLossConfig, token_logprobs

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the kernels on the interpreter (TRITON_INTERPRET=1)")


def _logits(C: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows from flat to very peaked (target margins up to ~40 nats), targets on and off the max;
    every fourth row rising left to right, so that its max grows in every tile (each one
    rescales the sums)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(C, V, generator=generator) * torch.linspace(0.1, 6.0, C)[:, None]
    targets = torch.randint(0, V, (C,), generator=generator)
    peaked = torch.arange(C) % 3 == 0
    logits[peaked, targets[peaked]] += torch.linspace(5.0, 40.0, int(peaked.sum()))
    rising = torch.arange(C) % 4 == 1
    logits[rising] = torch.linspace(-20.0, 20.0, V) + 0.1 * logits[rising]
    targets[0], targets[-1] = 0, V - 1  # the first and the last column
    return logits, targets


# V: one ragged split after a whole one (77), whole tiles only (128), whole tiles and a ragged
# tail in the last split (300); C: rows past the last token tile's end (13, 6)
@pytest.mark.parametrize("C, V", [(13, 77), (8, 128), (6, 300)])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("with_bias, temperature", [(False, 1.0), (True, 0.7)])
def test_lean_forward_matches_float64_and_the_split_kernel(C, V, with_entropy, with_bias,
                                                           temperature):
    from luffy_fast.kernels.forward import logsumexp_forward
    from luffy_fast.kernels.forward_lean import lean_forward

    logits, targets = _logits(C, V, seed=5 + V)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(6)) if with_bias else None
    before = logits.clone()
    got = lean_forward(logits, bias, targets, temperature, with_entropy)
    assert torch.equal(logits, before)  # the targets' logits are put back where they were
    split = logsumexp_forward(torch.zeros(C, 4), torch.zeros(V, 4), bias, torch.arange(C), targets,
                              temperature, with_entropy, logits=logits)
    expected = forward_oracle(logits, bias, targets, temperature)
    assert (got[3] is None) == (not with_entropy)
    assert_forward_outputs(got, split, expected, 2e-6)  # no worse than the split kernel
    assert float(expected[1].max()) > -1e-6  # a near-certain target is among the rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # fp16: a sentinel of its own
def test_lean_forward_reads_16_bit_logits_as_the_split_kernel(dtype):
    from luffy_fast.kernels.forward import logsumexp_forward
    from luffy_fast.kernels.forward_lean import lean_forward

    logits, targets = _logits(11, 300, seed=3)
    half = logits.to(dtype)
    before = half.clone()
    got = lean_forward(half, None, targets, 0.6, True)
    assert torch.equal(half, before)
    split = logsumexp_forward(torch.zeros(11, 4), torch.zeros(300, 4), None, torch.arange(11),
                              targets, 0.6, True, logits=half)
    expected = forward_oracle(half.float(), None, targets, 0.6)  # the rounded logits are the input
    assert_forward_outputs(got, split, expected, 2e-6)


# The opt-in switches over kept logits: the lean passes, the whole-row forward
# (kernels/forward_rows.py), and the statistics in the GEMM's epilogue (kernels/forward_fused.py).
SWITCHES = ["LUFFY_FAST_LEAN", "LUFFY_FAST_ROW_FORWARD", "LUFFY_FAST_FUSED_FORWARD"]


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("budget", [64.0, 0.05])  # one chunk; ~50-token chunks
@pytest.mark.parametrize("config", [LuffyLossConfig.luffy(max_len=64),
                                    LuffyLossConfig.grpo(entropy_coef=0.01, temperature=0.6)],
                         ids=["luffy", "grpo_entropy"])
def test_the_op_with_a_switch_matches_the_reference(monkeypatch, config, budget, switch):
    monkeypatch.setenv(switch, "1")
    batch = random_batch(150, 16, 90, seed=4, with_bias=True, zero_adv_fraction=0.3, num_seqs=6)
    compare_backends(batch, config.replace(memory_budget_mb=budget), torch.float32, "triton")


@pytest.mark.parametrize("switch", SWITCHES)
def test_token_logprobs_with_a_switch_matches_the_reference(monkeypatch, switch):
    monkeypatch.setenv(switch, "1")
    batch = random_batch(40, 8, 70, seed=9)
    expected, expected_entropy = token_logprobs(batch["hidden"].double(), batch["weight"].double(),
                                                batch["targets"], with_entropy=True,
                                                backend="reference")
    got, entropy = token_logprobs(batch["hidden"], batch["weight"], batch["targets"],
                                  with_entropy=True, backend="triton")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-5, atol=1e-6)
