"""The opt-in forward with the softmax statistics in the logits GEMM's epilogue
(kernels/forward_fused.py, LUFFY_FAST_FUSED_FORWARD=1): its statistics against float64 and the
split kernel, the logits it stores against the product, and the op with the switch against the
default path and the reference. On the interpreter, where its tiles are 16 x 32 x 16 and the
vocabulary is cut into 2-3 splits (the op's tests with the switch at kept budgets are in
test_forward_lean.py's SWITCHES)."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import (
    FORWARD_BOUNDS,
    FORWARD_OUTPUTS,
    assert_forward_outputs,
    compare_backends,
    forward_errors,
    forward_oracle,
    peaked_batch,
    random_batch,
    run_loss,
)
from luffy_fast import LuffyLossConfig, token_logprobs

SWITCH = "LUFFY_FAST_FUSED_FORWARD"
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the kernels on the interpreter (TRITON_INTERPRET=1)")


def test_wave_splits_fill_whole_waves():
    from luffy_fast.kernels.forward_fused import wave_splits

    # V = 151936 is 1187 tiles of 128; 132 SMs; cost = waves x (tiles per program + 2).
    # 2731 tokens are 22 tiles of 128: 6 splits make 132 programs, one wave of 198 tiles each
    # (200); 12 splits two waves of 99 (202); the default kernel's 38 splits would be 7 waves,
    # the last a third full.
    assert wave_splits(2731, 151936, 132) == 6
    # 8192 tokens, 64 tiles: 2 splits, one wave of 594 tiles (596); 4 splits two waves of 297
    # (598); 6 splits three of 198 (600)
    assert wave_splits(8192, 151936, 132) == 2
    # one token tile: 132 splits of at most 9 tiles (11); 131 splits need 10 tiles each (12)
    assert wave_splits(100, 151936, 132) == 132
    # a vocabulary of 2 tiles: 40 token tiles x 2 splits is still one wave (1 + 2 against 2 + 2)
    assert wave_splits(5000, 200, 132) == 2
    # 64-row tiles, two programs per SM (264 slots): 43 token tiles x 6 splits = 258 programs
    assert wave_splits(2731, 151936, 264, 64, 128) == 6


def _inputs(T: int, C: int, H: int, V: int, seed: int):
    """hidden [T, H] and weight [V, H] with logits from flat to peaked; `C` tokens at rows
    permuted out of T, targets on and off the max, the first and the last column among them."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=generator) * torch.linspace(0.2, 3.0, T)[:, None]
    weight = torch.randn(V, H, generator=generator)
    rows = torch.randperm(T, generator=generator)[:C]
    targets = torch.randint(0, V, (C,), generator=generator)
    targets[0], targets[-1] = 0, V - 1
    targets[1] = int((hidden[rows[1]] @ weight.T).argmax())
    return hidden, weight, rows, targets


@interpreted
# V: one ragged split after whole ones (77), whole tiles (128), a ragged tail (300); C: rows past
# the last token tile's end
@pytest.mark.parametrize("C, V", [(13, 77), (16, 128), (21, 300)])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("with_bias, temperature", [(False, 1.0), (True, 0.7)])
@pytest.mark.parametrize("store", [False, True])
def test_fused_forward_matches_float64_and_the_split_kernel(C, V, with_entropy, with_bias,
                                                            temperature, store):
    from luffy_fast.kernels.forward import logsumexp_forward
    from luffy_fast.kernels.forward_fused import fused_forward

    hidden, weight, rows, targets = _inputs(40, C, 24, V, seed=V + C)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(6)) if with_bias else None
    logits = torch.full((C, V), float("nan")) if store else None
    got = fused_forward(hidden, weight, bias, rows, targets, temperature, with_entropy, logits)
    split = logsumexp_forward(hidden, weight, bias, rows, targets, temperature, with_entropy)
    product = hidden[rows].double() @ weight.double().T
    if store:  # raw h W^T (no bias, no temperature), row i for token i, every entry written
        torch.testing.assert_close(logits.double(), product, rtol=1e-5, atol=1e-5)
    assert (got[3] is None) == (not with_entropy)
    assert_forward_outputs(got, split, forward_oracle(product, bias, targets, temperature), 2e-5)


