"""The naive backend: materializes the [tokens, vocab] logits and uses plain autograd.

It is the oracle of the tests: slow and memory-hungry on purpose, and as direct as possible.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import loss_math
from .config import LuffyLossConfig
from .inputs import LossInputs


def _logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float,
            dtype: torch.dtype) -> Tensor:
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logits / temperature


def reference_loss(inputs: LossInputs) -> tuple[Tensor, dict]:
    config = inputs.config
    hidden = inputs.hidden[inputs.rows]
    logits = _logits(hidden, inputs.weight, inputs.bias, config.temperature, inputs.compute_dtype)
    log_softmax = torch.log_softmax(logits, dim=-1)
    logprobs = log_softmax.gather(1, inputs.targets[:, None]).squeeze(1)

    per_token = loss_math.policy_loss(logprobs, inputs.old_logprobs, inputs.advantages,
                                      inputs.off_policy_mask, config)
    loss = (inputs.norm.weights * per_token).sum()
    entropy = None
    if config.entropy_coef > 0:
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        loss = loss - config.entropy_coef * (inputs.norm.entropy_weights * entropy).sum()

    with torch.no_grad():
        stats = inputs.summarize(inputs.token_terms(slice(None), logprobs.detach(),
                                                    None if entropy is None else entropy.detach()))
    return loss, stats


def reference_token_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                             targets: Tensor, config: LuffyLossConfig, with_entropy: bool):
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    log_softmax = torch.log_softmax(_logits(hidden, weight, bias, config.temperature, dtype), -1)
    logprobs = log_softmax.gather(1, targets[:, None]).squeeze(1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1) if with_entropy else None
    return logprobs, entropy
