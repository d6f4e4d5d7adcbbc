"""Single-token cases over a three-word vocabulary, worked out on paper.

Setup shared by every case: weight = I (3x3), hidden = z = [ln 2, 0, 0], so the logits are z and
    p = softmax(z) = [2, 1, 1] / 4 = [0.5, 0.25, 0.25],  target y = 0,  pi = 0.5.
With W = I, dL/dh = dL/dz and dL/dW[v] = dL/dz_v * h. One token, token normalizer: weight 1.
"""

from __future__ import annotations

import math

import pytest
import torch

from luffy_fast import LuffyLossConfig, fused_luffy_loss

LN2 = math.log(2.0)
BACKENDS = ["reference", "torch"]


def one_token(backend, config, advantage, off_policy, old_logprob=None):
    hidden = torch.tensor([[LN2, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.eye(3, dtype=torch.float64, requires_grad=True)
    old = None if old_logprob is None else torch.tensor([old_logprob], dtype=torch.float64)
    loss, stats = fused_luffy_loss(
        hidden, weight, torch.tensor([0]), torch.tensor([advantage], dtype=torch.float64),
        torch.tensor([True]), torch.tensor([off_policy]), old_logprobs=old, config=config,
        backend=backend)
    loss.backward()
    return float(loss.detach()), hidden.grad[0], weight.grad, stats


def check_grads(dh, dw, expected_dz):
    expected = torch.tensor(expected_dz, dtype=torch.float64)
    torch.testing.assert_close(dh, expected, rtol=1e-12, atol=1e-12)
    # dL/dW[v, :] = dL/dz_v * h = dL/dz_v * [ln 2, 0, 0]
    expected_dw = torch.zeros(3, 3, dtype=torch.float64)
    expected_dw[:, 0] = expected * LN2
    torch.testing.assert_close(dw, expected_dw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_unclipped(backend):
    # old pi = 0.5 / 1.1, so r = 1.1, inside [0.8, 1.2]; A = 1.
    # L = -r A = -1.1; g = dL/dlog pi = -A r = -1.1; dL/dz = g (e_y - p) = -1.1 [0.5, -0.25, -0.25]
    loss, dh, dw, stats = one_token(backend, LuffyLossConfig.grpo(), 1.0, False,
                                    old_logprob=math.log(0.5 / 1.1))
    assert loss == pytest.approx(-1.1, rel=1e-12)
    check_grads(dh, dw, [-0.55, 0.275, 0.275])
    assert float(stats["ratio_mean"]) == pytest.approx(1.1, rel=1e-6)
    assert float(stats["clip_fraction"]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_clipped_high(backend):
    # r = 1.5 > 1.2 with A = 1: L = -min(1.5, 1.2) = -1.2, and the clipped branch is flat: g = 0.
    loss, dh, dw, stats = one_token(backend, LuffyLossConfig.grpo(), 1.0, False,
                                    old_logprob=math.log(0.5 / 1.5))
    assert loss == pytest.approx(-1.2, rel=1e-12)
    check_grads(dh, dw, [0.0, 0.0, 0.0])
    assert float(stats["clip_fraction"]) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_clipped_low(backend):
    # r = 0.5 < 0.8 with A = -1: L = -min(-0.5, -0.8) = 0.8; clipped, g = 0.
    loss, dh, dw, _ = one_token(backend, LuffyLossConfig.grpo(), -1.0, False,
                                old_logprob=math.log(0.5 / 0.5))
    assert loss == pytest.approx(0.8, rel=1e-12)
    check_grads(dh, dw, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_clipping_off(backend):
    # Same r = 1.5, clipping off: L = -1.5, g = -1.5, dL/dz = -1.5 [0.5, -0.25, -0.25].
    loss, dh, dw, _ = one_token(backend, LuffyLossConfig(clip_on_policy=False), 1.0, False,
                                old_logprob=math.log(0.5 / 1.5))
    assert loss == pytest.approx(-1.5, rel=1e-12)
    check_grads(dh, dw, [-0.75, 0.375, 0.375])


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_policy_shaped(backend):
    # f(pi) = 0.5 / (0.5 + 0.1) = 5/6, A = 1: L = -5/6.
    # g = -A gamma pi / (pi + gamma)^2 = -0.1 * 0.5 / 0.36 = -5/36;
    # dL/dz = -5/36 [0.5, -0.25, -0.25] = [-5/72, 5/144, 5/144].
    loss, dh, dw, _ = one_token(backend, LuffyLossConfig(gamma=0.1), 1.0, True)
    assert loss == pytest.approx(-5 / 6, rel=1e-12)
    check_grads(dh, dw, [-5 / 72, 5 / 144, 5 / 144])


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_policy_unshaped(backend):
    # Shaping off: L = -pi A = -0.5, g = -A pi = -0.5; dL/dz = -0.5 [0.5, -0.25, -0.25].
    # old_logprobs are ignored for off-policy tokens (the behaviour policy is taken as 1).
    loss, dh, dw, _ = one_token(backend, LuffyLossConfig(shaping=False), 1.0, True, old_logprob=-3.0)
    assert loss == pytest.approx(-0.5, rel=1e-12)
    check_grads(dh, dw, [-0.25, 0.125, 0.125])


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gradient(backend):
    # A = 0, c_ent = 1: L = -H with H = -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.5 ln 2.
    # dL/dz_v = c p_v (z_v - E_p[z]); E_p[z] = 0.5 ln 2, z - E = [0.5, -0.5, -0.5] ln 2,
    # so dL/dz = [0.25, -0.125, -0.125] ln 2.
    loss, dh, dw, stats = one_token(backend, LuffyLossConfig(entropy_coef=1.0), 0.0, False)
    assert loss == pytest.approx(-1.5 * LN2, rel=1e-12)
    check_grads(dh, dw, [0.25 * LN2, -0.125 * LN2, -0.125 * LN2])
    assert float(stats["entropy_mean"]) == pytest.approx(1.5 * LN2, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_clip(backend):
    # A = -1, r = 4 > c = 3: L = min(max(4, 1.2), 3) * |A| = 3, and g = 0.
    loss, dh, dw, _ = one_token(backend, LuffyLossConfig.grpo(dual_clip=3.0), -1.0, False,
                                old_logprob=math.log(0.5 / 4.0))
    assert loss == pytest.approx(3.0, rel=1e-12)
    check_grads(dh, dw, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_normalizer_and_temperature(backend):
    # Temperature 0.5 doubles the logits: z = [2 ln 2, 0, 0], p = [4, 1, 1] / 6, pi = 2/3.
    # Off-policy unshaped, A = 1: L_t = -2/3; constant normalizer, 1 sequence, max_len 4: L = -1/6.
    # dL/dz = g (e_y - p) / 4 with g = -2/3, and dL/dh = dL/dz * (1/0.5).
    config = LuffyLossConfig(shaping=False, normalizer="constant", max_len=4, temperature=0.5)
    loss, dh, _, _ = one_token(backend, config, 1.0, True)
    assert loss == pytest.approx(-1 / 6, rel=1e-12)
    p = torch.tensor([4 / 6, 1 / 6, 1 / 6], dtype=torch.float64)
    expected = -2 / 3 * (torch.tensor([1.0, 0, 0], dtype=torch.float64) - p) / 4 * 2
    torch.testing.assert_close(dh, expected, rtol=1e-12, atol=1e-12)
