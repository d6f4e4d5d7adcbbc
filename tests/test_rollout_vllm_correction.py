"""Truncated importance sampling between rollout-engine and trainer log-probs."""

import math

import pytest
import torch

from luffy_fast import LuffyLossConfig, fused_luffy_loss
from luffy_fast.loss_math import normalization, policy_loss
from luffy_fast.rollout.correction import behaviour_logprobs, rollout_correction, weight_advantages


def test_gap_metrics_and_truncated_weights():
    behaviour = [torch.tensor([-1.0, -2.0]), None, torch.tensor([-0.5])]
    trainer = [torch.tensor([-1.0, -1.0]), torch.tensor([-3.0]), torch.tensor([-1.5])]
    weights, metrics = rollout_correction(behaviour, trainer, cap=2.0)
    # gaps |trainer - behaviour|: 0, 1, 1 (the trace, None, is not counted)
    assert metrics["rollout_logprob_gap_mean"] == pytest.approx(2 / 3)
    assert metrics["rollout_logprob_gap_max"] == pytest.approx(1.0)
    assert metrics["sampled_tokens"] == 3  # weighs the means over ranks
    assert weights[1] is None
    torch.testing.assert_close(weights[0], torch.tensor([1.0, 2.0]))  # e^1 capped at 2
    torch.testing.assert_close(weights[2], torch.tensor([math.exp(-1.0)]))
    assert metrics["tis_clipped_fraction"] == pytest.approx(1 / 3)
    assert metrics["tis_weight_mean"] == pytest.approx((1 + 2 + math.exp(-1)) / 3)


def test_without_cap_only_the_gap_is_reported():
    weights, metrics = rollout_correction([torch.tensor([-1.0])], [torch.tensor([-1.25])])
    assert weights is None
    assert set(metrics) == {"rollout_logprob_gap_mean", "rollout_logprob_gap_max", "sampled_tokens"}
    assert metrics["rollout_logprob_gap_max"] == pytest.approx(0.25)


def test_mismatched_lengths_and_bad_cap_raise():
    with pytest.raises(ValueError, match="sequence 0"):
        rollout_correction([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="cap"):
        rollout_correction([torch.zeros(1)], [torch.zeros(1)], cap=0.0)


@pytest.mark.parametrize("config", [
    LuffyLossConfig(normalizer="token"),  # PPO clipping on on-policy tokens, shaping off-policy
    LuffyLossConfig(normalizer="token", dual_clip=3.0, clip_low=0.1, clip_high=0.1),
    LuffyLossConfig.luffy(max_len=16),
], ids=["ppo-clip", "dual-clip", "luffy"])
def test_folding_weights_into_advantages_equals_weighting_each_token_loss(config):
    """The op's loss with A' = w A equals sum_t n_t w_t L_t (n_t: the normalizer's weights),
    gradients included, clipped tokens included."""
    torch.manual_seed(0)
    T, H, V = 24, 8, 11
    hidden = torch.randn(T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (T,))
    seq_ids = torch.arange(T) // 6  # four sequences of six tokens
    advantages = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)[seq_ids]
    loss_mask = torch.ones(T, dtype=torch.bool)
    off_policy = seq_ids == 3
    old = torch.randn(T, dtype=torch.float64) * 0.3 - 2.5  # ratios far from 1: clipping active
    per_sequence = [torch.rand(6, dtype=torch.float64) * 2 + 0.1 for _ in range(3)] + [None]

    folded = weight_advantages(advantages, loss_mask, seq_ids, range(4), per_sequence)
    h1 = hidden.clone().requires_grad_()
    loss, stats = fused_luffy_loss(h1, weight, targets, folded, loss_mask, off_policy,
                                   old_logprobs=old, config=config, seq_ids=seq_ids,
                                   backend="reference")
    loss.backward()
    assert float(stats["clip_fraction"]) > 0 or not config.clip_on_policy

    token_weight = torch.cat([w if w is not None else torch.ones(6, dtype=torch.float64)
                              for w in per_sequence])
    h2 = hidden.clone().requires_grad_()
    logprobs = (h2 @ weight.T / config.temperature).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    per_token = policy_loss(logprobs, old, advantages, off_policy, config)
    norm = normalization(loss_mask.to(torch.float64), seq_ids, config).weights
    expected = (norm * token_weight * per_token).sum()
    if config.entropy_coef:
        probs = (h2 @ weight.T / config.temperature).softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
        expected = expected - config.entropy_coef * (norm * entropy).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(h1.grad, h2.grad)


