"""Public op: `fused_luffy_loss`, `token_logprobs`, input checks and backend dispatch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .config import LuffyLossConfig
from .loss_math import Normalization, normalization

BACKENDS = ("torch", "reference", "triton")
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


def _fail(name: str, why: str) -> ValueError:
    return ValueError(f"fused_luffy_loss: `{name}` {why}")


def _check_tensor(name: str, value, shape, device, dtypes, dtype_words: str) -> None:
    if not isinstance(value, Tensor):
        raise _fail(name, f"must be a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise _fail(name, f"has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if value.device != device:
        raise _fail(name, f"is on {value.device}, but `hidden` is on {device}")
    if value.dtype not in dtypes:
        raise _fail(name, f"has dtype {value.dtype}, expected {dtype_words}")


def prepare_inputs(hidden, weight, targets, advantages, loss_mask, off_policy_mask,
                   old_logprobs, config, seq_ids, bias) -> LossInputs:
    """Check every input (raising ValueError naming it) and flatten to the loss tokens."""
    if not isinstance(config, LuffyLossConfig):
        raise _fail("config", f"must be a LuffyLossConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(hidden, Tensor):
        raise _fail("hidden", f"must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() not in (2, 3):
        raise _fail("hidden", f"must be [T, H] or [B, L, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise _fail("hidden", f"has dtype {hidden.dtype}, expected bf16, fp16, fp32 or fp64")
    device, token_shape, H = hidden.device, hidden.shape[:-1], hidden.shape[-1]
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != H:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise _fail("weight", f"must be [V, H] with H = {H} (hidden's last dim), got {shape}")
    V = weight.shape[0]
    _check_tensor("weight", weight, weight.shape, device, (hidden.dtype,), f"{hidden.dtype} like `hidden`")
    if bias is not None:
        _check_tensor("bias", bias, (V,), device, (hidden.dtype,), f"{hidden.dtype} like `hidden`")
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
    if bool(out_of_range.any()):
        bad = targets[out_of_range][0].item()
        raise _fail("targets", f"holds id {bad} outside [0, {V}) (vocabulary size from `weight`) "
                               f"that is not ignore_index={config.ignore_index}")
    mask = loss_mask.reshape(T).to(compute_dtype)
    if not bool(torch.isfinite(mask).all()) or bool((mask < 0).any()):
        raise _fail("loss_mask", "must be finite and non-negative")
    mask = torch.where(ignored, torch.zeros_like(mask), mask)
    in_loss = mask != 0
    advantages = advantages.reshape(T)
    if not bool(torch.isfinite(advantages[in_loss]).all()):
        raise _fail("advantages", "holds non-finite values at loss tokens")
    if old_logprobs is not None:
        old_logprobs = old_logprobs.reshape(T)
        if not bool(torch.isfinite(old_logprobs[in_loss]).all()):
            raise _fail("old_logprobs", "holds non-finite values at loss tokens")

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


def default_backend(device: torch.device) -> str:
    """`triton` on CUDA tensors, the chunked `torch` backend elsewhere."""
    return "triton" if device.type == "cuda" else "torch"


def _resolve_backend(backend: Optional[str], device: torch.device) -> str:
    if backend is not None and backend not in BACKENDS:
        raise _fail("backend", f"must be None or one of {BACKENDS}, got {backend!r}")
    return backend or default_backend(device)


def fused_luffy_loss(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor,
                     loss_mask: Tensor, off_policy_mask: Tensor,
                     old_logprobs: Optional[Tensor] = None,
                     config: LuffyLossConfig = LuffyLossConfig(),
                     seq_ids: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     backend: Optional[str] = None) -> tuple[Tensor, dict]:
    """The LUFFY mixed-policy loss from last hidden states and the LM-head weight.

    Returns the scalar loss (float32, or float64 for float64 inputs) and a dict of detached
    statistics. See LuffyLossConfig for the options and DESIGN.md for the contract.
    """
    inputs = prepare_inputs(hidden, weight, targets, advantages, loss_mask, off_policy_mask,
                            old_logprobs, config, seq_ids, bias)
    backend = _resolve_backend(backend, hidden.device)  # still before any kernel runs
    if backend == "reference":
        from .reference import reference_loss
        return reference_loss(inputs)
    if backend == "torch":
        from .chunked import chunked_loss
        return chunked_loss(inputs)
    from .kernels.function import triton_loss
    return triton_loss(inputs)


@torch.no_grad()
def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                   bias: Optional[Tensor] = None, with_entropy: bool = False,
                   backend: Optional[str] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token log pi(target) (and entropy) from hidden + weight, without grad, in one pass.

    For old-log-prob and evaluation passes. Returns float32 tensors of the token shape; positions
    whose target is out of range (e.g. -100 padding) get log-prob 0.
    """
    config = LuffyLossConfig(temperature=temperature)
    if not isinstance(hidden, Tensor) or hidden.dim() not in (2, 3):
        raise _fail("hidden", "must be a [T, H] or [B, L, H] tensor")
    backend = _resolve_backend(backend, hidden.device)
    token_shape = hidden.shape[:-1]
    hidden_flat = hidden.reshape(-1, hidden.shape[-1])
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise _fail("weight", "must be [V, H] with H equal to hidden's last dim")
    _check_tensor("targets", targets, token_shape, hidden.device, (torch.int64,), "torch.int64")
    V = weight.shape[0]
    flat_targets = targets.reshape(-1)
    valid = (flat_targets >= 0) & (flat_targets < V)
    safe_targets = torch.where(valid, flat_targets, torch.zeros_like(flat_targets))
    if backend == "reference":
        from .reference import reference_token_logprobs as impl
    elif backend == "torch":
        from .chunked import chunked_token_logprobs as impl
    else:
        from .kernels.function import triton_token_logprobs as impl
    logprobs, entropy = impl(hidden_flat, weight, bias, safe_targets, config, with_entropy)
    logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs)).reshape(token_shape)
    if entropy is not None:
        entropy = entropy.reshape(token_shape)
    return logprobs, entropy
