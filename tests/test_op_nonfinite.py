"""The op's guards (docs/robustness.md, items 4): non-finite `hidden`, `weight` or `bias` at loss
tokens raise a ValueError naming the input, on every backend; the on-policy ratio never
overflows for finite inputs; token_logprobs checks devices (a meta tensor holds no values)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from helpers import random_batch, run_loss
from luffy_fast import LuffyLossConfig, fused_luffy_loss, token_logprobs
from luffy_fast.loss_math import MAX_LOG_RATIO, policy_loss, policy_terms

TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)"))
BACKENDS = ["reference", "torch", TRITON]
CONFIG = LuffyLossConfig.grpo(entropy_coef=0.01)


def small_batch(**kwargs) -> dict:
    batch = random_batch(24, 8, 40, seed=3, with_bias=True, **kwargs)
    batch["loss_mask"][:] = True
    batch["loss_mask"][5] = False  # token 5 is not part of the loss
    return batch


def loss_of(batch: dict, backend: str, config: LuffyLossConfig = CONFIG):
    return fused_luffy_loss(batch["hidden"], batch["weight"], batch["targets"],
                            batch["advantages"], batch["loss_mask"], batch["off_policy_mask"],
                            old_logprobs=batch["old_logprobs"], config=config,
                            seq_ids=batch["seq_ids"], bias=batch["bias"], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_hidden_at_a_loss_token_is_named(backend, value):
    batch = small_batch()
    batch["hidden"][7, 2] = value
    with pytest.raises(ValueError, match=r"`hidden` holds non-finite values at loss token 7"):
        loss_of(batch, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_nonfinite_weight_or_bias_is_named(backend, name):
    batch = small_batch()
    batch[name].view(-1)[11] = math.nan
    with pytest.raises(ValueError, match=rf"`{name}` holds non-finite values"):
        loss_of(batch, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_hidden_outside_the_loss_changes_nothing(backend):
    """Token 5 is masked: its row never enters the loss, so NaN there gives the same result as
    zeros there (the oracle), and no error."""
    clean, dirty = small_batch(), small_batch()
    clean["hidden"][5] = 0.0
    dirty["hidden"][5] = math.nan
    expected, _, expected_grads = run_loss(clean, backend, CONFIG)
    got, _, grads = run_loss(dirty, backend, CONFIG)
    assert torch.equal(got, expected)
    assert torch.equal(grads["weight"], expected_grads["weight"])
    assert torch.equal(grads["hidden"], expected_grads["hidden"])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_check_finite_off_returns_the_nonfinite_loss(backend):
    batch = small_batch()
    batch["hidden"][7, 2] = math.nan
    loss, _ = loss_of(batch, backend, CONFIG.replace(check_finite=False))
    assert math.isnan(float(loss))


def test_a_nan_at_a_zero_advantage_token_reaches_the_gradients_as_in_the_reference():
    """check_finite off, no entropy: token 7's advantage is 0, so the torch backend puts it in a
    forward-only chunk (chunked._chunks). Its NaN hidden still makes dL/d log pi = -0 x NaN = NaN,
    which autograd (the reference) carries into d(hidden) row 7 and every d(weight) and d(bias)
    entry; the torch backend's gradients are NaN at exactly those places, finite elsewhere."""
    batch = small_batch()
    batch["advantages"][7] = 0.0
    batch["hidden"][7, 2] = math.nan
    config = LuffyLossConfig.grpo(check_finite=False)
    _, _, expected = run_loss(batch, "reference", config)
    _, _, grads = run_loss(batch, "torch", config)
    assert bool(expected["hidden"][7].isnan().all()) and bool(expected["weight"].isnan().all())
    for name, grad in grads.items():
        assert torch.equal(grad.isnan(), expected[name].isnan()), name
    rows = torch.arange(24) != 7
    torch.testing.assert_close(grads["hidden"][rows], expected["hidden"][rows], rtol=1e-5,
                               atol=1e-7)


def test_overflowing_logits_of_finite_inputs_are_reported():
    batch = small_batch()
    batch["hidden"][3] = 3e38  # finite, but h . w overflows float32
    with pytest.raises(ValueError, match=r"`hidden` and `weight` are finite, but their logits"):
        loss_of(batch, "reference")


