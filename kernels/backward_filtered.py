"""Backward with the gradient filter (LuffyLossConfig.grad_filter): dL/dz blocks that are all
negligible are skipped, in the GEMMs too.

Three kernels per chunk of active tokens, on one fixed block grid (`filter_tiles`):

1. `_filtered_grad_logits_kernel` forms each [BLOCK_T, BLOCK_V] dL/dz tile as the dense backward
   does (`dz_tile`, logits recomputed or read from the forward's GEMM) and keeps it only
   if some entry reaches grad_filter x its token's gradient scale s_t = (|g_t| + |c_t|) / tau
   (|dL/dz_tv| <= s_t (p_v + p_v |z_v - E_p[z]|), so the test is about a probability below the
   threshold). Kept tiles are written to the [C, V] buffer and flagged in a [C/BT, V/BV] map;
   skipped tiles are not written.
2. `_sparse_grad_hidden_kernel`: d(hidden)[rows] = dz @ W, one program per (token tile, H tile),
   reducing over the kept vocabulary tiles only. Programs run in groups of GROUP_H H tiles, the
   token tile varying slowest within a group, so that the programs running together span many
   token tiles: those that keep the same vocabulary tile get its weight rows from L2 (each kept
   block loads 128 weight rows across H, ~1 MiB in bf16), at the price of reading a token
   tile's dL/dz rows once per group instead of once. Then the skipped entries' share, to first
   order: each row of dL/dz sums to zero (sum_v g (e_y - p)_v = 0 and sum_v p_v (z_v - E_p[z]) = 0), so
   the skipped entries of row t sum to minus its kept ones, and that mass goes with the mean
   weight row. It removes the coherent part of the error (weight rows share a mean direction in
   trained LM heads); measured here ~7x less d(hidden) error on peaked logits.
3. `_sparse_grad_weight_kernel`: d(weight) += dz^T @ h (and d(bias) += column sums of dz), one
   program per (vocabulary tile, H tile), reducing over the kept token tiles only; a vocabulary
   tile with nothing kept leaves its rows of d(weight) untouched.

The GEMM kernels loop over compacted lists of kept tiles (`_kept_lists`), not over the map with a
branch per tile, so that their loads can be pipelined.

Why not one kernel with atomics: per (token tile, vocabulary tile) program, fp32 atomic adds of a
[BLOCK_V, H] slice of d(weight) and a [BLOCK_T, H] slice of d(hidden) make (T / BLOCK_T) V H +
(V / BLOCK_V) T H read-modify-writes: about 320 GB at T = 8192, H = 4096, V = 151936 with
128-wide tiles, several times the GEMMs' whole time when little is skipped. Output-stationary
kernels write each output tile once per chunk, and a skipped block costs neither its loads nor
its MMA.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .backward import GRAD_FLAGS, dz_tile
from .utils import INTERPRET, dot_precision


def filter_tiles(dtype: torch.dtype) -> dict:
    """The filter's block grid (BLOCK_T x BLOCK_V), the H step of the logit recompute (BLOCK_H),
    the GEMM kernels' output tile width (BLOCK_OUT) and the d(hidden) kernel's program groups
    (GROUP_H H tiles); tiny under the interpreter (GROUP_H 3, so that tests see a partial last
    group). Fixed rather than autotuned: all three kernels must agree on the blocks. GPU sizes
    are untuned guesses, narrower and with fewer stages for fp32 so that the tiles fit in shared
    memory."""
    if INTERPRET:
        return {"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_H": 16, "BLOCK_OUT": 16, "GROUP_H": 3,
                "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_H": 32, "BLOCK_OUT": 64, "GROUP_H": 8,
                "num_warps": 8, "num_stages": 2}
    return {"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_H": 64, "BLOCK_OUT": 128, "GROUP_H": 4,
            "num_warps": 8, "num_stages": 3}


@triton.heuristics(GRAD_FLAGS)
@triton.jit
def _filtered_grad_logits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, logit_rows_ptr, logits_ptr, targets_ptr,
    lse_ptr, logprob_ptr, coef_ptr, entropy_weight_ptr, row_max_ptr, expected_shift_ptr,
    grad_logits_ptr, keep_ptr,
    C, V, HD, stride_hidden, stride_weight, stride_logits, inv_temperature, threshold,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, FROM_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    grad, offs_t, t_mask, offs_v, v_mask = dz_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows_ptr, logit_rows_ptr, logits_ptr, targets_ptr, lse_ptr,
        logprob_ptr, coef_ptr, entropy_weight_ptr, row_max_ptr, expected_shift_ptr, C, V, HD,
        stride_hidden, stride_weight, stride_logits, inv_temperature, HAS_BIAS, WITH_ENTROPY,
        FROM_LOGITS, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_H)

    scale = tl.abs(tl.load(coef_ptr + offs_t, mask=t_mask, other=0.0))
    if WITH_ENTROPY:
        scale += tl.abs(tl.load(entropy_weight_ptr + offs_t, mask=t_mask, other=0.0))
    mask = t_mask[:, None] & v_mask[None, :]
    large = (tl.abs(grad) >= (threshold * inv_temperature) * scale[:, None]) & mask
    keep = tl.max(tl.max(large.to(tl.int32), axis=1), axis=0)
    tl.store(keep_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), keep.to(tl.int8))
    if keep != 0:
        out = grad_logits_ptr + offs_t[:, None].to(tl.int64) * V + offs_v[None, :]
        tl.store(out, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sparse_grad_hidden_kernel(
    grad_logits_ptr, kept_v_ptr, num_kept_v_ptr, weight_ptr, weight_mean_ptr, rows_ptr,
    grad_hidden_ptr, C, V, HD, stride_weight, stride_grad_hidden, num_v_tiles,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_OUT: tl.constexpr, GROUP_H: tl.constexpr,
):
    # A 1-D grid in groups of GROUP_H H tiles, the H tile varying fastest within a group: the
    # programs running together share each token tile's dL/dz rows and, across token tiles,
    # the weight rows of the vocabulary tiles they keep (both in L2).
    num_h = tl.cdiv(HD, BLOCK_OUT)
    per_group = GROUP_H * tl.cdiv(C, BLOCK_T)
    first_h = tl.program_id(0) // per_group * GROUP_H
    group_h = tl.minimum(num_h - first_h, GROUP_H)  # the last group may be narrower
    local = tl.program_id(0) % per_group
    pid_h = first_h + local % group_h
    pid_t = local // group_h
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    t_mask = offs_t < C
    h_mask = offs_h < HD
    acc = tl.zeros((BLOCK_T, BLOCK_OUT), tl.float32)
    kept_sum = tl.zeros((BLOCK_T,), tl.float32)  # sum of the kept entries of each dL/dz row
    num_kept = tl.load(num_kept_v_ptr + pid_t)
    for k in range(0, num_kept):  # the kept vocabulary tiles of this token tile, in order
        offs_v = tl.load(kept_v_ptr + pid_t * num_v_tiles + k) * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        dz = tl.load(grad_logits_ptr + offs_t[:, None].to(tl.int64) * V + offs_v[None, :],
                     mask=t_mask[:, None] & v_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + offs_v[:, None].to(tl.int64) * stride_weight + offs_h[None, :],
                    mask=v_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)
        kept_sum += tl.sum(dz.to(tl.float32), axis=1)
    # The skipped entries of each row sum to -kept_sum: that mass goes with the mean weight row.
    kept_sum = tl.where(num_kept < num_v_tiles, kept_sum, 0.0)
    weight_mean = tl.load(weight_mean_ptr + offs_h, mask=h_mask, other=0.0)
    acc -= kept_sum[:, None] * weight_mean[None, :]
    rows = tl.load(rows_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    out = grad_hidden_ptr + rows[:, None] * stride_grad_hidden + offs_h[None, :]
    tl.store(out, acc.to(grad_hidden_ptr.dtype.element_ty), mask=t_mask[:, None] & h_mask[None, :])


@triton.heuristics({"NEED_WEIGHT": lambda args: args["grad_weight_ptr"] is not None,
                    "NEED_BIAS": lambda args: args["grad_bias_ptr"] is not None})
@triton.jit
def _sparse_grad_weight_kernel(
    grad_logits_ptr, kept_t_ptr, num_kept_t_ptr, hidden_ptr, rows_ptr, grad_weight_ptr,
    grad_bias_ptr, C, V, HD, stride_hidden, stride_grad_weight, num_t_tiles,
    NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_OUT: tl.constexpr,
):
    # H tiles vary fastest: programs running together share one vocabulary tile's dL/dz columns;
    # the chunk's hidden rows stay in L2.
    pid_h = tl.program_id(0)
    pid_v = tl.program_id(1)
    num_kept = tl.load(num_kept_t_ptr + pid_v)
    if num_kept > 0:  # a vocabulary tile with nothing kept leaves d(weight) untouched
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        offs_h = pid_h * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        v_mask = offs_v < V
        h_mask = offs_h < HD
        acc = tl.zeros((BLOCK_V, BLOCK_OUT), tl.float32)
        bias_acc = tl.zeros((BLOCK_V,), tl.float32)
        for k in range(0, num_kept):  # the kept token tiles of this vocabulary tile, in order
            offs_t = tl.load(kept_t_ptr + pid_v * num_t_tiles + k) * BLOCK_T + tl.arange(0, BLOCK_T)
            t_mask = offs_t < C
            dz = tl.load(grad_logits_ptr + offs_t[:, None].to(tl.int64) * V + offs_v[None, :],
                         mask=t_mask[:, None] & v_mask[None, :], other=0.0)
            if NEED_WEIGHT:
                rows = tl.load(rows_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
                h = tl.load(hidden_ptr + rows[:, None] * stride_hidden + offs_h[None, :],
                            mask=t_mask[:, None] & h_mask[None, :], other=0.0)
                acc = tl.dot(tl.trans(dz), h, acc, input_precision=DOT_PRECISION)
            if NEED_BIAS:
                bias_acc += tl.sum(dz.to(tl.float32), axis=0)
        if NEED_WEIGHT:
            out = grad_weight_ptr + offs_v[:, None].to(tl.int64) * stride_grad_weight + offs_h[None, :]
            mask = v_mask[:, None] & h_mask[None, :]
            total = tl.load(out, mask=mask, other=0.0).to(tl.float32) + acc
            tl.store(out, total.to(grad_weight_ptr.dtype.element_ty), mask=mask)
        if NEED_BIAS:
            if pid_h == 0:
                total_bias = tl.load(grad_bias_ptr + offs_v, mask=v_mask, other=0.0) + bias_acc
                tl.store(grad_bias_ptr + offs_v, total_bias, mask=v_mask)


def _kept_lists(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the block map: the kept columns first, in increasing order, and their count."""
    order = torch.sort(keep, dim=1, descending=True, stable=True).indices.to(torch.int32)
    return order.contiguous(), keep.sum(dim=1, dtype=torch.int32)


