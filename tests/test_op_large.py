"""A batch whose materialized fp32 logits would need 32 GiB, on a 24 GiB machine."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close, run_loss
from luffy_fast import LuffyLossConfig


@pytest.mark.slow
def test_torch_backend_beyond_int32_and_beyond_memory():
    # T * V = 131072 * 65536 = 2^33 logits (32 GiB in fp32). The batch repeats a P-token pattern,
    # so the exact answer follows from the reference on P tokens: the token-mean loss and d(weight)
    # are the pattern's, and each d(hidden) row is the pattern row's times P / T.
    T, V, H, P = 131072, 65536, 8, 256
    gen = torch.Generator().manual_seed(0)
    pattern = {
        "hidden": torch.randn(P, H, generator=gen),
        "weight": torch.randn(V, H, generator=gen),
        "targets": torch.randint(0, V, (P,), generator=gen),
        "advantages": torch.randn(P, generator=gen),
        "loss_mask": torch.rand(P, generator=gen) < 0.9,
        "off_policy_mask": torch.rand(P, generator=gen) < 0.5,
        "old_logprobs": -torch.rand(P, generator=gen) * 12,
    }
    config = LuffyLossConfig(clip_on_policy=True, entropy_coef=0.01, memory_budget_mb=256)
    expected_loss, _, expected = run_loss(pattern, "reference", config)
    repeats = T // P
    full = {k: (v if k == "weight" else v.repeat(repeats, *([1] * (v.dim() - 1))))
            for k, v in pattern.items()}
    loss, stats, grads = run_loss(full, "torch", config)
    assert int(stats["num_on_policy_tokens"] + stats["num_off_policy_tokens"]) == \
        int(pattern["loss_mask"].sum()) * repeats
    assert_close(loss, expected_loss, 1e-4, "loss")
    assert_close(grads["weight"], expected["weight"], 1e-4, "d(weight)")
    # Rows past 2^31 / V = 32768 tokens exercise offsets beyond int32.
    for block in (0, repeats // 2, repeats - 1):
        rows = slice(block * P, (block + 1) * P)
        assert_close(grads["hidden"][rows] * repeats, expected["hidden"], 1e-4, f"d(hidden) block {block}")
