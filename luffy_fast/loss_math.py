"""The per-token LUFFY loss math, in one place (docs/algorithm.md).

Every backend goes through these functions: the reference differentiates `policy_loss` with
autograd; the chunked and Triton backends take `token_terms` after their logsumexp (the
closed-form gradient coefficient that the tests check against that autograd, the entropy and its
weight, the tokens that still contribute a gradient). All functions work on flat per-token
tensors of shape [N].
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

from .config import LuffyLossConfig

# The on-policy log-ratio log pi - log pi_old is clamped at this bound before exp, as verl's
# compute_policy_loss does (its +-20): finite old log-probs far below the current ones (~88 nats
# in fp32) would overflow the ratio to inf. Beyond the bound the ratio is e^20 ~ 4.9e8 and its
# gradient 0 (the clamp's); within it, ratio and clipping are exact (docs/robustness.md).
MAX_LOG_RATIO = 20.0


@dataclass
class PolicyTerms:
    """Per-token results of the policy-gradient part (entropy excluded)."""

    loss: Tensor  # L_t, before the normalizer
    grad_coef: Tensor  # g_t = dL_t / d log pi_t
    ratio: Tensor  # r_t for on-policy tokens, the (shaped) probability for off-policy ones
    clipped: Tensor  # bool: the clipped branch is active, so g_t = 0


def _ppo_clip(ratio: Tensor, advantages: Tensor, config: LuffyLossConfig):
    """PPO (and dual) clipping of a ratio: returns (loss, clipped)."""
    low, high = 1.0 - config.clip_low, 1.0 + config.clip_high
    unclipped = -ratio * advantages
    clipped_loss = -ratio.clamp(low, high) * advantages
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = ((advantages > 0) & (ratio > high)) | ((advantages < 0) & (ratio < low))
    if config.dual_clip is not None:
        capped = (advantages < 0) & (ratio > config.dual_clip)
        loss = torch.where(capped, -config.dual_clip * advantages, loss)
        clipped = clipped | capped
    return loss, clipped


def policy_loss(logprobs: Tensor, old_logprobs: Optional[Tensor], advantages: Tensor,
                off_policy_mask: Tensor, config: LuffyLossConfig) -> Tensor:
    """Per-token policy loss L_t, differentiable in `logprobs` (the reference uses autograd)."""
    return _policy(logprobs, old_logprobs, advantages, off_policy_mask, config, with_grad=False).loss


def policy_terms(logprobs: Tensor, old_logprobs: Optional[Tensor], advantages: Tensor,
                 off_policy_mask: Tensor, config: LuffyLossConfig) -> PolicyTerms:
    """Per-token loss, closed-form gradient coefficient, ratio and clip flags (no autograd)."""
    return _policy(logprobs.detach(), old_logprobs, advantages, off_policy_mask, config,
                   with_grad=True)


def _policy(logprobs, old_logprobs, advantages, off_policy_mask, config, with_grad):
    # On-policy: r = pi / pi_old. Old policy None means old == current, so r = 1 with grad r.
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    log_ratio = logprobs - old
    ratio_on = torch.exp(log_ratio.clamp(max=MAX_LOG_RATIO))
    if config.clip_on_policy:
        loss_on, clipped_on = _ppo_clip(ratio_on, advantages, config)
    else:
        loss_on, clipped_on = -ratio_on * advantages, torch.zeros_like(off_policy_mask)

    # Off-policy: the behaviour policy is taken as 1, so the "ratio" is the (shaped) probability.
    prob = torch.exp(logprobs)
    ratio_off = prob / (prob + config.gamma) if config.shaping else prob
    if config.clip_off_policy:
        loss_off, clipped_off = _ppo_clip(ratio_off, advantages, config)
    else:
        loss_off, clipped_off = -ratio_off * advantages, torch.zeros_like(off_policy_mask)

    loss = torch.where(off_policy_mask, loss_off, loss_on)
    ratio = torch.where(off_policy_mask, ratio_off, ratio_on)
    clipped = torch.where(off_policy_mask, clipped_off, clipped_on)
    if not with_grad:
        return PolicyTerms(loss, None, ratio, clipped)

    # d ratio / d log pi: r for on-policy; p, or gamma p / (p + gamma)^2 with shaping, off-policy.
    if config.shaping:
        dratio_off = config.gamma * prob / (prob + config.gamma) ** 2
    else:
        dratio_off = prob
    # the clamp passes no gradient above MAX_LOG_RATIO (as autograd of the clamped ratio); a NaN
    # log-ratio keeps its NaN, as autograd's does
    dratio_on = torch.where(log_ratio > MAX_LOG_RATIO, torch.zeros_like(ratio_on), ratio_on)
    dratio = torch.where(off_policy_mask, dratio_off, dratio_on)
    grad_coef = torch.where(clipped, torch.zeros_like(dratio), -advantages * dratio)
    return PolicyTerms(loss, grad_coef, ratio, clipped)


def entropy_from_moments(lse: Tensor, row_max: Tensor, expected_shift: Tensor) -> Tensor:
    """H = logsumexp(z) - E_p[z], written as (lse - max) - (E_p[z] - max): both parts keep their
    relative precision when p is peaked, where lse - E_p[z] would cancel."""
    return (lse - row_max) - expected_shift


@dataclass
class TokenTerms:
    """What a group of loss tokens contributes, from its log-probs (and entropies).

    The per-token fields are [n]; `loss` is the group's share of the normalized loss.
    """

    logprobs: Tensor
    ratio: Tensor  # PolicyTerms.ratio
    clipped: Tensor  # bool
    entropy: Optional[Tensor]  # None without the entropy bonus
    loss: Tensor  # scalar: sum_t w_t (L_t - entropy_coef H_t)
    coef: Tensor  # w_t g_t: dL/d log pi_t with the normalizer weight
    entropy_weight: Optional[Tensor]  # w_t * entropy_coef: dL/dH_t is minus this
    active: Tensor  # bool: the token has a gradient to contribute

    @classmethod
    def cat(cls, groups: list[TokenTerms]) -> TokenTerms:
        """The groups' terms one after the other, their losses summed."""
        def join(name: str) -> Optional[Tensor]:
            parts = [getattr(group, name) for group in groups]
            if parts[0] is None:
                return None
            return torch.stack(parts).sum() if name == "loss" else torch.cat(parts)
        return cls(**{field.name: join(field.name) for field in fields(cls)})