def filtered_gradients(hidden, weight, bias, tokens, temperature: float, threshold: float,
                       out: torch.Tensor, grads, logits=None, logit_rows=None,
                       weight_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dL/dz of `tokens` (C tokens: kernels/gradients.py, ActiveTokens) into `out` [C, V] for the
    blocks that pass the filter, then their share of d(hidden), d(weight) and d(bias) (`grads`,
    accumulated).
    `weight_mean` [H] (fp32 mean of the weight rows) is needed for d(hidden).

    Returns the block map [C / BLOCK_T, V / BLOCK_V] (int8, 1 = kept)."""
    C, V, HD = out.shape[0], weight.shape[0], weight.shape[1]
    tiles = filter_tiles(out.dtype)
    num_t, num_v = triton.cdiv(C, tiles["BLOCK_T"]), triton.cdiv(V, tiles["BLOCK_V"])
    keep = torch.empty((num_t, num_v), dtype=torch.int8, device=hidden.device)
    _filtered_grad_logits_kernel[(num_t, num_v)](
        hidden, weight, bias, tokens.rows, logit_rows, logits, tokens.targets,
        tokens.lse, tokens.logprobs, tokens.coef, tokens.entropy_weight, tokens.row_max,
        tokens.expected_shift, out, keep,
        C, V, HD, hidden.stride(0), weight.stride(0),
        logits.stride(0) if logits is not None else 0, 1.0 / temperature, float(threshold),
        BLOCK_T=tiles["BLOCK_T"], BLOCK_V=tiles["BLOCK_V"], BLOCK_H=tiles["BLOCK_H"],
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
    grad_hidden, grad_weight, grad_bias = grads
    precision = dot_precision(out.dtype)
    gemm_tiles = {key: tiles[key] for key in ("BLOCK_T", "BLOCK_V", "BLOCK_OUT", "num_warps",
                                              "num_stages")}
    num_h = triton.cdiv(HD, tiles["BLOCK_OUT"])
    if grad_hidden is not None:
        kept_v, num_kept_v = _kept_lists(keep)
        _sparse_grad_hidden_kernel[(num_h * num_t,)](
            out, kept_v, num_kept_v, weight, weight_mean, tokens.rows, grad_hidden, C, V, HD,
            weight.stride(0), grad_hidden.stride(0), num_v, DOT_PRECISION=precision,
            GROUP_H=tiles["GROUP_H"], **gemm_tiles)
    if grad_weight is not None or grad_bias is not None:
        kept_t, num_kept_t = _kept_lists(keep.T)
        _sparse_grad_weight_kernel[(num_h if grad_weight is not None else 1, num_v)](
            out, kept_t, num_kept_t, hidden, tokens.rows, grad_weight, grad_bias, C, V, HD,
            hidden.stride(0), grad_weight.stride(0) if grad_weight is not None else 0, num_t,
            DOT_PRECISION=precision, **gemm_tiles)
    return keep
