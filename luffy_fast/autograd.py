"""Autograd glue shared by the backends that compute their gradients during the forward.

The chunked and Triton backends form d(hidden), d(weight) and d(bias) in the same sweep as the
loss (docs/design.md §Layers of the op); `attach_gradients` returns the loss with a backward
that only scales those stored gradients by the upstream gradient.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .inputs import LossInputs


class StoredGradients:
    """(d(hidden), d(weight), d(bias)) formed in the forward for a unit upstream gradient."""

    def __init__(self, grads):
        self.grads = grads

    def scaled(self, grad_loss: Tensor):
        # In place: no second copy of d(weight) [V, H].
        return tuple(None if g is None else g.mul_(grad_loss) for g in self.grads)


SECOND_BACKWARD = ("fused_luffy_loss: a second backward through the same loss (retain_graph) "
                   "is not supported by this backend: the first backward handed out the "
                   "gradients its forward formed; compute the loss again (the 'reference' "
                   "backend keeps the whole graph)")
NO_CREATE_GRAPH = ("fused_luffy_loss: create_graph is not supported by this backend: its "
                   "gradients are formed in the forward and are not themselves differentiable "
                   "(the 'reference' backend's are)")


def check_backward(pending) -> None:
    """A fused backend's backward runs once (`pending`: what the forward left for it, None once
    handed out) and without create_graph (grad mode on inside a backward means create_graph),
    which would have given gradients that silently carry no graph."""
    if pending is None:
        raise RuntimeError(SECOND_BACKWARD)
    if torch.is_grad_enabled():
        raise RuntimeError(NO_CREATE_GRAPH)


@contextlib.contextmanager
def op_context(device: torch.device):
    """What the backends run in: autocast off on `device` (the op chooses its own precisions,
    fp32 logits and softmax, which autocast would round to 16 bits in its GEMMs) and, for a CUDA
    device, that device current. Triton launches a kernel on the current device and sizes its
    grid and its TMA scratch memory from it, so an LM head on another GPU than the current one
    (a model split over GPUs with device_map="auto" puts it on the last) would otherwise fail."""
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        if torch.amp.is_autocast_available(device.type):
            stack.enter_context(torch.autocast(device.type, enabled=False))
        yield


class AttachGradients(torch.autograd.Function):
    """Returns `loss` as is; its backward hands out gradients computed in the forward, scaled by
    the upstream gradient (`gradients.scaled`) and cast to the inputs' dtypes, once
    (`check_backward`)."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, gradients):
        ctx.gradients = gradients
        ctx.dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        check_backward(ctx.gradients)
        grads = ctx.gradients.scaled(grad_loss)
        ctx.gradients = None
        return (None, *(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)),
                None)


def bias_slot(inputs: LossInputs) -> Tensor:
    """The bias, or an empty tensor: an autograd.Function needs a tensor slot (it takes no grad)."""
    if inputs.bias is not None:
        return inputs.bias
    return torch.empty(0, device=inputs.hidden.device, dtype=inputs.hidden.dtype)


def attach_gradients(loss: Tensor, inputs: LossInputs, grads) -> Tensor:
    """`loss`, with `grads` as its gradients: (d(hidden), d(weight), d(bias)) of a unit upstream
    gradient, or an object whose `scaled(grad_loss)` returns them for the real one."""
    gradients = grads if hasattr(grads, "scaled") else StoredGradients(grads)
    return AttachGradients.apply(loss, inputs.hidden, inputs.weight, bias_slot(inputs), gradients)


def wants_grad(inputs: LossInputs) -> tuple[bool, bool, bool]:
    """Whether d(hidden), d(weight) and d(bias) are wanted."""
    enabled = torch.is_grad_enabled()
    return (enabled and inputs.hidden.requires_grad,
            enabled and inputs.weight.requires_grad,
            enabled and inputs.bias is not None and inputs.bias.requires_grad)
