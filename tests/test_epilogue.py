"""The per-token epilogue kernel (kernels/epilogue.py) against its definition,
luffy_fast.loss_math.token_terms, on every option of the loss and on log-probs from certain to
impossible (and NaN), chunk by chunk as the kept pass calls it. Float32 on the interpreter."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from luffy_fast import LuffyLossConfig
from luffy_fast.inputs import LossInputs
from luffy_fast.loss_math import MAX_LOG_RATIO, normalization, policy_terms

# CPU tensors throughout: the interpreter's numerics (a GPU's are checked by gpu_parity.py, its
# compile by test_cuda_compile.py).
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the kernel on the interpreter (TRITON_INTERPRET=1)")

N = 300
CHUNKS = (slice(0, 7), slice(7, 160), slice(160, N))  # odd lengths and offsets


def make_inputs(config: LuffyLossConfig, with_old: bool, seed: int) -> tuple[LossInputs, dict]:
    """Loss tokens with hand-placed corner cases, and the forward's moments for each token."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    logprobs = -rand(N) * 12
    # certain, nearly certain, impossible, NaN (a non-finite logit), and just-representable
    logprobs[:6] = torch.tensor([0.0, -1e-7, -math.inf, math.nan, -87.0, -103.0])
    old = -rand(N) * 12
    # log-ratios at, below and above the clamp bound, and an old log-prob far below
    old[6:10] = logprobs[6:10] - torch.tensor([MAX_LOG_RATIO, MAX_LOG_RATIO - 0.5, MAX_LOG_RATIO + 1, 90.0])
    seq_ids = torch.sort(torch.randint(0, 9, (N,), generator=generator)).values
    seq_advantages = torch.randn(9, generator=generator)
    seq_advantages[[2, 5]] = 0.0
    advantages = seq_advantages[seq_ids]
    advantages[10:14] = torch.tensor([3.0, -3.0, 0.5, -0.5])  # dual clip on both sides
    loss_mask = (rand(N) * 2).floor().clamp(max=1) * (0.5 + rand(N))  # zeros and weights
    inputs = LossInputs(
        hidden=torch.zeros(N, 1), weight=torch.zeros(2, 1), bias=None, rows=torch.arange(N),
        targets=torch.zeros(N, dtype=torch.int64), advantages=advantages, loss_mask=loss_mask,
        off_policy_mask=rand(N) < 0.4, old_logprobs=old if with_old else None,
        norm=normalization(loss_mask, seq_ids, config), config=config, compute_dtype=torch.float32)
    row_max = rand(N) * 4
    moments = {"logprobs": logprobs, "lse": row_max + rand(N) * 3, "row_max": row_max,
               "expected_shift": -rand(N) * 2}
    return inputs, moments


def run_epilogue(inputs: LossInputs, moments: dict):
    """The kernel over CHUNKS, given the forward's moments: every token's TokenBuffers."""
    from luffy_fast.kernels.epilogue import TokenBuffers, token_terms_into

    buffers = TokenBuffers.empty(inputs)
    for name in ("lse", "logprobs", "row_max", "expected_shift"):
        if getattr(buffers, name) is not None:
            getattr(buffers, name).copy_(moments[name])
    for part in CHUNKS:
        token_terms_into(inputs, part, buffers)
    return buffers


CONFIGS = [
    LuffyLossConfig(shaping=shaping, clip_on_policy=clip_on, clip_off_policy=clip_off,
                    dual_clip=dual, entropy_coef=entropy, gamma=gamma, clip_low=0.2, clip_high=0.28,
                    normalizer=normalizer, max_len=64, entropy_aggregation=aggregation)
    for (shaping, gamma), clip_on, clip_off, dual, (entropy, aggregation), normalizer in itertools.product(
        [(True, 0.1), (False, 0.1), (True, 0.5)], [True, False], [False, True], [None, 3.0],
        [(0.0, "normalizer"), (0.01, "normalizer"), (0.3, "token_mean")],
        ["token", "seq_mean_token_mean", "constant"])
    if clip_on or clip_off or dual is None  # dual clipping applies only inside a PPO clip
][::5]  # every fifth of the 216 combinations: each option value still appears many times


@pytest.mark.parametrize("with_old", [True, False])
@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_epilogue_kernel_matches_the_loss_math(config, with_old):
    inputs, moments = make_inputs(config, with_old, seed=len(str(config)))
    buffers = run_epilogue(inputs, moments)
    got = buffers.terms()

    entropy = None
    if config.entropy_coef > 0:
        entropy = (moments["lse"] - moments["row_max"]) - moments["expected_shift"]
    expected = inputs.token_terms(slice(None), moments["logprobs"], entropy)  # fp32, as the kernel
    for name in ("ratio", "coef", "entropy", "entropy_weight"):
        if getattr(expected, name) is None:
            assert getattr(got, name) is None, name
            continue
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=2e-6,
                                   atol=1e-37, equal_nan=True, msg=name)
    for name in ("clipped", "active"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    # each token's share of the loss: w_t L_t - w_t c_ent H_t, from the policy terms
    policy = policy_terms(moments["logprobs"], inputs.old_logprobs, inputs.advantages,
                          inputs.off_policy_mask, config)
    policy_part = inputs.norm.weights * policy.loss
    entropy_part = 0.0 if entropy is None else expected.entropy_weight * entropy
    token_loss = policy_part - entropy_part
    # the two parts may cancel: the error is relative to their size, not to the difference
    allowed = 2e-6 * (policy_part.abs() + torch.as_tensor(entropy_part).abs()) + 1e-37
    same_nan = torch.isnan(buffers.token_loss) == torch.isnan(token_loss)
    close = (buffers.token_loss - token_loss).abs() <= allowed
    assert bool((same_nan & (close | torch.isnan(token_loss))).all()), "token_loss"
    # the corner cases are present: a NaN log-prob makes the loss NaN in both
    assert math.isnan(float(got.loss)) == math.isnan(float(expected.loss))
    finite = torch.isfinite(moments["logprobs"])
    per_token = got.coef  # the coefficient is finite exactly where the log-prob is
    assert bool(torch.isfinite(per_token[finite]).all())
    can_clip = (config.clip_on_policy and with_old) or config.clip_off_policy  # r = 1 without old
    assert bool(got.clipped.any()) == can_clip


@pytest.mark.parametrize("config", CONFIGS[:6], ids=range(6))
def test_epilogue_loss_is_the_sum_of_the_chunks(config):
    """Without NaN tokens the loss is the float64 sum to fp32 rounding."""
    inputs, moments = make_inputs(config, True, seed=7)
    moments["logprobs"][3] = -1.0  # no NaN here
    buffers = run_epilogue(inputs, moments)
    entropy = None
    if config.entropy_coef > 0:
        entropy = ((moments["lse"] - moments["row_max"]) - moments["expected_shift"]).double()
    expected = inputs.token_terms(slice(None), moments["logprobs"].double(), entropy)
    assert float(buffers.terms().loss) == pytest.approx(float(expected.loss), rel=1e-5, abs=1e-9)
