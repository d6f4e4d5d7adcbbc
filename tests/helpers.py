"""Shared test helpers: random LUFFY batches and relative-error assertions."""

from __future__ import annotations

import torch

from luffy_fast import fused_luffy_loss


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def assert_close(actual, expected, rtol: float, what: str = "", atol: float = 1e-12) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    diff = float((actual.double() - expected.double()).norm())
    scale = float(expected.double().norm())
    assert diff <= rtol * scale + atol, f"{what}: error {diff:.3e} vs scale {scale:.3e} (rtol {rtol})"


def run_loss(batch: dict, backend: str, config, dtype=None):
    """Loss, stats and the gradients of hidden, weight (and bias) for one backend."""
    hidden = batch["hidden"].detach().clone().requires_grad_(True)
    weight = batch["weight"].detach().clone().requires_grad_(True)
    bias = batch.get("bias")
    if bias is not None:
        bias = bias.detach().clone().requires_grad_(True)
    loss, stats = fused_luffy_loss(
        hidden, weight, batch["targets"], batch["advantages"], batch["loss_mask"],
        batch["off_policy_mask"], old_logprobs=batch.get("old_logprobs"), config=config,
        seq_ids=batch.get("seq_ids"), bias=bias, backend=backend)
    loss.backward()
    grads = {"hidden": hidden.grad, "weight": weight.grad}
    if bias is not None:
        grads["bias"] = bias.grad
    return loss.detach(), stats, grads


def random_batch(T: int, H: int, V: int, dtype=torch.float32, seed: int = 0, *, off_fraction=0.5,
                 mask_fraction=0.8, zero_adv_fraction=0.0, num_seqs: int = 4, with_old=True,
                 with_bias=False, ignore_some=False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5 * 2
    seq_ids = torch.randint(0, num_seqs, (T,), generator=gen).sort().values
    seq_adv = torch.randn(num_seqs, generator=gen, dtype=torch.float64)
    seq_adv[torch.rand(num_seqs, generator=gen) < zero_adv_fraction] = 0
    batch = {
        "hidden": hidden.to(dtype),
        "weight": weight.to(dtype),
        "targets": torch.randint(0, V, (T,), generator=gen),
        "advantages": seq_adv[seq_ids].to(dtype),
        "loss_mask": torch.rand(T, generator=gen) < mask_fraction,
        "off_policy_mask": torch.rand(T, generator=gen) < off_fraction,
        "seq_ids": seq_ids,
    }
    if ignore_some:
        batch["targets"][torch.rand(T, generator=gen) < 0.2] = -100
    if with_old:
        batch["old_logprobs"] = (-torch.rand(T, generator=gen, dtype=torch.float64) * 6).to(dtype)
    if with_bias:
        batch["bias"] = (torch.randn(V, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    return batch