def token_terms(logprobs: Tensor, old_logprobs: Optional[Tensor], advantages: Tensor,
                off_policy_mask: Tensor, token_weight: Tensor, config: LuffyLossConfig,
                entropy: Optional[Tensor] = None,
                entropy_token_weight: Optional[Tensor] = None) -> TokenTerms:
    """Loss, gradient coefficients and statistics of tokens with normalizer weights `token_weight`.

    `entropy` is given exactly when config.entropy_coef > 0; its tokens are weighted by
    `entropy_token_weight` (Normalization.entropy_weights; default `token_weight`). A token is
    active when its coefficient or its entropy weight is non-zero (not clipped, non-zero
    advantage, or an entropy bonus).
    """
    terms = policy_terms(logprobs, old_logprobs, advantages, off_policy_mask, config)
    loss = (token_weight * terms.loss).sum()
    coef = token_weight * terms.grad_coef
    active = coef != 0
    entropy_weight = None
    if entropy is not None:
        base = token_weight if entropy_token_weight is None else entropy_token_weight
        entropy_weight = base * config.entropy_coef
        loss = loss - (entropy_weight * entropy).sum()
        active = active | (entropy_weight != 0)
    return TokenTerms(logprobs, terms.ratio, terms.clipped, entropy, loss, coef, entropy_weight,
                      active)


@dataclass
class Normalization:
    """Per-token weights w_t with loss = sum_t w_t L_t, and what produced them."""

    weights: Tensor  # [T], zero where the token is not part of the loss
    denominator: Tensor  # scalar: sum of mask, sequences, sequences * max_len, or max_len
    num_sequences: Tensor  # scalar: sequences with at least one loss token
    entropy_weights: Tensor  # [T]: the entropy term's weights (entropy_aggregation), before c_ent


