"""The logits GEMM shared by the fused backends: fp32 logits from fp32 or bf16/fp16 operands, or,
opt-in for the triton backend's kept logits, 16-bit ones."""

from __future__ import annotations

import os
from functools import cache

import torch
from torch import Tensor


@cache
def _mm_has_out_dtype(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.mm takes out_dtype=float32 for `dtype` operands here (CUDA, recent torch)."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def fp32_logits(hidden_rows: Tensor, weight: Tensor) -> Tensor:
    """h W^T in fp32 through one GEMM: bf16/fp16 operands accumulate and write in fp32 where
    torch.mm has `out_dtype`, else the product is rounded to the operand dtype and upcast."""
    if hidden_rows.dtype in (torch.float32, torch.float64):
        return hidden_rows @ weight.T
    if _mm_has_out_dtype(hidden_rows.device.type, hidden_rows.dtype):
        return torch.mm(hidden_rows, weight.T, out_dtype=torch.float32)
    return (hidden_rows @ weight.T).float()  # fallback: bf16-rounded logits


# Opt-in, being measured (benchmarks: the "+half" switch): the triton backend keeps 16-bit logits.
HALF_LOGITS = "LUFFY_FAST_HALF_LOGITS"


def half_logits(dtype: torch.dtype) -> bool:
    """Whether the triton backend keeps its chunks of logits in `dtype` itself (bf16/fp16 inputs
    with LUFFY_FAST_HALF_LOGITS=1) rather than fp32: half the bytes for the GEMM to write and the
    kernels to read, and twice the tokens per chunk at a memory budget (the d(weight) GEMM re-reads
    and re-writes [V, H] once per chunk). The logits are then rounded to 16 bits before the
    logsumexp, as a model's LM head in bf16 writes them for the naive loss and the official code;
    accumulation stays fp32."""
    return dtype in (torch.bfloat16, torch.float16) and os.environ.get(HALF_LOGITS, "0") == "1"


def kept_logits(hidden_rows: Tensor, weight: Tensor) -> Tensor:
    """h W^T for the triton backend's kept chunks: 16-bit where `half_logits`, else fp32."""
    if half_logits(hidden_rows.dtype):
        return hidden_rows @ weight.T
    return fp32_logits(hidden_rows, weight)
