"""Autotuning inside the memory budget: the in-place dL/dz kernel's first call of a size class
times its configs on the chunk itself and then puts the overwritten logits back from a host copy
(no device clone), and the autotuners time configs without Triton's 256 MiB L2-flush buffer.

On the CPU each kernel has one config, so nothing tunes; these tests give the in-place kernel's
autotuner two configs, as on a GPU, and check the result against the single-config pass.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import triton

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tensors on Triton's interpreter (tests/conftest.py sets it)")

C, V = 13, 70


def chunk(seed: int = 0):
    """A chunk of logits with the forward's per-token values (entropy on, one inactive token)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(C, V, generator=generator) * 3
    z = logits / 0.8
    lse = torch.logsumexp(z, dim=1)
    targets = torch.randint(0, V, (C,), generator=generator)
    logprobs = z.gather(1, targets[:, None]).squeeze(1) - lse
    coef = torch.randn(C, generator=generator)
    coef[4] = 0.0
    entropy_weight = torch.rand(C, generator=generator)
    entropy_weight[4] = 0.0
    row_max = z.max(dim=1).values
    expected_shift = (z.softmax(dim=1) * (z - row_max[:, None])).sum(dim=1)
    return logits, (None, targets, lse, logprobs, coef, entropy_weight, row_max, expected_shift, 0.8)


@pytest.fixture
def two_configs(monkeypatch):
    """The in-place kernel's autotuner with two configs and nothing tuned yet; counts the configs
    timed and the host copies taken."""
    from luffy_fast.kernels import backward

    tuner = backward._grad_logits_in_place_kernel.fn
    configs = [triton.Config({"BLOCK_T": 4, "BLOCK_V": 32}, num_warps=4),
               triton.Config({"BLOCK_T": 2, "BLOCK_V": 64}, num_warps=4)]
    monkeypatch.setattr(tuner, "configs", configs)
    monkeypatch.setattr(tuner, "cache", {})
    timed, copies = [], []
    bench, host_copy = tuner.do_bench, backward._host_copy
    monkeypatch.setitem(tuner.__dict__, "do_bench",
                        lambda call, quantiles: timed.append(1) or bench(call, quantiles))
    monkeypatch.setattr(backward, "_host_copy", lambda t: copies.append(1) or host_copy(t))
    return tuner, timed, copies


def test_first_call_tunes_on_the_chunk_and_restores_its_logits(two_configs):
    """The tuning call (every config run several times over the chunk, each overwriting it) gives
    the same dL/dz, bit for bit, as the single-config pass on fresh logits; later calls of the
    size class reuse the choice and tune no more."""
    from luffy_fast.kernels.backward import grad_logits_in_place

    tuner, timed, copies = two_configs
    logits, args = chunk()
    expected_config = tuner.configs[0]
    with pytest.MonkeyPatch.context() as single:
        single.setattr(tuner, "configs", [expected_config])
        expected = grad_logits_in_place(logits.clone(), *args, torch.float32)
    assert len(tuner.cache) == 0 and not timed  # one config: nothing to tune

    assert not copies
    got = grad_logits_in_place(logits.clone(), *args, torch.float32)
    assert len(timed) == 2 and len(tuner.cache) == 1  # both configs timed, once each
    assert len(copies) == 1
    assert torch.equal(got, expected)
    assert float(expected.abs().sum()) > 0 and bool(torch.isfinite(expected).all())

    again = grad_logits_in_place(logits.clone(), *args, torch.float32)
    assert len(timed) == 2 and len(copies) == 1  # tuned: no timing, no copy
    assert torch.equal(again, expected)


def test_tuning_runs_really_overwrite_the_chunk(two_configs, monkeypatch):
    """Without the restore the tuning call's answer is wrong: the timing runs take the chunk's
    dL/dz for its logits. (Guards the test above against passing for the wrong reason.)"""
    from luffy_fast.kernels import backward

    logits, args = chunk(1)
    expected = backward.grad_logits_in_place(logits.clone(), *args, torch.float32)
    monkeypatch.setattr(two_configs[0], "cache", {})
    monkeypatch.setattr(backward, "_host_copy", lambda tensor: tensor)  # "saves" the chunk itself
    got = backward.grad_logits_in_place(logits.clone(), *args, torch.float32)
    assert not torch.allclose(got, expected, atol=1e-3, equal_nan=True)


