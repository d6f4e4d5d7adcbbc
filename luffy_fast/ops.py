"""Public op: `fused_luffy_loss`, `token_logprobs` and the choice of backend.

The top of the op's layers (docs/design.md): checks the inputs (inputs.py), then hands them to
one backend: `reference`, the chunked `torch` backend, or the `triton` kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .autograd import op_context
from .config import LuffyLossConfig
from .inputs import LossInputs, input_error, prepare_inputs, prepare_token_inputs

BACKENDS = ("torch", "reference", "triton")


def default_backend(device: torch.device) -> str:
    """`triton` on CUDA tensors, the chunked `torch` backend elsewhere."""
    return "triton" if device.type == "cuda" else "torch"


def _backend(backend: Optional[str], device: torch.device, op: str = "fused_luffy_loss"):
    """The chosen backend's (loss, token_logprobs) functions; imported on first use (the triton
    backend imports Triton). `op`: the public op that asks, named in the error."""
    if backend is not None and backend not in BACKENDS:
        raise input_error("backend", f"must be None or one of {BACKENDS}, got {backend!r}", op)
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
    Gradients flow to hidden, weight and bias; advantages, old_logprobs and the masks are
    data (no gradient flows into them, whatever their requires_grad). Autocast is off inside.
    """
    inputs = prepare_inputs(hidden, weight, targets, advantages, loss_mask, off_policy_mask,
                            old_logprobs, config, seq_ids, bias)
    loss_of, _ = _backend(backend, hidden.device)  # still before any kernel runs
    with op_context(hidden.device):
        loss, stats = loss_of(inputs)
    if config.check_finite:
        _check_finite(loss, stats, inputs)
    return loss, stats


def _check_finite(loss: Tensor, stats: dict, inputs: LossInputs) -> None:
    """LuffyLossConfig.check_finite: one scalar check fused into the forward's statistics.

    stats["logprob_mean"] sums every loss token's log-prob (a non-finite logsumexp or target
    logit makes it non-finite) and the loss sums their policy and entropy terms; only when one
    of them is not finite are the inputs searched for the culprit, to name it.
    """
    if bool(torch.isfinite(loss.detach().float() + stats["logprob_mean"].float())):
        return
    rows = inputs.hidden[inputs.rows].detach()
    bad_rows = ~torch.isfinite(rows).all(dim=1)
    if bool(bad_rows.any()):
        token = int(inputs.rows[bad_rows][0])
        raise input_error("hidden", f"holds non-finite values at loss token {token} (flattened "
                                    f"index){_HOW_TO_SKIP}")
    for name, value in (("weight", inputs.weight), ("bias", inputs.bias)):
        if value is not None and not bool(torch.isfinite(value.detach()).all()):
            raise input_error(name, f"holds non-finite values{_HOW_TO_SKIP}")
    raise input_error("hidden", f"and `weight` are finite, but their logits at loss tokens "
                                f"overflow {inputs.hidden.dtype} (|h . w| / temperature){_HOW_TO_SKIP}")


_HOW_TO_SKIP = "; the loss would not be finite (LuffyLossConfig.check_finite=False skips this check)"


@torch.no_grad()
def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                   bias: Optional[Tensor] = None, with_entropy: bool = False,
                   backend: Optional[str] = None, logits_dtype: str = "float32",
                   memory_budget_mb: Optional[float] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token log pi(target) (and entropy) from hidden + weight, without grad, in one pass.

    For old-log-prob and evaluation passes. Returns float32 tensors of the token shape (float64
    for float64 inputs); positions whose target is out of range (e.g. -100 padding) get log-prob
    0. `logits_dtype` and `memory_budget_mb`: as in LuffyLossConfig (the triton backend's kept
    logits: "input" keeps them in 16 bits; the budget sizes the chunks of logits).
    """
    config = LuffyLossConfig(temperature=temperature, logits_dtype=logits_dtype,
                             memory_budget_mb=memory_budget_mb)
    hidden_flat, safe_targets, valid = prepare_token_inputs(hidden, weight, targets, bias)
    _, logprobs_of = _backend(backend, hidden.device, "token_logprobs")
    if (backend or default_backend(hidden.device)) == "triton" and weight.dtype != hidden.dtype:
        raise input_error("weight", f"is {weight.dtype} but `hidden` is {hidden.dtype}; the triton "
                                    "backend takes one dtype for both (cast one of them)",
                          "token_logprobs")
    with op_context(hidden.device):
        logprobs, entropy = logprobs_of(hidden_flat, weight, bias, safe_targets, config,
                                        with_entropy)
    token_shape = hidden.shape[:-1]
    logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs)).reshape(token_shape)
    if entropy is not None:
        entropy = entropy.reshape(token_shape)
    return logprobs, entropy
