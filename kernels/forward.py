"""Forward kernel: per-token logsumexp, target logit and (optionally) E_p[z], never storing logits.

Grid: token tiles x vocabulary splits. Each program multiplies hidden and weight tiles in SRAM
with fp32 accumulation and keeps an online max, sum of exponentials and sum of p*z for its token
tile over its share of the vocabulary; `merge_splits` combines the splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import num_vocab_splits, shape_bucket, tile_configs


@triton.autotune(configs=tile_configs("forward"), key=["V_BUCKET", "H_BUCKET"])
@triton.jit
def _forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr,
    max_ptr, sum_ptr, sum_pz_ptr, target_logit_ptr, logits_ptr,
    N, V, HD, stride_hidden, stride_weight, inv_temperature,
    V_BUCKET, H_BUCKET,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, KEEP_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
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
    run_sum_pz = tl.zeros((BLOCK_T,), tl.float32)
    target_logit = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
        for k0 in range(0, HD, BLOCK_H):
            offs_k = k0 + tl.arange(0, BLOCK_H)
            k_mask = offs_k < HD
            h = tl.load(hidden_ptr + rows[:, None] * stride_hidden + offs_k[None, :],
                        mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(weight_ptr + offs_v[:, None].to(tl.int64) * stride_weight + offs_k[None, :],
                        mask=v_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
        logits = acc * inv_temperature
        if KEEP_LOGITS:
            out = logits_ptr + offs_t[:, None].to(tl.int64) * V + offs_v[None, :]
            tl.store(out, logits.to(logits_ptr.dtype.element_ty), mask=t_mask[:, None] & v_mask[None, :])
        logits = tl.where(v_mask[None, :], logits, float("-inf"))

        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        rescale = tl.exp(run_max - new_max)
        exp = tl.exp(logits - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(exp, axis=1)
        if WITH_ENTROPY:
            run_sum_pz = run_sum_pz * rescale + tl.sum(exp * tl.where(v_mask[None, :], logits, 0.0), axis=1)
        is_target = offs_v[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
        run_max = new_max

    out = split * N + offs_t
    tl.store(max_ptr + out, run_max, mask=t_mask)
    tl.store(sum_ptr + out, run_sum, mask=t_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=t_mask)
    if WITH_ENTROPY:
        tl.store(sum_pz_ptr + out, run_sum_pz, mask=t_mask)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full-precision products (Triton would default to tf32).
    return "ieee" if dtype == torch.float32 else "tf32"


def merge_splits(run_max, run_sum, run_sum_pz, target_logit):
    """Combine per-split partials [S, N] into logsumexp, target logit and E_p[z] per token."""
    top = run_max.max(dim=0).values
    scale = torch.exp(run_max - top)  # an empty split has max -inf: scale 0
    total = (run_sum * scale).sum(dim=0)
    lse = top + total.log()
    expected_logit = None if run_sum_pz is None else (run_sum_pz * scale).sum(dim=0) / total
    return lse, target_logit.sum(dim=0), expected_logit


def logsumexp_forward(hidden, weight, bias, rows, targets, temperature: float, with_entropy: bool,
                      keep_logits: bool = False):
    """Per loss-token logsumexp, log-prob of the target, E_p[z] (entropy on) and kept logits.

    Kept logits are stored in the input dtype (bf16 for bf16 inputs), for a backward without
    recompute.

    `rows` [N] selects rows of `hidden` [T, H]; `targets` [N]. Returns fp32 tensors
    (lse, logprobs, expected_logit or None, logits [N, V] in hidden's dtype or None).
    """
    N, V, HD = rows.numel(), weight.shape[0], weight.shape[1]
    device = hidden.device
    splits = num_vocab_splits(N, V)
    partial = lambda: torch.empty((splits, N), dtype=torch.float32, device=device)  # noqa: E731
    run_max, run_sum, target_logit = partial(), partial(), partial()
    run_sum_pz = partial() if with_entropy else run_sum
    logits = torch.empty((N, V), dtype=hidden.dtype, device=device) if keep_logits else run_sum
    if N > 0:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_T"]), splits)  # noqa: E731
        _forward_kernel[grid](
            hidden, weight, bias if bias is not None else weight, rows, targets,
            run_max, run_sum, run_sum_pz, target_logit, logits,
            N, V, HD, hidden.stride(0), weight.stride(0), 1.0 / temperature,
            shape_bucket(V), shape_bucket(HD),
            HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, KEEP_LOGITS=keep_logits,
            DOT_PRECISION=dot_precision(hidden.dtype))
    lse, target, expected = merge_splits(run_max, run_sum, run_sum_pz if with_entropy else None,
                                         target_logit)
    return lse, target - lse, expected, (logits if keep_logits else None)
