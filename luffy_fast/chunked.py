"""The chunked PyTorch backend: loss and both gradients in one sweep over token chunks.

Never holds more than [chunk, V] logits. Each chunk's logits give the log-probs, the per-token
loss terms (loss_math) and, for the tokens that have anything to contribute, dL/dz, which goes
straight into fp32 accumulators for d(hidden), d(weight) and d(bias). The autograd backward only
scales those stored gradients, so nothing is recomputed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import loss_math
from .config import LuffyLossConfig
from .ops import LossInputs

DEFAULT_MEMORY_BUDGET_MB = 64
MIN_CHUNK, MAX_CHUNK = 16, 8192


def chunk_size(vocab_size: int, config: LuffyLossConfig, buffers: int = 2) -> int:
    """Tokens per chunk so that `buffers` fp32 [chunk, V] tensors fit the memory budget."""
    budget_mb = config.memory_budget_mb or DEFAULT_MEMORY_BUDGET_MB
    rows = int(budget_mb * 2**20 // (buffers * 4 * vocab_size))
    return max(MIN_CHUNK, min(MAX_CHUNK, rows))


def _upcast(tensor: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if tensor is None else tensor.detach().to(dtype)


class _ChunkedLogits:
    """Computes fp32 (or fp64) logits for a chunk of rows; low-precision weights are upcast once."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], temperature: float,
                 dtype: torch.dtype):
        self.weight = _upcast(weight, dtype)
        self.bias = _upcast(bias, dtype)
        self.inv_temperature = 1.0 / temperature
        self.dtype = dtype

    def __call__(self, hidden_rows: Tensor) -> Tensor:
        hidden_rows = hidden_rows.detach().to(self.dtype)
        if self.bias is None:
            logits = hidden_rows @ self.weight.T
        else:
            logits = torch.addmm(self.bias, hidden_rows, self.weight.T)
        if self.inv_temperature != 1.0:
            logits.mul_(self.inv_temperature)
        return logits


def _softmax_parts(logits: Tensor, targets: Tensor, with_entropy: bool, with_probs: bool = True):
    """From a [C, V] logit chunk: probabilities (a new buffer), logsumexp, log-probs, and with
    entropy (row max, E_p[z] - row max): the shifted form keeps z - E_p[z] exact when p is peaked.
    With entropy, `logits` is left holding z - row max.

    Goes through torch's fused log_softmax, several times faster on the CPU than separate max,
    exp and sum passes.
    """
    log_probs = torch.log_softmax(logits, dim=1)
    logprobs = log_probs.gather(1, targets[:, None]).squeeze(1)
    lse = logits.gather(1, targets[:, None]).squeeze(1) - logprobs
    if not with_probs:
        return None, lse, logprobs, None
    probs = log_probs.exp_()
    expected = None
    if with_entropy:
        # Shifts `logits` in place to z - max (callers use them so from here on); row dots by bmm
        # need no [C, V] temporary.
        row_max = logits.amax(dim=1)
        shifted = logits.sub_(row_max[:, None])
        expected = (row_max, torch.bmm(probs[:, None, :], shifted[:, :, None]).reshape(-1))
    # As pi -> 1, z_y - logsumexp cancels; 1 - pi summed over the other entries does not.
    target_probs = probs.gather(1, targets[:, None])
    others = probs.scatter_(1, targets[:, None], 0.0).sum(dim=1)
    probs.scatter_(1, targets[:, None], target_probs)
    logprobs = torch.where(others < 0.5, torch.log1p(-others), logprobs)
    return probs, lse, logprobs, expected


