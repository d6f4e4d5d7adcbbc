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


@pytest.mark.parametrize("use_std", [False, True])
def test_a_group_of_two_with_different_rewards_gets_nonzero_advantages(use_std):
    # Group 5: rewards 1, 0 -> mean 0.5 -> centered [0.5, -0.5].
    # Unbiased std = sqrt((0.25 + 0.25) / (2 - 1)) = sqrt(0.5) = 0.70711, so with std:
    # A = +-0.5 / (0.70711 + 1e-6) = +-0.70711 (a group of two is not a "group of one").
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    groups = torch.tensor([5, 5])
    centered = torch.tensor([0.5, -0.5], dtype=torch.float64)
    expected = centered / (math.sqrt(0.5) + 1e-6) if use_std else centered
    torch.testing.assert_close(group_advantages(rewards, groups, use_std=use_std), expected,
                               rtol=1e-12, atol=0)


def test_an_empty_batch_gives_an_empty_float_result():
    out = group_advantages(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0,) and out.dtype == torch.float64


def test_float_group_ids_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))


def test_two_groups_of_different_sizes_each_normalized_by_its_own_std():
    # Group 2: rewards 1, 0, 0 -> mean 1/3, centered [2/3, -1/3, -1/3], unbiased var
    # (4/9 + 1/9 + 1/9) / 2 = 1/3, std 0.57735 -> [1.1547, -0.57735, -0.57735].
    # Group 9: rewards 1, 0, 1, 1 -> mean 3/4, centered [1/4, -3/4, 1/4, 1/4], unbiased var
    # (3 x 1/16 + 9/16) / 3 = 1/4, std 1/2 -> [0.5, -1.5, 0.5, 0.5] (up to the 1e-6).
    # float32 in, float32 out; int32 ids group the same way as int64 ones.
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([2, 9, 2, 9, 2, 9, 9])
    third = math.sqrt(1 / 3) + 1e-6
    expected = torch.tensor([(2 / 3) / third, 0.25 / 0.500001, (-1 / 3) / third, -0.75 / 0.500001,
                             (-1 / 3) / third, 0.25 / 0.500001, 0.25 / 0.500001])
    for ids in (groups, groups.to(torch.int32)):
        out = group_advantages(rewards, ids, use_std=True)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


def test_rewards_must_be_one_float_value_per_sample():
    with pytest.raises(ValueError, match="`rewards` must be a 1-D float tensor"):
        group_advantages(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="`rewards` must be a 1-D float tensor"):
        group_advantages(torch.tensor([1, 0]), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"`group_ids` must have the shape of `rewards` \(4,\)"):
        group_advantages(torch.zeros(4), torch.zeros(2, 2, dtype=torch.int64))
