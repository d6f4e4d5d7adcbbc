"""Backward with the gradient filter (LuffyLossConfig.grad_filter): dL/dz blocks that are all
negligible are skipped, in the GEMMs too.

Three kernels per chunk of active tokens, on one fixed block grid (`filter_tiles`):

1. `_filtered_grad_logits_kernel` forms each [BLOCK_T, BLOCK_V] dL/dz tile as the dense backward
   does (`dz_tile`, logits recomputed or read from the forward's GEMM) and keeps it only
   if some entry reaches grad_filter x its token's gradient scale s_t = (|g_t| + |c_t|) / tau
   (|dL/dz_tv| <= s_t (p_v + p_v |z_v - E_p[z]|), so the test is about a probability below the
   threshold). Kept tiles are written (to a [C, V] buffer, or over the kept logits they were
   formed from: GradLogitBlocks) and flagged in a [C/BT, V/BV] map; skipped tiles are not
   written. Writing over its own input, the kernel must run once per chunk: never autotuned.
2. `_sparse_grad_hidden_kernel`: d(hidden)[rows] = dz @ W, one program per (SPAN token tiles,
   H tile), reducing over the vocabulary tiles any of its token tiles keeps (a token tile that
   skipped one reads zeros there, so the result is that of one program per token tile). A kept
   block's weight rows are read once per program, across H (~1 MiB in bf16), so a program
   taking two token tiles halves those reads at the price of the MMAs of the blocks only one of
   them keeps. Programs run in groups of GROUP_H H tiles, the token tiles varying slowest
   within a group, so that the programs running together span many token tiles: those that
   keep the same vocabulary tile get its weight rows from L2, at the price of reading a token
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

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .backward import GRAD_FLAGS, dz_tile
from .utils import INTERPRET, dot_precision, dz_block, dz_buffer_rows


def filter_tiles(dtype: torch.dtype) -> dict:
    """Launch parameters of the three kernels (`"logits"`, `"hidden"`, `"weight"`): the block grid
    all three share (BLOCK_T x BLOCK_V), the H step of the logit recompute (BLOCK_H), each GEMM
    kernel's output tile width (BLOCK_OUT), the d(hidden) kernel's token tiles per program
    (SPAN) and program groups (GROUP_H H tiles). Tiny under the interpreter (SPAN 2 and GROUP_H
    3, so that tests see merged token tiles and a partial last group). Fixed rather than
    autotuned: the kernels must agree on the blocks, the dL/dz kernel may write over its input
    (the kept logits) and the d(weight) kernel accumulates into its output, so a tuning run
    would corrupt both.

    The GEMM kernels read their operands from L2 (each kept block of the weight is read once per
    program that multiplies it), so their tiles are sized for reuse: a program multiplies
    SPAN x BLOCK_T rows of dL/dz by a [BLOCK_V, BLOCK_OUT] block of the weight, about
    1 / (1 / (SPAN BLOCK_T) + 1 / BLOCK_OUT) flops per byte (85 at 128 x 256, against 43 at
    64 x 128: round 3 timed the 64 x 128 kernels at about a third of cuBLAS's rate per block;
    an H100's tensor cores over its L2 bandwidth want ~180, so even 85 is bound by L2).
    Merging two token tiles keeps the 64-row grid's skipped blocks exact zeros: a merged program
    multiplies a vocabulary tile that either token tile keeps and reads zeros for the other.
    Not timed on a GPU yet: LUFFY_FAST_FILTER_TILES=narrow (read at each call) gives round 3's
    64 x 128 tiles, for the benchmarks to time both in one run (`triton_filter+narrow`)."""
    if INTERPRET:
        shared = {"BLOCK_T": 16, "BLOCK_V": 32, "num_warps": 4, "num_stages": 1}
        return {"logits": {**shared, "BLOCK_H": 16},
                "hidden": {**shared, "SPAN": 2, "BLOCK_OUT": 16, "GROUP_H": 3},
                "weight": {**shared, "BLOCK_OUT": 16}}
    if dtype == torch.float32:  # CUDA cores (no tf32 in the gradients): narrow tiles, 2 stages
        shared = {"BLOCK_T": 64, "BLOCK_V": 128, "num_warps": 8, "num_stages": 2}
        return {"logits": {**shared, "BLOCK_H": 32},
                "hidden": {**shared, "SPAN": 1, "BLOCK_OUT": 64, "GROUP_H": 8},
                "weight": {**shared, "BLOCK_OUT": 64}}
    shared = {"BLOCK_T": 64, "BLOCK_V": 128, "num_warps": 8}
    if os.environ.get("LUFFY_FAST_FILTER_TILES") == "narrow":  # round 3's, to time against
        return {"logits": {**shared, "BLOCK_H": 64, "num_stages": 3},
                "hidden": {**shared, "SPAN": 1, "BLOCK_OUT": 128, "GROUP_H": 4, "num_stages": 3},
                "weight": {**shared, "BLOCK_OUT": 128, "num_stages": 3}}
    return {"logits": {**shared, "BLOCK_H": 64, "num_stages": 3},
            "hidden": {**shared, "SPAN": 2, "BLOCK_OUT": 256, "GROUP_H": 4, "num_stages": 2},
            "weight": {**shared, "BLOCK_OUT": 256, "num_stages": 3}}


# dL/dz rows at `dz_rows` of its buffer (over the kept logits) rather than row i for token i
DZ_FLAGS = {"DZ_ROWS": lambda args: args["dz_rows_ptr"] is not None}


@triton.heuristics({**GRAD_FLAGS, **DZ_FLAGS})
@triton.jit
def _filtered_grad_logits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, logit_rows_ptr, logits_ptr, targets_ptr,
    lse_ptr, logprob_ptr, coef_ptr, entropy_weight_ptr, row_max_ptr, expected_shift_ptr,
    grad_logits_ptr, dz_rows_ptr, keep_ptr,
    C, V, HD, stride_hidden, stride_weight, stride_logits, stride_dz, stride_dz_tile,
    inv_temperature, threshold,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, FROM_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DZ_ROWS: tl.constexpr,
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
    if keep != 0:  # the same for every thread of the program
        dz_rows = dz_buffer_rows(dz_rows_ptr, offs_t, t_mask, DZ_ROWS)
        if DZ_ROWS:
            # Over the logits this program read: a 16-bit entry written over fp32 logits lands
            # on another thread's entry, so every read comes first.
            tl.debug_barrier()
        out = dz_block(grad_logits_ptr, dz_rows, tl.program_id(1), stride_dz, stride_dz_tile,
                       BLOCK_V)
        tl.store(out, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


@triton.heuristics(DZ_FLAGS)
@triton.jit
def _sparse_grad_hidden_kernel(
    grad_logits_ptr, dz_rows_ptr, kept_bits_ptr, tile_kept_ptr, kept_v_ptr, num_kept_v_ptr, weight_ptr,
    weight_mean_ptr, rows_ptr, grad_hidden_ptr, C, V, HD, stride_dz, stride_dz_tile,
    stride_weight, stride_grad_hidden, num_v_tiles,
    DOT_PRECISION: tl.constexpr, DZ_ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr, SPAN: tl.constexpr, BLOCK_OUT: tl.constexpr, GROUP_H: tl.constexpr,
):
    # A 1-D grid in groups of GROUP_H H tiles, the H tile varying fastest within a group: the
    # programs running together share each token tile's dL/dz rows and, across token tiles,
    # the weight rows of the vocabulary tiles they keep (both in L2).
    num_h = tl.cdiv(HD, BLOCK_OUT)
    per_group = GROUP_H * tl.cdiv(C, SPAN * BLOCK_T)
    first_h = tl.program_id(0) // per_group * GROUP_H
    group_h = tl.minimum(num_h - first_h, GROUP_H)  # the last group may be narrower
    local = tl.program_id(0) % per_group
    pid_h = first_h + local % group_h
    pid_t = local // group_h
    offs_t = pid_t * SPAN * BLOCK_T + tl.arange(0, SPAN * BLOCK_T)
    offs_h = pid_h * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    t_mask = offs_t < C
    h_mask = offs_h < HD
    tile_t = offs_t // BLOCK_T  # each row's token tile of the block map
    dz_rows = dz_buffer_rows(dz_rows_ptr, offs_t, t_mask, DZ_ROWS)
    acc = tl.zeros((SPAN * BLOCK_T, BLOCK_OUT), tl.float32)
    # The sums of each dL/dz row's kept entries, by the tensor cores (16 equal columns): a dz tile
    # read by anything but MMAs would have Triton give it a single buffer that the next tile's
    # copy may overwrite while the previous asynchronous MMA still reads it.
    ones = tl.full((BLOCK_V, 16), 1.0, grad_logits_ptr.dtype.element_ty)
    row_sums = tl.zeros((SPAN * BLOCK_T, 16), tl.float32)
    num_kept = tl.load(num_kept_v_ptr + pid_t)
    for k in range(0, num_kept):  # the vocabulary tiles some token tile of the span keeps, in order
        tile_v = tl.load(kept_v_ptr + pid_t * num_v_tiles + k)
        offs_v = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
        row_mask = t_mask
        if SPAN > 1:  # a token tile that skipped this block wrote nothing there: read zeros
            bits = tl.load(kept_bits_ptr + pid_t * num_v_tiles + k)  # bit s: the span's tile s keeps it
            row_mask &= ((bits >> (tile_t - pid_t * SPAN)) & 1) != 0
        dz = tl.load(dz_block(grad_logits_ptr, dz_rows, tile_v, stride_dz, stride_dz_tile, BLOCK_V),
                     mask=row_mask[:, None] & (offs_v < V)[None, :], other=0.0)
        w = tl.load(weight_ptr + offs_v[:, None].to(tl.int64) * stride_weight + offs_h[None, :],
                    mask=(offs_v < V)[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)
        row_sums = tl.dot(dz, ones, row_sums, input_precision=DOT_PRECISION)
    # The skipped entries of each row sum to -kept_sum: that mass goes with the mean weight row.
    kept_sum = tl.max(row_sums, axis=1)
    tile_kept = tl.load(tile_kept_ptr + tile_t, mask=t_mask, other=0)
    kept_sum = tl.where(tile_kept < num_v_tiles, kept_sum, 0.0)
    weight_mean = tl.load(weight_mean_ptr + offs_h, mask=h_mask, other=0.0)
    acc -= kept_sum[:, None] * weight_mean[None, :]
    rows = tl.load(rows_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    out = grad_hidden_ptr + rows[:, None] * stride_grad_hidden + offs_h[None, :]
    tl.store(out, acc.to(grad_hidden_ptr.dtype.element_ty), mask=t_mask[:, None] & h_mask[None, :])


@triton.heuristics({"NEED_WEIGHT": lambda args: args["grad_weight_ptr"] is not None,
                    "NEED_BIAS": lambda args: args["grad_bias_ptr"] is not None, **DZ_FLAGS})
@triton.jit
def _sparse_grad_weight_kernel(
    grad_logits_ptr, dz_rows_ptr, kept_t_ptr, num_kept_t_ptr, hidden_ptr, rows_ptr,
    grad_weight_ptr, grad_bias_ptr, C, V, HD, stride_dz, stride_dz_tile, stride_hidden,
    stride_grad_weight, num_t_tiles,
    NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DZ_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_OUT: tl.constexpr,
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
        # d(bias), by the tensor cores as d(hidden)'s row sums (16 equal columns)
        ones = tl.full((BLOCK_T, 16), 1.0, grad_logits_ptr.dtype.element_ty)
        column_sums = tl.zeros((BLOCK_V, 16), tl.float32)
        for k in range(0, num_kept):  # the kept token tiles of this vocabulary tile, in order
            offs_t = tl.load(kept_t_ptr + pid_v * num_t_tiles + k) * BLOCK_T + tl.arange(0, BLOCK_T)
            t_mask = offs_t < C
            dz_rows = dz_buffer_rows(dz_rows_ptr, offs_t, t_mask, DZ_ROWS)
            dz = tl.load(dz_block(grad_logits_ptr, dz_rows, pid_v, stride_dz, stride_dz_tile,
                                  BLOCK_V),
                         mask=t_mask[:, None] & v_mask[None, :], other=0.0)
            if NEED_WEIGHT:
                rows = tl.load(rows_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
                h = tl.load(hidden_ptr + rows[:, None] * stride_hidden + offs_h[None, :],
                            mask=t_mask[:, None] & h_mask[None, :], other=0.0)
                acc = tl.dot(tl.trans(dz), h, acc, input_precision=DOT_PRECISION)
            if NEED_BIAS:
                column_sums = tl.dot(tl.trans(dz), ones, column_sums, input_precision=DOT_PRECISION)
        if NEED_WEIGHT:
            out = grad_weight_ptr + offs_v[:, None].to(tl.int64) * stride_grad_weight + offs_h[None, :]
            mask = v_mask[:, None] & h_mask[None, :]
            total = tl.load(out, mask=mask, other=0.0).to(tl.float32) + acc
            tl.store(out, total.to(grad_weight_ptr.dtype.element_ty), mask=mask)
        if NEED_BIAS:
            if pid_h == 0:
                total_bias = (tl.load(grad_bias_ptr + offs_v, mask=v_mask, other=0.0)
                              + tl.max(column_sums, axis=1))
                tl.store(grad_bias_ptr + offs_v, total_bias, mask=v_mask)


def _kept_lists(keep: torch.Tensor, span: int = 1):
    """Per group of `span` rows of the block map: the columns any of them keeps, in increasing
    order, their count and, for span > 1, per listed column which rows of the group keep it
    (bit s for row s; int32)."""
    bits = None
    if span > 1:
        padded = torch.zeros((-(-keep.shape[0] // span) * span, keep.shape[1]), dtype=torch.int32,
                             device=keep.device)
        padded[:keep.shape[0]] = keep
        powers = 2 ** torch.arange(span, dtype=torch.int32, device=keep.device)
        bits = (padded.view(-1, span, keep.shape[1]) * powers[None, :, None]).sum(dim=1,
                                                                                    dtype=torch.int32)
        keep = bits != 0
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices
    if bits is not None:
        bits = bits.gather(1, order).contiguous()
    return order.to(torch.int32).contiguous(), keep.sum(dim=1, dtype=torch.int32), bits


@dataclass
class GradLogitBlocks:
    """Where entry (i, v) of a chunk's dL/dz lives: buffer[rows[i] * row_stride + (v // BLOCK_V) *
    tile_stride + v % BLOCK_V] (`rows` None: row i). A buffer of its own, or the chunk's kept
    logits, written over: entry for entry when the two dtypes match, and 16-bit dL/dz over fp32
    logits in the first half of each [BLOCK_V] tile's bytes (so that a program writes only over
    the logits it read)."""

    buffer: torch.Tensor
    rows: Optional[torch.Tensor]
    row_stride: int
    tile_stride: int

    @classmethod
    def own(cls, buffer: torch.Tensor) -> GradLogitBlocks:
        """A contiguous [C, V] buffer."""
        return cls(buffer, None, buffer.stride(0), filter_tiles(buffer.dtype)["logits"]["BLOCK_V"])

    @classmethod
    def over_logits(cls, logits: torch.Tensor, rows: torch.Tensor,
                    dtype: torch.dtype) -> GradLogitBlocks:
        """Over rows `rows` of `logits` [R, V] (contiguous rows), in `dtype`."""
        block_v = filter_tiles(dtype)["logits"]["BLOCK_V"]
        if logits.dtype == dtype:
            return cls(logits, rows, logits.stride(0), block_v)
        view = logits.view(dtype)  # fp32 logits as twice as many 16-bit entries a row
        return cls(view, rows, view.stride(0), 2 * block_v)

    def __len__(self) -> int:
        return self.buffer.shape[0] if self.rows is None else self.rows.numel()


def filtered_gradients(hidden, weight, bias, tokens, temperature: float, threshold: float,
                       out: Optional[torch.Tensor], grads, logits=None, logit_rows=None,
                       weight_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dL/dz of `tokens` (C tokens: kernels/gradients.py, ActiveTokens) for the blocks that pass
    the filter, into `out` [C, V] or, `out` None, over their kept logits (row logit_rows[i] of
    `logits` for token i: GradLogitBlocks.over_logits), then their share of d(hidden), d(weight)
    and d(bias) (`grads`, accumulated).
    `weight_mean` [H] (fp32 mean of the weight rows) is needed for d(hidden).

    Returns the block map [C / BLOCK_T, V / BLOCK_V] (int8, 1 = kept)."""
    if out is None and logits is None:
        raise ValueError("filtered_gradients: dL/dz goes over the logits only when there are some")
    blocks = (GradLogitBlocks.own(out) if out is not None
              else GradLogitBlocks.over_logits(logits, logit_rows, hidden.dtype))
    C, V, HD = len(tokens), weight.shape[0], weight.shape[1]
    launches = filter_tiles(hidden.dtype)
    block_t, block_v = launches["logits"]["BLOCK_T"], launches["logits"]["BLOCK_V"]
    num_t, num_v = triton.cdiv(C, block_t), triton.cdiv(V, block_v)
    keep = torch.empty((num_t, num_v), dtype=torch.int8, device=hidden.device)
    _filtered_grad_logits_kernel[(num_t, num_v)](
        hidden, weight, bias, tokens.rows, logit_rows, logits, tokens.targets,
        tokens.lse, tokens.logprobs, tokens.coef, tokens.entropy_weight, tokens.row_max,
        tokens.expected_shift, blocks.buffer, blocks.rows, keep,
        C, V, HD, hidden.stride(0), weight.stride(0),
        logits.stride(0) if logits is not None else 0, blocks.row_stride, blocks.tile_stride,
        1.0 / temperature, float(threshold), **launches["logits"])
    sparse_gradients(blocks, keep, hidden, weight, tokens.rows, grads, weight_mean)
    return keep


