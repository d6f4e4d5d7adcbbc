"""Bad inputs raise ValueError naming the argument, before any compute."""

from __future__ import annotations

import math
import re

import pytest
import torch

from helpers import random_batch
from luffy_fast import LuffyLossConfig, fused_luffy_loss, token_logprobs
from luffy_fast.autograd import wants_grad
from luffy_fast.inputs import prepare_inputs


def call(batch, **changes):
    args = dict(batch)
    args.update(changes)
    config = args.pop("config", LuffyLossConfig())
    backend = args.pop("backend", "torch")
    return fused_luffy_loss(args["hidden"], args["weight"], args["targets"], args["advantages"],
                            args["loss_mask"], args["off_policy_mask"],
                            old_logprobs=args.get("old_logprobs"), config=config,
                            seq_ids=args.get("seq_ids"), bias=args.get("bias"), backend=backend)


@pytest.fixture
def batch():
    return random_batch(12, 4, 9)


BAD_INPUTS = [
    ("hidden", lambda b: {"hidden": b["hidden"][0]}),  # 1-D
    ("hidden", lambda b: {"hidden": b["hidden"].long()}),
    ("weight", lambda b: {"weight": b["weight"][:, :3]}),  # H mismatch
    ("weight", lambda b: {"weight": b["weight"].double()}),  # dtype mismatch
    ("weight", lambda b: {"weight": b["weight"][:0]}),  # V = 0 (was a ZeroDivisionError)
    ("weight", lambda b: {"hidden": b["hidden"][:, :0], "weight": b["weight"][:, :0]}),  # H = 0
    ("targets", lambda b: {"targets": b["targets"][:5]}),
    ("targets", lambda b: {"targets": b["targets"].int()}),
    ("targets", lambda b: {"targets": torch.full_like(b["targets"], 9)}),  # == V
    ("targets", lambda b: {"targets": torch.full_like(b["targets"], -3)}),
    ("advantages", lambda b: {"advantages": torch.full_like(b["advantages"], float("nan"))}),
    ("advantages", lambda b: {"advantages": b["advantages"].long()}),
    ("loss_mask", lambda b: {"loss_mask": b["loss_mask"][:-1]}),
    ("loss_mask", lambda b: {"loss_mask": -torch.ones(12)}),
    ("off_policy_mask", lambda b: {"off_policy_mask": b["off_policy_mask"].float()}),
    ("old_logprobs", lambda b: {"old_logprobs": torch.full((12,), float("-inf"))}),
    ("old_logprobs", lambda b: {"old_logprobs": torch.zeros(11)}),
    ("seq_ids", lambda b: {"seq_ids": b["seq_ids"].float()}),
    ("bias", lambda b: {"bias": torch.zeros(8)}),
    ("backend", lambda b: {"backend": "cuda-magic"}),
    ("config", lambda b: {"config": {"gamma": 0.1}}),
]


