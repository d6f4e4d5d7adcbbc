"""A short example of the fused LUFFY loss: loss and gradients beside the reference's."""

from __future__ import annotations

import torch

from luffy_fast import LuffyLossConfig, fused_luffy_loss, group_advantages


def main() -> None:
    torch.manual_seed(0)
    groups, group_size, response_len, hidden_size, vocab = 4, 8, 64, 256, 4096
    T = groups * group_size * response_len
    # Rewards per sample; the last member of each group is the off-policy trace (always correct).
    rewards = (torch.rand(groups, group_size) < 0.3).float()
    rewards[:, -1] = 1.0
    group_ids = torch.arange(groups).repeat_interleave(group_size)
    advantages = group_advantages(rewards.flatten(), group_ids)
    sample = torch.arange(groups * group_size).repeat_interleave(response_len)
    off_policy = (sample % group_size == group_size - 1)

    hidden = torch.randn(T, hidden_size)
    weight = torch.randn(vocab, hidden_size) / hidden_size**0.5
    targets = torch.randint(0, vocab, (T,))
    config = LuffyLossConfig.luffy(max_len=response_len)
    print(f"{T} tokens, hidden {hidden_size}, vocab {vocab}, "
          f"config: LuffyLossConfig.luffy(max_len={response_len})")
    print(f"{'backend':<10} {'loss':>14} {'|d hidden|':>14} {'|d weight|':>14}")
    for backend in ("reference", "torch"):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss, stats = fused_luffy_loss(h, w, targets, advantages[sample], torch.ones(T, dtype=torch.bool),
                                       off_policy, config=config, seq_ids=sample, backend=backend)
        loss.backward()
        print(f"{backend:<10} {loss.item():>14.8f} {h.grad.norm().item():>14.8f} "
              f"{w.grad.norm().item():>14.8f}")
    print("stats:", {k: round(float(v), 5) for k, v in stats.items()})


if __name__ == "__main__":
    main()