def sparse_gradients(blocks: GradLogitBlocks, keep: torch.Tensor, hidden: torch.Tensor,
                     weight: torch.Tensor, rows: torch.Tensor, grads,
                     weight_mean: Optional[torch.Tensor] = None) -> None:
    """The kept blocks' share of d(hidden) (rows `rows` of it, written), d(weight) and d(bias)
    (accumulated): dL/dz (`blocks`) is read only in the blocks `keep` marks (the others may hold
    anything), each row's skipped mass going with `weight_mean`."""
    C, V, HD = len(blocks), weight.shape[0], weight.shape[1]
    launches = filter_tiles(hidden.dtype)
    num_t, num_v = keep.shape
    grad_hidden, grad_weight, grad_bias = grads
    precision = dot_precision(hidden.dtype)
    dz = (blocks.buffer, blocks.rows)
    strides = (blocks.row_stride, blocks.tile_stride)
    if grad_hidden is not None:
        tiles = launches["hidden"]
        kept_v, num_kept_v, kept_bits = _kept_lists(keep, tiles["SPAN"])
        num_programs = triton.cdiv(HD, tiles["BLOCK_OUT"]) * len(num_kept_v)
        _sparse_grad_hidden_kernel[(num_programs,)](
            *dz, kept_bits, keep.sum(dim=1, dtype=torch.int32), kept_v, num_kept_v, weight,
            weight_mean, rows, grad_hidden, C, V, HD, *strides, weight.stride(0),
            grad_hidden.stride(0), num_v, DOT_PRECISION=precision, **tiles)
    if grad_weight is not None or grad_bias is not None:
        tiles = launches["weight"]
        kept_t, num_kept_t, _ = _kept_lists(keep.T)
        num_h = triton.cdiv(HD, tiles["BLOCK_OUT"]) if grad_weight is not None else 1
        _sparse_grad_weight_kernel[(num_h, num_v)](
            *dz, kept_t, num_kept_t, hidden, rows, grad_weight, grad_bias, C, V, HD, *strides,
            hidden.stride(0), grad_weight.stride(0) if grad_weight is not None else 0, num_t,
            DOT_PRECISION=precision, **tiles)
