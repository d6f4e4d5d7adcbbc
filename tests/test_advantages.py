"""group_advantages on groups worked out by hand (docs/algorithm.md, Advantages)."""

from __future__ import annotations

import math

import pytest
import torch

from luffy_fast import group_advantages


def test_mean_centering_without_std():
    # Group 7: rewards 1, 0, 0, 1 -> mean 0.5 -> [0.5, -0.5, -0.5, 0.5].
    # Group 3: rewards 1, 0, 0 -> mean 1/3 -> [2/3, -1/3, -1/3]. Interleaved ids on purpose.
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([7, 3, 7, 3, 7, 3, 7])
    expected = torch.tensor([0.5, 2 / 3, -0.5, -1 / 3, -0.5, -1 / 3, 0.5])
    torch.testing.assert_close(group_advantages(rewards, groups), expected)


def test_std_normalization_uses_unbiased_std():
    # Rewards 1, 0, 0, 1: centered [0.5, -0.5, -0.5, 0.5]; unbiased var = 4 * 0.25 / 3 = 1/3,
    # std = 0.57735; A = centered / (std + 1e-6).
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    std = math.sqrt(1 / 3)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / (std + 1e-6)
    out = group_advantages(rewards, torch.zeros(4, dtype=torch.int64), use_std=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)


def test_group_of_one_and_all_equal_group_get_zero():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.7])
    groups = torch.tensor([0, 0, 0, 1, 2])  # group 0 all equal; groups 1 and 2 have one member
    for use_std in (False, True):
        out = group_advantages(rewards, groups, use_std=use_std)
        assert torch.equal(out, torch.zeros(5)), (use_std, out)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.int64))