def _representable(T: int, H: int, V: int, seed: int):
    """bf16 hidden in {-1, -0.5, 0, 0.5, 1} and weight in multiples of 1/16 below 0.5 (H <= 16):
    every logit is a bf16 number, so rounding to bf16 loses nothing."""
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randint(-2, 3, (T, H), generator=generator) / 2).to(torch.bfloat16)
    weight = (torch.randint(-7, 8, (V, H), generator=generator) / 16).to(torch.bfloat16)
    return hidden, weight


@interpreted
@pytest.mark.parametrize("kept_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("representable, with_bias, temperature", [(True, False, 0.8),
                                                                    (False, False, 0.8),
                                                                    (False, True, 0.6)])
def test_fused_forward_over_bf16_inputs_stores_the_kept_logits(kept_dtype, representable,
                                                               with_bias, temperature):
    """bf16 inputs. The stored tile is the product in the kept dtype: exact where every logit is a
    bf16 number, else rounded once. The statistics are the split kernel's over that buffer, and
    the same without a buffer (so the loss and token_logprobs agree): with 16-bit kept logits,
    those of the rounded logits. Both match float64 statistics of the buffer."""
    from luffy_fast.kernels.forward import logsumexp_forward
    from luffy_fast.kernels.forward_fused import fused_forward

    if representable:
        hidden, weight = _representable(30, 12, 150, seed=4)
    else:
        generator = torch.Generator().manual_seed(4)
        hidden = torch.randn(30, 12, generator=generator).to(torch.bfloat16)
        weight = torch.randn(150, 12, generator=generator).to(torch.bfloat16)
    rows = torch.randperm(30, generator=torch.Generator().manual_seed(1))[:19]
    targets = torch.randint(0, 150, (19,), generator=torch.Generator().manual_seed(2))
    bias = (torch.randn(150, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
            if with_bias else None)
    half = kept_dtype == torch.bfloat16
    logits = torch.full((19, 150), float("nan"), dtype=kept_dtype)
    stored = fused_forward(hidden, weight, bias, rows, targets, temperature, True, logits, half)
    product = hidden[rows].double() @ weight.double().T
    if representable:
        assert torch.equal(logits.double(), product)
    else:  # rounded once to the kept dtype: within one bf16 ulp (2^-7; the interpreter
        # truncates fp32 to bf16, where a GPU rounds to nearest even, within half of one)
        rounding = 2.0**-7 if half else 1e-6
        torch.testing.assert_close(logits.double(), product, rtol=rounding, atol=1e-6)
        assert not half or not torch.equal(logits.double(), product)
    unstored = fused_forward(hidden, weight, bias, rows, targets, temperature, True, None, half)
    split = logsumexp_forward(hidden, weight, bias, rows, targets, temperature, True,
                              logits=logits)
    for name, a, b, c in zip(FORWARD_OUTPUTS, stored, unstored, split):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, rtol=2e-6, atol=1e-6, msg=name)
    # and both those of float64 over the buffer, within FORWARD_BOUNDS
    assert_forward_outputs(stored, split, forward_oracle(logits.double(), bias, targets,
                                                         temperature), 2e-5)


def _tuned_loads() -> str:
    """The load form of the fused kernel's last launch: "TMA" or "cp.async"."""
    from luffy_fast.kernels.forward_fused import _fused_forward_kernel

    return "TMA" if _fused_forward_kernel.fn.best_config.kwargs["TMA"] else "cp.async"


