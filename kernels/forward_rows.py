"""Forward over a chunk of logits a GEMM wrote, a program per few whole rows (opt-in).

The split kernel (forward.py) gives each program a share of the vocabulary for a tile of tokens,
reduces across its tile at every step (max, sums) and leaves a merge of the splits to a second
launch. Here a program owns BLOCK_T whole rows and walks them left to right, as the in-place
dL/dz pass does (backward.py), keeping its running max and sums per element of its tile rather
than per row: no reduction inside the loop, one at the end, and no merge launch.

Per element, with m the running max of its column slot, s the sum of exp(z - m) over the
non-target entries seen there (and, with entropy, s_all over all of them and pz the sum of
exp(z - m) (z - m)), a new logit z with d = z - m updates them with one exponential, e = exp(-|d|):
a new max (d > 0) rescales the sums by e and starts them at 1 (or 0 for the target) and 0; else
the sums add e (and e d). The row's slots merge at the end as the splits do in forward.py, and the
outputs are those of logsumexp_forward: logsumexp, log pi (through log1p of the non-target sum,
exact as pi -> 1), the max and E_p[z] - max. One difference: a -inf logit (a banned token) takes
no probability here and leaves E_p[z] finite, where the split kernel's is NaN.

Opt-in: LUFFY_FAST_ROW_FORWARD=1 (read at each call). Timed on an H200 (BENCHMARKS.md, round 4)
it did not beat the split kernel: faster on fp32 logits (2.43 against 2.88 ms a step), slower on
16-bit ones (2.28 against 2.12 ms), the walls within noise. With no vocabulary split, a chunk
needs a couple of rows per streaming multiprocessor to fill the GPU; smaller chunks keep the
split kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .forward import moment_outputs
from .utils import INTERPRET, kept_logit_tile, lse_and_logprob, num_sms, shape_bucket, tuning_bench


def row_forward_enabled(num_rows: int) -> bool:
    """LUFFY_FAST_ROW_FORWARD=1, and a chunk of `num_rows` rows fills the GPU (two per SM)."""
    if os.environ.get("LUFFY_FAST_ROW_FORWARD", "0") != "1":
        return False
    if INTERPRET or not torch.cuda.is_available():
        return True
    return num_rows >= 2 * num_sms()


def _configs() -> list[triton.Config]:
    """Rows per program and tile width (memory-bound, as the in-place pass)."""
    if INTERPRET or not torch.cuda.is_available():
        return [triton.Config({"BLOCK_T": 2, "BLOCK_V": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_T": t, "BLOCK_V": v}, num_warps=w)
            # a few accumulators per element: smaller tiles let more programs hide the latency
            for t, v, w in ((1, 4096, 8), (1, 2048, 8), (1, 2048, 4), (1, 1024, 4), (2, 1024, 4),
                            (2, 2048, 8), (4, 512, 4))]


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None,
                    "WITH_ENTROPY": lambda args: args["expected_shift_ptr"] is not None})
@triton.autotune(configs=_configs(), key=["C_BUCKET", "V_BUCKET"], do_bench=tuning_bench)
@triton.jit
def _row_forward_kernel(
    logits_ptr, bias_ptr, targets_ptr, lse_ptr, logprob_ptr, top_ptr, expected_shift_ptr,
    C, V, stride_logits, inv_temperature, C_BUCKET, V_BUCKET,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < C
    rows = offs_t.to(tl.int64)
    targets = tl.load(targets_ptr + offs_t, mask=t_mask, other=0)
    m = tl.full((BLOCK_T, BLOCK_V), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    s_all = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    pz = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        valid = t_mask[:, None] & (offs_v < V)[None, :]
        z = kept_logit_tile(logits_ptr, bias_ptr, rows, offs_v, t_mask, offs_v < V, stride_logits,
                            inv_temperature, HAS_BIAS)
        # outside the tile's rows and columns, and for a -inf logit, d = -inf: e = 0, nothing
        # moves (z - m would be NaN while m is still -inf); a NaN logit carries through
        d = tl.where(valid & (z != float("-inf")), z - m, float("-inf"))
        e = tl.exp(-tl.abs(d))
        up = d > 0
        one = tl.where(offs_v[None, :] == targets[:, None], 0.0, 1.0)  # the target stays out of s
        s = tl.where(up, s * e + one, s + one * e)
        if WITH_ENTROPY:
            moved = tl.where(s_all > 0, -d * s_all, 0.0)  # (m - z) s_all: the old sum's shift
            pz = tl.where(up, (pz + moved) * e, pz + tl.where(e > 0, e * d, 0.0))  # 0, not 0 x -inf
            s_all = tl.where(up, s_all * e + 1.0, s_all + e)
        m = tl.where(up, z, m)

    top = tl.max(m, axis=1)
    scale = tl.exp(m - top[:, None])  # a slot that saw nothing has m = -inf: scale 0
    others = tl.sum(s * scale, axis=1)
    target_raw = tl.load(logits_ptr + rows * stride_logits + targets, mask=t_mask,
                         other=0.0).to(tl.float32)
    if HAS_BIAS:
        target_raw += tl.load(bias_ptr + targets, mask=t_mask, other=0.0).to(tl.float32)
    lse, logprob = lse_and_logprob(top, others, target_raw * inv_temperature - top)
    tl.store(lse_ptr + offs_t, lse, mask=t_mask)
    tl.store(logprob_ptr + offs_t, logprob, mask=t_mask)
    tl.store(top_ptr + offs_t, top, mask=t_mask)
    if WITH_ENTROPY:
        shift = tl.where(s_all > 0, (m - top[:, None]) * s_all, 0.0)
        sum_pz = tl.sum((pz + shift) * scale, axis=1)
        tl.store(expected_shift_ptr + offs_t, sum_pz / tl.sum(s_all * scale, axis=1), mask=t_mask)


def row_forward(logits: torch.Tensor, bias, targets: torch.Tensor, temperature: float,
                with_entropy: bool, out=None):
    """logsumexp_forward's outputs (logsumexp, log pi, max, E_p[z] - max or None) for the C tokens
    whose raw logits h W^T are the rows of `logits` [C, V] (fp32 or 16-bit, row i for token i),
    written into `out` when given (four [C] fp32 tensors, the last None without entropy)."""
    C, V = logits.shape
    lse, logprobs, top, expected_shift = out or moment_outputs(C, logits.device, with_entropy)
    if C > 0:
        grid = lambda meta: (triton.cdiv(C, meta["BLOCK_T"]),)  # noqa: E731
        _row_forward_kernel[grid](
            logits, bias, targets, lse, logprobs, top, expected_shift,
            C, V, logits.stride(0), 1.0 / temperature, shape_bucket(C), shape_bucket(V))
    return lse, logprobs, top, expected_shift
