"""Public op: `fused_luffy_loss`, `token_logprobs` and the choice of backend.

The top of the op's layers (docs/design.md): checks the inputs (inputs.py), then hands them to
one backend: `reference`, the chunked `torch` backend, or the `triton` kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import LuffyLossConfig
from .inputs import input_error, prepare_inputs, prepare_token_inputs

BACKENDS = ("torch", "reference", "triton")


def default_backend(device: torch.device) -> str:
    """`triton` on CUDA tensors, the chunked `torch` backend elsewhere."""
    return "triton" if device.type == "cuda" else "torch"


def _backend(backend: Optional[str], device: torch.device):
    """The chosen backend's (loss, token_logprobs) functions; imported on first use (the triton
    backend imports Triton)."""
    if backend is not None and backend not in BACKENDS:
        raise input_error("backend", f"must be None or one of {BACKENDS}, got {backend!r}")
    backend = backend or default_backend(device)
    if backend == "reference":
        from .reference import reference_loss as loss
        from .reference import reference_token_logprobs as logprobs
    elif backend == "torch":
        from .chunked import chunked_loss as loss
        from .chunked import chunked_token_logprobs as logprobs
    else:
        from .kernels.function import triton_loss as loss
        from .kernels.function import triton_token_logprobs as logprobs
    return loss, logprobs


def fused_luffy_loss(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor,
                     loss_mask: Tensor, off_policy_mask: Tensor,
                     old_logprobs: Optional[Tensor] = None,
                     config: LuffyLossConfig = LuffyLossConfig(),
                     seq_ids: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     backend: Optional[str] = None) -> tuple[Tensor, dict]:
    """The LUFFY mixed-policy loss from last hidden states and the LM-head weight.

    Returns the scalar loss (float32, or float64 for float64 inputs) and a dict of detached
    statistics. See LuffyLossConfig for the options and docs/design.md for the contract.
    """
    inputs = prepare_inputs(hidden, weight, targets, advantages, loss_mask, off_policy_mask,
                            old_logprobs, config, seq_ids, bias)
    loss_of, _ = _backend(backend, hidden.device)  # still before any kernel runs
    return loss_of(inputs)


@torch.no_grad()
def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                   bias: Optional[Tensor] = None, with_entropy: bool = False,
                   backend: Optional[str] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token log pi(target) (and entropy) from hidden + weight, without grad, in one pass.

    For old-log-prob and evaluation passes. Returns float32 tensors of the token shape; positions
    whose target is out of range (e.g. -100 padding) get log-prob 0.
    """
    config = LuffyLossConfig(temperature=temperature)
    hidden_flat, safe_targets, valid = prepare_token_inputs(hidden, weight, targets)
    _, logprobs_of = _backend(backend, hidden.device)
    logprobs, entropy = logprobs_of(hidden_flat, weight, bias, safe_targets, config, with_entropy)
    token_shape = hidden.shape[:-1]
    logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs)).reshape(token_shape)
    if entropy is not None:
        entropy = entropy.reshape(token_shape)
    return logprobs, entropy
