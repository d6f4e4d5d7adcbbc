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
@pytest.mark.parametrize("ratio, advantage, expected_loss, g", [
    (1.25, 1.0, -1.25, -1.25),  # inside [1 - 0.2, 1 + 0.28]: L = -r A, g = -A r
    (0.75, -1.0, 0.8, 0.0),     # below 1 - 0.2 with A < 0: L = -min(-0.75, -0.8) = 0.8, flat
])
def test_asymmetric_clip_range(backend, ratio, advantage, expected_loss, g):
    # clip_low = 0.2, clip_high = 0.28 (swapped, both cases would land on the other side).
    config = LuffyLossConfig.grpo(clip_low=0.2, clip_high=0.28)
    loss, dh, dw, _ = one_token(backend, config, advantage, False, old_logprob=math.log(0.5 / ratio))
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    check_grads(dh, dw, [g * 0.5, -g * 0.25, -g * 0.25])


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_policy_shaped_gamma_one_half(backend):
    # gamma = 0.5: f(1/2) = 0.5 / 1.0 = 1/2, L = -1/2; g = -A gamma pi / (pi + gamma)^2 = -1/4,
    # dL/dz = -1/4 [0.5, -0.25, -0.25].
    loss, dh, dw, _ = one_token(backend, LuffyLossConfig(gamma=0.5), 1.0, True)
    assert loss == pytest.approx(-0.5, rel=1e-12)
    check_grads(dh, dw, [-0.125, 0.0625, 0.0625])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_clip_leaves_positive_advantages_alone(backend):
    # The dual clip bounds the loss of A < 0 only. A = 1, r = 4, c = 3: the PPO clip gives
    # L = -min(4, 1.2) = -1.2 (flat, g = 0), not -3.
    loss, dh, dw, _ = one_token(backend, LuffyLossConfig.grpo(dual_clip=3.0), 1.0, False,
                                old_logprob=math.log(0.5 / 4.0))
    assert loss == pytest.approx(-1.2, rel=1e-12)
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


# ------------------------------------------------------------------ several tokens, worked out
# Two kinds of token over the same three-word vocabulary (W = I, target y = 0):
#   P: h = [ln 2, 0, 0], p = [1/2, 1/4, 1/4], pi = 1/2;   Q: h = 0, p = [1/3, 1/3, 1/3], pi = 1/3.
# e_y - p is then [1/2, -1/4, -1/4] for P and [2/3, -1/3, -1/3] for Q.
KIND = {"P": ([LN2, 0.0, 0.0], 0.5), "Q": ([0.0, 0.0, 0.0], 1 / 3)}
E_Y_MINUS_P = {"P": [0.5, -0.25, -0.25], "Q": [2 / 3, -1 / 3, -1 / 3]}