@interpreted
# C: a last token tile cut short; V: a ragged split and tail; H: a last H step cut short (TMA
# fills what lies past each operand's end with zeros)
@pytest.mark.parametrize("C, V, H", [(13, 77, 24), (21, 300, 40)])
@pytest.mark.parametrize("kept_dtype", [None, torch.float32, torch.bfloat16])
def test_contiguous_rows_load_by_tma_with_the_results_of_cp_async(monkeypatch, C, V, H,
                                                                    kept_dtype):
    """Hidden rows in order (rows=None) of bf16 inputs: the operand tiles come by TMA (tensor
    descriptors) unless LUFFY_FAST_FUSED_TMA=0, and in Hopper's warp-specialized config (its
    loop unflattened; the interpreter runs its programs' warps as one). All forms give the same
    bits: the statistics, with bias, temperature and entropy, and the stored logits; and those
    match float64 (the statistics those of the logits kept, rounded where 16-bit), within
    FORWARD_BOUNDS."""
    import triton

    from luffy_fast.kernels.forward_fused import _fused_forward_kernel, fused_forward

    generator = torch.Generator().manual_seed(C + V)
    hidden = torch.randn(C, H, generator=generator).to(torch.bfloat16)
    weight = torch.randn(V, H, generator=generator).to(torch.bfloat16)
    bias = torch.randn(V, generator=generator).to(torch.bfloat16)
    targets = torch.randint(0, V, (C,), generator=generator)
    targets[0], targets[-1] = 0, V - 1
    results = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("LUFFY_FAST_FUSED_TMA", mode)
        logits = None if kept_dtype is None else torch.full((C, V), float("nan"), dtype=kept_dtype)
        stats = fused_forward(hidden, weight, bias, None, targets, 0.8, True, logits,
                              kept_dtype == torch.bfloat16)
        results[_tuned_loads()] = stats, logits
    tuner = _fused_forward_kernel.fn
    specialized = triton.Config({**tuner.configs[0].kwargs, "TMA": 1, "WS": 1}, num_warps=4)
    monkeypatch.setattr(tuner, "configs", [specialized])
    monkeypatch.setattr(tuner, "cache", {})
    logits = None if kept_dtype is None else torch.full((C, V), float("nan"), dtype=kept_dtype)
    stats = fused_forward(hidden, weight, bias, None, targets, 0.8, True, logits,
                          kept_dtype == torch.bfloat16)
    results["TMA, warp-specialized"] = stats, logits
    (tma, tma_logits), (pointers, pointer_logits) = results["TMA"], results["cp.async"]
    for form in ("TMA", "TMA, warp-specialized"):
        for name, a, b in zip(FORWARD_OUTPUTS, results[form][0], pointers):
            assert torch.equal(a, b), (form, name)
        if kept_dtype is not None:
            assert torch.equal(results[form][1], pointer_logits), form
    if kept_dtype is not None:
        torch.testing.assert_close(tma_logits.double(), hidden.double() @ weight.double().T,
                                   rtol=2.0**-7 if kept_dtype == torch.bfloat16 else 1e-6,
                                   atol=1e-6)
    # float64 statistics of the logits: the product, or with 16-bit kept logits the rounded
    # ones (the buffer, checked against the product above); every form gave the bits checked
    product = hidden.double() @ weight.double().T if kept_dtype != torch.bfloat16 else tma_logits
    errors = forward_errors(tma, forward_oracle(product.double(), bias, targets, 0.8))
    assert errors.keys() == set(FORWARD_OUTPUTS)
    for name, error in errors.items():
        assert error <= FORWARD_BOUNDS[name], (name, error)


