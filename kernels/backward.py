"""Backward: dL/dz for chunks of active tokens, formed in registers, then the two gradient GEMMs.

For a chunk of active tokens (masked, clipped and zero-advantage tokens were compacted away),
`_grad_logits_kernel` takes each logit tile (recomputed from hidden and weight with fp32
accumulation, or read from the chunk of logits the forward's GEMM wrote), forms

    dL/dz = g (e_y - p) + c_ent p (z - E_p[z]),   scaled by 1 / temperature,

and writes it to a [chunk, V] buffer in the input dtype. d(hidden) for the chunk is then one
token-major GEMM (dz @ W) and d(weight) a vocabulary-major GEMM whose reduction runs over the
chunk's tokens (dz^T @ h), accumulated across chunks. No [T, V] buffer and no atomics.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from . import backward_lean
from .utils import (
    AUTOTUNE,
    IN_PLACE_FLAGS,
    LOGIT_FLAGS,
    expm1,
    in_place_autotune,
    kept_logit_tile,
    lean_passes,
    logit_tile,
    shape_bucket,
)

# The dL/dz kernels' flags: the logit tile's, and whether the entropy term is on.
GRAD_FLAGS = {**LOGIT_FLAGS, **IN_PLACE_FLAGS}


@triton.jit
def grad_logit_tile(logits, offs_t, t_mask, offs_v, targets_ptr, lse_ptr, logprob_ptr, coef_ptr,
                    entropy_weight_ptr, row_max_ptr, expected_shift_ptr, inv_temperature,
                    WITH_ENTROPY: tl.constexpr):
    """The fp32 dL/dz tile of tokens `offs_t` from their logit tile z (already divided by the
    temperature) and the forward's per-token values; one definition for both backward kernels."""
    lse = tl.load(lse_ptr + offs_t, mask=t_mask, other=0.0)
    coef = tl.load(coef_ptr + offs_t, mask=t_mask, other=0.0)
    targets = tl.load(targets_ptr + offs_t, mask=t_mask, other=-1)
    prob = tl.exp(logits - lse[:, None])
    # g (e_y - p): at the target g (1 - p_y) = -g expm1(log p_y), from the forward's log p_y
    # (exact as p_y -> 1, where z_y - lse would cancel).
    target_logprob = tl.load(logprob_ptr + offs_t, mask=t_mask, other=0.0)
    is_target = offs_v[None, :] == targets[:, None]
    grad = tl.where(is_target, -expm1(target_logprob)[:, None], -prob) * coef[:, None]
    if WITH_ENTROPY:
        entropy_weight = tl.load(entropy_weight_ptr + offs_t, mask=t_mask, other=0.0)
        # z - E_p[z] as (z - max) - (E_p[z] - max): no cancellation for a peaked distribution.
        row_max = tl.load(row_max_ptr + offs_t, mask=t_mask, other=0.0)
        expected_shift = tl.load(expected_shift_ptr + offs_t, mask=t_mask, other=0.0)
        shift = (logits - row_max[:, None]) - expected_shift[:, None]
        grad += prob * entropy_weight[:, None] * shift
    return grad * inv_temperature


