"""One step's rollout batch: mixed on/off-policy groups, their rewards and statistics.

A group is one prompt's n_on policy completions followed by n_off of its off-policy traces,
appended directly as responses (docs/algorithm.md §Mixed groups). Every member is scored by the
task's reward, traces included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from luffy_fast.data import Sample
from luffy_fast.rewards import RewardFunction
from luffy_fast.rollout.base import Completion


@dataclass
class RolloutBatch:
    """All members of all groups of one step, one entry per sequence (on- and off-policy)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    off_policy: Tensor  # [N] bool: the response is a trace, not a policy sample
    group_ids: Tensor  # [N] int64: index of the prompt in the step's batch
    finished: list[bool]  # the response ended with EOS
    rewards: Optional[Tensor] = None  # [N] float32
    advantages: Optional[Tensor] = None  # [N] float32

    def __len__(self) -> int:
        return len(self.response_ids)

    def sequence_length(self, index: int) -> int:
        """Tokens fed to the model for one sequence: prompt + response minus the last token."""
        return len(self.prompt_ids[index]) + len(self.response_ids[index]) - 1


def assemble_groups(samples: Sequence[Sample], completions: Sequence[Sequence[Completion]],
                    n_off: int) -> RolloutBatch:
    """Mixed groups: each prompt's policy completions, then n_off of its traces as responses.

    Traces are appended directly (never generated). A prompt with fewer than n_off traces reuses
    them in turn; one with none gets no off-policy members.
    """
    if completions and len(completions) != len(samples):
        raise ValueError(f"got completions for {len(completions)} prompts, expected {len(samples)}")
    prompt_ids, response_ids, off_policy, group_ids, finished = [], [], [], [], []
    for group, sample in enumerate(samples):
        members = [(c.token_ids, False, c.finished) for c in (completions[group] if completions
                                                              else [])]
        if sample.traces:
            members += [(sample.traces[k % len(sample.traces)], True, True) for k in range(n_off)]
        for response, is_trace, done in members:
            if not response:
                raise ValueError(f"prompt {group}: empty response (a trace or completion has "
                                 "no tokens)")
            prompt_ids.append(list(sample.prompt_ids))
            response_ids.append(list(response))
            off_policy.append(is_trace)
            group_ids.append(group)
            finished.append(done)
    return RolloutBatch(prompt_ids, response_ids, torch.tensor(off_policy, dtype=torch.bool),
                        torch.tensor(group_ids, dtype=torch.long), finished)


def score_responses(batch: RolloutBatch, samples: Sequence[Sample], reward_fn: RewardFunction,
                    decode: Callable[[Sequence[int]], str]) -> Tensor:
    """Verifiable reward of every member (off-policy traces are scored like the rest)."""
    rewards = [float(reward_fn(response, sample))
               for response, sample in reward_items(batch, samples, decode)]
    return torch.tensor(rewards, dtype=torch.float32)


def reward_items(batch: RolloutBatch, samples: Sequence[Sample],
                 decode: Callable[[Sequence[int]], str]) -> list[tuple[str, Sample]]:
    """(decoded response, its prompt's sample) of every member: what a RewardPool scores."""
    return [(decode(batch.response_ids[i]), samples[int(batch.group_ids[i])])
            for i in range(len(batch))]


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Rewards, accuracy, advantages and response lengths of a scored batch, on/off policy
    (the on- or off-policy ones only where the batch has such members: GRPO has no traces)."""
    on, off = ~batch.off_policy, batch.off_policy
    rewards, advantages = batch.rewards, batch.advantages
    lengths = torch.tensor([len(r) for r in batch.response_ids], dtype=torch.float32)
    metrics = {
        "samples": len(advantages), "off_policy_samples": int(off.sum()),
        "advantage_mean": float(advantages.mean()),
        # the population std, which pools exactly over the ranks (metrics.POOLED_OVER_RANKS)
        "advantage_std": float(advantages.std(correction=0)),
        "advantage_min": float(advantages.min()),
        "advantage_max": float(advantages.max()),
        "zero_advantage_fraction": float((advantages == 0).float().mean()),
    }
    if on.any():
        metrics.update({
            "reward_on_policy": float(rewards[on].mean()),
            "accuracy_on_policy": float((rewards[on] >= 1).float().mean()),
            "response_length_on_policy": float(lengths[on].mean()),
            "truncated_fraction": float(1 - torch.tensor(batch.finished)[on].float().mean()),
        })
    if off.any():
        metrics.update({"reward_off_policy": float(rewards[off].mean()),
                        "response_length_off_policy": float(lengths[off].mean())})
    return metrics