@interpreted
def test_tma_only_where_it_can_load_the_operands(monkeypatch):
    """TMA loads whole tiles of contiguous rows from 16-byte aligned operands: the kernel takes
    its TMA configs only then (`_tma_allowed`, which the autotune key holds), for 16-bit inputs,
    and as LUFFY_FAST_FUSED_TMA says."""
    import luffy_fast.kernels.forward_fused as forward_fused

    hidden, weight = torch.zeros(8, 24, dtype=torch.bfloat16), torch.zeros(40, 24, dtype=torch.bfloat16)

    def allowed(hidden=hidden, weight=weight, rows=None):
        return forward_fused._tma_allowed({
            "hidden_ptr": hidden, "weight_ptr": weight, "rows_ptr": rows,
            "stride_hidden": hidden.stride(0), "stride_weight": weight.stride(0)})

    assert allowed() == 1  # the default, "auto": both forms timed
    assert allowed(rows=torch.arange(8)) == 0  # gathered rows
    assert allowed(hidden=hidden.float()) == 0  # fp32 inputs
    assert allowed(weight=torch.zeros(40, 20, dtype=torch.bfloat16)) == 0  # 40-byte rows
    assert allowed(weight=torch.zeros(41 * 24, dtype=torch.bfloat16)[4:4 + 40 * 24].view(40, 24)) == 0
    # a base 2 bytes past an aligned address
    assert allowed(hidden=torch.zeros(9 * 24, dtype=torch.bfloat16)[1:1 + 8 * 24].view(8, 24)) == 0
    monkeypatch.setenv("LUFFY_FAST_FUSED_TMA", "1")
    assert allowed() == 2 and allowed(rows=torch.arange(8)) == 0
    monkeypatch.setenv("LUFFY_FAST_FUSED_TMA", "0")
    assert allowed() == 0
    monkeypatch.setenv("LUFFY_FAST_FUSED_TMA", "yes")
    with pytest.raises(ValueError, match="LUFFY_FAST_FUSED_TMA"):
        allowed()
    # the gathered rows of the op's recompute forward take the cp.async form
    monkeypatch.setenv("LUFFY_FAST_FUSED_TMA", "1")
    targets = torch.zeros(5, dtype=torch.long)
    forward_fused.fused_forward(hidden, weight, None, torch.arange(5), targets, 1.0, False)
    assert _tuned_loads() == "cp.async"
    forward_fused.fused_forward(hidden, weight, None, None, targets[:8].repeat(2)[:8], 1.0, False)
    assert _tuned_loads() == "TMA"


@interpreted
@pytest.mark.parametrize("config", [LuffyLossConfig.luffy(max_len=64),
                                    LuffyLossConfig.grpo(entropy_coef=0.01, temperature=0.6)],
                         ids=["luffy", "grpo_entropy"])
def test_the_op_at_a_recompute_budget_with_the_switch_matches_the_reference(monkeypatch, config):
    """The recompute strategy's forward (tile products, no logits kept) through the fused
    kernel."""
    from luffy_fast.kernels.function import plan

    monkeypatch.setenv(SWITCH, "1")
    batch = random_batch(150, 16, 90, seed=4, with_bias=True, zero_adv_fraction=0.3, num_seqs=6)
    config = config.replace(memory_budget_mb=0.001)
    assert plan(config, torch.device("cpu"), 150, 90, 4, 16)[0] == "recompute"
    compare_backends(batch, config, torch.float32, "triton")


