"""Before timing anything: every implementation computes the same loss and gradients.

At a small shape, naive (benchmarks/naive.py), the torch and triton backends agree with the
package's reference backend on both scenarios; Liger, configured as in the benchmarks, agrees
with the naive loss on the GRPO special case it can express (no off-policy tokens, no entropy).
"""

from __future__ import annotations

import pytest
import torch

from .cases import SCENARIOS, Case, make_inputs
from .impls import loss_fn, skip_reason
from .liger_baseline import liger_grpo_loss


def _loss_and_grads(impl: str, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs.zero_grads()
    # Liger eager here: its torch.compile happens once, in the timed benchmark's warm-up.
    loss = liger_grpo_loss(inputs, compiled=False) if impl == "liger" else loss_fn(impl)(inputs)
    loss.backward()
    grads = inputs.hidden.grad.float().clone(), inputs.weight.grad.float().clone()
    inputs.zero_grads()
    return loss.detach().float(), *grads


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    # fp32 everywhere; on a GPU, kernels may use TF32 tensor cores for fp32 dots.
    tolerance = 1e-2 if got.is_cuda else 2e-4
    scale = want.abs().max().clamp_min(1e-12)
    err = ((got - want).abs().max() / scale).item()
    assert err < tolerance, f"{name}: max relative error {err:.2e}"


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
def test_same_loss_as_reference(bench, impl: str, scenario: str) -> None:
    reason = skip_reason(impl, bench.device, bench.dry_run)
    if reason:
        pytest.skip(reason)
    inputs = make_inputs(Case(scenario, 256, 64, 1000), bench.device)
    want = _loss_and_grads("reference", inputs)
    got = _loss_and_grads(impl, inputs)
    for name, g, w in zip(("loss", "d hidden", "d weight"), got, want):
        _assert_close(f"{impl} vs reference, {scenario}, {name}", g, w)


def test_liger_matches_naive_grpo_case(bench) -> None:
    reason = skip_reason("liger", bench.device, bench.dry_run)
    if reason:
        pytest.skip(reason)
    inputs = make_inputs(Case("rlvr", 256, 64, 1000), bench.device)
    inputs.off_policy_mask.zero_()
    want = _loss_and_grads("naive", inputs)
    got = _loss_and_grads("liger", inputs)
    for name, g, w in zip(("loss", "d hidden", "d weight"), got, want):
        _assert_close(f"liger vs naive (GRPO case), {name}", g, w)
