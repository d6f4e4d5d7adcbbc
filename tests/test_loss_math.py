"""luffy_fast/loss_math.py on its own, by hand: the clip bounds themselves, the log-ratio bound,
each normalizer's denominator, which sequences count, the entropy's token mean under another
normalizer, and the ratio statistics of a batch without on-policy tokens.

The backends share this math, so comparing them with each other cannot catch a slip here: every
expected value below is worked out in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch

from luffy_fast import LuffyLossConfig, fused_luffy_loss
from luffy_fast.loss_math import normalization, normalizer_denominator, policy_loss, policy_terms

LN2 = math.log(2.0)


def test_a_ratio_exactly_at_a_clip_bound_keeps_the_unclipped_gradient():
    """PPO's clip is strict: at r = 1 + eps_high (A > 0), r = 1 - eps_low (A < 0) and r = the
    dual-clip constant (A < 0) the loss is the same on both branches, and the gradient is the
    unclipped -A r, as autograd of the per-token loss gives it (torch.maximum splits a tie in
    halves and clamp passes its bounds' gradient, so 1/2 (-A r) + 1/2 (-A r))."""
    # clip range [0.5, 1.25], dual clip 2; log pi_old = 0 and log pi = ln r, so that
    # r = e^(ln r) is exactly 1.25, 0.5 and 2.0 in float64 (the loss math takes any log-prob)
    config = LuffyLossConfig(clip_low=0.5, clip_high=0.25, dual_clip=2.0)
    logprobs = torch.tensor([math.log(1.25), math.log(0.5), LN2], dtype=torch.float64)
    old = torch.zeros(3, dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    off = torch.zeros(3, dtype=torch.bool)
    terms = policy_terms(logprobs, old, advantages, off, config)
    assert terms.ratio.tolist() == [1.25, 0.5, 2.0]  # the setup hits the bounds exactly
    # t0: -min(1.25, 1.25) = -1.25; t1: -min(-0.5, -0.5) = 0.5; t2: max(-r A, -1.25 A) = 2 = -c A
    torch.testing.assert_close(terms.loss, torch.tensor([-1.25, 0.5, 2.0], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert terms.clipped.tolist() == [False, False, False]
    # g = -A r: -1.25, 0.5, 2.0 (a clipped token's would be 0)
    expected = torch.tensor([-1.25, 0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(terms.grad_coef, expected, rtol=1e-15, atol=0.0)
    leaf = logprobs.clone().requires_grad_(True)
    policy_loss(leaf, old, advantages, off, config).sum().backward()
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-15, atol=0.0)


def test_the_log_ratio_is_clamped_at_twenty_nats_as_verl_does():
    """docs/robustness.md: the on-policy log-ratio is clamped at +20 (verl's bound) before exp:
    log-ratio 25 gives r = e^20 = 4.85165e8 and no gradient; log-ratio 19.5 is left alone."""
    logprobs = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    old = logprobs - torch.tensor([25.0, 19.5], dtype=torch.float64)
    advantages = torch.tensor([1.0, 1.0], dtype=torch.float64)
    config = LuffyLossConfig(clip_on_policy=False)
    terms = policy_terms(logprobs, old, advantages, torch.zeros(2, dtype=torch.bool), config)
    assert terms.ratio[0].item() == pytest.approx(485165195.4097903, rel=1e-12)  # e^20
    assert terms.ratio[1].item() == pytest.approx(294267566.0415088, rel=1e-12)  # e^19.5
    assert terms.grad_coef[0].item() == 0.0
    assert terms.grad_coef[1].item() == pytest.approx(-294267566.0415088, rel=1e-12)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("normalizer, expected", [
    ("token", 37.0),  # the loss tokens
    ("seq_mean_token_mean", 3.0),  # the sequences
    ("constant", 3.0 * 100),  # sequences x max_len (Dr. GRPO)
    ("token_sum_over_max_len", 100.0),  # max_len alone, whatever the sequences (official scale)
])
def test_each_normalizers_denominator_by_hand(normalizer, expected, as_tensor):
    """37 loss tokens in 3 sequences, max_len 100; the trainer passes numbers, the op tensors."""
    config = LuffyLossConfig(normalizer=normalizer, max_len=100)
    tokens, sequences = (torch.tensor(37.0), torch.tensor(3.0)) if as_tensor else (37, 3)
    denominator = normalizer_denominator(tokens, sequences, config)
    assert float(denominator) == expected
    assert isinstance(denominator, torch.Tensor) == as_tensor


def test_only_sequences_with_a_loss_token_count():
    """Four sequence ids, but sequence 2's tokens all have mask 0: 3 sequences. Constant
    normalizer, max_len 10: denominator 3 x 10 = 30, every loss token weighs 1/30, masked 0."""
    loss_mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    seq_ids = torch.tensor([0, 0, 1, 2, 2, 3])
    norm = normalization(loss_mask, seq_ids, LuffyLossConfig(normalizer="constant", max_len=10))
    assert float(norm.num_sequences) == 3.0
    assert float(norm.denominator) == 30.0
    torch.testing.assert_close(norm.weights, loss_mask / 30, rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("aggregation, divisor", [("token_mean", 2.0), ("normalizer", 4.0)])
def test_the_entropys_token_mean_ignores_the_constant_normalizer(backend, aggregation, divisor):
    """W = I, target 0, A = 0, c_ent = 1, one sequence, constant normalizer with max_len 4.
    P: h = [ln 2, 0, 0], p = [1/2, 1/4, 1/4], H_P = 1.5 ln 2; Q: h = 0, H_Q = ln 3.
    token_mean: L = -(H_P + H_Q) / 2 tokens; normalizer: L = -(H_P + H_Q) / (1 x 4).
    dL/dz_P = p (z - E_p[z]) / divisor = [1/4, -1/8, -1/8] ln 2 / divisor; Q's is 0 (flat z)."""
    config = LuffyLossConfig(entropy_coef=1.0, normalizer="constant", max_len=4,
                             entropy_aggregation=aggregation)
    hidden = torch.tensor([[LN2, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64,
                          requires_grad=True)
    loss, _ = fused_luffy_loss(hidden, torch.eye(3, dtype=torch.float64),
                               torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.float64),
                               torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool),
                               config=config, backend=backend)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-(1.5 * LN2 + math.log(3)) / divisor, rel=1e-12)
    expected = torch.zeros(2, 3, dtype=torch.float64)
    expected[0] = torch.tensor([0.25, -0.125, -0.125], dtype=torch.float64) * LN2 / divisor
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ratio_statistics_are_one_without_on_policy_tokens(backend):
    """README: ratio_min/mean/max are over on-policy tokens, 1.0 (old == current) when there are
    none; here both tokens are off-policy (their "ratio", the shaped probability, stays out)."""
    hidden = torch.tensor([[LN2, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    _, stats = fused_luffy_loss(hidden, torch.eye(3, dtype=torch.float64),
                                torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.float64),
                                torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool),
                                backend=backend)
    assert [float(stats[k]) for k in ("ratio_min", "ratio_mean", "ratio_max")] == [1.0, 1.0, 1.0]
    assert float(stats["num_on_policy_tokens"]) == 0 and float(stats["num_off_policy_tokens"]) == 2
