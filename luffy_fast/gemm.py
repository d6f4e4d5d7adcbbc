"""The logits GEMM shared by the fused backends: fp32 logits from fp32 or bf16/fp16 operands, or,
for the triton backend's kept logits with LuffyLossConfig.logits_dtype = "input", 16-bit ones."""

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
    torch.mm has `out_dtype`, else the product is rounded to the operand dtype and upcast.
    Autocast is off inside, so fp32 operands give fp32 logits under it too."""
    with torch.autocast(hidden_rows.device.type, enabled=False):
        if hidden_rows.dtype in (torch.float32, torch.float64):
            return hidden_rows @ weight.T
        if _mm_has_out_dtype(hidden_rows.device.type, hidden_rows.dtype):
            return torch.mm(hidden_rows, weight.T, out_dtype=torch.float32)
        return (hidden_rows @ weight.T).float()  # fallback: bf16-rounded logits


def half_logits(dtype: torch.dtype, logits_dtype: str) -> bool:
    """Whether the triton backend keeps its chunks of logits in `dtype` itself rather than fp32:
    16-bit inputs with LuffyLossConfig.logits_dtype = "input" (half the bytes, twice the tokens
    per chunk at a budget; the logits rounded to 16 bits before the logsumexp)."""
    return logits_dtype == "input" and dtype in (torch.bfloat16, torch.float16)


def kept_logits(hidden_rows: Tensor, weight: Tensor, half: bool) -> Tensor:
    """h W^T for the triton backend's kept chunks: in the operands' 16-bit dtype when `half`
    (`half_logits`), else fp32."""
    if not half:
        return fp32_logits(hidden_rows, weight)
    with torch.autocast(hidden_rows.device.type, enabled=False):
        return hidden_rows @ weight.T
