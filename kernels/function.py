"""The `triton` backend: strategy choice and the autograd glue around the kernels.

Two strategies, chosen from the memory budget (LuffyLossConfig.memory_budget_mb):

- kept logits (the budget holds a useful chunk of fp32 logits plus its dL/dz): per chunk of loss
  tokens one GEMM writes the raw logits, the forward kernel reads them for logsumexp and
  log-probs, and the gradient is formed from the same logits right away: 6 T H V FLOPs, no
  recompute. The backward only scales the stored gradients.
- recompute (small budgets): the forward kernel multiplies tiles in SRAM and never writes logits;
  the backward recomputes logit tiles for the active tokens only: 8 T H V FLOPs.

The per-token epilogue (ratio, shaping, clipping, normalizer, gradient coefficient) is
luffy_fast.loss_math on [N] vectors: the same definition as the other backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Optional

import torch
from torch import Tensor

from luffy_fast import loss_math
from luffy_fast.chunked import AttachGradients
from luffy_fast.config import LuffyLossConfig
from luffy_fast.ops import LossInputs

from .backward import accumulate_gradients, grad_logits
from .forward import logsumexp_forward
from .utils import INTERPRET

DEFAULT_MEMORY_BUDGET_MB = {"cuda": 1024, "cpu": 16}
# Below this many rows per chunk, GEMMs get too thin to pay for keeping logits (the d(weight)
# update re-reads and re-writes the whole [V, H] gradient once per chunk).
MIN_KEPT_ROWS = {"cuda": 256, "cpu": 16}


def _check_device(tensor: Tensor) -> None:
    if tensor.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            "fused_luffy_loss: `backend`='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
            "before luffy_fast.kernels is imported to run the kernels on the CPU interpreter")
    if tensor.dtype == torch.float64:
        raise ValueError("fused_luffy_loss: `hidden` is float64, which the triton backend does not "
                         "take (bf16, fp16, fp32); use backend='torch' or 'reference'")


def plan(config: LuffyLossConfig, device: torch.device, num_tokens: int, vocab_size: int,
         element_size: int) -> tuple[str, int]:
    """("kept", rows per chunk) or ("recompute", rows per backward chunk) for this budget."""
    budget = int((config.memory_budget_mb or DEFAULT_MEMORY_BUDGET_MB.get(device.type, 64)) * 2**20)
    kept_rows = budget // (vocab_size * (4 + element_size))
    if num_tokens > 0 and kept_rows >= min(num_tokens, MIN_KEPT_ROWS.get(device.type, 16)):
        return "kept", min(kept_rows, num_tokens)
    return "recompute", max(16, min(num_tokens, budget // (vocab_size * element_size)))


@cache
def _mm_has_out_dtype(device_type: str) -> bool:
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def raw_logits(hidden_rows: Tensor, weight: Tensor) -> Tensor:
    """h W^T in fp32 through a GEMM (bf16/fp16 operands accumulate and write in fp32)."""
    if hidden_rows.dtype == torch.float32:
        return hidden_rows @ weight.T
    if _mm_has_out_dtype(hidden_rows.device.type):
        return torch.mm(hidden_rows, weight.T, out_dtype=torch.float32)
    return (hidden_rows @ weight.T).float()  # fallback: bf16-rounded logits


class _Terms:
    """The epilogue of one group of tokens: loss, gradient coefficients, per-token stats."""

    def __init__(self, inputs: LossInputs, part: slice, lse: Tensor, logprobs: Tensor,
                 row_max: Tensor, expected_shift: Optional[Tensor]):
        config = inputs.config
        old = None if inputs.old_logprobs is None else inputs.old_logprobs[part]
        terms = loss_math.policy_terms(logprobs, old, inputs.advantages[part],
                                       inputs.off_policy_mask[part], config)
        token_weight = inputs.norm.weights[part].float()
        self.logprobs, self.ratio, self.clipped = logprobs, terms.ratio, terms.clipped
        self.loss = (token_weight * terms.loss.float()).sum()
        self.coef = token_weight * terms.grad_coef.float()
        self.active = self.coef != 0
        self.entropy = self.entropy_weight = None
        if expected_shift is not None:
            self.entropy = (lse - row_max) - expected_shift
            self.entropy_weight = token_weight * config.entropy_coef
            self.loss = self.loss - (self.entropy_weight * self.entropy).sum()
            self.active = self.active | (self.entropy_weight != 0)


def _stats(inputs: LossInputs, groups: list) -> dict:
    cat = lambda name: torch.cat([getattr(g, name) for g in groups])  # noqa: E731
    terms = loss_math.PolicyTerms(loss=None, grad_coef=None, ratio=cat("ratio"), clipped=cat("clipped"))
    entropy = cat("entropy") if groups[0].entropy is not None else None
    return loss_math.summarize(cat("logprobs"), entropy, terms, inputs.loss_mask,
                               inputs.off_policy_mask, inputs.norm)


def _pick(tensor: Optional[Tensor], index: Tensor) -> Optional[Tensor]:
    return None if tensor is None else tensor[index].contiguous()


@torch.no_grad()
def _kept_logits_pass(inputs: LossInputs, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                      chunk: int, needs: tuple[bool, bool, bool]):
    """Loss, stats and gradients in one sweep over chunks of logits written by a GEMM (N > 0)."""
    config = inputs.config
    with_entropy = config.entropy_coef > 0
    need_hidden, need_weight, need_bias = needs
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight = torch.zeros_like(weight) if need_weight else None
    grad_bias = None
    if need_bias:
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    N = inputs.rows.numel()
    groups, loss = [], torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_buffer = torch.empty((min(chunk, N), weight.shape[0]), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, N, chunk):
        part = slice(start, min(start + chunk, N))
        rows, targets = inputs.rows[part], inputs.targets[part]
        logits = raw_logits(hidden[rows], weight)
        lse, logprobs, row_max, expected_shift = logsumexp_forward(
            hidden, weight, bias, rows, targets, config.temperature, with_entropy, logits=logits)
        terms = _Terms(inputs, part, lse, logprobs, row_max, expected_shift)
        groups.append(terms)
        loss += terms.loss
        position = terms.active.nonzero().squeeze(1)
        if position.numel() == 0:
            continue
        out = grad_buffer[: position.numel()]
        grad_logits(hidden, weight, bias, rows[position].contiguous(), targets[position].contiguous(),
                    lse[position].contiguous(), logprobs[position].contiguous(),
                    terms.coef[position].contiguous(),
                    _pick(terms.entropy_weight, position), _pick(row_max, position),
                    _pick(expected_shift, position), config.temperature, out, logits=logits,
                    logit_rows=position)
        active_rows = rows[position]
        accumulate_gradients(out, hidden[active_rows], weight, active_rows, grad_hidden,
                             grad_weight, grad_bias)
    return loss, _stats(inputs, groups), (grad_hidden, grad_weight, grad_bias)


@dataclass
class _BackwardState:
    """What the recompute backward needs, restricted to the active tokens."""

    rows: Tensor  # rows of hidden
    targets: Tensor
    lse: Tensor
    logprobs: Tensor
    coef: Tensor  # dL/d log pi with the normalizer
    entropy_weight: Optional[Tensor]
    row_max: Optional[Tensor]
    expected_shift: Optional[Tensor]  # E_p[z] - max
    temperature: float
    chunk: int


@torch.no_grad()
def _recompute_forward(inputs: LossInputs, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                       chunk: int, needs_grad: bool):
    config = inputs.config
    lse, logprobs, row_max, expected_shift = logsumexp_forward(
        hidden, weight, bias, inputs.rows, inputs.targets, config.temperature,
        config.entropy_coef > 0)
    terms = _Terms(inputs, slice(0, inputs.rows.numel()), lse, logprobs, row_max, expected_shift)
    state = None
    if needs_grad:
        position = terms.active.nonzero().squeeze(1)  # only these go to the backward
        state = _BackwardState(
            rows=_pick(inputs.rows, position), targets=_pick(inputs.targets, position),
            lse=_pick(lse, position), logprobs=_pick(logprobs, position),
            coef=_pick(terms.coef, position),
            entropy_weight=_pick(terms.entropy_weight, position),
            row_max=_pick(row_max, position) if expected_shift is not None else None,
            expected_shift=_pick(expected_shift, position), temperature=config.temperature,
            chunk=chunk)
    return terms.loss, _stats(inputs, [terms]), state


class _RecomputeBackward(torch.autograd.Function):
    """Returns the forward's loss; its backward recomputes logit tiles of the active tokens."""

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
        has_bias = bias.numel() > 0
        need_bias = need_bias and has_bias
        hidden_c, weight_c = hidden.detach().contiguous(), weight.detach().contiguous()
        # The loss is linear in coef and entropy_weight: fold the upstream gradient into them.
        coef = state.coef * grad_loss
        entropy_weight = None if state.entropy_weight is None else state.entropy_weight * grad_loss
        grad_hidden = torch.zeros_like(hidden_c) if need_hidden else None
        # d(weight) accumulates in the weight's dtype, through GEMMs with fp32 accumulation.
        grad_weight = torch.zeros_like(weight_c) if need_weight else None
        grad_bias = None
        if need_bias:
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)

        A, chunk = state.rows.numel(), state.chunk
        buffer = torch.empty((min(chunk, A), weight.shape[0]), dtype=hidden.dtype, device=hidden.device)
        sub = lambda t, part: None if t is None else t[part]  # noqa: E731
        for start in range(0, A, chunk):
            part = slice(start, min(start + chunk, A))
            rows = state.rows[part]
            out = buffer[: rows.numel()]
            grad_logits(hidden_c, weight_c, bias if has_bias else None, rows, state.targets[part],
                        state.lse[part], state.logprobs[part], coef[part], sub(entropy_weight, part),
                        sub(state.row_max, part), sub(state.expected_shift, part),
                        state.temperature, out)
            accumulate_gradients(out, hidden_c[rows], weight_c, rows, grad_hidden, grad_weight,
                                 grad_bias)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return None, grad_hidden, grad_weight, grad_bias, None