def test_a_tuning_call_taken_for_a_tuned_one_is_refused(two_configs, monkeypatch):
    """Were the tuning key misjudged (no host copy taken, yet the autotuner tunes), the call
    raises instead of returning dL/dz of overwritten logits."""
    from luffy_fast.kernels import backward

    logits, args = chunk()
    tuner = two_configs[0]
    tuner.cache["a key Triton never forms"] = tuner.configs[0]
    monkeypatch.setattr(backward, "_tuning_key", lambda args: "a key Triton never forms")
    with pytest.raises(RuntimeError, match="without a saved copy"):
        backward.grad_logits_in_place(logits.clone(), *args, torch.float32)


def test_a_key_recipe_that_misses_is_reported(two_configs, monkeypatch):
    """Were _tuning_key's recipe to drift from Triton's, a tuned call would look untuned every
    time and copy its chunk to the host on every call: that is warned about, and stays exact."""
    from luffy_fast.kernels import backward

    logits, args = chunk()
    expected = backward.grad_logits_in_place(logits.clone(), *args, torch.float32)  # tunes
    monkeypatch.setattr(backward, "_tuning_key", lambda args: "a key Triton never forms")
    with pytest.warns(UserWarning, match="keys its autotune cache differently"):
        got = backward.grad_logits_in_place(logits.clone(), *args, torch.float32)
    assert torch.equal(got, expected)


def test_tuning_key_is_the_autotuners_own(two_configs, monkeypatch):
    """Every call the autotuner keys apart (another size class, logits dtype, dL/dz dtype, bias
    or entropy present or not) tunes once, with one host copy, under the key _tuning_key forms;
    a call of the same class is not tuned again."""
    from luffy_fast.kernels import backward

    tuner, timed, copies = two_configs
    formed = []
    key_of = backward._tuning_key
    monkeypatch.setattr(backward, "_tuning_key", lambda args: formed.append(key_of(args)) or formed[-1])
    logits, (bias, targets, lse, logprobs, coef, entropy_weight, row_max, shift, temperature) = chunk()
    calls = {
        "base": (logits, bias, entropy_weight, row_max, shift, torch.float32),
        "bf16 dL/dz over fp32 logits": (logits, bias, entropy_weight, row_max, shift, torch.bfloat16),
        "bf16 logits": (logits.bfloat16(), bias, entropy_weight, row_max, shift, torch.bfloat16),
        "bias": (logits, torch.randn(V), entropy_weight, row_max, shift, torch.float32),
        "no entropy": (logits, bias, None, None, None, torch.float32),
        "another size class": (torch.randn(3 * C, V), bias, None, None, None, torch.float32),
    }
    for name, (kept, bias_, weight, top, expected_shift, dtype) in calls.items():
        rows = kept.shape[0]
        per_token = [v.repeat(3)[:rows] if v is not None else None
                     for v in (targets, lse, logprobs, coef, weight, top, expected_shift)]
        before = len(tuner.cache)
        args = (kept.clone(), bias_, *per_token, temperature, dtype)
        backward.grad_logits_in_place(*args)
        assert len(tuner.cache) == before + 1, name  # a class of its own: tuned
        assert formed[-1] in tuner.cache, name  # under the key formed here
    assert len(timed) == 2 * len(calls) and len(copies) == len(calls)
    # the same class again (13 rows and 9 rows share the 16-row bucket): nothing more
    backward.grad_logits_in_place(logits[:9].clone(), None, *[v[:9] for v in (
        targets, lse, logprobs, coef, entropy_weight, row_max, shift)], temperature, torch.float32)
    assert len(timed) == 2 * len(calls) and len(copies) == len(calls)


def test_tuning_bench_times_the_call_at_the_quantiles():
    from luffy_fast.kernels.utils import tuning_bench

    calls = []
    timings = tuning_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8))
    assert len(timings) == 3 and len(calls) >= 3
    median, low, high = timings
    assert 0 <= low <= median <= high


def test_profile_lists_the_tuned_choice(two_configs):
    """benchmarks/profile_op.py reports the config the tuning picked, under its size key."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # plain `pytest` leaves the repository root out
        sys.path.insert(0, root)
    from benchmarks.profile_op import tuning_choices
    from luffy_fast.kernels.backward import grad_logits_in_place

    tuner = two_configs[0]
    logits, args = chunk()
    grad_logits_in_place(logits, *args, torch.float32)
    (chosen,) = tuner.cache.values()
    lines = [line for line in tuning_choices().splitlines() if "_grad_logits_in_place_kernel" in line]
    assert lines == [f"  _grad_logits_in_place_kernel [16, 128] float32/int64: {chosen}"]
