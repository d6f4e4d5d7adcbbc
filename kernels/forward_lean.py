"""Forward statistics over kept logits in few instructions per entry (opt-in).

The split kernel (forward.py) reads a chunk of logits that a GEMM wrote at ~1.2 TB/s (16-bit,
H200, round 4) and the in-place dL/dz pass at ~2.7 TB/s, both short of the memory's rate. Their
sm_90 machine code spends 33-38 and ~30 instructions per logit in the hot loop
(`python -m benchmarks.sass_count`), which at the rates measured is ~20 T instructions a second
in both, near what the SMs issue: the passes are bound by instructions, not bytes. The split
kernel reduces five sums across lanes (and warps) per tile, masks every entry and compares every
column with the targets.

Here, on the same grid and with the same per-split outputs (merged by forward.merge_splits):
- the sums are kept per entry of the tile and reduced once, after the loop; only the max is
  reduced per tile, and the sums are rescaled only in tiles where some row's max grew;
- whole tiles load without masks (rows past the chunk's end read its last row and are not
  stored); the split's ragged last tile is the only masked one;
- the target's logit is read once and, while the tiles stream, replaced in the buffer by a
  sentinel that takes no probability, so that no entry is compared with the target; it is put
  back before the program ends, and its terms are added after the loop (the non-target sum
  stays exact as pi -> 1, as in the split kernel);
- exponentials in base 2 with the temperature folded in: exp(z - m) = 2^((u - m_u) c) with u
  the raw logit (plus bias) and c = log2(e) / temperature; the sum of p (z - max) is kept in
  base-2 units and scaled by ln 2 at the end.

Per entry in a tile where no max grows, with entropy and bias: ~11.6 instructions (the split
kernel: ~33); a growing max adds ~3.8 in that tile.

Opt-in: LUFFY_FAST_LEAN=1 (utils.lean_passes, with kernels/backward_lean.py's dL/dz pass); off,
the split kernel runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import merge_splits, split_partials
from .utils import INTERPRET, num_vocab_splits, raw_logit_tile, shape_bucket, tuning_bench


def _configs() -> list[triton.Config]:
    """Rows per program and tile width: 32 or 64 entries per thread (two fp32 sums each, and the
    tile), rows at least the warps for the configs with 64."""
    if INTERPRET or not torch.cuda.is_available():
        return [triton.Config({"BLOCK_T": 4, "BLOCK_V": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_T": t, "BLOCK_V": v}, num_warps=w)
            for t, v, w in ((8, 1024, 4), (8, 1024, 8), (4, 1024, 4), (16, 512, 4),
                            (16, 1024, 8), (4, 2048, 8))]


@triton.jit
def _tile(u, m, others, pz, c, WITH_ENTROPY: tl.constexpr):
    """One tile of raw logits `u` [BT, BV] into the running max `m` [BT] and the per-entry sums
    `others` (exp(z - m)) and `pz` (exp(z - m) times (z - m) log2 e)."""
    new_m = tl.maximum(m, tl.max(u, axis=1))
    if tl.max((new_m > m).to(tl.int32), axis=0) > 0:  # some row's max grew: rescale its sums
        shift = tl.where(m > float("-inf"), (m - new_m) * c, 0.0)  # <= 0; 0 before any entry
        scale = tl.exp2(shift)
        if WITH_ENTROPY:
            pz = (pz + shift[:, None] * others) * scale[:, None]
        others = others * scale[:, None]
        m = new_m
    # (u - m) c, not u c - m c: a GPU compiles the latter to one FMA, which leaves the max entry
    # at t = -rounding(m c) instead of 0 and offsets E_p[z] - max by it (peaked rows' entropy)
    t = (u - m[:, None]) * c
    e = tl.exp2(t)
    others += e
    if WITH_ENTROPY:
        pz = tl.fma(e, t, pz)
    return m, others, pz


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None,
                    "WITH_ENTROPY": lambda args: args["sum_pz_ptr"] is not None})
@triton.autotune(configs=_configs(), key=["V_BUCKET"], do_bench=tuning_bench)
@triton.jit
def _lean_forward_kernel(
    logits_ptr, bias_ptr, targets_ptr, max_ptr, sum_ptr, sum_all_ptr, sum_pz_ptr,
    target_logit_ptr, N, V, stride_logits, inv_temperature, sentinel, V_BUCKET,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    split = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < N
    # rows past the end read the last row: every load of a whole tile is in bounds, unmasked
    row_starts = logits_ptr + tl.minimum(offs_t, N - 1).to(tl.int64) * stride_logits
    targets = tl.load(targets_ptr + offs_t, mask=t_mask, other=-1)

    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), tl.num_programs(0))
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    v_whole = v_begin + tl.maximum(v_end - v_begin, 0) // BLOCK_V * BLOCK_V
    c = inv_temperature * 1.4426950408889634  # log2(e) / temperature

    # The target's logit is read once and, while the tiles stream, replaced in the buffer by a
    # sentinel that takes no probability, so that no entry is compared with the target; only
    # this program reads that entry (its row, its split), and it puts the logit back at the end.
    in_split = t_mask & (targets >= v_begin) & (targets < v_end)
    target_ptrs = row_starts + targets
    target_raw = tl.load(target_ptrs, mask=in_split, other=0.0)
    # every thread holding a copy of a row's value loads it before one of them stores the
    # sentinel (a store goes out from one thread per value, loads from all of them)
    tl.debug_barrier()
    tl.store(target_ptrs, tl.zeros((BLOCK_T,), tl.float32) + sentinel, mask=in_split)
    tl.debug_barrier()  # the sentinels are in place for every thread of the program

    target_u = target_raw.to(tl.float32)
    if HAS_BIAS:
        target_u += tl.load(bias_ptr + targets, mask=in_split, other=0.0).to(tl.float32)
    m = tl.where(in_split, target_u, float("-inf"))  # the max counts the target
    others = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    pz = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    for v0 in range(v_begin, v_whole, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        u = raw_logit_tile(row_starts, bias_ptr, offs_v, offs_v < V, HAS_BIAS, False)
        m, others, pz = _tile(u, m, others, pz, c, WITH_ENTROPY)
    if v_whole < v_end:  # the split's ragged last tile; its columns past the end are sentinels
        offs_v = v_whole + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        u = raw_logit_tile(row_starts, bias_ptr, offs_v, v_mask, HAS_BIAS, True)
        u = tl.where(v_mask[None, :], u, sentinel)
        m, others, pz = _tile(u, m, others, pz, c, WITH_ENTROPY)
    tl.debug_barrier()  # every thread has read its tiles before the logits are put back
    tl.store(target_ptrs, target_raw, mask=in_split)

    # the target's own terms, added after the loop (the non-target sum stays exact as pi -> 1)
    target_t = tl.where(in_split, (target_u - m) * c, float("-inf"))
    target_e = tl.exp2(target_t)  # 0 outside the split
    out = split * N + offs_t
    run_sum = tl.sum(others, axis=1)
    tl.store(max_ptr + out, m * inv_temperature, mask=t_mask)
    tl.store(sum_ptr + out, run_sum, mask=t_mask)
    tl.store(target_logit_ptr + out, tl.where(in_split, target_u * inv_temperature, 0.0), mask=t_mask)
    if WITH_ENTROPY:
        sum_pz = tl.sum(pz, axis=1) + tl.where(in_split, target_e * target_t, 0.0)
        tl.store(sum_all_ptr + out, run_sum + target_e, mask=t_mask)
        tl.store(sum_pz_ptr + out, sum_pz * 0.6931471805599453, mask=t_mask)  # x ln 2


def _sentinel(dtype: torch.dtype) -> float:
    """A logit that takes no probability beside any real one and stays finite (so that
    exp(z - m) (z - m) is 0, not NaN) in the buffer's dtype and times 1 / temperature."""
    return -65504.0 if dtype == torch.float16 else -1e30


def lean_forward(logits: torch.Tensor, bias, targets: torch.Tensor, temperature: float,
                 with_entropy: bool, out=None):
    """logsumexp_forward's outputs (logsumexp, log pi, max, E_p[z] - max or None) for the N
    tokens whose raw logits h W^T are the rows of `logits` [N, V] (fp32 or 16-bit, row i for
    token i), written into `out` when given."""
    N, V = logits.shape
    splits = num_vocab_splits(N, V)
    run_max, run_sum, run_sum_all, run_sum_pz, target_logit = split_partials(
        splits, N, logits.device, with_entropy)
    if N > 0:
        grid = lambda meta: (splits, triton.cdiv(N, meta["BLOCK_T"]))  # noqa: E731
        _lean_forward_kernel[grid](
            logits, bias, targets, run_max, run_sum, run_sum_all, run_sum_pz, target_logit,
            N, V, logits.stride(0), 1.0 / temperature, _sentinel(logits.dtype), shape_bucket(V))
    return merge_splits(run_max, run_sum, run_sum_all, run_sum_pz, target_logit, out)