@torch.no_grad()
def _sweep(inputs: LossInputs, need_hidden: bool, need_weight: bool, need_bias: bool):
    """One pass over token chunks: loss, per-token values for the stats, and the gradients."""
    hidden, weight, bias = inputs.hidden, inputs.weight, inputs.bias
    config, dtype, device = inputs.config, inputs.compute_dtype, hidden.device
    V, N = weight.shape[0], inputs.rows.numel()
    grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=device) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=device) if need_weight else None
    grad_bias = torch.zeros(V, dtype=dtype, device=device) if need_bias else None
    any_grad = need_hidden or need_weight or need_bias

    logits_of = _ChunkedLogits(weight, bias, config.temperature, dtype)
    with_entropy = config.entropy_coef > 0
    logprobs = torch.empty(N, dtype=dtype, device=device)
    entropy = torch.empty(N, dtype=dtype, device=device) if with_entropy else None
    ratio = torch.empty(N, dtype=dtype, device=device)
    clipped = torch.empty(N, dtype=torch.bool, device=device)
    loss = torch.zeros((), dtype=dtype, device=device)
    step = chunk_size(V, config)

    # Tokens with zero advantage and no entropy term can never contribute a gradient: sweep them
    # last, in chunks of their own, which only need log-probs for the stats.
    may_contribute = inputs.advantages != 0
    if with_entropy or bool(may_contribute.all()):
        order, num_contributing = None, N
    else:
        order = torch.cat([may_contribute.nonzero().squeeze(1), (~may_contribute).nonzero().squeeze(1)])
        num_contributing = int(may_contribute.sum())
    boundaries = [(start, min(start + step, num_contributing)) for start in range(0, num_contributing, step)]
    boundaries += [(start, min(start + step, N)) for start in range(num_contributing, N, step)]

    for start, stop in boundaries:
        part = slice(start, stop) if order is None else order[start:stop]
        rows, targets = inputs.rows[part], inputs.targets[part]
        hidden_rows = hidden[rows]
        logits = logits_of(hidden_rows)
        forward_only = start >= num_contributing  # log-probs for the stats; the loss term is 0
        probs, lse, lp, expected = _softmax_parts(logits, targets, with_entropy,
                                                  with_probs=not forward_only)
        terms = loss_math.policy_terms(
            lp, None if inputs.old_logprobs is None else inputs.old_logprobs[part],
            inputs.advantages[part], inputs.off_policy_mask[part], config)
        logprobs[part], ratio[part], clipped[part] = lp, terms.ratio, terms.clipped
        if forward_only:
            continue
        token_weight = inputs.norm.weights[part]
        loss += (token_weight * terms.loss).sum()
        coef = token_weight * terms.grad_coef  # dL/d log pi, normalizer included
        entropy_weight = None
        if with_entropy:
            row_max, expected_shift = expected
            entropy[part] = (lse - row_max) - expected_shift
            entropy_weight = token_weight * config.entropy_coef
            loss -= (entropy_weight * entropy[part]).sum()
        if not any_grad:
            continue

        # Tokens with nothing to contribute (clipped, zero advantage, no entropy) are skipped.
        active = coef != 0 if entropy_weight is None else (coef != 0) | (entropy_weight != 0)
        if not bool(active.all()):
            index = active.nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            probs, coef, targets, rows = probs[index], coef[index], targets[index], rows[index]
            hidden_rows, logits, lp = hidden_rows[index], logits[index], lp[index]
            if entropy_weight is not None:
                entropy_weight = entropy_weight[index]
                row_max, expected_shift = row_max[index], expected_shift[index]

        # dL/dz = g (e_y - p) + c_ent p (z - E_p[z]), then 1/temperature for z = hW^T / tau.
        # At the target, g (1 - p_y) = -g expm1(log p_y): no cancellation when p_y is near 1.
        target_grad = -coef * torch.expm1(lp)
        grad_logits = probs  # overwritten in place
        if entropy_weight is None:
            grad_logits.mul_(-coef[:, None])
        else:
            # z - E_p[z] = (z - max) - (E_p[z] - max): exact for a peaked distribution.
            shift = logits.sub_(expected_shift[:, None])  # logits already hold z - max
            target_grad += entropy_weight * lp.exp() * shift.gather(1, targets[:, None]).squeeze(1)
            shift.mul_(entropy_weight[:, None])
            grad_logits.mul_(shift.sub_(coef[:, None]))
        grad_logits.scatter_(1, targets[:, None], target_grad[:, None])
        if config.temperature != 1.0:
            grad_logits.mul_(1.0 / config.temperature)

        if need_hidden:
            grad_hidden[rows] = grad_logits @ logits_of.weight
        if need_weight:
            grad_weight.addmm_(grad_logits.T, hidden_rows.to(dtype))
        if need_bias:
            grad_bias += grad_logits.sum(dim=0)

    terms = loss_math.PolicyTerms(loss=None, grad_coef=None, ratio=ratio, clipped=clipped)
    stats = loss_math.summarize(logprobs, entropy, terms, inputs.loss_mask, inputs.off_policy_mask,
                                inputs.norm)
    return loss, (grad_hidden, grad_weight, grad_bias), stats


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
    return AttachGradients.apply(loss, inputs.hidden, inputs.weight, bias_slot(inputs), grads)


def wants_grad(inputs: LossInputs) -> tuple[bool, bool, bool]:
    enabled = torch.is_grad_enabled()
    return (enabled and inputs.hidden.requires_grad,
            enabled and inputs.weight.requires_grad,
            enabled and inputs.bias is not None and inputs.bias.requires_grad)


def chunked_loss(inputs: LossInputs) -> tuple[Tensor, dict]:
    needs = wants_grad(inputs)
    loss, grads, stats = _sweep(inputs, *needs)
    if any(needs):
        loss = attach_gradients(loss, inputs, grads)
    return loss, stats


@torch.no_grad()
def chunked_token_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                           targets: Tensor, config: LuffyLossConfig, with_entropy: bool):
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits_of = _ChunkedLogits(weight, bias, config.temperature, dtype)
    T = hidden.shape[0]
    logprobs = torch.empty(T, dtype=dtype, device=hidden.device)
    entropy = torch.empty(T, dtype=dtype, device=hidden.device) if with_entropy else None
    step = chunk_size(weight.shape[0], config, buffers=2)
    for start in range(0, T, step):
        part = slice(start, min(start + step, T))
        logits = logits_of(hidden[part])
        _, lse, lp, expected = _softmax_parts(logits, targets[part], with_entropy,
                                              with_probs=with_entropy)
        logprobs[part] = lp
        if with_entropy:
            row_max, expected_shift = expected
            entropy[part] = (lse - row_max) - expected_shift
    return logprobs, entropy