@pytest.mark.parametrize("name,change", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(batch, name, change):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call(batch, **change(batch))


def test_non_finite_values_outside_the_loss_are_ignored(batch):
    # Padding positions may hold anything; only loss tokens are checked. The oracle: the same
    # batch with zeros there.
    batch["loss_mask"] = torch.ones(12, dtype=torch.bool)
    batch["loss_mask"][0] = False
    results = []
    for advantage, old_logprob in ((0.0, 0.0), (float("nan"), float("-inf"))):
        args = {name: value.clone() for name, value in batch.items()}
        args["advantages"][0], args["old_logprobs"][0] = advantage, old_logprob
        args["hidden"].requires_grad_(True)
        loss, _ = call(args)
        loss.backward()
        results.append((loss, args["hidden"].grad))
    (expected, expected_grad), (loss, grad) = results
    assert torch.isfinite(expected) and torch.equal(loss, expected)
    assert torch.equal(grad, expected_grad)


def test_ignore_index_is_not_out_of_range(batch):
    # A target of -100 leaves its token out of the loss, as masking it does
    masked = dict(batch, loss_mask=batch["loss_mask"].clone())
    masked["loss_mask"][:4] = 0
    expected, _ = call(masked)
    batch["targets"][:4] = -100
    loss, stats = call(batch)
    assert torch.isfinite(loss) and torch.equal(loss, expected)
    kept = int((batch["loss_mask"][4:] != 0).sum())
    assert kept > 0 and int(stats["num_on_policy_tokens"] + stats["num_off_policy_tokens"]) == kept


@pytest.mark.parametrize("field,value", [
    ("normalizer", "sum"), ("max_len", None), ("gamma", 0.0), ("temperature", -1.0),
    ("clip_low", 1.5), ("dual_clip", 0.5), ("entropy_coef", float("nan")), ("memory_budget_mb", 0),
    # the wrong type, which truthiness or int(True) would otherwise read as a setting
    ("shaping", "no"), ("clip_on_policy", "false"), ("check_finite", 1), ("gamma", True),
    ("entropy_coef", True), ("max_len", True), ("ignore_index", 3.5), ("ignore_index", "x"),
    ("memory_budget_mb", "64"), ("dual_clip", "3"), ("grad_filter", False),
    # past what the op's byte counts and int64 targets hold (an OverflowError at the first call)
    ("memory_budget_mb", 1.7e308), ("memory_budget_mb", float("inf")), ("ignore_index", 2**63),
    # the first value past each bound
    ("clip_low", 1.0), ("dual_clip", 1.0), ("grad_filter", 1.0), ("max_len", 0),
    ("memory_budget_mb", 2.0**40 * 1.5), ("ignore_index", -2**63 - 1),
])
def test_bad_config_names_the_field(field, value):
    base = {"normalizer": "constant", "max_len": 8} if field == "max_len" else {}
    with pytest.raises(ValueError, match=f"^LuffyLossConfig.{field}: .* \\(got {re.escape(repr(value))}\\)$"):
        LuffyLossConfig(**{**base, field: value})


def test_the_bounds_themselves_are_accepted():
    config = LuffyLossConfig(clip_low=0.999, dual_clip=1.001, grad_filter=0.0, max_len=1,
                             normalizer="constant", memory_budget_mb=2.0**40, ignore_index=-2**63,
                             entropy_coef=0.0, clip_high=0.0)
    assert (config.clip_low, config.dual_clip, config.grad_filter, config.max_len) == (
        0.999, 1.001, 0.0, 1)
    assert (config.memory_budget_mb, config.ignore_index) == (2.0**40, -2**63)


def test_the_memory_budget_in_bytes_and_each_devices_default():
    """None: 1024 MiB on CUDA, 64 MiB on the CPU and any other device; MiB are 2**20 bytes."""
    from luffy_fast.config import default_memory_budget_mb

    assert [default_memory_budget_mb(torch.device(name)) for name in ("cuda", "cpu", "meta")] == [
        1024.0, 64.0, 64.0]
    assert LuffyLossConfig().memory_budget_bytes(torch.device("cpu")) == 67_108_864
    assert LuffyLossConfig().memory_budget_bytes(torch.device("cuda")) == 1_073_741_824
    assert LuffyLossConfig(memory_budget_mb=0.5).memory_budget_bytes(torch.device("cuda")) == 524_288


def test_dual_clip_without_any_ppo_clip_is_refused():
    """dual_clip caps the PPO-clipped loss: with clipping off on both sides it would do nothing."""
    with pytest.raises(ValueError, match=r"^LuffyLossConfig.dual_clip: caps the PPO-clipped .*"
                                         r"\(got 3.0\)$"):
        LuffyLossConfig(clip_on_policy=False, clip_off_policy=False, dual_clip=3.0)
    assert LuffyLossConfig(clip_on_policy=False, clip_off_policy=True, dual_clip=3.0).dual_clip == 3.0


@pytest.mark.parametrize("name", ["targets", "advantages", "loss_mask", "off_policy_mask",
                                  "old_logprobs", "seq_ids"])
def test_a_per_token_input_on_another_device_is_named(batch, name):
    # a meta tensor stands in for another device here (no GPU needed)
    batch["seq_ids"] = torch.arange(12) // 3
    with pytest.raises(ValueError, match=rf"^fused_luffy_loss: `{name}` is on meta, but `hidden` is on cpu"):
        call(batch, **{name: torch.empty_like(batch[name], device="meta")})


def test_device_mismatch_is_named(batch):
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    with pytest.raises(ValueError, match="`weight`"):
        call(batch, weight=batch["weight"].cuda())


# --------------------------------------------------------------------------- what passes the checks

def test_a_float_loss_mask_above_one_weighs_its_token_that_many_times():
    """Off-policy, unshaped, W = I, target 0, h = [ln 2, 0, 0]: p = [1/2, 1/4, 1/4], pi = 1/2, so
    L_t = -A/2 and dL/dz_t = -A/2 (e_y - p) = -A/2 [1/2, -1/4, -1/4]. Weights 3 and 1 with
    A = 1 and 2, token normalizer: L = (3 (-1/2) + 1 (-1)) / 4 = -5/8 (weights capped at 1 would
    give -3/4); d(hidden) rows are -1/2 (e_y - p) x 3/4 and -1 (e_y - p) x 1/4."""
    hidden = torch.tensor([[math.log(2.0), 0.0, 0.0]] * 2, dtype=torch.float64, requires_grad=True)
    loss, stats = fused_luffy_loss(
        hidden, torch.eye(3, dtype=torch.float64), torch.zeros(2, dtype=torch.long),
        torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 1.0], dtype=torch.float64),
        torch.ones(2, dtype=torch.bool), config=LuffyLossConfig(shaping=False), backend="torch")
    loss.backward()
    assert float(loss) == pytest.approx(-5 / 8, rel=1e-12)
    e_y_minus_p = torch.tensor([0.5, -0.25, -0.25], dtype=torch.float64)
    expected = torch.stack([-0.5 * 3 / 4 * e_y_minus_p, -1.0 / 4 * e_y_minus_p])
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-12, atol=1e-15)
    assert float(stats["denominator"]) == 4.0


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_token_logprobs_give_zero_for_targets_outside_the_vocabulary(backend):
    """ops.token_logprobs: a target of -100, -1 or V (= 3 here) gets log-prob 0; the others are
    log softmax: W = I, h = [ln 2, 0, 0], p = [1/2, 1/4, 1/4], so target 0 -> -ln 2, 2 -> -ln 4."""
    hidden = torch.tensor([[math.log(2.0), 0.0, 0.0]] * 5, dtype=torch.float64)
    lp, _ = token_logprobs(hidden, torch.eye(3, dtype=torch.float64),
                           torch.tensor([0, 3, -1, 2, -100]), backend=backend)
    expected = [-math.log(2.0), 0.0, 0.0, -math.log(4.0), 0.0]
    assert lp.tolist() == pytest.approx(expected, rel=1e-12, abs=0.0)