@interpreted
@pytest.mark.parametrize("rows", [1000, 40])  # one chunk; chunks of at most 40 tokens
def test_the_switch_changes_no_result_of_the_16_bit_kept_path(monkeypatch, rows):
    """bf16 inputs with bf16 numbers for logits and 16-bit kept logits: the loss, the stats and
    every gradient the same with the fused forward as with cuBLAS's GEMM and the split pass, and
    the old log-probs token_logprobs gives equal to the loss's. The switch must have run."""
    from test_half_logits import HALF, _budget_mb, _representable_batch

    import luffy_fast.kernels.function as function

    batch = _representable_batch(150, 12, 150, seed=3, with_bias=True, zero_adv_fraction=0.3,
                                 num_seqs=6)
    config = LuffyLossConfig.grpo(entropy_coef=0.01, temperature=0.5, dual_clip=3.0).replace(
        memory_budget_mb=_budget_mb(rows, batch, 2), **HALF)
    args = (batch["hidden"], batch["weight"], batch["targets"])
    options = {"bias": batch["bias"], "backend": "triton", "temperature": 0.5,
               "logits_dtype": "input"}
    loss, stats, grads = run_loss(batch, "triton", config)
    old_logprobs, _ = token_logprobs(*args, **options)
    calls = {"fused": 0, "cuBLAS": 0}

    def counted(name, function_):
        def call(*a, **k):
            calls[name] += 1
            return function_(*a, **k)
        return call

    monkeypatch.setattr(function, "fused_forward", counted("fused", function.fused_forward))
    monkeypatch.setattr(function, "kept_logits", counted("cuBLAS", function.kept_logits))
    monkeypatch.setenv(SWITCH, "1")
    fused_loss, fused_stats, fused_grads = run_loss(batch, "triton", config)
    assert calls["fused"] >= (1 if rows > 150 else 3) and calls["cuBLAS"] == 0
    assert torch.equal(fused_loss, loss)
    for key, value in stats.items():
        assert torch.equal(torch.as_tensor(fused_stats[key]), torch.as_tensor(value)), key
    for name, grad in grads.items():
        assert torch.equal(fused_grads[name], grad), name
    fused_old_logprobs, _ = token_logprobs(*args, **options)
    assert torch.equal(fused_old_logprobs, old_logprobs)


@interpreted
@pytest.mark.parametrize("rows", [1000, 30])  # one chunk; chunks of at most 30 tokens
def test_on_policy_ratios_start_at_1_with_the_switch_and_16_bit_logits(monkeypatch, rows):
    """bf16 logits that 16-bit kept logits round: old log-probs from token_logprobs and the
    loss's log-probs see the same rounding, so every on-policy ratio is exactly 1 (the trainer's
    old log-probs take the loss's logits dtype)."""
    from test_half_logits import _budget_mb

    from luffy_fast.kernels.function import plan

    monkeypatch.setenv(SWITCH, "1")
    batch = random_batch(120, 16, 200, torch.bfloat16, seed=8, zero_adv_fraction=0.25)
    config = LuffyLossConfig.grpo(memory_budget_mb=_budget_mb(rows, batch, 2),
                                  logits_dtype="input")
    tokens = int(batch["loss_mask"].sum())
    assert plan(config, torch.device("cpu"), tokens, 200, 2, 16, 2) == ("kept", min(rows, tokens))
    batch["old_logprobs"], _ = token_logprobs(batch["hidden"], batch["weight"], batch["targets"],
                                              backend="triton", logits_dtype="input")
    _, stats, _ = run_loss(batch, "triton", config)
    assert float(stats["ratio_min"]) == float(stats["ratio_max"]) == 1.0
    # and the rounding is there: fp32 logits give other log-probs
    unrounded, _ = token_logprobs(batch["hidden"], batch["weight"], batch["targets"],
                                  backend="triton")
    assert not torch.equal(unrounded, batch["old_logprobs"])


