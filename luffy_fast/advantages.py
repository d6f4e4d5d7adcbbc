"""Group-normalized advantages over mixed on/off-policy groups (docs/algorithm.md, Advantages)."""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_ids: Tensor, use_std: bool = False,
                     eps: float = 1e-6) -> Tensor:
    """A_j = R_j - mean_G(R), or divided by (unbiased std_G(R) + eps) when `use_std`.

    `rewards` [N] float, `group_ids` [N] int64 (any values; equal ids form one group, on- and
    off-policy members together). A group of one gets A = 0, and so does a group whose rewards are
    all equal.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError("group_advantages: `rewards` must be a 1-D float tensor")
    if not isinstance(group_ids, Tensor) or group_ids.shape != rewards.shape:
        raise ValueError(f"group_advantages: `group_ids` must have the shape of `rewards` "
                         f"{tuple(rewards.shape)}")
    if group_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"group_advantages: `group_ids` must be an integer tensor, got {group_ids.dtype}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("group_advantages: `rewards` holds non-finite values")
    if rewards.numel() == 0:
        return rewards.clone()

    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1
    values = rewards.double()
    count = torch.zeros(num_groups, dtype=torch.float64, device=rewards.device)
    count.index_add_(0, group, torch.ones_like(values))
    total = torch.zeros_like(count).index_add_(0, group, values)
    mean = total / count
    centered = values - mean[group]
    if use_std:
        squares = torch.zeros_like(count).index_add_(0, group, centered**2)
        std = (squares / (count - 1).clamp_min(1)).sqrt()
        centered = centered / (std[group] + eps)
    centered = torch.where(count[group] > 1, centered, torch.zeros_like(centered))
    return centered.to(rewards.dtype)
