"""Where the triton backend's gradients add up across chunks of tokens.

`ActiveTokens` are the dL/dz kernels' per-token inputs and `add_gradients` their launch;
`zero_gradients` are the plain accumulators (the recompute backward, the gradient filter);
`PendingGradients` gathers dL/dz rows of several chunks before their GEMMs, and
`recomputed_gradients` feeds it from recomputed logits; `KeptGradients`
runs the kept strategy's GEMMs with two passes over d(weight) left out; `FilterCount` counts the
gradient filter's skipped blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor

from .backward import accumulate_gradients, grad_logits
from .backward_filtered import filtered_gradients


def zero_gradients(hidden: Tensor, weight: Tensor, needs: tuple[bool, bool, bool]):
    """Accumulators: d(hidden) and d(weight) in their own dtypes (GEMMs accumulate in fp32 within
    a chunk), d(bias) in fp32."""
    need_hidden, need_weight, need_bias = needs
    return (torch.zeros_like(hidden) if need_hidden else None,
            torch.zeros_like(weight) if need_weight else None,
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None)


class FilterCount:
    """Blocks of dL/dz the gradient filter skipped, out of all it tested (no host sync)."""

    def __init__(self, threshold: float, device: torch.device):
        self.threshold = threshold
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)
        self.total = 0
        self._weight_mean: Optional[Tensor] = None

    def weight_mean(self, weight: Tensor) -> Tensor:
        """The fp32 mean weight row (for the skipped blocks' share of d(hidden)), once per call."""
        if self._weight_mean is None:
            self._weight_mean = weight.mean(dim=0, dtype=torch.float32)
        return self._weight_mean

    def add(self, keep: Tensor) -> None:
        self.skipped += (keep == 0).sum()
        self.total += keep.numel()

    def fraction(self) -> Tensor:
        return self.skipped / max(self.total, 1)


class PendingGradients:
    """dL/dz rows of active tokens gathered in one buffer, possibly across chunks, multiplied into
    the gradients `grads` (plain accumulators) when it is full and at the end: the chunks of
    `recomputed_gradients`."""

    def __init__(self, buffer: Tensor, hidden: Tensor, weight: Tensor, grads):
        self.buffer, self.hidden, self.weight, self.grads = buffer, hidden, weight, grads
        self.rows: list[Tensor] = []
        self.filled = 0

    def slot(self, count: int) -> Tensor:
        """Buffer rows for the next `count` tokens (flushing first when they do not fit)."""
        if self.filled + count > self.buffer.shape[0]:
            self.flush()
        return self.buffer[self.filled: self.filled + count]

    def add(self, rows: Tensor) -> None:
        self.rows.append(rows)
        self.filled += rows.numel()

    def flush(self) -> None:
        if self.filled:
            rows = torch.cat(self.rows)
            accumulate_gradients(self.buffer[: self.filled], self.hidden[rows], self.weight, rows,
                                 *self.grads)
        self.rows, self.filled = [], 0


class KeptGradients:
    """d(hidden), d(weight) and d(bias) of the kept strategy's gradient chunks, for a unit upstream
    gradient until `scaled` (AttachGradients' backward) applies the real one.

    Each chunk's d(hidden) rows are one GEMM (dz W) and d(bias) a column sum. d(weight) [V, H] is
    the big one, and two passes over it are left out: the first chunk's GEMM writes it (beta = 0)
    instead of adding to a zero-filled buffer, and the last chunk's GEMM waits for the backward,
    where the upstream gradient g scales the sum inside the same GEMM (beta = alpha = g) instead
    of in a pass of its own. The last chunk's dz (its logits buffer, within the budget) lives
    until then, so memory beyond the op's return: the loss is meant to be backpropagated before
    the next one is computed (as trainers do per micro-batch). The chunks come in the order that
    makes it the last buffer allocated."""

    def __init__(self, hidden: Tensor, weight: Tensor, needs: tuple[bool, bool, bool]):
        need_hidden, need_weight, need_bias = needs
        self.weight = weight
        self.grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        self.grad_weight = torch.empty_like(weight) if need_weight else None
        self.grad_bias = (torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
                          if need_bias else None)
        self.weight_written = False
        self.held: Optional[tuple[Tensor, Tensor]] = None  # the last chunk's (dz, hidden rows)

    def add_chunk(self, grad: Tensor, hidden_rows: Tensor, rows: Tensor, last: bool) -> None:
        """A chunk's dz [C, V] for tokens at `rows` of hidden (`hidden_rows` = hidden[rows])."""
        weight_now = None if last else self.grad_weight
        accumulate_gradients(grad, hidden_rows, self.weight, rows, self.grad_hidden, weight_now,
                             self.grad_bias, weight_beta=1.0 if self.weight_written else 0.0)
        if weight_now is not None:
            self.weight_written = True
        elif self.grad_weight is not None:
            self.held = (grad, hidden_rows)

    def _weight_gemm(self, grad: Tensor, hidden_rows: Tensor, scale: float) -> None:
        """d(weight) = scale (d(weight) + dz^T h), d(weight) taken as zero before the first."""
        accumulate_gradients(grad, hidden_rows, self.weight, None, None, self.grad_weight, None,
                             weight_beta=scale if self.weight_written else 0.0, weight_scale=scale)
        self.weight_written = True

    def accumulators(self) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """The three sums so far as plain accumulators (d(weight) written), for code that adds to
        them (the gradient filter's kernels, PendingGradients). No chunk may be held."""
        assert self.held is None, "a held chunk's GEMM must come last"
        if self.grad_weight is not None and not self.weight_written:
            self.grad_weight.zero_()
            self.weight_written = True
        return self.grad_hidden, self.grad_weight, self.grad_bias

    def scaled(self, grad_loss: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """The gradients for upstream gradient `grad_loss` (a scalar; one host sync)."""
        scale = float(grad_loss)
        if self.held is not None:
            # beta = 0 would drop a non-finite sum where autograd's 0 x NaN keeps it: scale after
            self._weight_gemm(*self.held, scale if scale != 0 else 1.0)
            self.held = None
            if scale == 0:
                self.grad_weight.mul_(scale)
        elif self.grad_weight is not None:
            if self.weight_written:
                self.grad_weight.mul_(scale)
            else:
                self.grad_weight.zero_()
        for grad in (self.grad_hidden, self.grad_bias):
            if grad is not None:
                grad.mul_(scale)
        return self.grad_hidden, self.grad_weight, self.grad_bias


@dataclass
class ActiveTokens:
    """The gradient kernel's per-token inputs, for the tokens with something to contribute."""

    rows: Tensor  # rows of hidden
    targets: Tensor
    lse: Tensor
    logprobs: Tensor
    coef: Tensor  # dL/d log pi with the normalizer
    entropy_weight: Optional[Tensor]
    row_max: Optional[Tensor]
    expected_shift: Optional[Tensor]  # E_p[z] - max

    @classmethod
    def select(cls, terms, rows: Tensor, targets: Tensor) -> tuple[ActiveTokens, Tensor]:
        """The active tokens among `terms` (TokenBuffers of a chunk: compacted), and their
        positions among them."""
        position = terms.active.nonzero().squeeze(1)
        pick = lambda t: None if t is None else t[position].contiguous()  # noqa: E731
        row_max = terms.row_max if terms.expected_shift is not None else None
        tokens = cls(pick(rows), pick(targets), pick(terms.lse), pick(terms.logprobs),
                     pick(terms.coef), pick(terms.entropy_weight), pick(row_max),
                     pick(terms.expected_shift))
        return tokens, position

    def __len__(self) -> int:
        return self.rows.numel()

    def __getitem__(self, part: slice) -> ActiveTokens:
        return ActiveTokens(*(None if getattr(self, f.name) is None else getattr(self, f.name)[part]
                              for f in fields(self)))

    def scaled(self, factor: Tensor) -> ActiveTokens:
        """The loss is linear in coef and entropy_weight: an upstream gradient scales both."""
        entropy_weight = None if self.entropy_weight is None else self.entropy_weight * factor
        return replace(self, coef=self.coef * factor, entropy_weight=entropy_weight)


def add_gradients(tokens: ActiveTokens, pending: PendingGradients, bias: Optional[Tensor],
                  temperature: float, grad_filter: Optional[FilterCount] = None):
    """dL/dz of `tokens` from recomputed logit tiles into `pending`'s buffer, and its share of the
    three gradients: when the buffer is full (PendingGradients), or, with the gradient filter,
    right away for the blocks that pass it (kernels/backward_filtered.py: its block-sparse GEMMs
    run per call)."""
    out, hidden, weight = pending.slot(len(tokens)), pending.hidden, pending.weight
    if grad_filter is not None:
        filter_gradients(tokens, hidden, weight, bias, temperature, pending.grads, grad_filter,
                         out=out)
        return
    grad_logits(hidden, weight, bias, tokens.rows, tokens.targets, tokens.lse, tokens.logprobs,
                tokens.coef, tokens.entropy_weight, tokens.row_max, tokens.expected_shift,
                temperature, out)
    pending.add(tokens.rows)


def filter_gradients(tokens: ActiveTokens, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                     temperature: float, grads, grad_filter: FilterCount,
                     out: Optional[Tensor] = None, logits: Optional[Tensor] = None,
                     logit_rows: Optional[Tensor] = None) -> None:
    """The gradient filter's dL/dz of `tokens` (into `out`, or, `out` None, over their kept logits:
    row logit_rows[i] of `logits` for token i) and its kept blocks' share of `grads` (plain
    accumulators), right away (kernels/backward_filtered.py)."""
    keep = filtered_gradients(hidden, weight, bias, tokens, temperature, grad_filter.threshold,
                              out, grads, logits=logits, logit_rows=logit_rows,
                              weight_mean=(grad_filter.weight_mean(weight)
                                           if grads[0] is not None else None))
    grad_filter.add(keep)


def recomputed_gradients(tokens: ActiveTokens, hidden: Tensor, weight: Tensor,
                         bias: Optional[Tensor], temperature: float, chunk: int, grads,
                         grad_filter: Optional[FilterCount] = None) -> None:
    """dL/dz of `tokens` from logit tiles recomputed from hidden and weight, `chunk` tokens at a
    time through one buffer, added into `grads` (plain accumulators): the recompute backward,
    and the kept pass's stray tokens whose logits are gone."""
    buffer = torch.empty((min(chunk, len(tokens)), weight.shape[0]), dtype=hidden.dtype,
                         device=hidden.device)
    pending = PendingGradients(buffer, hidden, weight, grads)  # one chunk fills it
    for start in range(0, len(tokens), chunk):
        add_gradients(tokens[start:start + chunk], pending, bias, temperature,
                      grad_filter=grad_filter)
    pending.flush()