@pytest.mark.parametrize("entropy_coef, expected", [(0.0, [True, False, True]),
                                                     (0.01, [True, True, True])])
def test_zero_advantage_tokens_may_carry_a_gradient_only_through_the_entropy(entropy_coef,
                                                                            expected):
    """LossInputs.may_carry_gradient (the triton backend computes the others forward only):
    advantages (1, 0, -2) at three loss tokens; with an entropy bonus every one may."""
    T = 3
    inputs = prepare_inputs(torch.zeros(T, 2), torch.zeros(4, 2), torch.zeros(T, dtype=torch.long),
                            torch.tensor([1.0, 0.0, -2.0]), torch.ones(T, dtype=torch.bool),
                            torch.zeros(T, dtype=torch.bool), None,
                            LuffyLossConfig(entropy_coef=entropy_coef), None, None)
    assert inputs.may_carry_gradient().tolist() == expected


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_the_backward_scales_the_gradients_by_the_upstream_gradient(backend):
    """The trainer scales each micro-batch's loss (denominator / global denominator) before its
    backward: d(2.5 L)/dx is 2.5 dL/dx on every backend (the fused ones form dL/dx in the
    forward and must multiply by the upstream gradient). Oracle: the same backend's unit
    backward, times 2.5."""
    grads = []
    for scale in (1.0, 2.5):
        batch = random_batch(20, 5, 11, dtype=torch.float64, seed=2, with_bias=True)
        leaves = {k: batch[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")}
        loss, _ = fused_luffy_loss(leaves["hidden"], leaves["weight"], batch["targets"],
                                   batch["advantages"], batch["loss_mask"],
                                   batch["off_policy_mask"], old_logprobs=batch["old_logprobs"],
                                   config=LuffyLossConfig(entropy_coef=0.1),
                                   seq_ids=batch["seq_ids"], bias=leaves["bias"], backend=backend)
        (scale * loss).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for name in ("hidden", "weight", "bias"):
        assert float(grads[0][name].abs().max()) > 0, name
        torch.testing.assert_close(grads[1][name], 2.5 * grads[0][name], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_frozen_decoder_still_gets_the_lm_heads_gradient(backend):
    """hidden without requires_grad (a frozen decoder), weight and bias trainable: d(weight) and
    d(bias) as when hidden requires grad too (the oracle), and hidden gets none."""
    batch = random_batch(20, 5, 11, dtype=torch.float64, seed=2, with_bias=True)
    grads = []
    for hidden_grad in (True, False):
        hidden = batch["hidden"].clone().requires_grad_(hidden_grad)
        weight, bias = batch["weight"].clone().requires_grad_(), batch["bias"].clone().requires_grad_()
        loss, _ = fused_luffy_loss(hidden, weight, batch["targets"], batch["advantages"],
                                   batch["loss_mask"], batch["off_policy_mask"],
                                   old_logprobs=batch["old_logprobs"], seq_ids=batch["seq_ids"],
                                   bias=bias, backend=backend)
        loss.backward()
        grads.append((hidden.grad, weight.grad, bias.grad))
    assert grads[1][0] is None and float(grads[0][1].abs().max()) > 0
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-12, atol=0.0)
    torch.testing.assert_close(grads[1][2], grads[0][2], rtol=1e-12, atol=0.0)


def test_only_the_gradients_autograd_will_use_are_formed():
    """autograd.wants_grad: none under no_grad; d(bias) only for a bias that requires grad."""
    weight = torch.zeros(4, 2, requires_grad=True)
    def wanted(bias):
        return wants_grad(prepare_inputs(
            torch.zeros(3, 2, requires_grad=True), weight, torch.zeros(3, dtype=torch.long),
            torch.ones(3), torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool),
            None, LuffyLossConfig(), None, bias))
    assert wanted(torch.zeros(4, requires_grad=True)) == (True, True, True)
    assert wanted(torch.zeros(4)) == (True, True, False)
    with torch.no_grad():
        assert wanted(torch.zeros(4, requires_grad=True)) == (False, False, False)


def test_batched_hidden_numbers_its_sequences_row_by_row():
    """hidden [B, L, H] without seq_ids: row b is sequence b. B = 2, L = 3, loss_mask rows
    (1, 1, 0) and (1, 0, 0): seq_mean_token_mean weighs each token 1 / (its sequence's tokens x
    2 sequences): 1/4, 1/4 for row 0's two, 1/2 for row 1's one."""
    B, L = 2, 3
    inputs = prepare_inputs(torch.zeros(B, L, 2), torch.zeros(4, 2),
                            torch.zeros(B, L, dtype=torch.long), torch.ones(B, L),
                            torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
                            torch.zeros(B, L, dtype=torch.bool), None,
                            LuffyLossConfig(normalizer="seq_mean_token_mean"), None, None)
    assert inputs.rows.tolist() == [0, 1, 3]
    assert inputs.norm.weights.tolist() == [0.25, 0.25, 0.5]
    assert float(inputs.norm.num_sequences) == 2.0


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ratio_statistics_pair_each_ratio_with_its_own_token(backend):
    """W = 0: every log-prob is -ln 4 (V = 4); old log-probs -ln 4 + (0, -ln 2, ln 2) give ratios
    (1, 2, 1/2). Tokens 0 and 2 on-policy: ratio min 1/2, mean 3/4, max 1. Token 0 has zero
    advantage, so the torch backend computes it last (order 1, 2, 0): the statistics must still
    read its on-policy flag, not token 2's."""
    ln2, ln4 = math.log(2.0), math.log(4.0)
    _, stats = fused_luffy_loss(
        torch.zeros(3, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64),
        torch.zeros(3, dtype=torch.long), torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64),
        torch.ones(3, dtype=torch.bool), torch.tensor([False, True, False]),
        old_logprobs=torch.tensor([-ln4, -ln4 - ln2, -ln4 + ln2], dtype=torch.float64),
        config=LuffyLossConfig(), backend=backend)
    assert [float(stats[k]) for k in ("ratio_min", "ratio_mean", "ratio_max")] == pytest.approx(
        [0.5, 0.75, 1.0], rel=1e-6)
    assert (int(stats["num_on_policy_tokens"]), int(stats["num_off_policy_tokens"])) == (2, 1)


