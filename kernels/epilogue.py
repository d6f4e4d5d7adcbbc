"""The per-token epilogue in one launch: ratio, shaping, clipping, normalizer weight, gradient
coefficient and entropy of a chunk of loss tokens, from the forward kernel's log-probs.

The definition is luffy_fast.loss_math.token_terms (the reference, the chunked backend and the
tests use it); this kernel computes the same values elementwise, with every option of
LuffyLossConfig, and the tests hold the two to each other (tests/test_epilogue.py). As a kernel it
is one launch per chunk where the torch ops are about forty, each a launch of its own: on a GPU
those launches, not the arithmetic, cost the time (about 16 µs of host time each).

`TokenBuffers` holds every loss token's values, [N] each; the chunks' launches fill slices of it,
so that the loss (a sum over tokens) and the statistics come from one pass at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from luffy_fast.inputs import LossInputs
from luffy_fast.loss_math import MAX_LOG_RATIO, TokenTerms

from .utils import INTERPRET


@triton.jit
def _ppo_clip(ratio, advantages, low, high, dual_clip, HAS_DUAL: tl.constexpr):
    """(loss, clipped) of PPO clipping, with the dual clip when HAS_DUAL (loss_math._ppo_clip).
    torch.maximum and torch.clamp propagate NaN; Triton's min and max do only when asked (and a
    jit function reads no plain module global, so the flag is spelled out each time)."""
    unclipped = -ratio * advantages
    bounded = tl.maximum(ratio, low, propagate_nan=tl.PropagateNan.ALL)
    bounded = tl.minimum(bounded, high, propagate_nan=tl.PropagateNan.ALL)
    loss = tl.maximum(unclipped, -bounded * advantages, propagate_nan=tl.PropagateNan.ALL)
    clipped = ((advantages > 0) & (ratio > high)) | ((advantages < 0) & (ratio < low))
    if HAS_DUAL:
        capped = (advantages < 0) & (ratio > dual_clip)
        loss = tl.where(capped, -dual_clip * advantages, loss)
        clipped = clipped | capped
    return loss, clipped


@triton.heuristics({"HAS_OLD": lambda args: args["old_ptr"] is not None,
                    "WITH_ENTROPY": lambda args: args["entropy_weight_ptr"] is not None})
@triton.jit
def _token_terms_kernel(
    logprob_ptr, old_ptr, advantage_ptr, off_policy_ptr, weight_ptr, entropy_weight_ptr,
    lse_ptr, row_max_ptr, expected_shift_ptr,
    ratio_ptr, clipped_ptr, token_loss_ptr, coef_ptr, entropy_ptr, active_ptr,
    N, gamma, low, high, dual_clip, max_log_ratio,
    SHAPING: tl.constexpr, CLIP_ON: tl.constexpr, CLIP_OFF: tl.constexpr, HAS_DUAL: tl.constexpr,
    HAS_OLD: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    logprob = tl.load(logprob_ptr + offs, mask=mask, other=0.0)
    advantages = tl.load(advantage_ptr + offs, mask=mask, other=0.0)
    off_policy = tl.load(off_policy_ptr + offs, mask=mask, other=0) != 0
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0)

    # On-policy: r = pi / pi_old (old = current when absent), the log-ratio clamped above.
    log_ratio = logprob - logprob  # 0, or NaN for a non-finite log-prob (as loss_math's)
    if HAS_OLD:
        log_ratio = logprob - tl.load(old_ptr + offs, mask=mask, other=0.0)
    ratio_on = tl.exp(tl.minimum(log_ratio, max_log_ratio, propagate_nan=tl.PropagateNan.ALL))
    if CLIP_ON:
        loss_on, clipped_on = _ppo_clip(ratio_on, advantages, low, high, dual_clip, HAS_DUAL)
    else:
        loss_on, clipped_on = -ratio_on * advantages, tl.zeros((BLOCK,), tl.int1)
    # Off-policy: the (shaped) probability, f(p) = p / (p + gamma).
    prob = tl.exp(logprob)
    ratio_off = prob
    dratio_off = prob
    if SHAPING:
        ratio_off = prob / (prob + gamma)
        dratio_off = gamma * prob / ((prob + gamma) * (prob + gamma))
    if CLIP_OFF:
        loss_off, clipped_off = _ppo_clip(ratio_off, advantages, low, high, dual_clip, HAS_DUAL)
    else:
        loss_off, clipped_off = -ratio_off * advantages, tl.zeros((BLOCK,), tl.int1)

    loss = tl.where(off_policy, loss_off, loss_on)
    clipped = tl.where(off_policy, clipped_off, clipped_on)
    dratio = tl.where(off_policy, dratio_off, tl.where(log_ratio > max_log_ratio, 0.0, ratio_on))
    coef = weight * tl.where(clipped, 0.0, -advantages * dratio)
    token_loss = weight * loss
    active = coef != 0
    if WITH_ENTROPY:
        entropy_weight = tl.load(entropy_weight_ptr + offs, mask=mask, other=0.0)
        lse = tl.load(lse_ptr + offs, mask=mask, other=0.0)
        row_max = tl.load(row_max_ptr + offs, mask=mask, other=0.0)
        entropy = (lse - row_max) - tl.load(expected_shift_ptr + offs, mask=mask, other=0.0)
        token_loss = token_loss - entropy_weight * entropy
        active = active | (entropy_weight != 0)
        tl.store(entropy_ptr + offs, entropy, mask=mask)
    tl.store(ratio_ptr + offs, tl.where(off_policy, ratio_off, ratio_on), mask=mask)
    tl.store(clipped_ptr + offs, clipped.to(tl.uint8), mask=mask)
    tl.store(token_loss_ptr + offs, token_loss, mask=mask)
    tl.store(coef_ptr + offs, coef, mask=mask)
    tl.store(active_ptr + offs, active.to(tl.uint8), mask=mask)


@dataclass
class TokenBuffers:
    """Every loss token's values ([N] each, fp32 unless noted), filled chunk by chunk: the forward
    kernel's moments, then the epilogue's terms. Indexing with a slice gives views of a chunk."""

    lse: Tensor
    logprobs: Tensor
    row_max: Tensor
    expected_shift: Optional[Tensor]  # E_p[z] - max, with the entropy term only
    ratio: Tensor
    clipped: Tensor  # bool
    token_loss: Tensor  # w_t (L_t - c_ent H_t): the loss is their sum
    coef: Tensor
    entropy: Optional[Tensor]
    entropy_weight: Optional[Tensor]  # w_t c_ent, known before any log-prob
    active: Tensor  # bool

    @classmethod
    def empty(cls, inputs: LossInputs) -> TokenBuffers:
        config, N, device = inputs.config, inputs.rows.numel(), inputs.rows.device
        with_entropy = config.entropy_coef > 0
        new = lambda dtype=torch.float32: torch.empty(N, dtype=dtype, device=device)  # noqa: E731
        return cls(new(), new(), new(), new() if with_entropy else None, new(), new(torch.bool),
                   new(), new(), new() if with_entropy else None,
                   inputs.norm.entropy_weights.float() * config.entropy_coef if with_entropy else None,
                   new(torch.bool))

    def moments(self, part: slice) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """The forward kernel's outputs for the tokens `part` (views to write into)."""
        shift = None if self.expected_shift is None else self.expected_shift[part]
        return self.lse[part], self.logprobs[part], self.row_max[part], shift

    def __getitem__(self, part: slice) -> TokenBuffers:
        return TokenBuffers(*(None if getattr(self, f.name) is None else getattr(self, f.name)[part]
                              for f in fields(self)))

    def terms(self) -> TokenTerms:
        """All the tokens' terms, the loss summed once."""
        return TokenTerms(self.logprobs, self.ratio, self.clipped, self.entropy,
                          self.token_loss.sum(), self.coef, self.entropy_weight, self.active)


