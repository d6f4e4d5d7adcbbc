"""The official code's loss scale, as named options (docs/algorithm.md §Normalizers):
normalizer="token_sum_over_max_len" (sum / max_len per micro-batch, micro-batches summed) and
entropy_aggregation="token_mean" (c_ent x the micro-batch's token-mean entropy). Checked against
numbers worked by hand, on every backend, and composed with the trainer's micro-batch rescaling.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from helpers import cast_batch, compare_backends, policy_gradients, random_batch, run_loss, tiny_config
from luffy_fast import LuffyLossConfig
from luffy_fast.micro_batches import loss_denominator, plan_micro_batches

LN2, LN3 = math.log(2.0), math.log(3.0)
# Entropy of p = (3/4, 1/4): -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623351446188083
H_OFF = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))


def hand_batch() -> dict:
    """Three loss tokens whose logits are the hidden rows (W = I, V = 2, target 0 everywhere):
    sequence 0, on-policy, A = 0.5: two tokens with z = (0, 0), p = 1/2, H = ln 2;
    sequence 1, off-policy, A = -1: one token with z = (ln 3, 0), p = 3/4, H = H_OFF."""
    return {
        "hidden": torch.tensor([[0.0, 0.0], [0.0, 0.0], [LN3, 0.0]], dtype=torch.float64),
        "weight": torch.eye(2, dtype=torch.float64),
        "targets": torch.tensor([0, 0, 0]),
        "advantages": torch.tensor([0.5, 0.5, -1.0], dtype=torch.float64),
        "loss_mask": torch.tensor([True, True, True]),
        "off_policy_mask": torch.tensor([False, False, True]),
        "seq_ids": torch.tensor([0, 0, 1]),
    }


def official(max_len: int = 4, **overrides) -> LuffyLossConfig:
    # no shaping and no clipping, so L_t is -r A on-policy and -p A off-policy
    return LuffyLossConfig.luffy_official_scale(max_len, shaping=False, entropy_coef=0.1,
                                                **overrides)


BACKENDS = ["reference", "torch", pytest.param("triton", marks=pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)"))]


def run_hand(backend: str, config: LuffyLossConfig):
    """The hand batch on `backend` (float32 for triton, which takes no float64)."""
    batch = hand_batch()
    if backend == "triton":
        batch = cast_batch(batch, torch.float32)
    return run_loss(batch, backend, config)


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_scale_by_hand(backend):
    loss, stats, grads = run_hand(backend, official())
    # policy: on-policy r = 1 (old = current): L = -0.5 twice; off-policy L = -p A = 0.75.
    #   sum m L = -0.5 - 0.5 + 0.75 = -0.25; / L_max = 4 (no division by S = 2): -0.0625
    # entropy: c_ent x token mean = 0.1 x (2 ln 2 + H_OFF) / 3 = 0.1 x 0.6495431688 = 0.0649543169
    expected = -0.25 / 4 - 0.1 * (2 * LN2 + H_OFF) / 3
    rel = 1e-6 if backend == "triton" else 1e-12
    assert float(loss) == pytest.approx(-0.1274543169, rel=max(rel, 1e-9))
    assert float(loss) == pytest.approx(expected, rel=rel)
    assert float(stats["denominator"]) == 4.0
    # d loss / d z of the off-policy token (= d hidden, W = I):
    #   policy: w g (e_y - p) = (1/4)(-A p)(1/4, -1/4) = 0.1875 x (0.25, -0.25) = (0.046875, -)
    #   entropy: -c_ent (1/3) dH/dz, dH/dz_v = -p_v (z_v - E_p z), E_p z = 0.75 ln 3:
    #     p (z - E_p z) = (0.75 x 0.25 ln 3, 0.25 x (-0.75 ln 3)) = (0.2059898, -0.2059898)
    #     so +0.1 / 3 x 0.2059898 = 0.0068663268 on z_0
    #   total (0.0537413268, -0.0537413268)
    off_grad = grads["hidden"][2]
    rel = 1e-6 if backend == "triton" else 1e-9
    assert float(off_grad[0]) == pytest.approx(0.0537413268, rel=rel)
    assert float(off_grad[1]) == pytest.approx(-0.0537413268, rel=rel)
    # an on-policy token: w g (e_y - p) with g = -A r = -0.5, w = 1/4: -0.125 x (0.5, -0.5);
    # its entropy gradient is 0 at the uniform distribution (z - E_p z = 0)
    assert grads["hidden"][0].tolist() == pytest.approx([-0.0625, 0.0625], rel=rel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_scale_by_hand_for_contrast(backend):
    # the default "constant" normalizer with the entropy under the same weights:
    # (sum m (L - c_ent H)) / (S L_max) = (-0.25 - 0.1 (2 ln 2 + H_OFF)) / (2 x 4) = -0.0556078688
    config = official().replace(normalizer="constant", entropy_aggregation="normalizer")
    loss, stats, _ = run_hand(backend, config)
    assert float(loss) == pytest.approx(-0.0556078688, rel=1e-6)
    assert float(stats["denominator"]) == 8.0


def test_micro_batches_are_summed_as_the_official_code_does():
    # Two calls (micro-batches): sequence 0 alone, then sequence 1 alone.
    #   first:  -1 / 4 - 0.1 x ln 2   = -0.25 - 0.0693147181 = -0.3193147181
    #   second: 0.75 / 4 - 0.1 x H_OFF = 0.1875 - 0.0562335145 = 0.1312664855
    #   summed: -0.1880482326 (the entropy term depends on the split, as it does officially)
    batch, config = hand_batch(), official()
    total = 0.0
    for rows in ([0, 1], [2]):
        part = {k: v[rows] if k != "weight" else v for k, v in batch.items()}
        loss, stats, _ = run_loss(part, "reference", config)
        # the trainer's rescaling: the call's denominator over the mini-batch's, both L_max
        assert float(stats["denominator"]) == 4.0
        total += float(loss) * float(stats["denominator"]) / 4.0
    assert total == pytest.approx(-0.1880482326, abs=1e-9)


def test_config_checks():
    with pytest.raises(ValueError, match="max_len"):
        LuffyLossConfig(normalizer="token_sum_over_max_len")
    with pytest.raises(ValueError, match="entropy_aggregation"):
        LuffyLossConfig(entropy_aggregation="sum")
    preset = LuffyLossConfig.luffy_official_scale()
    assert (preset.normalizer, preset.entropy_aggregation, preset.max_len) == (
        "token_sum_over_max_len", "token_mean", 8192)


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("config", [
    LuffyLossConfig.luffy_official_scale(max_len=80),
    LuffyLossConfig.luffy(max_len=80, entropy_coef=0.2, entropy_aggregation="token_mean"),
    LuffyLossConfig(normalizer="token_sum_over_max_len", max_len=70, clip_off_policy=True,
                    temperature=0.6),
], ids=["official", "constant_token_mean_entropy", "sum_over_max_len_clipped"])
def test_backends_agree_with_the_reference(backend, config):
    batch = random_batch(67, 21, 77, seed=5, with_bias=True, ignore_some=True, zero_adv_fraction=0.4)
    budget = 0.002 if backend == "triton" else 0.01  # several chunks (triton: recompute)
    compare_backends(batch, config.replace(memory_budget_mb=budget), torch.float32, backend)
    compare_backends(batch, config, torch.float32, backend)


# --------------------------------------------------------------------------- with the trainer

def test_trainer_sums_micro_batches_to_the_official_gradient(tmp_path):
    """Without entropy, the official scale is S x the `constant` normalizer's (S sequences in the
    mini-batch) whatever the split; the trainer's rescaling leaves its micro-batch sums as they
    are (each call's denominator L_max over the mini-batch's L_max)."""
    from luffy_fast.rollout import SamplingParams
    from luffy_fast.rollout_batch import assemble_groups
    from luffy_fast.trainer import LuffyTrainer

    trainer = LuffyTrainer(tiny_config(tmp_path, "loss.normalizer=token_sum_over_max_len",
                                       "loss.entropy_coef=0.0"))
    samples = trainer.prompt_batch(0)
    completions = trainer.rollout.generate([s.prompt_ids for s in samples], n=3,
                                           params=SamplingParams(24, seed=11))
    batch = assemble_groups(samples, completions, n_off=1)
    batch.advantages = torch.linspace(-1.0, 1.0, len(batch))  # every sequence has a gradient
    config = trainer.config.loss
    assert loss_denominator(batch, range(len(batch)), config) == config.max_len
    lengths = [batch.sequence_length(i) for i in range(len(batch))]
    official_whole = policy_gradients(trainer, batch)
    budget = next(b for b in range(max(lengths), 4096)
                  if len(plan_micro_batches(lengths, b, padded=True)) == 4)
    trainer.config.train.token_budget = budget
    official_split = policy_gradients(trainer, batch)
    trainer.config.loss = config.replace(normalizer="constant")
    trainer.engine.module.loss_head.loss_config = trainer.config.loss
    constant = policy_gradients(trainer, batch)
    assert constant and constant.keys() == official_whole.keys() == official_split.keys()
    for name, value in constant.items():
        scale = value.abs().max().clamp_min(1e-12)
        for other in (official_whole, official_split):
            error = (other[name] - len(batch) * value).abs().max() / (len(batch) * scale)
            assert error <= 1e-5, f"{name}: {error:.2e}"
