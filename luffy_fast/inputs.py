"""The op's inputs: every check (errors name the argument) and the flattened loss tokens.

Shared by the public op and every backend; imports only the config and the loss math.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from .config import LuffyLossConfig
from .loss_math import Normalization, TokenTerms, normalization, summarize, token_terms

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class LossInputs:
    """Validated, flattened inputs restricted to the tokens that are part of the loss."""

    hidden: Tensor  # [T, H] as given (flattened), still attached to autograd
    weight: Tensor  # [V, H]
    bias: Optional[Tensor]  # [V]
    rows: Tensor  # [N] int64: indices of loss tokens in hidden
    targets: Tensor  # [N] int64
    advantages: Tensor  # [N] compute dtype
    loss_mask: Tensor  # [N] compute dtype, non-zero
    off_policy_mask: Tensor  # [N] bool
    old_logprobs: Optional[Tensor]  # [N] compute dtype
    norm: Normalization  # weights over the N loss tokens
    config: LuffyLossConfig
    compute_dtype: torch.dtype  # float64 for float64 inputs, else float32

    def token_terms(self, part, logprobs: Tensor, entropy: Optional[Tensor] = None) -> TokenTerms:
        """loss_math.token_terms of the loss tokens `part` (a slice or an index tensor)."""
        old = None if self.old_logprobs is None else self.old_logprobs[part]
        return token_terms(logprobs, old, self.advantages[part], self.off_policy_mask[part],
                           self.norm.weights[part], self.config, entropy,
                           self.norm.entropy_weights[part])

    def may_carry_gradient(self) -> Tensor:
        """[N] bool: the loss tokens that may carry a gradient (a non-zero normalizer weight times
        advantage, or an entropy weight). Known before any log-prob: tokens of zero-advantage
        groups need only the forward, and their loss term is 0."""
        maybe = self.norm.weights * self.advantages != 0
        if self.config.entropy_coef > 0:
            maybe |= self.norm.entropy_weights != 0
        return maybe

    def gradient_last(self) -> tuple[Tensor, int]:
        """Positions of the loss tokens with those that may carry a gradient last (stable), and
        how many those are."""
        maybe = self.may_carry_gradient()
        return torch.argsort(maybe.to(torch.uint8), stable=True), int(maybe.sum())

    def reordered(self, order: Tensor) -> LossInputs:
        """The same loss tokens listed in `order` (a permutation): the per-token tensors are
        permuted once, so that runs of tokens in that order are slices (views) of them."""
        norm = replace(self.norm, weights=self.norm.weights[order],
                       entropy_weights=self.norm.entropy_weights[order])
        return replace(self, rows=self.rows[order], targets=self.targets[order],
                       advantages=self.advantages[order], loss_mask=self.loss_mask[order],
                       off_policy_mask=self.off_policy_mask[order],
                       old_logprobs=None if self.old_logprobs is None else self.old_logprobs[order],
                       norm=norm)

    def summarize(self, terms: TokenTerms, order: Optional[Tensor] = None) -> dict:
        """The op's statistics from the terms of every loss token, listed in `order` when given
        (a permutation: the statistics are sums and extremes, so any order gives them)."""
        loss_mask, off_policy_mask = self.loss_mask, self.off_policy_mask
        if order is not None:
            loss_mask, off_policy_mask = loss_mask[order], off_policy_mask[order]
        return summarize(terms, loss_mask, off_policy_mask, self.norm)


def input_error(name: str, why: str, op: str = "fused_luffy_loss") -> ValueError:
    """The error for a bad input `name` of the op `op` (its message names both)."""
    return ValueError(f"{op}: `{name}` {why}")


def _check_tensor(name: str, value, shape, device, dtypes, dtype_words: str,
                  op: str = "fused_luffy_loss") -> None:
    if not isinstance(value, Tensor):
        raise input_error(name, f"must be a torch.Tensor, got {type(value).__name__}", op)
    if tuple(value.shape) != tuple(shape):
        raise input_error(name, f"has shape {tuple(value.shape)}, expected {tuple(shape)}", op)
    if value.device != device:
        raise input_error(name, f"is on {value.device}, but `hidden` is on {device}", op)
    if value.dtype not in dtypes:
        raise input_error(name, f"has dtype {value.dtype}, expected {dtype_words}", op)


def _check_hidden_weight(hidden, weight, bias, weight_dtypes, dtype_words: str,
                         op: str = "fused_luffy_loss") -> None:
    """The checks both ops make of `hidden` [T, H] or [B, L, H], `weight` [V, H] (one of
    `weight_dtypes`) and `bias` [V], all on hidden's device."""
    if not isinstance(hidden, Tensor):
        raise input_error("hidden", f"must be a torch.Tensor, got {type(hidden).__name__}", op)
    if hidden.dim() not in (2, 3):
        raise input_error("hidden", f"must be [T, H] or [B, L, H], got shape {tuple(hidden.shape)}",
                          op)
    if hidden.device.type == "meta":  # no data: the result would be uninitialized memory
        raise input_error("hidden", "is on the meta device (it holds no values)", op)
    if hidden.dtype not in FLOAT_DTYPES:
        raise input_error("hidden", f"has dtype {hidden.dtype}, expected bf16, fp16, fp32 or fp64",
                          op)
    H = hidden.shape[-1]
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != H:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise input_error("weight", f"must be [V, H] with H = {H} (hidden's last dim), got {shape}",
                          op)
    if 0 in weight.shape:
        raise input_error("weight", f"has no vocabulary rows or no hidden columns: shape "
                                    f"{tuple(weight.shape)}", op)
    _check_tensor("weight", weight, weight.shape, hidden.device, weight_dtypes, dtype_words, op)
    if bias is not None:
        _check_tensor("bias", bias, (weight.shape[0],), hidden.device, weight_dtypes, dtype_words,
                      op)