def token_terms_into(inputs: LossInputs, part: slice, buffers: TokenBuffers) -> None:
    """loss_math.token_terms of the loss tokens `part` (a slice), from the moments the forward
    kernel wrote into `buffers`, written into the same slice of `buffers`: one launch."""
    config, out = inputs.config, buffers[part]
    n = out.logprobs.numel()
    if n == 0:
        return
    old = None if inputs.old_logprobs is None else inputs.old_logprobs[part]
    block = 256 if INTERPRET else 1024
    _token_terms_kernel[(triton.cdiv(n, block),)](
        out.logprobs, old, inputs.advantages[part], inputs.off_policy_mask[part].view(torch.uint8),
        inputs.norm.weights[part], out.entropy_weight, out.lse, out.row_max, out.expected_shift,
        out.ratio, out.clipped.view(torch.uint8), out.token_loss, out.coef, out.entropy,
        out.active.view(torch.uint8),
        n, config.gamma, 1.0 - config.clip_low, 1.0 + config.clip_high,
        0.0 if config.dual_clip is None else config.dual_clip, MAX_LOG_RATIO,
        SHAPING=config.shaping, CLIP_ON=config.clip_on_policy, CLIP_OFF=config.clip_off_policy,
        HAS_DUAL=config.dual_clip is not None, BLOCK=block)
