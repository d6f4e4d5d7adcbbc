"""16-bit kept logits in the triton backend (LuffyLossConfig.logits_dtype = "input"): the
budget's chunks hold twice the tokens, and the kernels read 16-bit logits and write dL/dz over
them in place.

bf16 inputs on the interpreter: the kept strategy multiplies no tiles in Triton (the GEMMs are
torch's), so the interpreter's bf16 tl.dot is never used. Where the inputs make every logit a
bf16 number, 16-bit logits lose nothing, and the option must not change a single result: any
indexing, stride or in-place ordering slip shows as a difference.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import assert_close, random_batch, run_loss
from luffy_fast import LuffyLossConfig, token_logprobs
from luffy_fast.gemm import half_logits

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the kernels on the interpreter (TRITON_INTERPRET=1)")
HALF = {"logits_dtype": "input"}


def _representable_batch(T: int, H: int, V: int, seed: int, **options) -> dict:
    """random_batch in bf16 with hidden in {-1, -0.5, 0, 0.5, 1} and weight in multiples of 1/16
    below 0.5: every logit is a multiple of 1/32 below 256/32 in size (H <= 16), exact in bf16."""
    assert H <= 16
    batch = random_batch(T, H, V, torch.bfloat16, seed, **options)
    generator = torch.Generator().manual_seed(seed + 1)
    batch["hidden"] = (torch.randint(-2, 3, (T, H), generator=generator) / 2).to(torch.bfloat16)
    batch["weight"] = (torch.randint(-7, 8, (V, H), generator=generator) / 16).to(torch.bfloat16)
    if "bias" in batch:
        batch["bias"] = (torch.randint(-8, 9, (V,), generator=generator) / 32).to(torch.bfloat16)
    exact = batch["hidden"].double() @ batch["weight"].double().T
    assert torch.equal(exact.to(torch.bfloat16).double(), exact)
    return batch


def _budget_mb(rows: int, batch: dict, logit_size: int) -> float:
    """A budget that keeps chunks of `rows` rows with `logit_size`-byte logits (function.plan)."""
    from luffy_fast.kernels.function import PER_TOKEN_BYTES

    V, H = batch["weight"].shape
    per_row = V * logit_size + 2 * H * batch["hidden"].element_size()
    tokens = int(batch["loss_mask"].sum())
    return (rows * per_row + tokens * PER_TOKEN_BYTES + per_row // 2) / 2**20


def _kept_dtypes(monkeypatch) -> list:
    """Records, per kept chunk, the dtype of its logits and whether dL/dz was written over them
    (the same memory), from inside the triton backend."""
    import luffy_fast.kernels.function as function

    seen, logits_of = [], {}
    kept_logits, in_place = function.kept_logits, function.grad_logits_in_place

    def tracked_logits(*args):
        logits = kept_logits(*args)
        logits_of["last"] = logits
        return logits

    def tracked_in_place(logits, *args):
        grad = in_place(logits, *args)
        seen.append((logits.dtype, grad.data_ptr() == logits_of["last"].data_ptr()))
        return grad

    monkeypatch.setattr(function, "kept_logits", tracked_logits)
    monkeypatch.setattr(function, "grad_logits_in_place", tracked_in_place)
    return seen


def _float64(batch: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def test_the_option_halves_the_bytes_per_kept_row():
    from luffy_fast.kernels.function import plan

    config, cuda = LuffyLossConfig(), torch.device("cuda")
    # At the LM-head shape: ~1720 rows of fp32 logits in the default 1 GiB, ~3400 of bf16 ones.
    assert 1700 < plan(config, cuda, 8192, 151936, 2, 4096)[1] < 1800
    assert 3300 < plan(config, cuda, 8192, 151936, 2, 4096, logit_size=2)[1] < 3500
    # 256 MiB: ~430 rows (20 chunks at T = 8192) become ~830 (10 chunks)
    small = config.replace(memory_budget_mb=256)
    assert 400 < plan(small, cuda, 8192, 151936, 2, 4096)[1] < 450
    assert 800 < plan(small, cuda, 8192, 151936, 2, 4096, logit_size=2)[1] < 860
    assert not half_logits(torch.bfloat16, "float32")
    assert half_logits(torch.bfloat16, "input") and half_logits(torch.float16, "input")
    assert not half_logits(torch.float32, "input")  # fp32 inputs keep fp32 logits


def test_a_bad_logits_dtype_is_named():
    with pytest.raises(ValueError, match="logits_dtype"):
        LuffyLossConfig(logits_dtype="bfloat16")


@pytest.mark.parametrize("row_forward", [False, True])
@pytest.mark.parametrize("rows", [1000, 40])  # one chunk; chunks of at most 40 tokens
@pytest.mark.parametrize("config", [
    LuffyLossConfig.luffy(max_len=64),
    LuffyLossConfig.grpo(entropy_coef=0.01, temperature=0.5, dual_clip=3.0),
], ids=["luffy", "grpo_entropy"])
def test_16_bit_logits_change_nothing_when_the_logits_are_bf16_numbers(monkeypatch, config, rows,
                                                                       row_forward):
    """The same chunks of tokens with fp32 and with 16-bit logits (each with the budget that
    gives them), so that even d(weight)'s rounding per chunk is the same."""
    from luffy_fast.kernels.function import plan

    if row_forward:
        monkeypatch.setenv("LUFFY_FAST_ROW_FORWARD", "1")
    batch = _representable_batch(150, 12, 150, seed=3, with_bias=True, zero_adv_fraction=0.3,
                                 num_seqs=6)
    fp32_config = config.replace(memory_budget_mb=_budget_mb(rows, batch, 4))
    half_config = config.replace(memory_budget_mb=_budget_mb(rows, batch, 2), **HALF)
    tokens = int(batch["loss_mask"].sum())
    for budget_config, size in ((fp32_config, 4), (half_config, 2)):
        assert plan(budget_config, torch.device("cpu"), tokens, 150, 2, 12,
                    logit_size=size) == ("kept", min(rows, tokens))
    kept = _kept_dtypes(monkeypatch)
    loss, stats, grads = run_loss(batch, "triton", fp32_config)
    fp32_chunks, kept[:] = list(kept), []
    half_loss, half_stats, half_grads = run_loss(batch, "triton", half_config)
    # the 16-bit path ran: bf16 logits, the same chunks
    assert set(fp32_chunks) == {(torch.float32, True)} and set(kept) == {(torch.bfloat16, True)}
    assert len(kept) == len(fp32_chunks) >= (1 if rows > tokens else 3)
    assert torch.equal(half_loss, loss)
    assert half_stats.keys() == stats.keys()
    for key, value in stats.items():
        assert torch.equal(torch.as_tensor(half_stats[key]), torch.as_tensor(value)), key
    for name, grad in grads.items():
        assert half_grads[name].dtype == torch.bfloat16
        torch.testing.assert_close(half_grads[name], grad, rtol=0, atol=0, msg=name)
    # and both are the loss: against the float64 reference on the same (exact) logits
    expected_loss, _, expected = run_loss(_float64(batch), "reference", fp32_config)
    assert_close(half_loss, expected_loss, 1e-5, "loss", atol=1e-7)
    for name, grad in half_grads.items():
        assert_close(grad, expected[name], 1e-2, f"d({name})")


