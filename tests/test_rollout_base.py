"""The rollout interface's own checks (luffy_fast/rollout/base.py): sampling settings, a
completion's one log-prob per token, generate's arguments, and the per-request seeds."""

from __future__ import annotations

import pytest

from luffy_fast.rollout.base import Completion, SamplingParams, check_generate_args, request_seed


@pytest.mark.parametrize("settings, message", [
    (dict(max_new_tokens=0), r"max_new_tokens must be positive \(got 0\)"),
    (dict(max_new_tokens=4, temperature=-0.1), r"temperature must be >= 0 \(got -0.1\)"),
    (dict(max_new_tokens=4, top_p=0.0), r"top_p must be in \(0, 1\] \(got 0.0\)"),
    (dict(max_new_tokens=4, top_p=1.5), r"top_p must be in \(0, 1\] \(got 1.5\)"),
])
def test_bad_sampling_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**settings)


def test_the_edges_of_the_sampling_settings_are_allowed():
    greedy = SamplingParams(1, temperature=0.0, top_p=1.0)
    assert (greedy.max_new_tokens, greedy.temperature, greedy.top_p) == (1, 0.0, 1.0)


def test_a_completion_has_one_logprob_per_token():
    assert Completion([4, 5], [-0.5, -1.0]).logprobs == [-0.5, -1.0]
    with pytest.raises(ValueError, match="Completion has 2 tokens but 1 log-probs"):
        Completion([4, 5], [-0.5])


def test_generate_arguments():
    check_generate_args([[1], [2, 3]], n=1)
    with pytest.raises(ValueError, match=r"n must be positive \(got 0\)"):
        check_generate_args([[1]], n=0)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        check_generate_args([[1], []], n=2)


def test_request_seeds_leave_room_for_vllms_per_sample_offsets():
    """vLLM seeds a request's n samples with seed, seed + 1, ...: a seed below 2**62 keeps
    every one of them an int64 (a 63-bit hash would put half the seeds within n of 2**63)."""
    seeds = [request_seed(seed, index, rank) for seed in range(4) for index in range(64)
             for rank in range(4)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= seed < 2**62 for seed in seeds)
    assert max(seeds) > 2**61  # the 62 bits are used: the offsets only need the headroom