@interpreted
@pytest.mark.parametrize("splits", [1, 9])  # one split; 9 splits of 3 tiles, 6 of them empty
def test_fused_forward_at_any_split_count_and_across_launches(monkeypatch, splits):
    """The GPU's split counts (wave_splits) are not the interpreter's: the kernel at a forced count,
    empty splits included, matches float64; and inputs longer than a launch takes
    (MAX_LAUNCH_ROWS, made 7 here) go in several launches with the same results, written into
    `out`."""
    import luffy_fast.kernels.forward_fused as forward_fused
    from luffy_fast.kernels.forward import logsumexp_forward

    hidden, weight, rows, targets = _inputs(40, 19, 24, 65, seed=7)
    bias = torch.randn(65, generator=torch.Generator().manual_seed(8))
    # the partials are sized for the most splits any config takes (here 4 more than the launch's,
    # filled with NaN): only the launch's own count may be merged
    monkeypatch.setattr(forward_fused, "_splits",
                        lambda n, v, meta: splits if "HALF_LOGITS" in meta else splits + 4)
    partials = forward_fused.split_partials
    monkeypatch.setattr(forward_fused, "split_partials", lambda *args: tuple(
        None if p is None else p.fill_(float("nan")) for p in partials(*args)))
    logits = torch.full((19, 65), float("nan"))
    got = forward_fused.fused_forward(hidden, weight, bias, rows, targets, 0.9, True, logits)
    product = hidden[rows].double() @ weight.double().T
    torch.testing.assert_close(logits.double(), product, rtol=1e-5, atol=1e-5)
    split = logsumexp_forward(hidden, weight, bias, rows, targets, 0.9, True)
    assert_forward_outputs(got, split, forward_oracle(product, bias, targets, 0.9), 2e-5)
    monkeypatch.setattr(forward_fused, "MAX_LAUNCH_ROWS", 7)
    again = torch.full((19, 65), float("nan"))
    out = tuple(torch.empty(19) for _ in range(4))
    pieces = forward_fused.fused_forward(hidden, weight, bias, rows, targets, 0.9, True, again,
                                         out=out)
    # (the same up to the rounding of the interpreter's products, whose order follows the tiles)
    torch.testing.assert_close(again, logits, rtol=1e-6, atol=1e-6)
    for name, value, piece, into in zip(FORWARD_OUTPUTS, got, pieces, out):
        assert piece is into, name
        torch.testing.assert_close(piece, value, rtol=1e-5, atol=1e-5, msg=name)
    # the rows in order (rows=None): each launch takes its own slice of them
    in_order = torch.full((19, 65), float("nan"))
    pieces = forward_fused.fused_forward(hidden[rows].contiguous(), weight, bias, None, targets,
                                         0.9, True, in_order)
    torch.testing.assert_close(in_order, logits, rtol=1e-6, atol=1e-6)
    for name, value, piece in zip(FORWARD_OUTPUTS, got, pieces):
        torch.testing.assert_close(piece, value, rtol=1e-5, atol=1e-5, msg=name)


@interpreted
def test_token_logprobs_with_the_switch_rounds_only_where_logits_would_be_kept(monkeypatch):
    """With 16-bit kept logits the default token_logprobs rounds the logits only at budgets that
    keep a chunk of them (the tile products at smaller ones do not round); the switch keeps no
    logits at any budget but rounds exactly where the default would."""
    from luffy_fast.kernels.function import logprob_chunk, triton_token_logprobs

    monkeypatch.setenv(SWITCH, "1")
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(40, 16, generator=generator).to(torch.bfloat16)
    weight = torch.randn(120, 16, generator=generator).to(torch.bfloat16)
    targets = torch.randint(0, 120, (40,), generator=generator)

    def logprobs(budget_mb: float, logits_dtype: str) -> torch.Tensor:
        config = LuffyLossConfig(memory_budget_mb=budget_mb, logits_dtype=logits_dtype)
        return triton_token_logprobs(hidden, weight, None, targets, config, False)[0]

    small = 1e-4  # too small to keep a chunk, for either logit size
    assert logprob_chunk(LuffyLossConfig(memory_budget_mb=small), torch.device("cpu"), 40, 120,
                         logit_size=2) == 0
    assert torch.equal(logprobs(small, "input"), logprobs(small, "float32"))
    assert not torch.equal(logprobs(64.0, "input"), logprobs(64.0, "float32"))


