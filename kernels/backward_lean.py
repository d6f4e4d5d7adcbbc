"""dL/dz written over kept logits in few instructions per entry (opt-in: LUFFY_FAST_LEAN=1,
utils.lean_passes).

The same pass as backward.py's `_grad_logits_in_place_kernel` (same arguments, grid and layout:
a program owns BLOCK_T whole rows and walks them left to right, each write landing on logits it
has read), which spends ~30 instructions per logit in its loop (`python -m
benchmarks.sass_count`) and runs bound by their issue (docs/design.md). Here:
- whole tiles load and store without masks: rows past the chunk's end repeat its last row with
  that row's values, so they store what it stores; only a row's ragged last tile is masked;
- no entry is compared with the target: every entry gets -g p (+ the entropy term), and after
  the row is written its target entry is overwritten with g (1 - p_y) = -g expm1(log p_y) (+ its
  entropy term), from the target's logit read before the first write;
- per-token factors are folded before the loop: p = 2^((u / temperature - lse) log2 e) with u
  the raw logit (plus bias) and u / temperature - lse one FMA (one rounding, of a small number
  where p is large), g = coef / temperature, and the entropy term
  p (ew / temperature) ((u / temperature - max) - (E_p[z] - max)), the last difference taken as
  the split kernel takes it (no cancellation for a peaked distribution).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .utils import IN_PLACE_FLAGS, expm1, in_place_autotune, raw_logit_tile


@triton.jit
def _grad_tile(u, lse, g, h, row_max, expected_shift, active, s, WITH_ENTROPY: tl.constexpr):
    """dL/dz of a tile of raw logits `u` (plus bias) for every entry as if none were a target."""
    p = tl.exp2(tl.fma(u, s, -lse[:, None]) * 1.4426950408889634)  # one rounding of z - lse
    grad = -p * g[:, None]
    if WITH_ENTROPY:
        shift = tl.fma(u, s, -row_max[:, None]) - expected_shift[:, None]
        grad = tl.fma(p * h[:, None], shift, grad)
    # an inactive token (clipped, or no weight) contributes exact zeros, whatever its logits
    return tl.where(active[:, None], grad, 0.0)


# The arguments, flags and tuning are the in-place kernel's: grad_logits_in_place launches either.
@triton.heuristics(IN_PLACE_FLAGS)
@triton.autotune(**in_place_autotune())
@triton.jit
def _lean_grad_logits_kernel(
    logits_ptr, grad_logits_ptr, bias_ptr, targets_ptr, lse_ptr, logprob_ptr, coef_ptr,
    entropy_weight_ptr, row_max_ptr, expected_shift_ptr,
    C, V, stride_logits, stride_grad, inv_temperature, C_BUCKET, V_BUCKET,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < C
    # rows past the end repeat the last row, values and all: their stores write what its do
    rows = tl.minimum(offs_t, C - 1)
    logit_rows = logits_ptr + rows.to(tl.int64) * stride_logits
    grad_rows = grad_logits_ptr + rows.to(tl.int64) * stride_grad
    s = inv_temperature
    lse = tl.load(lse_ptr + rows)
    coef = tl.load(coef_ptr + rows)
    g = coef * s
    active = coef != 0
    h = g  # unused without entropy
    row_max = lse
    expected_shift = lse
    if WITH_ENTROPY:
        entropy_weight = tl.load(entropy_weight_ptr + rows)
        active = active | (entropy_weight != 0)
        h = entropy_weight * s
        row_max = tl.load(row_max_ptr + rows)
        expected_shift = tl.load(expected_shift_ptr + rows)

    # the target's entry, from its logit read before any write over the row
    targets = tl.load(targets_ptr + rows)
    has_target = t_mask & (targets >= 0) & (targets < V)
    target_u = tl.load(logit_rows + targets, mask=has_target, other=0.0).to(tl.float32)
    if HAS_BIAS:
        target_u += tl.load(bias_ptr + targets, mask=has_target, other=0.0).to(tl.float32)
    target_grad = -expm1(tl.load(logprob_ptr + rows)) * g
    if WITH_ENTROPY:
        target_p = tl.exp2(tl.fma(target_u, s, -lse) * 1.4426950408889634)
        target_grad += target_p * h * (tl.fma(target_u, s, -row_max) - expected_shift)
    target_grad = tl.where(active, target_grad, 0.0)

    v_whole = V // BLOCK_V * BLOCK_V
    for v0 in range(0, v_whole, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        u = raw_logit_tile(logit_rows, bias_ptr, offs_v, offs_v < V, HAS_BIAS, False)
        grad = _grad_tile(u, lse, g, h, row_max, expected_shift, active, s, WITH_ENTROPY)
        tl.debug_barrier()  # every warp has read this tile before any writes over it
        tl.store(grad_rows[:, None] + offs_v[None, :], grad.to(grad_logits_ptr.dtype.element_ty))
    if v_whole < V:  # the ragged last tile
        offs_v = v_whole + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        u = raw_logit_tile(logit_rows, bias_ptr, offs_v, v_mask, HAS_BIAS, True)
        grad = _grad_tile(u, lse, g, h, row_max, expected_shift, active, s, WITH_ENTROPY)
        tl.debug_barrier()
        tl.store(grad_rows[:, None] + offs_v[None, :], grad.to(grad_logits_ptr.dtype.element_ty),
                 mask=v_mask[None, :])
    tl.debug_barrier()  # the row's tiles are written before its target entry is overwritten
    tl.store(grad_rows + targets, target_grad.to(grad_logits_ptr.dtype.element_ty), mask=has_target)
