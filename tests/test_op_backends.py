"""The chunked `torch` backend against the materialized `reference` oracle, on random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_close, random_batch, run_loss
from luffy_fast import LuffyLossConfig, token_logprobs

TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-5, torch.bfloat16: 1e-2}


@st.composite
def loss_case(draw):
    """A random batch and config covering the op's options and its corner cases."""
    T = draw(st.integers(1, 300))
    V = draw(st.integers(2, 300))
    H = draw(st.integers(1, 70))
    scenario = draw(st.sampled_from(["mixed", "mixed", "mixed", "all_masked", "zero_advantage",
                                     "all_clipped", "all_off_policy"]))
    normalizer = draw(st.sampled_from(["token", "seq_mean_token_mean", "constant"]))
    config = LuffyLossConfig(
        gamma=draw(st.sampled_from([0.1, 0.5])),
        shaping=draw(st.booleans()),
        clip_low=0.2, clip_high=draw(st.sampled_from([0.2, 0.28])),
        clip_on_policy=draw(st.booleans()),
        clip_off_policy=draw(st.booleans()),
        dual_clip=draw(st.sampled_from([None, 3.0])),
        entropy_coef=draw(st.sampled_from([0.0, 0.0, 0.01, 0.3])),
        temperature=draw(st.sampled_from([1.0, 0.6, 1.7])),
        normalizer=normalizer,
        max_len=draw(st.integers(T, 2 * T + 5)) if normalizer == "constant" else None,
        memory_budget_mb=draw(st.sampled_from([None, 0.01])),  # 0.01 MiB: many tiny chunks
    )
    batch = random_batch(
        T, H, V, dtype=torch.float64, seed=draw(st.integers(0, 2**31 - 1)),
        off_fraction={"all_off_policy": 1.0}.get(scenario, draw(st.sampled_from([0.0, 0.3, 0.7]))),
        mask_fraction=0.0 if scenario == "all_masked" else draw(st.sampled_from([0.5, 1.0])),
        zero_adv_fraction=1.0 if scenario == "zero_advantage" else 0.3,
        num_seqs=draw(st.integers(1, 6)), with_old=draw(st.booleans()),
        with_bias=draw(st.booleans()), ignore_some=draw(st.booleans()))
    if scenario == "all_clipped":
        # Put every on-policy ratio outside the clip range on the side its advantage pushes.
        current, _ = token_logprobs(batch["hidden"], batch["weight"], batch["targets"].clamp_min(0),
                                    temperature=config.temperature, bias=batch.get("bias"),
                                    backend="reference")
        sign = torch.sign(batch["advantages"])
        batch["advantages"] = torch.where(sign == 0, torch.ones_like(sign), batch["advantages"])
        batch["old_logprobs"] = current - 0.5 * torch.sign(batch["advantages"])
        batch["off_policy_mask"] = torch.zeros_like(batch["off_policy_mask"])
        config = config.replace(clip_on_policy=True, dual_clip=None, entropy_coef=0.0)
    layout = draw(st.sampled_from(["packed", "packed_one_sequence", "rows"]))
    if layout == "packed_one_sequence":
        del batch["seq_ids"]
    elif layout == "rows":
        # [B, L, H] input: rows are sequences. Use a T that factors; drop seq_ids.
        B = draw(st.sampled_from([d for d in range(1, 7) if T % d == 0]))
        del batch["seq_ids"]
        for key in ("hidden",):
            batch[key] = batch[key].reshape(B, T // B, H)
        for key in ("targets", "advantages", "loss_mask", "off_policy_mask", "old_logprobs"):
            if key in batch:
                batch[key] = batch[key].reshape(B, T // B)
    return batch, config, scenario


def cast_batch(batch: dict, dtype: torch.dtype) -> dict:
    out = dict(batch)
    for key in ("hidden", "weight", "bias", "advantages", "old_logprobs"):
        if key in out:
            out[key] = out[key].to(dtype)
    return out


def compare_backends(batch: dict, config, dtype: torch.dtype, backend: str,
                     oracle_dtype: torch.dtype | None = torch.float64) -> None:
    """`backend` on `dtype` inputs against the reference on the same inputs, upcast to float64.

    A float64 oracle measures each backend's own error; an fp32 reference would add its own
    rounding (e.g. log_softmax's backward computes g (1 - p_y) with cancellation as p_y -> 1).
    """
    rtol = TOLERANCE[dtype]
    # The oracle sees the same rounded inputs, upcast when oracle_dtype is given.
    rounded = cast_batch(batch, dtype)
    expected_loss, expected_stats, expected_grads = run_loss(
        cast_batch(rounded, oracle_dtype) if oracle_dtype else rounded, "reference", config)
    loss, stats, grads = run_loss(cast_batch(batch, dtype), backend, config)
    atol = 1e-12 if dtype == torch.float64 else 1e-8
    # The loss is a weighted mean of O(1) terms of both signs: when they cancel, its error is
    # set by the terms' scale, so it also gets an absolute allowance of rtol * 0.01.
    assert_close(loss, expected_loss, rtol, "loss", atol=max(atol, rtol * 1e-2))
    for name, expected in expected_grads.items():
        assert grads[name].dtype == dtype, f"d({name}) dtype"
        assert_close(grads[name], expected.to(dtype), rtol, f"d({name})", atol=atol)
    assert stats.keys() == expected_stats.keys()
    for key in ("num_on_policy_tokens", "num_off_policy_tokens", "num_sequences", "denominator"):
        assert float(stats[key]) == float(expected_stats[key]), key
    for key in ("logprob_mean", "entropy_mean", "ratio_mean"):
        if key in stats:
            assert_close(stats[key], expected_stats[key], max(rtol, 1e-6), key, atol=1e-6)


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=60, **SETTINGS)
@given(case=loss_case())
def test_torch_backend_matches_reference_float64(case):
    batch, config, _ = case
    compare_backends(batch, config, torch.float64, "torch")


@settings(max_examples=40, **SETTINGS)
@given(case=loss_case())
def test_torch_backend_matches_reference_float32(case):
    batch, config, _ = case
    compare_backends(batch, config, torch.float32, "torch")


@settings(max_examples=15, **SETTINGS)
@given(case=loss_case())
def test_torch_backend_bfloat16_within_1e2(case):
    batch, config, scenario = case
    if scenario == "all_clipped":
        return  # clip decisions on bf16-rounded ratios legitimately differ from float64 ones
    compare_backends(batch, config, torch.bfloat16, "torch")


def test_empty_batch_gives_zero_loss_and_zero_gradients():
    batch = random_batch(17, 5, 11, mask_fraction=0.0)
    for backend in ("reference", "torch"):
        loss, stats, grads = run_loss(batch, backend, LuffyLossConfig(entropy_coef=0.1))
        assert float(loss) == 0.0
        assert all(float(g.abs().max()) == 0.0 for g in grads.values())
        assert float(stats["num_on_policy_tokens"] + stats["num_off_policy_tokens"]) == 0


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_rows_layout_equals_packed_with_seq_ids(backend):
    batch = random_batch(24, 6, 13, num_seqs=4)
    config = LuffyLossConfig(normalizer="seq_mean_token_mean", entropy_coef=0.05)
    batch["seq_ids"] = torch.arange(4).repeat_interleave(6)
    packed = run_loss(batch, backend, config)
    rows = {k: (v.reshape(4, 6, -1) if k == "hidden" else v.reshape(4, 6))
            for k, v in batch.items() if k not in ("weight", "seq_ids")}
    rows["weight"] = batch["weight"]
    as_rows = run_loss(rows, backend, config)
    assert_close(as_rows[0], packed[0], 1e-6, "loss")
    assert_close(as_rows[2]["hidden"].reshape(24, 6), packed[2]["hidden"], 1e-6, "d(hidden)")


def test_float_loss_mask_weights_tokens():
    batch = random_batch(20, 4, 9, mask_fraction=1.0)
    weights = torch.rand(20, generator=torch.Generator().manual_seed(3))
    batch["loss_mask"] = weights
    for backend in ("reference", "torch"):
        loss, _, _ = run_loss(batch, backend, LuffyLossConfig())
        batch_half = dict(batch, loss_mask=weights * 0.5)  # token mean is invariant to scale
        loss_half, _, _ = run_loss(batch_half, backend, LuffyLossConfig())
        assert_close(loss_half, loss, 1e-6, "scale-invariant token mean")


@pytest.mark.parametrize("with_entropy", [False, True])
def test_token_logprobs_backends_agree(with_entropy):
    batch = random_batch(50, 8, 37, with_bias=True)
    targets = batch["targets"].clone()
    targets[:3] = -100
    results = {}
    for backend in ("reference", "torch"):
        results[backend] = token_logprobs(batch["hidden"], batch["weight"], targets, temperature=0.8,
                                          bias=batch["bias"], with_entropy=with_entropy,
                                          backend=backend)
    lp_ref, ent_ref = results["reference"]
    lp, ent = results["torch"]
    assert float(lp[:3].abs().max()) == 0.0
    assert_close(lp, lp_ref, 1e-5, "logprobs")
    # Against log_softmax computed directly.
    z = (batch["hidden"] @ batch["weight"].T + batch["bias"]) / 0.8
    direct = torch.log_softmax(z, -1).gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    assert_close(lp[3:], direct[3:], 1e-5, "direct")
    if with_entropy:
        p = torch.softmax(z, -1)
        assert_close(ent, -(p * p.log()).sum(-1), 1e-5, "entropy")
        assert_close(ent_ref, ent, 1e-5, "entropy backends")
    else:
        assert ent is None and ent_ref is None