# --------------------------------------------------------------------------- the ratio

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gap", [88.0, 100.0, 1e30])
def test_ratio_of_far_old_logprobs_stays_finite(backend, gap):
    """old = current log-prob - gap, no clipping, no dual clip: the log-ratio is clamped at
    MAX_LOG_RATIO, so each token's loss is -exp(20) A and its gradient 0 (hand formula)."""
    batch = random_batch(10, 6, 30, seed=5, with_old=False, with_bias=False)
    batch["loss_mask"][:] = True
    batch["off_policy_mask"][:] = False
    config = LuffyLossConfig(clip_on_policy=False, normalizer="token")
    current, _ = token_logprobs(batch["hidden"], batch["weight"], batch["targets"])
    batch["old_logprobs"] = current - gap
    loss, stats, grads = run_loss(batch, backend, config)
    ratio = math.exp(MAX_LOG_RATIO)
    expected = -ratio * batch["advantages"].double().mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(stats["ratio_max"]) == pytest.approx(ratio, rel=1e-5)
    assert float(grads["hidden"].abs().max()) == 0.0  # the clamp passes no gradient


def test_ratio_within_the_bound_is_exact():
    """log-ratios up to the bound: ratio, clipping and loss as without the clamp."""
    logprobs = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    old = logprobs - torch.tensor([19.5, 0.1, -0.3, -5.0], dtype=torch.float64)
    advantages = torch.tensor([-1.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    off = torch.zeros(4, dtype=torch.bool)
    config = LuffyLossConfig(clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    terms = policy_terms(logprobs, old, advantages, off, config)
    ratio = torch.exp(logprobs - old)
    assert torch.equal(terms.ratio, ratio)
    # by hand: token 0 A < 0, r = e^19.5 > dual clip 3 -> loss 3 |A|; token 1 A > 0, r = 1.105
    # inside [0.8, 1.2] -> -r A; token 2 A < 0, r = e^-0.3 = 0.741 < 0.8 -> clipped at
    # -0.8 A = 1.6; token 3 A > 0, r = e^-5 -> -r A
    expected = torch.tensor([3.0, -math.exp(0.1), 1.6, -math.exp(-5.0) * 0.5], dtype=torch.float64)
    torch.testing.assert_close(terms.loss, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("clip_on_policy", [True, False])
def test_closed_form_coefficient_matches_autograd_across_the_bound(clip_on_policy):
    """The closed-form dL/d log pi equals autograd of the (clamped) per-token loss, for
    log-ratios from -40 to 40 (both sides of MAX_LOG_RATIO)."""
    gen = torch.Generator().manual_seed(0)
    n = 400
    logprobs = -torch.rand(n, generator=gen, dtype=torch.float64) * 5
    old = logprobs - torch.linspace(-40, 40, n, dtype=torch.float64)
    advantages = torch.randn(n, generator=gen, dtype=torch.float64)
    off = torch.rand(n, generator=gen) < 0.3
    config = LuffyLossConfig(clip_on_policy=clip_on_policy, dual_clip=None)
    leaf = logprobs.clone().requires_grad_(True)
    policy_loss(leaf, old, advantages, off, config).sum().backward()
    terms = policy_terms(logprobs, old, advantages, off, config)
    assert torch.isfinite(terms.loss).all() and torch.isfinite(terms.grad_coef).all()
    torch.testing.assert_close(terms.grad_coef, leaf.grad, rtol=1e-12, atol=0.0)


# --------------------------------------------------------------------------- token_logprobs

@pytest.mark.parametrize("name", ["weight", "bias", "hidden"])
def test_token_logprobs_refuses_meta_tensors(name):
    """The message names the op the user called and the input (the checks are the loss op's)."""
    tensors = {"hidden": torch.randn(4, 3), "weight": torch.randn(5, 3), "bias": torch.randn(5)}
    tensors[name] = torch.empty_like(tensors[name], device="meta")
    with pytest.raises(ValueError, match=rf"^token_logprobs: `{name}` .*meta"):
        token_logprobs(tensors["hidden"], tensors["weight"], torch.tensor([0, 1, 2, 3]),
                       bias=tensors["bias"])


@pytest.mark.parametrize("name", ["weight", "hidden"])
def test_the_loss_refuses_meta_tensors_before_any_work(name):
    """The loss op makes the same checks of hidden/weight/bias as token_logprobs
    (inputs._check_hidden_weight): a meta tensor is a ValueError naming it."""
    T = 4
    tensors = {"hidden": torch.randn(T, 3), "weight": torch.randn(5, 3)}
    tensors[name] = torch.empty_like(tensors[name], device="meta")
    with pytest.raises(ValueError, match=rf"^fused_luffy_loss: `{name}` .*meta"):
        fused_luffy_loss(tensors["hidden"], tensors["weight"], torch.tensor([0, 1, 2, 3]),
                         torch.ones(T), torch.ones(T, dtype=torch.bool),
                         torch.zeros(T, dtype=torch.bool))
