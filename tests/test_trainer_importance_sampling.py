"""Truncated importance sampling (rollout.tis_cap) in the trainer's step, against a rollout engine
whose log-probs are off by a known amount: the logged weights and the policy's gradient."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import gradient_differences, policy_gradients, tiny_config
from luffy_fast.rollout import Completion, HFGenerateEngine, RolloutEngine
from luffy_fast.toy.task import ToyTask
from luffy_fast.trainer import LuffyTrainer


class ShiftedLogprobsEngine(RolloutEngine):
    """The hf engine on a copy of the trainer's seeded initial policy (its log-probs and the
    trainer's agree to float32 rounding, 1e-6 here), reporting every sampled token's log-prob
    `shift` lower: each token's ratio pi_train / pi_rollout is e^shift."""

    def __init__(self, config, shift: float) -> None:
        tokenizer, policy = ToyTask(config).components()
        self.inner = HFGenerateEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
        self.shift = shift

    def generate(self, prompts, n, params):
        return [[Completion(c.token_ids, [value - self.shift for value in c.logprobs], c.finished)
                 for c in group] for group in self.inner.generate(prompts, n, params)]

    def sync_weights(self, named_tensors):
        self.inner.sync_weights(named_tensors)

    def close(self):
        self.inner.close()


def step_with_recorded_gradient(trainer: LuffyTrainer) -> tuple[dict, object, dict]:
    """One training step; returns its metrics, its rollout batch and the policy's gradient at
    its optimizer step, and puts the initial weights back (the oracle's gradient is taken there)."""
    policy, seen = trainer.engine.module.policy, {}
    initial = {name: p.detach().clone() for name, p in policy.named_parameters()}
    update, optimizer_step = trainer.update_policy, trainer.nonfinite.optimizer_step

    def recording_update(batch, *rest):
        seen["batch"] = batch
        return update(batch, *rest)

    def recording_optimizer_step(engine, number):
        seen["gradient"] = {name: p.grad.detach().clone() for name, p in policy.named_parameters()
                            if p.grad is not None}
        return optimizer_step(engine, number)

    trainer.update_policy, trainer.nonfinite.optimizer_step = (recording_update,
                                                               recording_optimizer_step)
    metrics = trainer.training_step(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            p.copy_(initial[name])
    return metrics, seen["batch"], seen["gradient"]


@pytest.mark.parametrize("shift, weight", [
    (0.3, math.exp(0.3)),  # e^0.3 = 1.3499, under the cap of 2
    (1.0, 2.0),  # e^1 = 2.718: every weight is the cap
], ids=["under-the-cap", "capped"])
def test_sampled_tokens_are_reweighted_by_the_truncated_ratio_to_the_rollout_engine(
        tmp_path, shift, weight):
    """Every on-policy token's weight is min(e^shift, 2); the step's gradient is the gradient
    of the same batch with each on-policy advantage multiplied by that weight by hand (traces
    unweighted), computed without the importance-sampling code."""
    config = tiny_config(tmp_path, "rollout.tis_cap=2.0", "eval.every=0")
    trainer = LuffyTrainer(config, rollout_engine=ShiftedLogprobsEngine(config, shift))
    try:
        metrics, batch, gradient = step_with_recorded_gradient(trainer)
        # |log pi_train - log pi_rollout| = shift, up to the engines' float32 rounding
        assert metrics["rollout_logprob_gap_mean"] == pytest.approx(shift, abs=1e-5)
        assert metrics["tis_weight_mean"] == pytest.approx(weight, rel=1e-5)
        assert metrics["tis_clipped_fraction"] == (1.0 if weight == 2.0 else 0.0)
        assert metrics["sampled_tokens"] == sum(
            len(r) for r, off in zip(batch.response_ids, batch.off_policy) if not off)
        on_policy = ~batch.off_policy
        assert (batch.advantages[on_policy] != 0).any()  # the weights have something to scale
        unweighted = policy_gradients(trainer, batch)
        batch.advantages = torch.where(on_policy, weight * batch.advantages, batch.advantages)
        by_hand = policy_gradients(trainer, batch)
    finally:
        trainer.close()
    # the weights differ from e^shift by that rounding (not at all in the capped case)
    assert max(gradient_differences(by_hand, gradient).values()) < 1e-5
    # the oracle tells the weighting apart: without it the gradient differs by 37 % (capped: 62 %)
    assert max(gradient_differences(by_hand, unweighted).values()) > 0.1