def test_16_bit_logits_on_random_inputs_stay_within_bf16_error():
    """Logits that bf16 rounds: the op still matches float64 to bf16's error, as the naive loss on
    a bf16 model's logits does."""
    from luffy_fast.kernels.function import plan

    batch = random_batch(120, 16, 200, torch.bfloat16, seed=8, zero_adv_fraction=0.25)
    config = LuffyLossConfig.luffy(max_len=64, memory_budget_mb=_budget_mb(40, batch, 2), **HALF)
    assert plan(config, torch.device("cpu"), int(batch["loss_mask"].sum()), 200, 2, 16,
                logit_size=2) == ("kept", 40)
    loss, _, grads = run_loss(batch, "triton", config)
    expected_loss, _, expected = run_loss(_float64(batch), "reference", config)
    assert_close(loss, expected_loss, 1e-2, "loss", atol=1e-4)
    for name, grad in grads.items():
        assert_close(grad, expected[name], 2e-2, f"d({name})")


def test_the_torch_backend_keeps_fp32_logits():
    batch = random_batch(60, 8, 50, torch.bfloat16, seed=2)
    config = LuffyLossConfig.luffy(max_len=32)
    loss, _, grads = run_loss(batch, "torch", config)
    half_loss, _, half_grads = run_loss(batch, "torch", config.replace(**HALF))
    assert torch.equal(half_loss, loss)
    for name, grad in grads.items():
        assert torch.equal(half_grads[name], grad), name


