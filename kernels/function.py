"""The `triton` backend: autograd Function around the forward and backward kernels.

Forward: `logsumexp_forward` gives each loss token's logsumexp, log-prob (and E_p[z]); the per-token
epilogue is luffy_fast.loss_math (the same definition as the other backends) on those [N] vectors.
Backward: active tokens only, in chunks sized from the memory budget (`backward.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from luffy_fast import loss_math
from luffy_fast.config import LuffyLossConfig
from luffy_fast.ops import LossInputs

from .backward import accumulate_gradients, grad_logits
from .forward import logsumexp_forward
from .utils import INTERPRET

DEFAULT_MEMORY_BUDGET_MB = {"cuda": 512, "cpu": 16}


def _check_device(tensor: Tensor) -> None:
    if tensor.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            "fused_luffy_loss: `backend`='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
            "before luffy_fast.kernels is imported to run the kernels on the CPU interpreter")
    if tensor.dtype == torch.float64:
        raise ValueError("fused_luffy_loss: `hidden` is float64, which the triton backend does not "
                         "take (bf16, fp16, fp32); use backend='torch' or 'reference'")


def _budget_bytes(config: LuffyLossConfig, device: torch.device) -> int:
    budget = config.memory_budget_mb or DEFAULT_MEMORY_BUDGET_MB.get(device.type, 64)
    return int(budget * 2**20)


@dataclass
class _BackwardState:
    """What the backward needs, restricted to the active tokens."""

    rows: Tensor  # rows of hidden
    targets: Tensor
    lse: Tensor
    coef: Tensor  # dL/d log pi with the normalizer
    entropy_weight: Optional[Tensor]
    expected_logit: Optional[Tensor]
    kept_rows: Optional[Tensor]  # rows of `kept`
    kept: Optional[Tensor]  # [N, V] logits from the forward (input dtype), when the budget allowed
    temperature: float
    budget: int


@torch.no_grad()
def _forward(inputs: LossInputs, hidden: Tensor, weight: Tensor, needs_grad: bool):
    config = inputs.config
    bias = None if inputs.bias is None else inputs.bias.detach()
    with_entropy = config.entropy_coef > 0
    N, V = inputs.rows.numel(), weight.shape[0]
    budget = _budget_bytes(config, hidden.device)
    keep_logits = needs_grad and 0 < N * V * hidden.element_size() <= budget // 2

    lse, logprobs, expected_logit, kept = logsumexp_forward(
        hidden, weight, bias, inputs.rows, inputs.targets, config.temperature, with_entropy,
        keep_logits=keep_logits)
    terms = loss_math.policy_terms(logprobs, inputs.old_logprobs, inputs.advantages,
                                   inputs.off_policy_mask, config)
    token_weight = inputs.norm.weights.float()
    loss = (token_weight * terms.loss.float()).sum()
    entropy = entropy_weight = None
    coef = token_weight * terms.grad_coef.float()
    active = coef != 0
    if with_entropy:
        entropy = lse - expected_logit
        entropy_weight = token_weight * config.entropy_coef
        loss = loss - (entropy_weight * entropy).sum()
        active = active | (entropy_weight != 0)
    stats = loss_math.summarize(logprobs, entropy, terms, inputs.loss_mask, inputs.off_policy_mask,
                                inputs.norm)
    state = None
    if needs_grad:
        # Only tokens with something to contribute go to the backward.
        position = active.nonzero().squeeze(1)
        pick = lambda t: None if t is None else t[position].contiguous()  # noqa: E731
        state = _BackwardState(
            rows=pick(inputs.rows), targets=pick(inputs.targets), lse=pick(lse), coef=pick(coef),
            entropy_weight=pick(entropy_weight), expected_logit=pick(expected_logit),
            kept_rows=position if kept is not None else None, kept=kept,
            temperature=config.temperature, budget=budget)
    return loss, stats, state


class _TritonBackward(torch.autograd.Function):
    """Returns the forward's loss; its backward runs the gradient kernels on the active tokens."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, state: _BackwardState):
        ctx.state = state
        ctx.save_for_backward(hidden, weight, bias)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, weight, bias = ctx.saved_tensors
        state, ctx.state = ctx.state, None
        _, need_hidden, need_weight, need_bias = ctx.needs_input_grad[:4]
        need_bias = need_bias and bias.numel() > 0
        V = weight.shape[0]
        # The loss is linear in coef and entropy_weight: fold the upstream gradient into them.
        coef = state.coef * grad_loss
        entropy_weight = None if state.entropy_weight is None else state.entropy_weight * grad_loss
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # d(weight) accumulates in the weight's dtype, through GEMMs with fp32 accumulation.
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_bias else None
        bias_or_none = bias if bias.numel() > 0 else None

        A = state.rows.numel()
        chunk = max(16, min(A, state.budget // (V * hidden.element_size())))
        buffer = torch.empty((min(chunk, A), V), dtype=hidden.dtype, device=hidden.device)
        sub = lambda t, part: None if t is None else t[part]  # noqa: E731
        for start in range(0, A, chunk):
            part = slice(start, min(start + chunk, A))
            rows = state.rows[part]
            out = buffer[: rows.numel()]
            grad_logits(hidden, weight, bias_or_none, rows, sub(state.kept_rows, part), state.kept,
                        state.targets[part], state.lse[part], coef[part],
                        sub(entropy_weight, part), sub(state.expected_logit, part),
                        state.temperature, out)
            accumulate_gradients(out, hidden[rows], weight, rows, grad_hidden, grad_weight,
                                 grad_bias)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return None, grad_hidden, grad_weight, grad_bias, None


def triton_loss(inputs: LossInputs) -> tuple[Tensor, dict]:
    _check_device(inputs.hidden)
    hidden, weight = inputs.hidden.detach().contiguous(), inputs.weight.detach().contiguous()
    bias = inputs.bias
    enabled = torch.is_grad_enabled()
    needs_grad = enabled and (inputs.hidden.requires_grad or inputs.weight.requires_grad or
                              (bias is not None and bias.requires_grad))
    loss, stats, state = _forward(inputs, hidden, weight, needs_grad)
    if needs_grad:
        if bias is None:  # autograd.Function needs a tensor slot; an empty one takes no gradient
            bias = torch.empty(0, device=hidden.device, dtype=hidden.dtype)
        loss = _TritonBackward.apply(loss, inputs.hidden, inputs.weight, bias, state)
    return loss, stats


@torch.no_grad()
def triton_token_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          config: LuffyLossConfig, with_entropy: bool):
    _check_device(hidden)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    lse, logprobs, expected_logit, _ = logsumexp_forward(
        hidden.contiguous(), weight.contiguous(), bias, rows, targets, config.temperature,
        with_entropy)
    return logprobs, (lse - expected_logit) if with_entropy else None
