"""The logits GEMM shared by the fused backends: fp32 logits from fp32 or bf16/fp16 operands."""

from __future__ import annotations

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
