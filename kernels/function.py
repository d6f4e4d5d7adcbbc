"""The `triton` backend: strategy choice and the autograd glue around the kernels.

Two strategies, chosen from the memory budget (LuffyLossConfig.memory_budget_mb):

- kept logits (the budget holds a useful chunk of fp32 logits, or 16-bit ones with
  LuffyLossConfig.logits_dtype = "input"): per chunk of loss tokens one GEMM writes the raw
  logits, the forward kernel reads them for logsumexp and log-probs, and dL/dz is written over
  the same logits right away: 6 T H V FLOPs, no recompute. Tokens that cannot carry a gradient
  (zero-advantage groups) are ordered first and get the forward only. The backward runs the
  last chunk's d(weight) GEMM with the upstream gradient in its scalars and scales the rest
  (kernels/gradients.py: KeptGradients).
- recompute (small budgets): the forward kernel multiplies tiles in SRAM and never writes logits;
  the backward recomputes logit tiles for the active tokens only: 8 T H V FLOPs.

The per-token epilogue (ratio, shaping, clipping, normalizer, gradient coefficient, entropy) is
one kernel launch per chunk (kernels/epilogue.py), held to luffy_fast.loss_math.token_terms, the
definition the other backends use, by tests/test_epilogue.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from luffy_fast.autograd import attach_gradients, bias_slot, check_backward, op_context, wants_grad
from luffy_fast.config import LuffyLossConfig
from luffy_fast.gemm import half_logits, kept_logits
from luffy_fast.inputs import LossInputs
from luffy_fast.loss_math import entropy_from_moments

from .backward import grad_logits_in_place
from .epilogue import TokenBuffers, token_terms_into
from .forward import logsumexp_forward
from .forward_fused import fused_forward, fused_forward_enabled, launch_bytes, tma_possible
from .forward_lean import lean_forward
from .forward_rows import row_forward, row_forward_enabled
from .gradients import (
    ActiveTokens,
    FilterCount,
    KeptGradients,
    filter_gradients,
    recomputed_gradients,
    zero_gradients,
)
from .utils import INTERPRET, lean_passes

# Below this many rows per chunk, GEMMs get too thin to pay for keeping logits (the d(weight)
# update re-reads and re-writes the whole [V, H] gradient once per chunk).
MIN_KEPT_ROWS = {"cuda": 256, "cpu": 16}
# Bytes per loss token that the loss's kept pass holds whatever its chunks (the reordered inputs,
# every token's terms, their concatenation and statistics; ~200 measured on an H200), left out of
# the budget before the chunks get theirs, so that the budget holds at any T.
PER_TOKEN_BYTES = 256


def _check_device(tensor: Tensor, op: str = "fused_luffy_loss") -> None:
    if tensor.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{op}: `backend`='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
            "before luffy_fast.kernels is imported to run the kernels on the CPU interpreter")
    if tensor.dtype == torch.float64:
        raise ValueError(f"{op}: `hidden` is float64, which the triton backend does not "
                         "take (bf16, fp16, fp32); use backend='torch' or 'reference'")


def plan(config: LuffyLossConfig, device: torch.device, num_tokens: int, vocab_size: int,
         element_size: int, hidden_size: int = 0, logit_size: int = 4) -> tuple[str, int]:
    """("kept", rows per chunk) or ("recompute", rows per backward chunk) for this budget.

    A kept row is its logits (`logit_size` bytes each: fp32, or 16-bit with
    LuffyLossConfig.logits_dtype = "input"), with dL/dz written over them (the gradient filter's
    too), plus two [H] rows beside them (the gathered hidden state and its d(hidden) product)."""
    kept_rows = _kept_rows(config, device, num_tokens,
                           vocab_size * logit_size + 2 * hidden_size * element_size, PER_TOKEN_BYTES)
    if kept_rows:
        return "kept", kept_rows
    budget = config.memory_budget_bytes(device)
    return "recompute", max(16, min(num_tokens, budget // (vocab_size * element_size)))


def _kept_rows(config: LuffyLossConfig, device: torch.device, num_tokens: int,
               bytes_per_row: int, bytes_per_token: int = 0) -> int:
    """Rows of a kept chunk (`bytes_per_row` each) that fit the budget beside `bytes_per_token`
    for every token, or 0 when fewer than MIN_KEPT_ROWS (or all the tokens) fit: thinner GEMMs
    do not pay for keeping."""
    rows = max(0, config.memory_budget_bytes(device) - num_tokens * bytes_per_token) // bytes_per_row
    if num_tokens > 0 and rows >= min(num_tokens, MIN_KEPT_ROWS.get(device.type, 16)):
        return min(rows, num_tokens)
    return 0


def _forward_only_chunk(config: LuffyLossConfig, hidden: Tensor, num_tokens: int,
                        vocab_size: int, chunk: int) -> int:
    """Rows per forward-only chunk of the kept strategy: a kept chunk's, or with
    LUFFY_FAST_FUSED_FORWARD=1, which keeps no logits for them, all in one launch, or where TMA
    could load them (rows gathered in order) as many gathered [H] rows as the budget holds beside
    the launch's split partials."""
    if not fused_forward_enabled():
        return chunk
    if not tma_possible(hidden):
        return max(chunk, num_tokens)
    room = config.memory_budget_bytes(hidden.device) - num_tokens * PER_TOKEN_BYTES
    row_bytes = hidden.shape[1] * hidden.element_size()
    rows = min(num_tokens, room // row_bytes)
    for _ in range(8):  # fewer rows may take more splits: shrink until both fit
        if rows <= chunk:
            break
        used = rows * row_bytes + launch_bytes(hidden, rows, vocab_size, config.entropy_coef > 0)
        if used <= room:
            return rows
        rows = rows * room // used
    return chunk


def _filter_count(config: LuffyLossConfig, device: torch.device) -> Optional[FilterCount]:
    return None if config.grad_filter is None else FilterCount(config.grad_filter, device)


def _kept_chunks(num_tokens: int, num_maybe_active: int, chunk: int,
                 forward_chunk: Optional[int] = None):
    """(slice, gradient chunk?, last gradient chunk?) over the token order of
    LossInputs.gradient_last: slices of nearly equal length, at most `chunk` (`forward_chunk` for
    the forward-only tokens, when given), none straddling the forward-only tokens and the last
    `num_maybe_active` (the gradient chunks)."""
    first_gradient = num_tokens - num_maybe_active
    for begin, end, gradient in ((0, first_gradient, False), (first_gradient, num_tokens, True)):
        most = chunk if gradient or forward_chunk is None else forward_chunk
        # equal chunks rather than full ones and a thin remainder: the GEMMs like fat operands
        count = -(-(end - begin) // most)
        for k in range(count):
            start, stop = begin + (end - begin) * k // count, begin + (end - begin) * (k + 1) // count
            yield slice(start, stop), gradient, gradient and k == count - 1


@torch.no_grad()
def _kept_logits_pass(inputs: LossInputs, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                      chunk: int, needs: tuple[bool, bool, bool], half: bool):
    """Loss, stats and gradients in one sweep over chunks of logits written by a GEMM (N > 0).

    Tokens that cannot carry a gradient (zero-advantage groups) come first and get the forward
    only (LossInputs.gradient_last). A chunk of the others gets dL/dz written over its own logits
    (grad_logits_in_place: 4 bytes per entry, 2 with 16-bit logits) and its gradient GEMMs
    (KeptGradients, which keeps the last chunk's d(weight) GEMM for the backward). Per chunk: a
    gather, the GEMM, the forward and epilogue kernels, dL/dz and the gradient GEMMs, no host
    sync. With the gradient filter the active tokens' kept blocks of dL/dz are written over
    their logits and multiplied right away (kernels/backward_filtered.py) instead. `half`: the
    logits are kept in the inputs' 16-bit dtype
    (luffy_fast.gemm.half_logits)."""
    config = inputs.config
    gradients = KeptGradients(hidden, weight, needs)
    order, num_maybe_active = inputs.gradient_last()
    N = order.numel()
    if 0 < num_maybe_active < N:  # otherwise the order is the identity
        inputs = inputs.reordered(order)
    buffers = TokenBuffers.empty(inputs)
    grad_filter = _filter_count(config, hidden.device)
    forward_chunk = _forward_only_chunk(config, hidden, N, weight.shape[0], chunk)
    for part, gradient_chunk, last in _kept_chunks(N, num_maybe_active, chunk, forward_chunk):
        if gradient_chunk and part.start == N - num_maybe_active:  # the forward-only ones are done
            _stray_gradients(inputs, buffers, part.start, hidden, weight, bias, chunk, gradients)
        rows, targets = inputs.rows[part], inputs.targets[part]
        logits, hidden_rows = _chunk_forward(hidden, weight, bias, rows, targets, config, half,
                                             gradient_chunk, buffers.moments(part))
        token_terms_into(inputs, part, buffers)
        terms = buffers[part]
        if gradient_chunk and grad_filter is None:
            grad = grad_logits_in_place(logits, bias, targets, terms.lse, terms.logprobs, terms.coef,
                                        terms.entropy_weight, terms.row_max, terms.expected_shift,
                                        config.temperature, hidden.dtype)
            gradients.add_chunk(grad, hidden_rows, rows, last)
            del grad
        elif gradient_chunk:  # the filter: dL/dz over the active tokens' logits
            tokens, position = ActiveTokens.select(terms, rows, targets)
            if len(tokens):
                filter_gradients(tokens, hidden, weight, bias, config.temperature,
                                 gradients.accumulators(), grad_filter, logits=logits,
                                 logit_rows=position)
        del logits  # before the next chunk's GEMM allocates its own: one chunk in memory at a time
    if num_maybe_active == 0:
        _stray_gradients(inputs, buffers, N, hidden, weight, bias, chunk, gradients)
    terms = buffers.terms()
    stats = inputs.summarize(terms)
    if grad_filter is not None:
        stats["grad_filter_skipped_fraction"] = grad_filter.fraction()
    return terms.loss, stats, gradients


def _chunk_forward(hidden, weight, bias, rows, targets, config: LuffyLossConfig, half: bool,
                   gradient_chunk: bool, out) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """A kept chunk's forward statistics, written into `out`, and its logits (raw h W^T, fp32 or
    16-bit when `half`) and gathered hidden rows for the gradients: cuBLAS's GEMM and a pass over
    its output, or with LUFFY_FAST_FUSED_FORWARD=1 one Triton GEMM with the statistics in its
    epilogue (kernels/forward_fused.py), which keeps no logits for a forward-only chunk (and
    gathers its rows, in order, only where TMA could load them)."""
    with_entropy = config.entropy_coef > 0
    if fused_forward_enabled():
        logits = None
        if gradient_chunk:
            logits = torch.empty(rows.numel(), weight.shape[0], device=hidden.device,
                                 dtype=hidden.dtype if half else torch.float32)
        # rows in order (which TMA can load) where the gradients gather them anyway or TMA could
        in_order = gradient_chunk or tma_possible(hidden)
        hidden_rows = hidden[rows] if in_order else None
        fused_forward(hidden_rows if in_order else hidden, weight, bias, None if in_order else rows,
                      targets, config.temperature, with_entropy, logits, half, out)
        return logits, hidden_rows if gradient_chunk else None
    hidden_rows = hidden[rows]
    logits = kept_logits(hidden_rows, weight, half)
    _kept_forward(hidden, weight, bias, rows, targets, config.temperature, with_entropy, logits, out)
    return logits, hidden_rows


def _kept_forward(hidden, weight, bias, rows, targets, temperature: float, with_entropy: bool,
                  logits: Tensor, out=None):
    """The forward statistics of a chunk from its kept logits: the split kernel, the lean one when
    LUFFY_FAST_LEAN=1 (kernels/forward_lean.py), or the whole-row one when
    LUFFY_FAST_ROW_FORWARD=1 (kernels/forward_rows.py)."""
    if lean_passes():
        return lean_forward(logits, bias, targets, temperature, with_entropy, out)
    if row_forward_enabled(logits.shape[0]):
        return row_forward(logits, bias, targets, temperature, with_entropy, out)
    return logsumexp_forward(hidden, weight, bias, rows, targets, temperature, with_entropy,
                             logits=logits, out=out)


def _stray_gradients(inputs: LossInputs, buffers: TokenBuffers, count: int, hidden: Tensor,
                     weight: Tensor, bias: Optional[Tensor], chunk: int,
                     gradients: KeptGradients) -> None:
    """The gradient of any of the first `count` tokens (the forward-only chunks') that turned out
    active after all: a non-finite log-prob gives NaN where the weight times advantage was 0,
    which the exact gradient carries (as autograd's 0 x NaN). Rare, so one host sync for all of
    them, and their logits, long gone, recomputed in tiles."""
    if count == 0 or not bool(buffers.active[:count].any()):
        return
    tokens, _ = ActiveTokens.select(buffers[:count], inputs.rows[:count], inputs.targets[:count])
    recomputed_gradients(tokens, hidden, weight, bias, inputs.config.temperature, chunk,
                         gradients.accumulators())


@dataclass
class _BackwardState:
    """What the recompute backward needs."""

    tokens: ActiveTokens
    temperature: float
    chunk: int
    grad_filter: Optional[FilterCount]
    skipped_fraction: Optional[Tensor]  # the stats entry, filled in when the backward runs


@torch.no_grad()
def _recompute_forward(inputs: LossInputs, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                       chunk: int, needs_grad: bool):
    config = inputs.config
    buffers = TokenBuffers.empty(inputs)
    # tile products, no logits kept: the split kernel, or the fused forward's flattened GEMM
    forward = fused_forward if fused_forward_enabled() else logsumexp_forward
    forward(hidden, weight, bias, inputs.rows, inputs.targets, config.temperature,
            config.entropy_coef > 0, out=buffers.moments(slice(None)))
    token_terms_into(inputs, slice(None), buffers)
    terms = buffers.terms()
    state, stats = None, inputs.summarize(terms)
    if needs_grad:  # only the active tokens go to the backward
        tokens, _ = ActiveTokens.select(buffers, inputs.rows, inputs.targets)
        grad_filter = _filter_count(config, hidden.device)
        skipped = None if grad_filter is None else grad_filter.fraction()
        state = _BackwardState(tokens, config.temperature, chunk, grad_filter, skipped)
        if skipped is not None:
            stats["grad_filter_skipped_fraction"] = skipped
    return terms.loss, stats, state


class _RecomputeBackward(torch.autograd.Function):
    """Returns the forward's loss; its backward recomputes logit tiles of the active tokens."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, state: _BackwardState):
        ctx.state = state
        ctx.save_for_backward(hidden, weight, bias)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        check_backward(ctx.state)
        hidden, weight, bias = ctx.saved_tensors
        state, ctx.state = ctx.state, None
        has_bias = bias.numel() > 0
        needs = (ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[3] and has_bias)
        hidden_c, weight_c = hidden.detach().contiguous(), weight.detach().contiguous()
        grads = zero_gradients(hidden_c, weight_c, needs)
        with op_context(hidden.device):  # under autocast, or another device current
            recomputed_gradients(state.tokens.scaled(grad_loss), hidden_c, weight_c,
                                 bias.detach().contiguous() if has_bias else None,
                                 state.temperature, state.chunk, grads, state.grad_filter)
        if state.grad_filter is not None:
            state.skipped_fraction.copy_(state.grad_filter.fraction())
        grad_hidden, grad_weight, grad_bias = grads
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return None, grad_hidden, grad_weight, grad_bias, None


@torch.compiler.disable  # under torch.compile: run as launched (a graph break), not traced
def triton_loss(inputs: LossInputs) -> tuple[Tensor, dict]:
    _check_device(inputs.hidden)
    hidden, weight = inputs.hidden.detach().contiguous(), inputs.weight.detach().contiguous()
    bias = None if inputs.bias is None else inputs.bias.detach().contiguous()
    needs = wants_grad(inputs)
    half = half_logits(hidden.dtype, inputs.config.logits_dtype)
    strategy, chunk = plan(inputs.config, hidden.device, inputs.rows.numel(), weight.shape[0],
                           hidden.element_size(), weight.shape[1], 2 if half else 4)
    if strategy == "kept" and any(needs):
        loss, stats, grads = _kept_logits_pass(inputs, hidden, weight, bias, chunk, needs, half)
        return attach_gradients(loss, inputs, grads), stats
    loss, stats, state = _recompute_forward(inputs, hidden, weight, bias, chunk, any(needs))
    if any(needs):
        loss = _RecomputeBackward.apply(loss, inputs.hidden, inputs.weight, bias_slot(inputs), state)
    return loss, stats


def logprob_chunk(config: LuffyLossConfig, device: torch.device, num_tokens: int,
                  vocab_size: int, logit_size: int = 4) -> int:
    """Rows per chunk of kept logits that token_logprobs keeps, or 0 for the tile products."""
    return _kept_rows(config, device, num_tokens, vocab_size * logit_size)


@torch.compiler.disable
@torch.no_grad()
def triton_token_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          config: LuffyLossConfig, with_entropy: bool):
    """Per-token log-probs (and entropy). When the budget holds a useful chunk of logits (fp32, or
    16-bit with LuffyLossConfig.logits_dtype = "input"), one GEMM per chunk writes them and the
    forward kernel reads them (one bare GEMM plus a read); otherwise the forward kernel
    multiplies hidden and weight tiles itself. With LUFFY_FAST_FUSED_FORWARD=1 the tile products
    of kernels/forward_fused.py at any budget, rounded as the kept chunks' logits would be."""
    _check_device(hidden, "token_logprobs")
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernels read it with stride 1
    T = hidden.shape[0]
    rows = torch.arange(T, device=hidden.device)
    half = half_logits(hidden.dtype, config.logits_dtype)
    chunk = logprob_chunk(config, hidden.device, T, weight.shape[0], 2 if half else 4)
    if fused_forward_enabled():  # no logits kept at any budget
        lse, logprobs, row_max, expected_shift = fused_forward(
            hidden, weight, bias, None, targets, config.temperature, with_entropy,
            half=half and chunk > 0)
    elif chunk == 0:
        lse, logprobs, row_max, expected_shift = logsumexp_forward(
            hidden, weight, bias, rows, targets, config.temperature, with_entropy)
    else:
        outs = [_kept_forward(hidden, weight, bias, rows[start:start + chunk],
                              targets[start:start + chunk], config.temperature, with_entropy,
                              kept_logits(hidden[start:start + chunk], weight, half))
                for start in range(0, T, chunk)]
        lse, logprobs, row_max, expected_shift = (
            None if values[0] is None else torch.cat(values) for values in zip(*outs))
    return logprobs, entropy_from_moments(lse, row_max, expected_shift) if with_entropy else None
