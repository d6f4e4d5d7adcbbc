"""rollout_batch on a hand-made mixed batch: group assembly errors, what each reward is scored
against, and the step's rollout statistics worked out by hand."""

from __future__ import annotations

import pytest
import torch

from helpers import hand_made_inputs
from luffy_fast import group_advantages
from luffy_fast.rollout_batch import assemble_groups, reward_items, rollout_metrics, score_responses


def test_completions_for_another_number_of_prompts_are_an_error():
    samples, completions = hand_made_inputs()
    with pytest.raises(ValueError, match="completions for 1 prompts, expected 2"):
        assemble_groups(samples, completions[:1], n_off=1)


def test_every_member_is_scored_against_its_own_prompts_sample():
    samples, completions = hand_made_inputs()
    batch = assemble_groups(samples, completions, n_off=2)  # 4 members per group, groups 0, 1
    items = reward_items(batch, samples, lambda ids: ",".join(map(str, ids)))
    assert items == [("2,1", samples[0]), ("3,3,3", samples[0]), ("7,8,1", samples[0]),
                     ("7,8,1", samples[0]), ("4,1", samples[1]), ("5,1", samples[1]),
                     ("3,1", samples[1]), ("4,4,1", samples[1])]
    # reward = number of response tokens, + 10 when scored against the "y" sample (group 1)
    rewards = score_responses(batch, samples,
                              lambda text, s: len(text.split(",")) + (10 if s.ground_truth == "y" else 0),
                              lambda ids: ",".join(map(str, ids)))
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == [2, 3, 3, 3, 12, 12, 12, 13]


def test_rollout_metrics_of_a_mixed_batch_match_hand_worked_values():
    samples, completions = hand_made_inputs()
    batch = assemble_groups(samples, completions, n_off=2)
    # members: group 0 = rollouts 0, 1 then traces 2, 3; group 1 = rollouts 4, 5 then traces 6, 7
    batch.rewards = torch.tensor([0.5, 0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    batch.advantages = group_advantages(batch.rewards, batch.group_ids)
    # group 0: mean (0.5 + 0 + 1 + 0.5) / 4 = 0.5 -> A = [0, -0.5, 0.5, 0];
    # group 1: all 1 -> A = 0 for its 4 members
    m = rollout_metrics(batch)
    assert (m["samples"], m["off_policy_samples"]) == (8, 4)
    assert m["advantage_mean"] == 0.0  # -0.5 + 0.5 = 0
    assert (m["advantage_min"], m["advantage_max"]) == (-0.5, 0.5)
    # population std: (0.25 + 0.25) / 8 = 0.0625 -> 0.25
    assert m["advantage_std"] == pytest.approx(0.25, rel=1e-6)
    assert m["zero_advantage_fraction"] == 0.75  # members 0, 3 and group 1's 4: 6 of 8
    # on-policy rollouts 0, 1, 4, 5: rewards 0.5, 0, 1, 1 -> mean 2.5 / 4 = 0.625; only a reward
    # of at least 1 is correct (0.5 is partial credit): accuracy 2 / 4 = 0.5
    assert m["reward_on_policy"] == 0.625 and m["accuracy_on_policy"] == 0.5
    assert m["response_length_on_policy"] == 2.25  # lengths 2, 3, 2, 2
    assert m["truncated_fraction"] == 0.25  # rollout 1 did not finish
    # traces 2, 3, 6, 7: rewards 1, 0.5, 1, 1 -> 3.5 / 4; lengths 3, 3, 2, 3 -> 11 / 4
    assert m["reward_off_policy"] == 0.875 and m["response_length_off_policy"] == 2.75
