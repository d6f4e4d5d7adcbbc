"""Forward kernel: per-token logsumexp, target logit and (optionally) E_p[z].

Grid: vocabulary splits x token tiles, the split index varying fastest, so the programs that run
at the same time share a few hidden tiles and walk the weight together (both stay in L2). Each
program forms logit tiles in SRAM (`logit_tile`: hidden x weight tiles with fp32 accumulation, or
read from a chunk of logits a GEMM wrote) and keeps an online max, sum of exponentials and sum of
p*z for its token tile over its share of the vocabulary; `merge_splits` combines the splits.
No [T, V] buffer: the logits exist only as tiles.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import (
    AUTOTUNE,
    INTERPRET,
    LOGIT_FLAGS,
    logit_tile,
    lse_and_logprob,
    num_vocab_splits,
    online_softmax_step,
    shape_bucket,
)


@triton.heuristics({**LOGIT_FLAGS, "WITH_ENTROPY": lambda args: args["sum_pz_ptr"] is not None})
@triton.autotune(**AUTOTUNE)
@triton.jit
def _forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr, logits_ptr,
    max_ptr, sum_ptr, sum_all_ptr, sum_pz_ptr, target_logit_ptr,
    N, V, HD, stride_hidden, stride_weight, stride_logits, inv_temperature,
    V_BUCKET, H_BUCKET,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, FROM_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    split = tl.program_id(0)
    num_splits = tl.num_programs(0)
    pid_t = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < N
    rows = tl.load(rows_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + offs_t, mask=t_mask, other=0)

    # This split's share of the vocabulary, in whole tiles (trailing splits may be empty).
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), num_splits)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)

    run_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_T,), tl.float32)
    run_sum_all = tl.zeros((BLOCK_T,), tl.float32)
    run_sum_pz = tl.zeros((BLOCK_T,), tl.float32)
    target_logit = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        logits = logit_tile(hidden_ptr, weight_ptr, bias_ptr, logits_ptr, rows,
                            offs_t.to(tl.int64), offs_v, t_mask, v_mask, HD, stride_hidden,
                            stride_weight, stride_logits, inv_temperature, HAS_BIAS, FROM_LOGITS,
                            DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_H)
        run_max, run_sum, run_sum_all, run_sum_pz, target_logit = online_softmax_step(
            logits, offs_v, v_mask, targets, run_max, run_sum, run_sum_all, run_sum_pz,
            target_logit, WITH_ENTROPY)

    out = split * N + offs_t
    tl.store(max_ptr + out, run_max, mask=t_mask)
    tl.store(sum_ptr + out, run_sum, mask=t_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=t_mask)
    if WITH_ENTROPY:
        tl.store(sum_all_ptr + out, run_sum_all, mask=t_mask)
        tl.store(sum_pz_ptr + out, run_sum_pz, mask=t_mask)


@triton.heuristics({"WITH_ENTROPY": lambda args: args["sum_pz_ptr"] is not None})
@triton.jit
def _merge_splits_kernel(
    max_ptr, other_ptr, sum_all_ptr, sum_pz_ptr, target_logit_ptr,
    lse_ptr, logprob_ptr, top_ptr, expected_shift_ptr, N, S,
    WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per token, the S splits' partials (rescaled to the largest max) into logsumexp, log pi,
    max and E_p[z] - max. One launch instead of a dozen small torch ops per chunk."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    top = tl.full((BLOCK,), float("-inf"), tl.float32)
    for s in range(S):
        top = tl.maximum(top, tl.load(max_ptr + s * N + offs, mask=mask, other=float("-inf")))
    others = tl.zeros((BLOCK,), tl.float32)
    target_logit = tl.zeros((BLOCK,), tl.float32)
    total_all = tl.zeros((BLOCK,), tl.float32)
    total_pz = tl.zeros((BLOCK,), tl.float32)
    for s in range(S):
        split_max = tl.load(max_ptr + s * N + offs, mask=mask, other=float("-inf"))
        scale = tl.exp(split_max - top)  # an empty split has max -inf: scale 0
        others += tl.load(other_ptr + s * N + offs, mask=mask, other=0.0) * scale
        target_logit += tl.load(target_logit_ptr + s * N + offs, mask=mask, other=0.0)
        if WITH_ENTROPY:
            sum_all = tl.load(sum_all_ptr + s * N + offs, mask=mask, other=0.0)
            moved = tl.where(sum_all > 0, (split_max - top) * sum_all, 0.0)
            total_pz += (tl.load(sum_pz_ptr + s * N + offs, mask=mask, other=0.0) + moved) * scale
            total_all += sum_all * scale
    lse, logprob = lse_and_logprob(top, others, target_logit - top)
    tl.store(lse_ptr + offs, lse, mask=mask)
    tl.store(logprob_ptr + offs, logprob, mask=mask)
    tl.store(top_ptr + offs, top, mask=mask)
    if WITH_ENTROPY:
        tl.store(expected_shift_ptr + offs, total_pz / total_all, mask=mask)


def moment_outputs(n: int, device: torch.device, with_entropy: bool):
    """Empty [n] fp32 outputs of the forward: logsumexp, log pi, max, E_p[z] - max (None without
    entropy)."""
    new = lambda: torch.empty(n, dtype=torch.float32, device=device)  # noqa: E731
    return new(), new(), new(), new() if with_entropy else None


def merge_splits(run_max, run_other, run_sum_all, run_sum_pz, target_logit, out=None):
    """Combine per-split partials [S, N] into per-token logsumexp, log pi, max and E_p[z] - max
    (written into `out`, four [N] fp32 tensors or None for the last, when given).

    `run_other` sums exp(z - max) over the non-target entries, so that
    log pi = -log1p(others / exp(z_y)) keeps full relative precision as pi -> 1 (where
    z_y - logsumexp would cancel). With entropy, `run_sum_pz` holds sum exp(z - max) (z - max);
    otherwise the last output is None.
    """
    S, N = run_max.shape
    lse, logprobs, top, expected_shift = out or moment_outputs(N, run_max.device,
                                                               run_sum_pz is not None)
    if N > 0:
        block = 128 if INTERPRET else 256
        _merge_splits_kernel[(triton.cdiv(N, block),)](
            run_max, run_other, run_sum_all, run_sum_pz, target_logit,
            lse, logprobs, top, expected_shift, N, S, BLOCK=block)
    return lse, logprobs, top, expected_shift


def split_partials(splits: int, n: int, device: torch.device, with_entropy: bool):
    """Empty [splits, n] fp32 partials of a split forward kernel, as merge_splits takes them: max,
    non-target sum, sum of all, sum of p (z - max) (the two None without entropy), target logit."""
    new = lambda: torch.empty((splits, n), dtype=torch.float32, device=device)  # noqa: E731
    return (new(), new(), new() if with_entropy else None, new() if with_entropy else None, new())


def logsumexp_forward(hidden, weight, bias, rows, targets, temperature: float, with_entropy: bool,
                      logits: Optional[torch.Tensor] = None, out=None):
    """Per-token logsumexp, log-prob of the target, max logit and E_p[z] - max, in fp32 (written
    into `out`, as merge_splits takes it, when given).

    The last is None without entropy; the entropy is lse - max - (E_p[z] - max).

    Tokens are rows `rows` [N] of `hidden` [T, H] with `targets` [N]. When `logits` [N, V] (raw
    h W^T from a GEMM, row i for token i) is given, tiles are read from it instead of multiplied.
    """
    N, V, HD = rows.numel(), weight.shape[0], weight.shape[1]
    splits = num_vocab_splits(N, V)
    run_max, run_sum, run_sum_all, run_sum_pz, target_logit = split_partials(
        splits, N, hidden.device, with_entropy)
    if N > 0:
        grid = lambda meta: (splits, triton.cdiv(N, meta["BLOCK_T"]))  # noqa: E731
        _forward_kernel[grid](
            hidden, weight, bias, rows, targets, logits,
            run_max, run_sum, run_sum_all, run_sum_pz, target_logit,
            N, V, HD, hidden.stride(0), weight.stride(0),
            logits.stride(0) if logits is not None else 0, 1.0 / temperature,
            shape_bucket(V), shape_bucket(HD))
    return merge_splits(run_max, run_sum, run_sum_all, run_sum_pz, target_logit, out)