@triton.jit
def dz_tile(hidden_ptr, weight_ptr, bias_ptr, rows_ptr, logit_rows_ptr, logits_ptr, targets_ptr,
            lse_ptr, logprob_ptr, coef_ptr, entropy_weight_ptr, row_max_ptr, expected_shift_ptr,
            C, V, HD, stride_hidden, stride_weight, stride_logits, inv_temperature,
            HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
            FROM_LOGITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's fp32 dL/dz tile (token tile program_id(0) of the C-token chunk x vocabulary
    tile program_id(1)): logits recomputed from hidden and weight tiles (or read from the
    forward's GEMM output, row logit_rows[i] for token i), then `grad_logit_tile`. Returns the
    tile with its token and vocabulary offsets and masks."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    t_mask = offs_t < C
    v_mask = offs_v < V
    rows = tl.load(rows_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    logit_rows = rows  # unused unless the logits are read from a buffer
    if FROM_LOGITS:
        logit_rows = tl.load(logit_rows_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    logits = logit_tile(hidden_ptr, weight_ptr, bias_ptr, logits_ptr, rows, logit_rows, offs_v,
                        t_mask, v_mask, HD, stride_hidden, stride_weight, stride_logits,
                        inv_temperature, HAS_BIAS, FROM_LOGITS, DOT_PRECISION,
                        BLOCK_T, BLOCK_V, BLOCK_H)
    grad = grad_logit_tile(logits, offs_t, t_mask, offs_v, targets_ptr, lse_ptr, logprob_ptr,
                           coef_ptr, entropy_weight_ptr, row_max_ptr, expected_shift_ptr,
                           inv_temperature, WITH_ENTROPY)
    return grad, offs_t, t_mask, offs_v, v_mask


@triton.heuristics(GRAD_FLAGS)
@triton.autotune(**AUTOTUNE)
@triton.jit
def _grad_logits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, logit_rows_ptr, logits_ptr, targets_ptr,
    lse_ptr, logprob_ptr, coef_ptr, entropy_weight_ptr, row_max_ptr, expected_shift_ptr, grad_logits_ptr,
    C, V, HD, stride_hidden, stride_weight, stride_logits, inv_temperature,
    V_BUCKET, H_BUCKET,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, FROM_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    grad, offs_t, t_mask, offs_v, v_mask = dz_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows_ptr, logit_rows_ptr, logits_ptr, targets_ptr, lse_ptr,
        logprob_ptr, coef_ptr, entropy_weight_ptr, row_max_ptr, expected_shift_ptr, C, V, HD,
        stride_hidden, stride_weight, stride_logits, inv_temperature, HAS_BIAS, WITH_ENTROPY,
        FROM_LOGITS, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_H)
    out = grad_logits_ptr + offs_t[:, None].to(tl.int64) * V + offs_v[None, :]
    tl.store(out, grad.to(grad_logits_ptr.dtype.element_ty), mask=t_mask[:, None] & v_mask[None, :])


def grad_logits(hidden, weight, bias, rows, targets, lse, logprobs, coef, entropy_weight, row_max,
                expected_shift, temperature: float, out: torch.Tensor,
                logits: Optional[torch.Tensor] = None,
                logit_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fill `out` [C, V] with dL/dz for C active tokens.

    Token i is row rows[i] of `hidden`; with `logits` given (raw h W^T from the forward's GEMM),
    its logits are row logit_rows[i] of that buffer instead of being recomputed.
    """
    C, V, HD = out.shape[0], weight.shape[0], weight.shape[1]
    grid = lambda meta: (triton.cdiv(C, meta["BLOCK_T"]), triton.cdiv(V, meta["BLOCK_V"]))  # noqa: E731
    _grad_logits_kernel[grid](
        hidden, weight, bias, rows, logit_rows, logits, targets,
        lse, logprobs, coef, entropy_weight, row_max, expected_shift, out,
        C, V, HD, hidden.stride(0), weight.stride(0),
        logits.stride(0) if logits is not None else 0, 1.0 / temperature,
        shape_bucket(V), shape_bucket(HD))
    return out


@triton.heuristics(IN_PLACE_FLAGS)
@triton.autotune(**in_place_autotune())
@triton.jit
def _grad_logits_in_place_kernel(
    logits_ptr, grad_logits_ptr, bias_ptr, targets_ptr, lse_ptr, logprob_ptr, coef_ptr,
    entropy_weight_ptr, row_max_ptr, expected_shift_ptr,
    C, V, stride_logits, stride_grad, inv_temperature, C_BUCKET, V_BUCKET,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # One program owns BLOCK_T whole rows and walks them left to right. dL/dz of columns
    # [v0, v0 + BLOCK_V) lands in bytes that hold logits of columns < v0 + BLOCK_V (the same
    # columns when both have one dtype, the first half of the row for 16-bit dL/dz over fp32
    # logits), so every write falls on logits this program has read already; the barrier orders
    # the other warps' reads of this tile before any write over them.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < C
    coef = tl.load(coef_ptr + offs_t, mask=t_mask, other=0.0)
    active = coef != 0
    if WITH_ENTROPY:
        active = active | (tl.load(entropy_weight_ptr + offs_t, mask=t_mask, other=0.0) != 0)
    rows = offs_t.to(tl.int64)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask = t_mask[:, None] & (offs_v < V)[None, :]
        z = kept_logit_tile(logits_ptr, bias_ptr, rows, offs_v, t_mask, offs_v < V, stride_logits,
                            inv_temperature, HAS_BIAS)
        grad = grad_logit_tile(z, offs_t, t_mask, offs_v, targets_ptr,
                               lse_ptr, logprob_ptr, coef_ptr, entropy_weight_ptr, row_max_ptr,
                               expected_shift_ptr, inv_temperature, WITH_ENTROPY)
        # an inactive token (clipped, or no weight) contributes exact zeros, whatever its logits
        grad = tl.where(active[:, None], grad, 0.0)
        tl.debug_barrier()
        tl.store(grad_logits_ptr + rows[:, None] * stride_grad + offs_v[None, :],
                 grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def grad_logits_in_place(logits, bias, targets, lse, logprobs, coef, entropy_weight, row_max,
                         expected_shift, temperature: float, dtype: torch.dtype,
                         lean: Optional[bool] = None) -> torch.Tensor:
    """dL/dz of a chunk's C tokens written over their logits [C, V] (raw h W^T, contiguous; fp32,
    or `dtype` itself with LuffyLossConfig.logits_dtype = "input"), as a [C, V] tensor in `dtype`
    that shares their memory: in place of each logit when the dtypes match, else 16-bit in the
    first half of each fp32 logits row (row stride 2V, which cuBLAS takes as is). One buffer
    instead of logits plus a separate dL/dz. Tokens with a zero `coef` and entropy weight get zero
    rows. `logits` is overwritten. `lean` (default: LUFFY_FAST_LEAN=1, utils.lean_passes) runs
    the lean kernel instead (kernels/backward_lean.py: same arguments and layout)."""
    C, V = logits.shape
    if dtype == logits.dtype:
        grad = logits
    elif logits.dtype == torch.float32 and dtype.itemsize == 2:
        grad = logits.view(dtype)[:, :V]
    else:  # a wider dL/dz would not fit in narrower logits' bytes
        raise ValueError(f"grad_logits_in_place: dL/dz in {dtype} cannot be written over "
                         f"{logits.dtype} logits (same dtype, or 16-bit over fp32)")
    if C == 0:
        return grad
    args = (logits, grad, bias, targets, lse, logprobs, coef, entropy_weight, row_max,
            expected_shift, C, V, logits.stride(0), grad.stride(0), 1.0 / temperature,
            shape_bucket(C), shape_bucket(V))
    grid = lambda meta: (triton.cdiv(C, meta["BLOCK_T"]),)  # noqa: E731
    lean = lean_passes() if lean is None else lean
    kernel = backward_lean._lean_grad_logits_kernel if lean else _grad_logits_in_place_kernel
    tuner = kernel.fn
    # The first call of a size class times each config on this very chunk, which overwrites its
    # logits: they are put back from a host copy and the pass reruns with the chosen config. A
    # device copy (the autotuner's `restore_value`) would pass the memory budget by a chunk.
    tunes = len(tuner.configs) > 1 and _tuning_key(args) not in tuner.cache
    saved = _host_copy(logits) if tunes else None
    tuned_before = len(tuner.cache)
    kernel[grid](*args)
    if len(tuner.cache) > tuned_before:
        if saved is None:
            raise RuntimeError("grad_logits_in_place: the kernel autotuned without a saved copy "
                               "of the logits it overwrote (tuning key mismatch)")
        logits.copy_(saved)
        kernel[grid](*args)
    elif tunes:  # a tuned config ran, under a key other than _tuning_key's
        warnings.warn("grad_logits_in_place: this Triton keys its autotune cache differently from "
                      "_tuning_key, so every call copies its chunk to the host", stacklevel=2)
    return grad


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to("cpu", copy=True)  # a copy even of a CPU tensor (the interpreter's)


def _tuning_key(args) -> tuple:
    """The in-place kernel's autotune cache key for these positional arguments, formed as Triton's
    Autotuner.run forms it (Triton 3.6 and 3.9): the `key` arguments' values, then the dtype of
    every argument that has one, in order (the heuristics' flags have none)."""
    return args[-2:] + tuple(str(arg.dtype) for arg in args if hasattr(arg, "dtype"))


def accumulate_gradients(grad_logits_chunk, hidden_rows, weight, rows, grad_hidden, grad_weight,
                         grad_bias, weight_beta: float = 1.0, weight_scale: float = 1.0) -> None:
    """d(hidden)[rows] = dz @ W; d(weight) = weight_beta d(weight) + weight_scale dz^T @ h (the
    old d(weight) is not read when weight_beta is 0); d(bias) += sum of dz (GEMMs, fp32
    accumulate). dz, hidden and weight share one dtype (the op's inputs are checked for it)."""
    if grad_hidden is not None:
        grad_hidden.index_copy_(0, rows, (grad_logits_chunk @ weight).to(grad_hidden.dtype))
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits_chunk.T, hidden_rows, beta=weight_beta, alpha=weight_scale)
    if grad_bias is not None:
        grad_bias += grad_logits_chunk.sum(dim=0, dtype=torch.float32)