def test_weight_advantages_checks_token_counts():
    with pytest.raises(ValueError, match="sequence 0"):
        weight_advantages(torch.ones(3), torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long),
                          [0], [torch.ones(2)])


def test_behaviour_logprobs_follow_the_batch_layout():
    from luffy_fast.rollout.base import Completion

    completions = [[Completion([5, 1], [-0.1, -0.2]), Completion([6], [-0.3])],
                   [Completion([7], [-0.4]), Completion([8, 1], [-0.5, -0.6])]]
    off_policy = [False, False, True, False, False, True]
    group_ids = [0, 0, 0, 1, 1, 1]
    result = behaviour_logprobs(off_policy, group_ids, completions)
    assert result[2] is None and result[5] is None
    torch.testing.assert_close(result[0], torch.tensor([-0.1, -0.2]))
    torch.testing.assert_close(result[4], torch.tensor([-0.5, -0.6]))


def test_request_seeds_never_replay_another_prompt_or_step():
    from luffy_fast.rollout.vllm import request_seed

    n = 8  # vLLM seeds a request's samples seed, seed + 1, ..., seed + n - 1
    streams = [range(request_seed(step, i), request_seed(step, i) + n)
               for step in range(50) for i in range(32)]
    starts = sorted(s.start for s in streams)
    assert all(b - a >= n for a, b in zip(starts, starts[1:]))
    assert request_seed(3, 1) == request_seed(3, 1)


def test_a_weight_exactly_at_the_cap_is_not_counted_as_clipped():
    # log-prob gaps trainer - behaviour: 0 and 0.5 -> ratios e^0 = 1 (exactly the cap: the
    # clamp leaves it) and e^0.5 = 1.65 (cut to 1): 1 of 2 tokens clipped, weights [1, 1]
    weights, metrics = rollout_correction([torch.tensor([-1.0, -1.0])],
                                          [torch.tensor([-1.0, -0.5])], cap=1.0)
    torch.testing.assert_close(weights[0], torch.tensor([1.0, 1.0]))
    assert metrics["tis_clipped_fraction"] == 0.5
    assert metrics["tis_weight_mean"] == 1.0


def test_a_batch_of_only_traces_reports_no_gap_and_neutral_weights():
    # nothing was sampled by the engine: no gap, no tokens, the weight mean of no weights is 1
    weights, metrics = rollout_correction([None, None], [torch.tensor([-1.0]), torch.tensor([-2.0])],
                                          cap=2.0)
    assert weights == [None, None]
    assert metrics == {"rollout_logprob_gap_mean": 0.0, "rollout_logprob_gap_max": 0.0,
                       "sampled_tokens": 0, "tis_weight_mean": 1.0, "tis_clipped_fraction": 0.0}


def test_log_probs_for_another_number_of_sequences_are_refused():
    with pytest.raises(ValueError, match="behaviour log-probs for 2 sequences and trainer "
                                         "log-probs for 1"):
        rollout_correction([torch.zeros(1), torch.zeros(1)], [torch.zeros(1)])


def test_only_the_response_tokens_of_the_packed_sequences_are_weighted():
    # a micro-batch packing sequence 2 (2 prompt tokens, 3 response tokens) then sequence 0
    # (1 prompt token, 2 response tokens); sequence 1 is packed in another micro-batch
    seq_ids = torch.tensor([2, 2, 2, 2, 2, 0, 0, 0])
    loss_mask = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1])
    advantages = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -2.0, -2.0, -2.0])
    token_weights = [torch.tensor([0.5, 2.0]), torch.tensor([9.0]), torch.tensor([0.25, 0.5, 4.0])]
    weighted = weight_advantages(advantages, loss_mask, seq_ids, [2, 0], token_weights)
    # prompt tokens keep A; sequence 2's responses 1 * (0.25, 0.5, 4); sequence 0's -2 * (0.5, 2)
    assert weighted.tolist() == [1.0, 1.0, 0.25, 0.5, 4.0, -2.0, -1.0, -4.0]
    assert advantages.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, -2.0, -2.0, -2.0]  # not modified