@interpreted
def test_the_gradient_filter_with_the_switch(monkeypatch):
    """The gradient filter reads the kept logits the fused forward stored: the same loss, skipped
    fraction and gradients as over cuBLAS's logits (fp32)."""
    batch = peaked_batch(64, 64, 1024, margin=20.0)  # most targets top-1 at p > 0.9
    config = LuffyLossConfig.luffy(max_len=64, grad_filter=1e-4, memory_budget_mb=0.1)
    loss, stats, grads = run_loss(batch, "triton", config)
    assert float(stats["grad_filter_skipped_fraction"]) > 0.1
    monkeypatch.setenv(SWITCH, "1")
    fused_loss, fused_stats, fused_grads = run_loss(batch, "triton", config)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-7)
    assert float(fused_stats["grad_filter_skipped_fraction"]) == float(
        stats["grad_filter_skipped_fraction"])
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_only_chunks_keep_no_logits(monkeypatch, dtype):
    """Zero-advantage tokens get the forward only: with the switch their chunks store no logits.
    Gradient chunks hand the kernel their gathered hidden rows in order (rows=None, as TMA loads
    them; the gradient GEMMs use the same rows); forward-only chunks gather theirs only where
    TMA could load them (16-bit inputs), and otherwise pass their row indices. Keeping no
    logits, the forward-only tokens (77 here, more than a kept chunk's rows) take one launch.
    The op still matches the reference."""
    import luffy_fast.kernels.function as function

    calls, sizes = [], []
    fused = function.fused_forward

    def spy(hidden, weight, bias, rows, targets, temperature, with_entropy, logits=None, *a, **k):
        in_order = rows is None and hidden.shape[0] == targets.shape[0]
        calls.append(("stored" if logits is not None else "forward-only", in_order))
        sizes.append(targets.shape[0])
        return fused(hidden, weight, bias, rows, targets, temperature, with_entropy, logits, *a, **k)

    monkeypatch.setattr(function, "fused_forward", spy)
    monkeypatch.setenv(SWITCH, "1")
    batch = random_batch(150, 16, 90, seed=4, zero_adv_fraction=0.5, num_seqs=6)
    config = LuffyLossConfig.grpo(memory_budget_mb=0.05)
    compare_backends(batch, config, dtype, "triton")
    assert set(calls) == {("stored", True), ("forward-only", dtype == torch.bfloat16)}, calls
    assert calls.count(("forward-only", dtype == torch.bfloat16)) == 1, calls
    loss_tokens = int(batch["loss_mask"].sum())
    kept_chunk = function.plan(config, torch.device("cpu"), loss_tokens, 90, dtype.itemsize, 16)[1]
    assert calls[0][0] == "forward-only" and sizes[0] > kept_chunk >= max(sizes[1:]), sizes


@pytest.mark.parametrize("entropy", [0.0, 0.01])
def test_forward_only_chunks_with_the_switch_hold_the_budget_in_gathered_rows(monkeypatch,
                                                                               entropy):
    """Forward-only rows per chunk: a kept chunk's without the switch; with it all of them where
    the rows go by index (fp32), and where TMA could load them in order (16-bit) as many
    gathered rows as the budget holds beside the launch's split partials: at most
    (budget - 256 bytes a token) / (H x 2 bytes), fewer by the partials."""
    from luffy_fast.kernels import forward_fused, function

    config = LuffyLossConfig.grpo(memory_budget_mb=1, entropy_coef=entropy)  # 1048576 bytes
    bf16, fp32 = (torch.zeros(4, 512, dtype=dtype) for dtype in (torch.bfloat16, torch.float32))
    monkeypatch.setattr(function, "tma_possible", lambda hidden: hidden.element_size() == 2)
    monkeypatch.delenv(SWITCH, raising=False)
    assert function._forward_only_chunk(config, bf16, 3000, 50000, 20) == 20
    monkeypatch.setenv(SWITCH, "1")
    assert function._forward_only_chunk(config, fp32, 3000, 50000, 20) == 3000
    room = 1048576 - 3000 * 256  # 274 gathered rows of 1024 bytes without the partials
    for splits in (1, 8, 40):  # the partials: 12 or 20 bytes a row and split
        monkeypatch.setattr(forward_fused, "_splits", lambda n, v, meta, s=splits: s)
        rows = function._forward_only_chunk(config, bf16, 3000, 50000, 20)
        partials = forward_fused.launch_bytes(bf16, rows, 50000, entropy > 0)
        assert partials == rows * splits * (20 if entropy else 12)
        assert rows * 1024 + partials <= room and rows >= 0.95 * room // (1024 + partials / rows)
    assert function._forward_only_chunk(config, bf16, 5000, 50000, 20) == 20  # no room left
    # nearly equal slices of at most 274 over the 1000 forward-only tokens, 20 over the rest
    parts = list(function._kept_chunks(1100, 100, 20, 274))
    forward = [part.stop - part.start for part, gradient, _ in parts if not gradient]
    assert forward == [250] * 4 and sum(1 for _, gradient, _ in parts if gradient) == 5
    assert [last for _, _, last in parts].count(True) == 1 and parts[-1][2]


