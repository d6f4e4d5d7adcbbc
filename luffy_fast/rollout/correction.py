"""Rollout-vs-trainer mismatch: the log-prob gap per step and an optional truncated importance-
sampling (TIS) correction.

The rollout engine samples with its own kernels (and possibly another precision), so its
behaviour log-prob log pi_rollout of a sampled token differs slightly from the trainer's
log pi_train of the same token under the same weights. The gap is logged every step. With a cap
C, each on-policy token gets the weight w = min(pi_train / pi_rollout, C) (detached).

How the weight enters the loss: it is folded into the token's advantage, A' = w * A. That is
exact for the policy-gradient term of the LUFFY op, because w > 0 and the term is positively
homogeneous in A: -r A, PPO's max(-r A, -clip(r) A), its clip flags (which depend only on the
sign of A) and dual clipping's -c A all scale by w. The entropy bonus is not weighted (it does not
depend on the sampling distribution's correction). Weighting `loss_mask` instead would be wrong
with the "token" normalizer, which divides by the sum of the mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from luffy_fast.rollout.base import Completion


def behaviour_logprobs(off_policy: Sequence[bool], group_ids: Sequence[int],
                       completions: Sequence[Sequence[Completion]]) -> list[Optional[Tensor]]:
    """The engine's log-probs of every member of a rollout batch, None for off-policy traces.

    Members are in batch order: each group's completions in order, then its traces (the layout
    of luffy_fast.trainer.assemble_groups).
    """
    taken = [0] * len(completions)
    result: list[Optional[Tensor]] = []
    for is_trace, group in zip(off_policy, group_ids):
        group = int(group)
        if bool(is_trace):
            result.append(None)
            continue
        completion = completions[group][taken[group]]
        taken[group] += 1
        result.append(torch.tensor(completion.logprobs, dtype=torch.float32))
    return result


def rollout_correction(behaviour_logprobs: Sequence[Optional[Tensor]],
                       trainer_logprobs: Sequence[Optional[Tensor]],
                       cap: Optional[float] = None) -> tuple[Optional[list[Optional[Tensor]]], dict]:
    """Per-sequence token weights (None without a cap) and the step's gap metrics.

    behaviour_logprobs / trainer_logprobs: one [L_i] tensor per sequence of the batch, None for
    sequences that were not sampled by the engine (off-policy traces): they get no weight.
    Metrics: rollout_logprob_gap_mean / _max (|log pi_train - log pi_rollout| over sampled
    tokens), sampled_tokens (their count) and, with a cap, tis_weight_mean and
    tis_clipped_fraction.
    """
    if len(behaviour_logprobs) != len(trainer_logprobs):
        raise ValueError(f"got behaviour log-probs for {len(behaviour_logprobs)} sequences and "
                         f"trainer log-probs for {len(trainer_logprobs)}")
    if cap is not None and not cap > 0:
        raise ValueError(f"the importance-sampling cap must be positive (got {cap})")
    diffs, weights = [], []
    for index, (behaviour, trainer) in enumerate(zip(behaviour_logprobs, trainer_logprobs)):
        if behaviour is None:
            weights.append(None)
            continue
        behaviour = torch.as_tensor(behaviour, dtype=torch.float32)
        trainer = torch.as_tensor(trainer, dtype=torch.float32)
        if behaviour.shape != trainer.shape:
            raise ValueError(f"sequence {index}: {behaviour.numel()} behaviour log-probs but "
                             f"{trainer.numel()} trainer log-probs")
        diff = trainer - behaviour  # log(pi_train / pi_rollout)
        diffs.append(diff)
        weights.append(diff.exp().clamp(max=cap) if cap is not None else None)
    all_diffs = torch.cat(diffs) if diffs else torch.zeros(0)
    metrics = {
        "rollout_logprob_gap_mean": float(all_diffs.abs().mean()) if all_diffs.numel() else 0.0,
        "rollout_logprob_gap_max": float(all_diffs.abs().max()) if all_diffs.numel() else 0.0,
        "sampled_tokens": all_diffs.numel(),
    }
    if cap is None:
        return None, metrics
    all_weights = torch.cat([w for w in weights if w is not None]) if diffs else torch.zeros(0)
    metrics["tis_weight_mean"] = float(all_weights.mean()) if all_weights.numel() else 1.0
    metrics["tis_clipped_fraction"] = (float((all_diffs.exp() > cap).float().mean())
                                       if all_diffs.numel() else 0.0)
    return weights, metrics


def weight_advantages(advantages: Tensor, loss_mask: Tensor, seq_ids: Tensor,
                      sequence_indices: Sequence[int],
                      token_weights: Sequence[Optional[Tensor]]) -> Tensor:
    """Packed per-token advantages with each sampled sequence's response tokens scaled by its
    weights (A' = w * A, see the module docstring); sequences with no weights are unchanged.

    advantages, loss_mask, seq_ids: the packed micro-batch's [T] tensors; `seq_ids` holds the
    batch index of each token's sequence; `sequence_indices` the batch indices packed in it.
    """
    weighted = advantages.clone()
    in_loss = loss_mask.bool()
    for index in sequence_indices:
        weights = token_weights[index]
        if weights is None:
            continue
        rows = in_loss & (seq_ids == index)
        if int(rows.sum()) != weights.numel():
            raise ValueError(f"sequence {index}: {int(rows.sum())} response tokens but "
                             f"{weights.numel()} importance weights")
        weighted[rows] = weighted[rows] * weights.to(weighted.device, weighted.dtype)
    return weighted
