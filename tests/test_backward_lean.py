"""The opt-in lean dL/dz pass over kept logits (kernels/backward_lean.py, LUFFY_FAST_LEAN=1)
against float64 and against the default in-place kernel (the op with both lean passes on:
tests/test_forward_lean.py). Float32 arithmetic on the interpreter, where its tiles are 4 x 32."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import assert_no_worse

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the kernels on the interpreter (TRITON_INTERPRET=1)")
TEMPERATURE = 0.7
# The largest error against float64, relative to the chunk's norm or (without entropy) each row's,
# that either kernel's dL/dz may have: ~6-7x the default kernel's largest measured over the
# parametrizations (fp32: chunk 5.4e-7, row 7.8e-7; bf16 dL/dz, its rounding: chunk 4.2e-3, row
# 5.9e-3).
BOUNDS = {("chunk", torch.float32): 4e-6, ("row", torch.float32): 5e-6,
          ("chunk", torch.bfloat16): 3e-2, ("row", torch.bfloat16): 4e-2}


def _chunk(C: int, V: int, with_entropy: bool, logits_dtype: torch.dtype):
    """Logits (values of `logits_dtype`), bias and the forward's per-token values; two tokens
    without weight (one with a NaN logit); targets in the first and last columns too; a
    near-certain target (p_y -> 1, where 1 - p_y needs log p_y)."""
    generator = torch.Generator().manual_seed(C + V)
    logits = torch.randn(C, V, generator=generator) * 3
    targets = torch.randint(0, V, (C,), generator=generator)
    targets[0], targets[1] = 0, V - 1
    logits[3, targets[3]] += 25.0  # 1 - p_y ~ 1e-9: below fp32's resolution of p_y, not float64's
    logits = logits.to(logits_dtype).float()
    bias = torch.randn(V, generator=generator)
    z = (logits.double() + bias.double()) / TEMPERATURE
    lse = torch.logsumexp(z, dim=1)
    logprobs = z.gather(1, targets[:, None]).squeeze(1) - lse
    coef = torch.randn(C, generator=generator).double()
    coef[[2, C - 1]] = 0.0
    weight = row_max = expected_shift = None
    if with_entropy:
        weight = torch.rand(C, generator=generator).double()
        weight[[2, C - 1]] = 0.0
        row_max = z.max(dim=1).values
        expected_shift = (z.softmax(dim=1) * (z - row_max[:, None])).sum(dim=1)
    logits[C - 1, 5] = float("nan")  # an inactive token's row
    per_token = (targets, lse, logprobs, coef, weight, row_max, expected_shift)
    return logits, bias, per_token, z


def _oracle(z, per_token) -> torch.Tensor:
    """dL/dz = (g (e_y - p) + c_ent p (z - E_p[z])) / temperature in float64."""
    targets, lse, logprobs, coef, weight, row_max, expected_shift = per_token
    p = torch.exp(z - lse[:, None])
    grad = -p * coef[:, None]
    grad.scatter_(1, targets[:, None], (-torch.expm1(logprobs) * coef)[:, None])
    if weight is not None:
        grad += p * weight[:, None] * ((z - row_max[:, None]) - expected_shift[:, None])
    grad[coef.eq(0) & (weight is None or weight.eq(0))] = 0.0
    return grad / TEMPERATURE


@pytest.mark.parametrize("C, V", [(19, 77), (8, 64)])  # ragged / whole tiles; rows past the end
@pytest.mark.parametrize(("logits_dtype", "dtype"), [(torch.float32, torch.float32),
                                                     (torch.float32, torch.bfloat16),
                                                     (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_lean_pass_matches_float64_and_the_default_kernel(monkeypatch, C, V, logits_dtype, dtype,
                                                          with_entropy):
    from luffy_fast.kernels.backward import grad_logits_in_place

    logits, bias, per_token, z = _chunk(C, V, with_entropy, logits_dtype)
    args = [None if value is None else value.float() if value.is_floating_point() else value
            for value in per_token]
    expected = _oracle(z, per_token)
    default = grad_logits_in_place(logits.to(logits_dtype, copy=True), bias, *args, TEMPERATURE,
                                   dtype).float()
    monkeypatch.setenv("LUFFY_FAST_LEAN", "1")
    kept = logits.to(logits_dtype, copy=True)
    got = grad_logits_in_place(kept, bias, *args, TEMPERATURE, dtype)
    assert got.dtype == dtype and got.shape == (C, V) and got.data_ptr() == kept.data_ptr()
    assert torch.equal(got[[2, C - 1]].float(), torch.zeros(2, V))  # no weight: zeros, NaN or not
    # relative to the chunk's norm, and without entropy per row (relative to the row's norm, so
    # that a near-certain token's tiny row counts): no worse than the default kernel, or than
    # rounding. The exponent's conversion to base 2 rounds it by up to |z - lse| 2^-24 (~4e-6
    # for an entry 66 below, in base 2), which the interpreter's natural exp in the default
    # kernel does not show (on a GPU, tl.exp converts too). With entropy a row of a near-certain
    # token is as tiny, and its target's (z - max) - (E_p[z] - max) is ~0 less the rounding of z
    # (the default kernel here rounds z as the test's max does; a GPU fuses z - max into one FMA,
    # as the lean kernel does), so the row-relative check would measure that rounding.
    # Both capped (assert_no_worse): the default kernel's error, and the allowance of twice it,
    # within BOUNDS, so that a bug both kernels share fails.
    error = float((got.double() - expected).norm() / expected.norm())
    default_error = float((default.double() - expected).norm() / expected.norm())
    rounding = 2e-6 if dtype == torch.float32 else 8e-3
    assert_no_worse(error, default_error, rounding, BOUNDS["chunk", dtype], "chunk")
    if not with_entropy:
        scale = expected.norm(dim=1, keepdim=True).clamp_min(1e-30)
        error = float(((got.double() - expected) / scale).abs().max())
        default_error = float(((default.double() - expected) / scale).abs().max())
        rounding = 1e-5 if dtype == torch.float32 else 8e-3
        assert_no_worse(error, default_error, rounding, BOUNDS["row", dtype], "row")
    if not with_entropy:  # the near-certain target: 1 - p_y from log p_y, not from the logits
        target = int(per_token[0][3])
        assert 1e-12 < float(-torch.expm1(per_token[2][3])) < 1e-7
        torch.testing.assert_close(got[3, target].double(), expected[3, target],
                                   rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)