@pytest.mark.parametrize("interpreted_run", [True, False])
def test_16_bit_inputs_tune_over_the_128_row_tiles_and_tma_where_allowed(monkeypatch,
                                                                          interpreted_run):
    import triton

    import luffy_fast.kernels.forward_fused as forward_fused
    from luffy_fast.kernels.forward_fused import _configs_for

    monkeypatch.setattr(forward_fused, "INTERPRET", interpreted_run)
    INTERPRET = interpreted_run

    configs = [triton.Config({"BLOCK_T": t, "BLOCK_V": 128, "BLOCK_H": h, "TMA": tma})
               for tma in (0, 1) for t, h in ((128, 64), (64, 32))]
    loads, tma = configs[:2], configs[2:]
    for dtype, kept in ((torch.bfloat16, loads[:1]), (torch.float16, loads[:1]),
                        (torch.float32, loads)):
        assert _configs_for(configs, {"hidden_ptr": torch.empty(1, dtype=dtype)}) == kept
    # no 128-row tile (the interpreter's): every config stays
    assert _configs_for(loads[1:], {"hidden_ptr": torch.empty(1, dtype=torch.bfloat16)}) == \
        loads[1:]
    # the TMA forms where allowed: beside the cp.async ones (one of the two on the interpreter,
    # the TMA one), or alone; never where not allowed, nor as a fallback
    bf16 = {"hidden_ptr": torch.empty(1, dtype=torch.bfloat16)}
    assert _configs_for(configs, bf16, TMA_ALLOWED=2) == tma[:1]
    assert _configs_for(configs, bf16, TMA_ALLOWED=1) == (tma[:1] if INTERPRET else
                                                           [loads[0], tma[0]])
    assert _configs_for(loads, bf16, TMA_ALLOWED=2) == loads[:1]
    assert _configs_for(tma + loads[1:], bf16, TMA_ALLOWED=0) == loads[1:]
    # gathered rows: never TMA, whatever the key says
    assert _configs_for(configs, {**bf16, "rows_ptr": torch.arange(3)}, TMA_ALLOWED=2) == loads[:1]


def test_hopper_tunes_each_tile_by_cp_async_and_tma_and_one_warp_specialized(monkeypatch):
    import triton

    import luffy_fast.kernels.forward_fused as forward_fused
    from benchmarks.pass_sweep import label

    tiles = [triton.Config({"BLOCK_T": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=4),
             triton.Config({"BLOCK_T": 128, "BLOCK_V": 256, "BLOCK_H": 64}, num_warps=8, num_stages=3),
             triton.Config({"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=4, num_stages=3)]
    monkeypatch.setattr(forward_fused, "tile_configs", lambda: tiles)
    monkeypatch.setattr(forward_fused, "hopper", lambda: True)
    monkeypatch.setattr(forward_fused, "_tma_capable", lambda: True)
    loads = ["T128 V128 w8 s4", "T128 V128 w8 s3", "T64 V128 w4 s3"]
    assert [label(c) for c in forward_fused.fused_tile_configs()] == (
        loads + [f"{name} TMA" for name in loads] + ["T128 V128 w4 s3 TMA WS"])
    monkeypatch.setattr(forward_fused, "_tma_capable", lambda: False)  # e.g. an A100
    monkeypatch.setattr(forward_fused, "hopper", lambda: False)
    assert [label(c) for c in forward_fused.fused_tile_configs()] == ["T128 V128 w8 s4",
                                                                      "T64 V128 w4 s3"]
