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

from .autograd import attach_gradients, wants_grad
from .config import LuffyLossConfig
from .gemm import fp32_logits
from .inputs import LossInputs
from .loss_math import TokenTerms, entropy_from_moments

MIN_CHUNK, MAX_CHUNK = 16, 8192


def chunk_size(vocab_size: int, budget_bytes: int, buffers: float = 2) -> int:
    """Tokens per chunk so that `buffers` fp32 [chunk, V] tensors fit the memory budget."""
    rows = int(budget_bytes // (buffers * 4 * vocab_size))
    return max(MIN_CHUNK, min(MAX_CHUNK, rows))


def _upcast(tensor: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if tensor is None else tensor.detach().to(dtype)


def gemm_dtype(hidden: Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    """The GEMMs' operand dtype: bf16/fp16 inputs stay so on CUDA (tensor cores, fp32 accumulation
    and fp32 logits); elsewhere, and for fp32/fp64, the compute dtype (CPU numerics unchanged)."""
    if hidden.device.type == "cuda" and hidden.dtype in (torch.bfloat16, torch.float16):
        return hidden.dtype
    return compute_dtype


class _ChunkedLogits:
    """Computes fp32 (or fp64) logits for a chunk of rows. Weights in a low-precision GEMM dtype
    are used as they are (fp32 output); otherwise they are upcast once to the compute dtype."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], temperature: float,
                 dtype: torch.dtype, operand_dtype: Optional[torch.dtype] = None):
        self.operand_dtype = operand_dtype or dtype
        self.weight = _upcast(weight, self.operand_dtype)
        self.bias = _upcast(bias, dtype)
        self.inv_temperature = 1.0 / temperature
        self.dtype = dtype

    def __call__(self, hidden_rows: Tensor) -> Tensor:
        hidden_rows = hidden_rows.detach().to(self.operand_dtype)
        if self.operand_dtype != self.dtype:
            logits = fp32_logits(hidden_rows, self.weight)  # self.dtype is fp32 here
            if self.bias is not None:
                logits += self.bias
        elif self.bias is None:
            logits = hidden_rows @ self.weight.T
        else:
            logits = torch.addmm(self.bias, hidden_rows, self.weight.T)
        if self.inv_temperature != 1.0:
            logits.mul_(self.inv_temperature)
        return logits


def _softmax_parts(logits: Tensor, targets: Tensor, with_entropy: bool, with_probs: bool = True):
    """From a [C, V] logit chunk: probabilities (a new buffer), log-probs and, with entropy, the
    entropy and E_p[z] - row max (the shifted form keeps z - E_p[z] exact when p is peaked).
    With entropy, `logits` is left holding z - row max.

    Goes through torch's fused log_softmax, several times faster on the CPU than separate max,
    exp and sum passes.
    """
    log_probs = torch.log_softmax(logits, dim=1)
    logprobs = log_probs.gather(1, targets[:, None]).squeeze(1)
    lse = logits.gather(1, targets[:, None]).squeeze(1) - logprobs
    if not with_probs:
        return None, logprobs, None, None
    probs = log_probs.exp_()
    entropy = expected_shift = None
    if with_entropy:
        # Shifts `logits` in place to z - max (callers use them so from here on); row dots by bmm
        # need no [C, V] temporary.
        row_max = logits.amax(dim=1)
        shifted = logits.sub_(row_max[:, None])
        expected_shift = torch.bmm(probs[:, None, :], shifted[:, :, None]).reshape(-1)
        entropy = entropy_from_moments(lse, row_max, expected_shift)
    # As pi -> 1, z_y - logsumexp cancels; 1 - pi summed over the other entries does not.
    target_probs = probs.gather(1, targets[:, None])
    others = probs.scatter_(1, targets[:, None], 0.0).sum(dim=1)
    probs.scatter_(1, targets[:, None], target_probs)
    logprobs = torch.where(others < 0.5, torch.log1p(-others), logprobs)
    return probs, logprobs, entropy, expected_shift


def _chunks(inputs: LossInputs, step: int) -> tuple[Optional[Tensor], list, int]:
    """The order of the loss tokens, chunk boundaries in it, and how many may contribute.

    Tokens that can never contribute a gradient (LossInputs.may_carry_gradient: zero advantage
    and no entropy term) go last, in chunks of their own, which only need log-probs for the stats.
    """
    N = inputs.rows.numel()
    may_contribute = inputs.may_carry_gradient()
    if bool(may_contribute.all()):
        order, num_contributing = None, N
    else:
        order = torch.cat([may_contribute.nonzero().squeeze(1), (~may_contribute).nonzero().squeeze(1)])
        num_contributing = int(may_contribute.sum())
    boundaries = [(start, min(start + step, num_contributing)) for start in range(0, num_contributing, step)]
    boundaries += [(start, min(start + step, N)) for start in range(num_contributing, N, step)]
    return order, boundaries, num_contributing


def _grad_logits(probs: Tensor, logits: Tensor, targets: Tensor, logprobs: Tensor, coef: Tensor,
                 entropy_weight: Optional[Tensor], expected_shift: Optional[Tensor],
                 temperature: float) -> Tensor:
    """dL/dz = g (e_y - p) + c_ent p (z - E_p[z]), then 1/temperature for z = hW^T / tau, formed in
    `probs`. With entropy, `logits` hold z - max (and are overwritten)."""
    # At the target, g (1 - p_y) = -g expm1(log p_y): no cancellation when p_y is near 1.
    target_grad = -coef * torch.expm1(logprobs)
    grad_logits = probs  # overwritten in place
    if entropy_weight is None:
        grad_logits.mul_(-coef[:, None])
    else:
        # z - E_p[z] = (z - max) - (E_p[z] - max): exact for a peaked distribution.
        shift = logits.sub_(expected_shift[:, None])
        target_grad += entropy_weight * logprobs.exp() * shift.gather(1, targets[:, None]).squeeze(1)
        shift.mul_(entropy_weight[:, None])
        grad_logits.mul_(shift.sub_(coef[:, None]))
    grad_logits.scatter_(1, targets[:, None], target_grad[:, None])
    if temperature != 1.0:
        grad_logits.mul_(1.0 / temperature)
    return grad_logits


def _select(index: Tensor, *tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    return [None if tensor is None else tensor[index] for tensor in tensors]


@torch.no_grad()
def _sweep(inputs: LossInputs, need_hidden: bool, need_weight: bool, need_bias: bool):
    """One pass over token chunks: loss, per-token values for the stats, and the gradients."""
    hidden, weight, bias = inputs.hidden, inputs.weight, inputs.bias
    config, dtype, device = inputs.config, inputs.compute_dtype, hidden.device
    # Low-precision GEMMs on CUDA: dL/dz goes to them in the input dtype and d(hidden), d(weight)
    # accumulate in it, as the triton backend does; elsewhere all in the compute dtype.
    operand = gemm_dtype(hidden, dtype)
    grad_hidden = torch.zeros(hidden.shape, dtype=operand, device=device) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=operand, device=device) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=device) if need_bias else None
    any_grad = need_hidden or need_weight or need_bias

    logits_of = _ChunkedLogits(weight, bias, config.temperature, dtype, operand)
    with_entropy = config.entropy_coef > 0
    loss = torch.zeros((), dtype=dtype, device=device)
    groups = []
    # With low-precision GEMMs, dL/dz's cast is half an fp32 buffer more.
    step = chunk_size(weight.shape[0], config.memory_budget_bytes(device),
                      buffers=2 if operand == dtype else 2.5)
    order, boundaries, num_contributing = _chunks(inputs, step)

    for start, stop in boundaries:
        part = slice(start, stop) if order is None else order[start:stop]
        rows, targets = inputs.rows[part], inputs.targets[part]
        hidden_rows = hidden[rows]
        logits = logits_of(hidden_rows)
        forward_only = start >= num_contributing  # log-probs for the stats; the loss term is 0
        # forward-only tokens need only their log-probs, and their entropies for the stats (a
        # token whose entropy weight underflowed to 0 is forward-only with the entropy term on)
        probs, lp, entropy, expected_shift = _softmax_parts(
            logits, targets, with_entropy, with_probs=not forward_only or with_entropy)
        terms = inputs.token_terms(part, lp, entropy)
        groups.append(terms)
        loss += terms.loss  # forward-only tokens add 0, or NaN for a non-finite log-prob
        if not any_grad:
            continue
        if forward_only:
            if not bool(terms.active.any()):
                continue
            # rare: a non-finite log-prob, whose NaN the exact gradient carries (as autograd's
            # 0 x NaN in the reference); its probabilities were left out above
            probs, _, _, expected_shift = _softmax_parts(logits, targets, with_entropy)

        # Tokens with nothing to contribute (clipped, zero advantage, no entropy) are skipped.
        per_token = (probs, logits, targets, terms.logprobs, terms.coef, terms.entropy_weight,
                     expected_shift, rows, hidden_rows)
        if not bool(terms.active.all()):
            index = terms.active.nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            per_token = _select(index, *per_token)
        *parts, rows, hidden_rows = per_token
        grad_logits = _grad_logits(*parts, config.temperature)
        if need_bias:
            grad_bias += grad_logits.sum(dim=0)
        grad_logits = grad_logits.to(operand)
        if need_hidden:
            grad_hidden[rows] = grad_logits @ logits_of.weight
        if need_weight:
            grad_weight.addmm_(grad_logits.T, hidden_rows.to(operand))

    if not groups:  # no loss tokens
        empty = torch.empty(0, dtype=dtype, device=device)
        groups.append(inputs.token_terms(slice(0, 0), empty, empty if with_entropy else None))
    stats = inputs.summarize(TokenTerms.cat(groups), order)
    return loss, (grad_hidden, grad_weight, grad_bias), stats


def chunked_loss(inputs: LossInputs) -> tuple[Tensor, dict]:
    if inputs.config.grad_filter is not None:
        # Its saving is skipped GEMM blocks, which whole-chunk torch GEMMs cannot skip.
        raise ValueError("LuffyLossConfig.grad_filter: the gradient filter is an option of the "
                         "triton backend; use backend='triton' or grad_filter=None with 'torch'")
    needs = wants_grad(inputs)
    loss, grads, stats = _sweep(inputs, *needs)
    if any(needs):
        loss = attach_gradients(loss, inputs, grads)
    return loss, stats


@torch.no_grad()
def chunked_token_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                           targets: Tensor, config: LuffyLossConfig, with_entropy: bool):
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits_of = _ChunkedLogits(weight, bias, config.temperature, dtype, gemm_dtype(hidden, dtype))
    T = hidden.shape[0]
    logprobs = torch.empty(T, dtype=dtype, device=hidden.device)
    entropy = torch.empty(T, dtype=dtype, device=hidden.device) if with_entropy else None
    step = chunk_size(weight.shape[0], config.memory_budget_bytes(hidden.device), buffers=2)
    for start in range(0, T, step):
        part = slice(start, min(start + step, T))
        logits = logits_of(hidden[part])
        _, logprobs[part], part_entropy, _ = _softmax_parts(logits, targets[part], with_entropy,
                                                            with_probs=with_entropy)
        if with_entropy:
            entropy[part] = part_entropy
    return logprobs, entropy