def test_reordered_permutes_every_per_token_input_together():
    """LossInputs.reordered (the triton backend's gradient-last order): token i of the result is
    token order[i] of the inputs, in every per-token tensor (weights 1, 2, 3 under the token
    normalizer: 1/6, 2/6, 3/6)."""
    inputs = prepare_inputs(torch.zeros(3, 2, dtype=torch.float64),
                            torch.zeros(4, 2, dtype=torch.float64), torch.tensor([0, 1, 2]),
                            torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64),
                            torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
                            torch.tensor([True, False, False]),
                            torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64),
                            LuffyLossConfig(), None, None)
    moved = inputs.reordered(torch.tensor([2, 0, 1]))
    assert moved.rows.tolist() == [2, 0, 1] and moved.targets.tolist() == [2, 0, 1]
    assert moved.advantages.tolist() == [-1.0, 0.5, 0.0]
    assert moved.loss_mask.tolist() == [3.0, 1.0, 2.0]
    assert moved.off_policy_mask.tolist() == [False, True, False]
    assert moved.old_logprobs.tolist() == [-3.0, -1.0, -2.0]
    assert moved.norm.weights.tolist() == pytest.approx([3 / 6, 1 / 6, 2 / 6], rel=1e-15)
    assert moved.norm.entropy_weights.tolist() == pytest.approx([3 / 6, 1 / 6, 2 / 6], rel=1e-15)


def test_an_out_of_range_target_is_named_by_the_first_bad_id(batch):
    """Positions 3 and 7 hold 9 (= V) and -3: the message names 9, the first one."""
    targets = batch["targets"].clone()
    targets[3], targets[7] = 9, -3
    with pytest.raises(ValueError) as error:
        call(batch, targets=targets)
    assert str(error.value) == ("fused_luffy_loss: `targets` holds id 9 outside [0, 9) (vocabulary "
                                "size from `weight`) that is not ignore_index=-100")