def several_tokens(backend, config, tokens, seq_ids=None):
    """`tokens`: (kind, advantage, off_policy, loss-mask weight, ratio against the old policy or
    None for old = current). Returns the loss, d(hidden) and the stats."""
    hidden = torch.tensor([KIND[t[0]][0] for t in tokens], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([math.log(KIND[k][1] / ratio) if ratio else math.log(KIND[k][1])
                        for k, _, _, _, ratio in tokens], dtype=torch.float64)
    as_tensor = lambda i, dtype: torch.tensor([t[i] for t in tokens], dtype=dtype)  # noqa: E731
    loss, stats = fused_luffy_loss(
        hidden, torch.eye(3, dtype=torch.float64), torch.zeros(len(tokens), dtype=torch.long),
        as_tensor(1, torch.float64), as_tensor(3, torch.float64), as_tensor(2, torch.bool),
        old_logprobs=old, config=config,
        seq_ids=None if seq_ids is None else torch.tensor(seq_ids), backend=backend)
    loss.backward()
    return float(loss.detach()), hidden.grad, stats


def expected_dz(rows):
    """dL/dz rows from (kind, factor): factor (e_y - p) for the kind, factor = g_t x weight_t."""
    return torch.tensor([[factor * e for e in E_Y_MINUS_P[kind]] for kind, factor in rows],
                        dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seq_mean_token_mean_over_sequences_of_two_lengths(backend):
    # Off-policy, unshaped: L_t = -pi A, g_t = -pi A. Sequence 0: two P tokens with A = 1
    # (L = -1/2 each); sequence 1: one P token with A = 2 (L = -1).
    # Loss = mean over sequences of their token means = (-1/2 + -1) / 2 = -3/4
    # (a token mean would give -2/3; a token sum over sequences -1).
    # Weights: 1 / (2 tokens x 2 sequences) = 1/4 in sequence 0, 1 / (1 x 2) = 1/2 in sequence 1.
    config = LuffyLossConfig(shaping=False, normalizer="seq_mean_token_mean")
    tokens = [("P", 1.0, True, 1.0, None), ("P", 1.0, True, 1.0, None), ("P", 2.0, True, 1.0, None)]
    loss, dh, stats = several_tokens(backend, config, tokens, seq_ids=[0, 0, 1])
    assert loss == pytest.approx(-0.75, rel=1e-12)
    torch.testing.assert_close(dh, expected_dz([("P", -0.5 / 4), ("P", -0.5 / 4), ("P", -1.0 / 2)]),
                               rtol=1e-12, atol=1e-12)
    assert float(stats["num_sequences"]) == 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_loss_mask_weights_enter_the_token_mean(backend):
    # Off-policy, unshaped, A = 1 and 2: L = -1/2 and -1, weights 1/4 and 1.
    # Loss = (1/4 (-1/2) + 1 (-1)) / (5/4) = -0.9 (unweighted: -0.75); the token weights
    # in the gradient are (1/4) / (5/4) = 1/5 and 1 / (5/4) = 4/5.
    config = LuffyLossConfig(shaping=False)
    tokens = [("P", 1.0, True, 0.25, None), ("P", 2.0, True, 1.0, None)]
    loss, dh, stats = several_tokens(backend, config, tokens)
    assert loss == pytest.approx(-0.9, rel=1e-12)
    torch.testing.assert_close(dh, expected_dz([("P", -0.5 / 5), ("P", -1.0 * 4 / 5)]),
                               rtol=1e-12, atol=1e-12)
    assert float(stats["denominator"]) == pytest.approx(1.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_loss_gradient_and_every_statistic(backend):
    # Default config: PPO clip 0.2 for on-policy tokens, shaping with gamma 0.1 off-policy,
    # token normalizer over the weights 1 + 1/2 + 1/4 = 7/4 (t4 is masked out).
    #   t1 P on-policy, r = 1.5, A = 1: clipped at 1.2, L = -1.2, g = 0
    #   t2 Q on-policy, r = 0.9, A = 1: inside, L = -0.9, g = -0.9; weight (1/2) / (7/4) = 2/7
    #   t3 P off-policy, A = 1: L = -f(1/2) = -5/6, g = -0.1 (1/2) / 0.36 = -5/36; weight 1/7
    #   t4 Q on-policy, r = 3, weight 0: nothing, and left out of every statistic
    # Loss = (-1.2 - 0.45 - 5/24) / (7/4) = -223/210.
    tokens = [("P", 1.0, False, 1.0, 1.5), ("Q", 1.0, False, 0.5, 0.9),
              ("P", 1.0, True, 0.25, None), ("Q", 1.0, False, 0.0, 3.0)]
    loss, dh, stats = several_tokens(backend, LuffyLossConfig(), tokens, seq_ids=[0, 0, 1, 1])
    assert loss == pytest.approx(-223 / 210, rel=1e-12)
    torch.testing.assert_close(
        dh, expected_dz([("P", 0.0), ("Q", -0.9 * 2 / 7), ("P", -5 / 36 / 7), ("Q", 0.0)]),
        rtol=1e-12, atol=1e-12)
    expected = {
        # weighted by the mask: (1 (-ln 2) + 1/2 (-ln 3) + 1/4 (-ln 2)) / (7/4)
        "logprob_mean": -(1.25 * LN2 + 0.5 * math.log(3)) / 1.75,
        "clip_fraction": 1 / 3,  # t1 of the three loss tokens
        "num_on_policy_tokens": 2, "num_off_policy_tokens": 1,
        "num_sequences": 2, "denominator": 1.75,
        # on-policy loss tokens only (t1, t2): t3's pi and t4's ratio 3 stay out
        "ratio_min": 0.9, "ratio_mean": 1.2, "ratio_max": 1.5,
    }
    assert stats.keys() == expected.keys()
    for key, value in expected.items():
        assert float(stats[key]) == pytest.approx(value, rel=1e-6), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_token_mean_uses_the_mask_weights(backend):
    # A = 0, c_ent = 1, entropy_aggregation "token_mean": L = -sum w_t H_t / sum w_t with the
    # float weights w = (1, 1/2, 0): H_P = 1.5 ln 2, H_Q = ln 3, so
    # L = -(1.5 ln 2 + 0.5 ln 3) / 1.5 (a plain token count would divide by 2).
    # dL/dz = w_t / 1.5 x p_v (z_v - E_p[z]): for P that is [1/4, -1/8, -1/8] ln 2; for Q, zero
    # (z is flat). The entropy statistic is the same weighted mean.
    config = LuffyLossConfig(entropy_coef=1.0, entropy_aggregation="token_mean")
    tokens = [("P", 0.0, False, 1.0, None), ("Q", 0.0, False, 0.5, None),
              ("P", 0.0, True, 0.0, None)]
    loss, dh, stats = several_tokens(backend, config, tokens)
    entropy = (1.5 * LN2 + 0.5 * math.log(3)) / 1.5
    assert loss == pytest.approx(-entropy, rel=1e-12)
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[0] = torch.tensor([0.25, -0.125, -0.125], dtype=torch.float64) * LN2 / 1.5
    torch.testing.assert_close(dh, expected, rtol=1e-12, atol=1e-12)
    assert float(stats["entropy_mean"]) == pytest.approx(entropy, rel=1e-6)