def triton_loss(inputs: LossInputs) -> tuple[Tensor, dict]:
    _check_device(inputs.hidden)
    hidden, weight = inputs.hidden.detach().contiguous(), inputs.weight.detach().contiguous()
    bias = None if inputs.bias is None else inputs.bias.detach().contiguous()
    enabled = torch.is_grad_enabled()
    needs = (enabled and inputs.hidden.requires_grad, enabled and inputs.weight.requires_grad,
             enabled and bias is not None and inputs.bias.requires_grad)
    strategy, chunk = plan(inputs.config, hidden.device, inputs.rows.numel(), weight.shape[0],
                           hidden.element_size())
    # An autograd.Function needs a tensor in the bias slot; an empty one takes no gradient.
    bias_slot = inputs.bias if inputs.bias is not None else torch.empty(0, device=hidden.device,
                                                                         dtype=hidden.dtype)
    if strategy == "kept" and any(needs):
        loss, stats, grads = _kept_logits_pass(inputs, hidden, weight, bias, chunk, needs)
        loss = AttachGradients.apply(loss, inputs.hidden, inputs.weight, bias_slot, grads)
        return loss, stats
    loss, stats, state = _recompute_forward(inputs, hidden, weight, bias, chunk, any(needs))
    if any(needs):
        loss = _RecomputeBackward.apply(loss, inputs.hidden, inputs.weight, bias_slot, state)
    return loss, stats


@torch.no_grad()
def triton_token_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          config: LuffyLossConfig, with_entropy: bool):
    _check_device(hidden)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    lse, logprobs, row_max, expected_shift = logsumexp_forward(
        hidden.contiguous(), weight.contiguous(), bias, rows, targets, config.temperature,
        with_entropy)
    return logprobs, ((lse - row_max) - expected_shift) if with_entropy else None