def prepare_inputs(hidden, weight, targets, advantages, loss_mask, off_policy_mask,
                   old_logprobs, config, seq_ids, bias) -> LossInputs:
    """Check every input (raising ValueError naming it) and flatten to the loss tokens."""
    if not isinstance(config, LuffyLossConfig):
        raise input_error("config", f"must be a LuffyLossConfig, got {type(config).__name__}")
    config.validate()
    _check_hidden_weight(hidden, weight, bias, (hidden.dtype,), f"{hidden.dtype} like `hidden`")
    device, token_shape, H, V = hidden.device, hidden.shape[:-1], hidden.shape[-1], weight.shape[0]
    floats = FLOAT_DTYPES
    _check_tensor("targets", targets, token_shape, device, (torch.int64,), "torch.int64")
    _check_tensor("advantages", advantages, token_shape, device, floats, "a float dtype")
    _check_tensor("loss_mask", loss_mask, token_shape, device, floats + (torch.bool,), "bool or float")
    _check_tensor("off_policy_mask", off_policy_mask, token_shape, device, (torch.bool,), "torch.bool")
    if old_logprobs is not None:
        _check_tensor("old_logprobs", old_logprobs, token_shape, device, floats, "a float dtype")
    if seq_ids is not None:
        _check_tensor("seq_ids", seq_ids, token_shape, device, (torch.int64,), "torch.int64")

    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    hidden_flat = hidden.reshape(-1, H)
    T = hidden_flat.shape[0]
    targets = targets.reshape(T)
    ignored = targets == config.ignore_index
    out_of_range = ~ignored & ((targets < 0) | (targets >= V))
    raw_mask = loss_mask.reshape(T).detach().to(compute_dtype)  # data, as the advantages
    mask = torch.where(ignored, torch.zeros_like(raw_mask), raw_mask)
    in_loss = mask != 0
    advantages = advantages.reshape(T).detach()
    old_logprobs = None if old_logprobs is None else old_logprobs.reshape(T).detach()
    # Every value check in one host sync: (argument, what is wrong, where it is wrong).
    checks = [("targets", None, out_of_range),
              ("loss_mask", "must be finite and non-negative", ~torch.isfinite(raw_mask) | (raw_mask < 0)),
              ("advantages", "holds non-finite values at loss tokens", in_loss & ~torch.isfinite(advantages))]
    if old_logprobs is not None:
        checks.append(("old_logprobs", "holds non-finite values at loss tokens",
                       in_loss & ~torch.isfinite(old_logprobs)))
    failed = torch.stack([bad.any() for _, _, bad in checks]).tolist()
    for (name, why, bad), is_bad in zip(checks, failed):
        if is_bad and name == "targets":
            value = targets[bad][0].item()
            why = (f"holds id {value} outside [0, {V}) (vocabulary size from `weight`) that is not "
                   f"ignore_index={config.ignore_index}")
        if is_bad:
            raise input_error(name, why)

    if hidden.dim() == 3 and seq_ids is None:
        B, L = token_shape
        seq_ids = torch.arange(B, device=device).repeat_interleave(L)
    elif seq_ids is None:
        seq_ids = torch.zeros(T, dtype=torch.int64, device=device)  # packed input: one sequence
    seq_ids = seq_ids.reshape(T)

    rows = in_loss.nonzero().squeeze(1)
    norm = normalization(mask[rows], seq_ids[rows], config)
    return LossInputs(
        hidden=hidden_flat, weight=weight, bias=bias, rows=rows, targets=targets[rows],
        advantages=advantages[rows].to(compute_dtype), loss_mask=mask[rows],
        off_policy_mask=off_policy_mask.reshape(T)[rows],
        old_logprobs=None if old_logprobs is None else old_logprobs[rows].to(compute_dtype),
        norm=norm, config=config, compute_dtype=compute_dtype)


def prepare_token_inputs(hidden, weight, targets, bias=None) -> tuple[Tensor, Tensor, Tensor]:
    """token_logprobs' checks: flattened hidden [T, H], targets with out-of-range ids (e.g. -100
    padding) replaced by 0, and the mask of the valid ones."""
    _check_hidden_weight(hidden, weight, bias, FLOAT_DTYPES, "a float dtype", "token_logprobs")
    _check_tensor("targets", targets, hidden.shape[:-1], hidden.device, (torch.int64,), "torch.int64",
                  "token_logprobs")
    flat_targets = targets.reshape(-1)
    valid = (flat_targets >= 0) & (flat_targets < weight.shape[0])
    safe_targets = torch.where(valid, flat_targets, torch.zeros_like(flat_targets))
    return hidden.reshape(-1, hidden.shape[-1]), safe_targets, valid
