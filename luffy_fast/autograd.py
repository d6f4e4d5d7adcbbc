"""Autograd glue shared by the backends that compute their gradients during the forward.

The chunked and Triton backends form d(hidden), d(weight) and d(bias) in the same sweep as the
loss (docs/design.md §Layers of the op); `attach_gradients` returns the loss with a backward
that only scales those stored gradients by the upstream gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .inputs import LossInputs


class AttachGradients(torch.autograd.Function):
    """Returns `loss` as is; its backward hands out gradients computed in the forward, scaled."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grads):
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        # Scale in place where the dtype already matches: no second copy of d(weight) [V, H].
        grads = tuple(None if g is None else g.mul_(grad_loss) if g.dtype == dtype
                      else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes))
        ctx.grads = None
        return (None, *grads, None)


def bias_slot(inputs: LossInputs) -> Tensor:
    """The bias, or an empty tensor: an autograd.Function needs a tensor slot (it takes no grad)."""
    if inputs.bias is not None:
        return inputs.bias
    return torch.empty(0, device=inputs.hidden.device, dtype=inputs.hidden.dtype)


def attach_gradients(loss: Tensor, inputs: LossInputs, grads) -> Tensor:
    """`loss`, with (d(hidden), d(weight), d(bias)) as the gradients of a unit upstream gradient."""
    return AttachGradients.apply(loss, inputs.hidden, inputs.weight, bias_slot(inputs), grads)


def wants_grad(inputs: LossInputs) -> tuple[bool, bool, bool]:
    """Whether d(hidden), d(weight) and d(bias) are wanted."""
    enabled = torch.is_grad_enabled()
    return (enabled and inputs.hidden.requires_grad,
            enabled and inputs.weight.requires_grad,
            enabled and inputs.bias is not None and inputs.bias.requires_grad)