def normalizer_denominator(num_tokens, num_sequences, config: LuffyLossConfig):
    """The normalizer's denominator: loss = sum_t L_t / denominator (docs/algorithm.md §Normalizers).

    `num_tokens` is the (weighted) count of loss tokens, `num_sequences` the sequences with at least
    one loss token; numbers or scalar tensors, and the result has their type. The op reports it as
    stats["denominator"]; the trainer uses it over a whole mini-batch.
    """
    if config.normalizer == "token":
        return num_tokens
    if config.normalizer == "seq_mean_token_mean":
        return num_sequences
    if config.normalizer == "token_sum_over_max_len":
        # the official scale: max_len alone, the same for every call, so a trainer's calls add up
        if isinstance(num_tokens, Tensor):
            return torch.full_like(num_tokens, float(config.max_len))
        return float(config.max_len)
    return num_sequences * config.max_len  # "constant"


def normalization(loss_mask: Tensor, seq_ids: Tensor, config: LuffyLossConfig) -> Normalization:
    """Aggregation weights for the configured normalizer (docs/algorithm.md §Normalizers).

    `loss_mask` is a float weight per token (0 outside the loss); `seq_ids` a sequence id per token.
    Only sequences with at least one loss token count. An empty batch gets all-zero weights.
    """
    sequences, seq_index = torch.unique(seq_ids, return_inverse=True)
    num_slots = sequences.numel()
    per_seq_mask = torch.zeros(num_slots, dtype=loss_mask.dtype, device=loss_mask.device)
    per_seq_mask.index_add_(0, seq_index, loss_mask)
    num_sequences = (per_seq_mask != 0).sum().to(loss_mask.dtype)

    denominator = normalizer_denominator(loss_mask.sum(), num_sequences, config)
    if config.normalizer == "token":
        weights = loss_mask / denominator.clamp_min(torch.finfo(loss_mask.dtype).tiny)
    elif config.normalizer == "seq_mean_token_mean":
        seq_total = per_seq_mask[seq_index]
        safe = torch.where(seq_total != 0, seq_total, torch.ones_like(seq_total))
        weights = loss_mask / safe / denominator.clamp_min(1)
    else:  # "constant", "token_sum_over_max_len"
        weights = loss_mask / denominator.clamp_min(1)
    entropy_weights = weights
    if config.entropy_aggregation == "token_mean":  # the token mean over this call
        entropy_weights = loss_mask / loss_mask.sum().clamp_min(torch.finfo(loss_mask.dtype).tiny)
    return Normalization(weights, denominator, num_sequences, entropy_weights)


def summarize(terms: TokenTerms, loss_mask: Tensor, off_policy_mask: Tensor,
              normalization: Normalization) -> dict:
    """The detached statistics the trainer logs, from per-token values of one pass."""
    with torch.no_grad():
        in_loss = loss_mask != 0
        weight = loss_mask.to(torch.float32)
        total = weight.sum().clamp_min(1e-30)
        on = in_loss & ~off_policy_mask
        stats = {
            "logprob_mean": (terms.logprobs.float() * weight).sum() / total,
            "clip_fraction": (terms.clipped & in_loss).float().sum() / in_loss.sum().clamp_min(1),
            "num_on_policy_tokens": on.sum(),
            "num_off_policy_tokens": (in_loss & off_policy_mask).sum(),
            "num_sequences": normalization.num_sequences.detach().float(),
            "denominator": normalization.denominator.detach().float(),
        }
        if terms.entropy is not None:
            stats["entropy_mean"] = (terms.entropy.float() * weight).sum() / total
        # Ratio statistics over on-policy loss tokens; 1.0 (old == current) when there are none.
        # Masked reductions, not ratio[on]: no host sync in the middle of the op.
        ratio = terms.ratio.float()
        any_on, one = on.any(), torch.ones((), device=ratio.device)
        inf = torch.tensor(float("inf"), device=ratio.device)
        ratio_min = torch.where(on, ratio, inf).min() if ratio.numel() else inf
        ratio_max = torch.where(on, ratio, -inf).max() if ratio.numel() else -inf
        ratio_mean = torch.where(on, ratio, 0.0).sum() / on.sum().clamp_min(1)
        stats["ratio_min"] = torch.where(any_on, ratio_min, one)
        stats["ratio_mean"] = torch.where(any_on, ratio_mean, one)
        stats["ratio_max"] = torch.where(any_on, ratio_max, one)
        return {k: v.detach() for k, v in stats.items()}
