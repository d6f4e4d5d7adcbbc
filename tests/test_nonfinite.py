"""The non-finite policy's parts on their own, with scripted engines: the skip decision, the
counts a step logs and the stop after N skips in a row, CheckedAdamW's skip and its clipping
switch, and the poisoning of a non-finite loss."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from luffy_fast.nonfinite import (
    CheckedAdamW,
    NonFiniteGuard,
    NonFiniteTrainingError,
    optimizer_step,
    poison_if_nonfinite,
)


class ScriptedEngine:
    """engine.step() takes the next (norm, skipped) outcome: the norm get_global_grad_norm then
    reports, and whether DeepSpeed counted the step as skipped."""

    def __init__(self, outcomes):
        self.outcomes, self.skipped_steps, self.norm = list(outcomes), 0, None

    def step(self):
        self.norm, skipped = self.outcomes.pop(0)
        self.skipped_steps += skipped

    def get_global_grad_norm(self):
        return self.norm


def test_a_step_is_applied_only_when_deepspeed_did_not_skip_it_and_its_norm_is_finite():
    assert optimizer_step(ScriptedEngine([(2.5, False)])) == (2.5, True)
    assert optimizer_step(ScriptedEngine([(None, False)])) == (None, True)  # norm left unset
    # counted as skipped by DeepSpeed although its norm reads finite: not applied
    assert optimizer_step(ScriptedEngine([(2.5, True)])) == (2.5, False)
    # a non-finite norm is not applied even where the skip counter did not move
    assert optimizer_step(ScriptedEngine([(math.inf, False)])) == (None, False)
    assert optimizer_step(ScriptedEngine([(math.nan, True)])) == (None, False)


def test_the_guard_counts_every_skipped_optimizer_step_of_a_training_step():
    # two optimizer steps per training step: skipped, skipped | applied, skipped | applied, applied
    guard = NonFiniteGuard(max_consecutive=0)
    engine = ScriptedEngine([(math.nan, True), (math.nan, True), (1.0, False), (math.nan, True),
                             (1.0, False), (1.0, False)])
    logged, norms = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in (1, 2, 3):
            norms += [guard.optimizer_step(engine, step) for _ in range(2)]
            logged.append(guard.metrics()["nonfinite/skipped_steps"])
    assert logged == [2, 1, 0]
    assert [n if math.isfinite(n) else "nan" for n in norms] == ["nan", "nan", 1.0, "nan", 1.0, 1.0]
    assert guard.state_dict() == {"consecutive": 0, "total": 3}


def test_an_applied_step_restarts_the_count_in_a_row():
    guard = NonFiniteGuard(max_consecutive=2)
    with pytest.warns(RuntimeWarning, match=r"^step 1: .*\(1 in a row, 1 in all\)"):
        guard.record(False, 1)
    guard.record(True, 2)
    with pytest.warns(RuntimeWarning, match=r"^step 3: .*\(1 in a row, 2 in all\)"):
        guard.record(False, 3)  # 1 in a row again: no stop at max_consecutive = 2
    with pytest.warns(RuntimeWarning, match=r"\(2 in a row, 3 in all\)"):
        with pytest.raises(NonFiniteTrainingError, match="^step 4: 2 optimizer steps in a row"):
            guard.record(False, 4)


def test_a_limit_of_zero_never_stops_the_run():
    guard = NonFiniteGuard(max_consecutive=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(1, 6):
            guard.record(False, step)
    assert guard.state_dict() == {"consecutive": 5, "total": 5}


def test_checked_adamw_skips_a_nonfinite_gradient_of_any_group_and_clears_the_gradients():
    first, second = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    optimizer = CheckedAdamW([{"params": [first]}, {"params": [second]}], max_norm=1.0, lr=0.1)
    first.grad, second.grad = torch.tensor([0.5, 0.5]), torch.tensor([math.nan])
    assert optimizer.step() is None
    assert optimizer.overflow and optimizer._global_grad_norm == math.inf
    assert first.grad is None and second.grad is None
    assert first.tolist() == [1.0, 2.0] and second.tolist() == [3.0]
    # a finite step again: the norm over both groups, sqrt(3^2 + 4^2 + 12^2) = 13
    first.grad, second.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    optimizer.step()
    assert not optimizer.overflow and optimizer._global_grad_norm == pytest.approx(13.0)


def test_checked_adamw_with_max_norm_zero_does_not_clip():
    """max_norm 0 means no clipping: the same update as torch's AdamW on the raw gradient (the
    oracle); eps = 1 makes Adam's first step depend on the gradient's scale."""
    start, grad = torch.tensor([1.0, -2.0]), torch.tensor([30.0, 40.0])  # norm 50
    mine, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    checked = CheckedAdamW([mine], max_norm=0.0, lr=0.1, eps=1.0, weight_decay=0.0)
    plain = torch.optim.AdamW([theirs], lr=0.1, eps=1.0, weight_decay=0.0)
    mine.grad, theirs.grad = grad.clone(), grad.clone()
    checked.step()
    plain.step()
    assert checked._global_grad_norm == pytest.approx(50.0)
    torch.testing.assert_close(mine.grad, grad)
    torch.testing.assert_close(mine, theirs)


def test_a_nonfinite_loss_with_a_finite_gradient_is_poisoned():
    weight = torch.tensor([2.0, 3.0], requires_grad=True)
    loss = weight.sum() + math.inf  # d loss / d weight = [1, 1]: finite
    poisoned = poison_if_nonfinite(loss, float(loss.detach()))
    poisoned.backward()
    assert torch.isnan(weight.grad).all()
    finite = weight.sum()
    assert poison_if_nonfinite(finite, float(finite.detach())) is finite
