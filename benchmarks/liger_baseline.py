"""Liger-Kernel's LigerFusedLinearGRPOLoss, configured as close to the LUFFY loss as it goes.

Closest configuration: beta = 0 and no reference model (LUFFY has no KL term), old log-probs None
(one PPO epoch, ratio 1, as in our benchmarks), loss_type "dr_grpo" with max_completion_length =
the sequence length (our `constant` normalizer). What it cannot do: off-policy tokens get the plain
on-policy ratio (no policy shaping), and there is no entropy term. So it computes a GRPO loss of
the same shape and gradient structure, not the LUFFY loss; the timing comparison is still fair
because the expensive parts (logits, softmax, the three GEMMs) are identical.
"""

from __future__ import annotations

from functools import cache
from typing import Optional

import torch

from .cases import Inputs


@cache
def liger_import_error() -> str | None:
    """None when liger-kernel imports, else why not."""
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"liger-kernel not importable: {type(exc).__name__}: {exc}"
    return None


@cache
def _liger_loss(seq_len: int, compiled: bool) -> torch.nn.Module:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=compiled,
                                    loss_type="dr_grpo", max_completion_length=seq_len,
                                    epsilon_low=0.2, epsilon_high=0.2)


def liger_grpo_loss(inputs: Inputs, compiled: Optional[bool] = None) -> torch.Tensor:
    """Liger's loss on the benchmark inputs (compiled on CUDA, its default; eager on the CPU)."""
    case = inputs.case
    B, L = case.n_seqs, case.seq_len
    loss_fn = _liger_loss(L, compiled=inputs.hidden.is_cuda if compiled is None else compiled)
    loss, _metrics = loss_fn(inputs.hidden.view(B, L, case.H), inputs.weight,
                             inputs.targets.view(B, L), inputs.loss_mask.view(B, L).float(),
                             inputs.seq_advantages)
    return loss