@pytest.mark.parametrize("row_forward", [False, True])
def test_token_logprobs_with_16_bit_logits(monkeypatch, row_forward):
    from luffy_fast.kernels.function import logprob_chunk, triton_token_logprobs

    if row_forward:
        monkeypatch.setenv("LUFFY_FAST_ROW_FORWARD", "1")
    batch = _representable_batch(45, 10, 70, seed=5)
    config = LuffyLossConfig(memory_budget_mb=0.0054)  # chunks of 20 tokens (fp32), 40 (bf16)
    assert logprob_chunk(config, torch.device("cpu"), 45, 70) == 20
    assert logprob_chunk(config, torch.device("cpu"), 45, 70, logit_size=2) == 40
    args = (batch["hidden"], batch["weight"], None, batch["targets"])
    fp32 = triton_token_logprobs(*args, config, with_entropy=True)
    half = triton_token_logprobs(*args, config.replace(**HALF), with_entropy=True)
    for name, got, expected in zip(("logprobs", "entropy"), half, fp32):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)
    # the public op takes the option too
    public = token_logprobs(batch["hidden"], batch["weight"], batch["targets"], with_entropy=True,
                            backend="triton", logits_dtype="input")
    torch.testing.assert_close(public[0], fp32[0], rtol=0, atol=0)


def test_the_loss_head_computes_old_logprobs_with_the_loss_logits_dtype(monkeypatch):
    """The trainer's old log-probs (FusedLossHead, logprobs_only) use the loss's logits dtype, so
    that on-policy ratios start at 1 up to the same rounding."""
    import luffy_fast.policy as policy

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return torch.zeros(1), None

    monkeypatch.setattr(policy, "token_logprobs", spy)
    head = policy.FusedLossHead(torch.nn.Linear(4, 9, bias=False),
                                LuffyLossConfig(logits_dtype="input"), backend="triton")

    class Micro:
        targets = torch.zeros(3, dtype=torch.long)

    head(torch.zeros(3, 4), Micro(), logprobs_only=True)
    assert seen["logits_dtype"] == "input"


@pytest.mark.parametrize("threshold", [0.0, 1e-3, 0.05])
def test_the_gradient_filter_over_16_bit_logits(monkeypatch, threshold):
    """The filter reads the kept logits as well (logit_tile casts them to fp32): with bf16 numbers
    for logits, 16-bit logits change neither its gradients nor what it skips."""
    import luffy_fast.kernels.function as function

    dtypes, kept_logits = [], function.kept_logits
    monkeypatch.setattr(function, "kept_logits",
                        lambda *args: dtypes.append(kept_logits(*args).dtype) or kept_logits(*args))
    batch = _representable_batch(120, 12, 150, seed=6, zero_adv_fraction=0.25)
    config = LuffyLossConfig.luffy(max_len=64, grad_filter=threshold)
    fp32 = config.replace(memory_budget_mb=_budget_mb(40, batch, 4))
    half = config.replace(memory_budget_mb=_budget_mb(40, batch, 2), **HALF)
    loss, stats, grads = run_loss(batch, "triton", fp32)
    fp32_dtypes, dtypes[:] = list(dtypes), []
    half_loss, half_stats, half_grads = run_loss(batch, "triton", half)
    assert set(fp32_dtypes) == {torch.float32} and set(dtypes) == {torch.bfloat16}
    assert len(dtypes) == len(fp32_dtypes) >= 3
    assert torch.equal(half_loss, loss)
    assert float(half_stats["grad_filter_skipped_fraction"]) == float(
        stats["grad_filter_skipped_fraction"])
    for name, grad in grads.items():
        torch.testing.assert_close(half_grads[name], grad, rtol=0, atol=0, msg=name)


def test_fp16_inputs_keep_fp16_logits(monkeypatch):
    batch = _representable_batch(80, 12, 150, seed=7)
    batch = {k: v.half() if v.dtype == torch.bfloat16 else v for k, v in batch.items()}
    config = LuffyLossConfig.luffy(max_len=64, memory_budget_mb=_budget_mb(1000, batch, 2), **HALF)
    kept = _kept_dtypes(monkeypatch)
    loss, _, grads = run_loss(batch, "triton", config)
    assert set(kept) == {(torch.float16, True)}
    expected_loss, _, expected = run_loss(_float64(batch), "reference", config)
    assert_close(loss, expected_loss, 1e-5, "loss", atol=1e-7)
    for name, grad in grads.items():
        assert grad.dtype == torch.float16
        assert_close(grad, expected[name], 2e-3, f"d({name})")
