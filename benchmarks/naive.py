"""The naive LUFFY loss: what most trainers write, and the baseline of the benchmarks.

Logits are materialized in the input dtype, log_softmax runs in float32 over the whole [T, V]
tensor, the target log-probs are gathered, and plain autograd does the backward. The loss math
follows docs/algorithm.md (the per-token loss) and is written out here on purpose (not imported from
luffy_fast), so that the benchmarks also check the package against an independent version.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from luffy_fast import LuffyLossConfig


def naive_luffy_loss(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor,
                     loss_mask: Tensor, off_policy_mask: Tensor, seq_ids: Tensor,
                     config: LuffyLossConfig, old_logprobs: Optional[Tensor] = None) -> Tensor:
    """Scalar LUFFY loss over flat [T] token inputs; hidden [T, H], weight [V, H]."""
    if config.clip_off_policy or config.dual_clip is not None:
        raise NotImplementedError("the naive baseline covers the configs the benchmarks use")
    logits = hidden @ weight.T  # [T, V] in the input dtype
    if config.temperature != 1.0:
        logits = logits / config.temperature
    log_softmax = torch.log_softmax(logits.float(), dim=-1)  # [T, V] float32
    in_vocab = targets != config.ignore_index
    logprobs = log_softmax.gather(1, torch.where(in_vocab, targets, 0)[:, None]).squeeze(1)

    adv = advantages.float()
    old = logprobs.detach() if old_logprobs is None else old_logprobs.float()
    ratio = torch.exp(logprobs - old)
    on_policy = -ratio * adv
    if config.clip_on_policy:
        clipped_ratio = ratio.clamp(1 - config.clip_low, 1 + config.clip_high)
        on_policy = torch.maximum(on_policy, -clipped_ratio * adv)
    prob = torch.exp(logprobs)
    shaped = prob / (prob + config.gamma) if config.shaping else prob
    per_token = torch.where(off_policy_mask, -shaped * adv, on_policy)
    if config.entropy_coef > 0:
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        per_token = per_token - config.entropy_coef * entropy

    mask = loss_mask.float() * in_vocab
    total = (mask * per_token).sum()
    if config.normalizer == "token":
        return total / mask.sum().clamp_min(1e-30)
    # Sequences that have at least one loss token.
    seq_tokens = torch.zeros(int(seq_ids.max()) + 1, device=mask.device).index_add_(0, seq_ids, mask)
    num_sequences = (seq_tokens > 0).sum().clamp_min(1)
    if config.normalizer == "constant":
        return total / (num_sequences * config.max_len)
    # seq_mean_token_mean: mean over sequences of each sequence's token mean.
    token_weight = mask / seq_tokens.clamp_min(1e-30)[seq_ids]
    return (token_weight * per_token).sum() / num_sequences
