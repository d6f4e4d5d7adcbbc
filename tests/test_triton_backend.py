"""The `triton` backend against the reference, on the CPU interpreter (TRITON_INTERPRET=1).

The interpreter simulates every tile on the CPU, so shapes stay small; float32 only (it computes
bf16 dots wrongly; bf16 is checked on a GPU by benchmarks/gpu_parity.py).
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import SETTINGS, assert_close, cast_batch, compare_backends, loss_case, random_batch, run_loss
from luffy_fast import LuffyLossConfig, fused_luffy_loss, token_logprobs
from luffy_fast.kernels.function import PER_TOKEN_BYTES
from luffy_fast.ops import default_backend

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")

# MiB: logits kept (one chunk), kept in chunks of ~50 tokens, recomputed in 16-token chunks.
KEEP, KEEP_CHUNKED, RECOMPUTE = 64.0, 0.05, 0.002


def kept_budget_mb(rows: int, V: int, H: int, tokens: int) -> float:
    """A budget (MiB) that keeps fp32 chunks of `rows` rows at vocabulary V and hidden size H, for
    `tokens` loss tokens (kernels/function.py: plan, PER_TOKEN_BYTES)."""
    return (rows * (V * 4 + 2 * H * 4) + tokens * PER_TOKEN_BYTES) / 2**20


def small_case():
    """loss_case with the interpreter in mind: at most ~100 tokens and vocabulary ~130."""
    return loss_case().filter(lambda c: c[0]["hidden"].numel() // c[0]["hidden"].shape[-1] <= 100
                              and c[0]["weight"].shape[0] <= 130)


@settings(max_examples=60, **SETTINGS)
@given(case=small_case(), budget=st.sampled_from([KEEP, KEEP_CHUNKED, RECOMPUTE]))
def test_triton_matches_reference_float32(case, budget):
    batch, config, _ = case
    compare_backends(batch, config.replace(memory_budget_mb=budget), torch.float32, "triton")


@pytest.mark.parametrize("budget", [KEEP, KEEP_CHUNKED, RECOMPUTE])
@pytest.mark.parametrize("config", [
    LuffyLossConfig.luffy(max_len=80),
    LuffyLossConfig.grpo(dual_clip=3.0),
    LuffyLossConfig(shaping=False, clip_off_policy=True, entropy_coef=0.2, temperature=0.6,
                    normalizer="seq_mean_token_mean"),
], ids=["luffy", "grpo_dual_clip", "unshaped_entropy_temperature"])
def test_triton_option_combinations(config, budget):
    # T, V, H deliberately not multiples of any tile size; ignore_index and a bias present.
    batch = random_batch(67, 21, 77, seed=5, with_bias=True, ignore_some=True, zero_adv_fraction=0.4)
    compare_backends(batch, config.replace(memory_budget_mb=budget), torch.float32, "triton")


@pytest.mark.parametrize("scenario", ["all_masked", "zero_advantage"])
def test_triton_empty_work(scenario):
    batch = random_batch(40, 9, 50, mask_fraction=0.0 if scenario == "all_masked" else 1.0,
                         zero_adv_fraction=1.0)
    loss, _, grads = run_loss(batch, "triton", LuffyLossConfig())
    assert float(loss) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_budget_selects_the_strategy():
    from luffy_fast.kernels.function import plan

    config = LuffyLossConfig
    cpu = torch.device("cpu")
    assert plan(config(memory_budget_mb=KEEP), cpu, 100, 130, 4) == ("kept", 100)
    strategy, rows = plan(config(memory_budget_mb=KEEP_CHUNKED), cpu, 100, 130, 4)
    assert strategy == "kept" and 16 <= rows < 100
    assert plan(config(memory_budget_mb=RECOMPUTE), cpu, 100, 130, 4) == ("recompute", 16)
    # An H100-sized problem under the default budget keeps ~1720-token chunks of logits.
    strategy, rows = plan(config(), torch.device("cuda"), 8192, 151936, 2, 4096)
    assert strategy == "kept" and 1700 < rows < 1800  # 1 GiB of fp32 logits


@pytest.mark.parametrize("with_entropy", [False, True])
def test_triton_token_logprobs(with_entropy):
    batch = random_batch(33, 12, 45, with_bias=True)
    expected = token_logprobs(batch["hidden"], batch["weight"], batch["targets"], temperature=1.3,
                              bias=batch["bias"], with_entropy=with_entropy, backend="reference")
    actual = token_logprobs(batch["hidden"], batch["weight"], batch["targets"], temperature=1.3,
                            bias=batch["bias"], with_entropy=with_entropy, backend="triton")
    assert_close(actual[0], expected[0], 1e-5, "logprobs")
    if with_entropy:
        assert_close(actual[1], expected[1], 1e-5, "entropy")


# MiB: all 40 tokens' logits kept (one GEMM), ~20-token chunks of them, or tile products.
@pytest.mark.parametrize("budget", [KEEP, 0.003, RECOMPUTE])
def test_triton_token_logprobs_strategies(budget):
    from luffy_fast.kernels.function import logprob_chunk, triton_token_logprobs

    batch = random_batch(40, 12, 37, with_bias=True)
    hidden, weight, bias, targets = batch["hidden"], batch["weight"], batch["bias"], batch["targets"]
    config = LuffyLossConfig(temperature=0.8, memory_budget_mb=budget)
    chunk = logprob_chunk(config, hidden.device, 40, 37)
    assert chunk == {KEEP: 40, 0.003: 21, RECOMPUTE: 0}[budget]
    expected = token_logprobs(hidden.double(), weight.double(), targets, temperature=0.8,
                              bias=bias.double(), with_entropy=True, backend="reference")
    actual = triton_token_logprobs(hidden, weight, bias, targets, config, with_entropy=True)
    assert_close(actual[0], expected[0].float(), 1e-5, "logprobs")
    assert_close(actual[1], expected[1].float(), 1e-5, "entropy")


def test_default_backend_by_device():
    assert default_backend(torch.device("cpu")) == "torch"
    assert default_backend(torch.device("cuda", 0)) == "triton"


def _scaled_gradients(batch: dict, backend: str, config) -> list:
    """Gradients left in .grad by three losses backpropagated with upstream gradients 0, -2.5, 0.5."""
    leaves = [batch[name].detach().clone().requires_grad_(True) for name in ("hidden", "weight", "bias")]
    for scale in (0.0, -2.5, 0.5):
        loss, _ = fused_luffy_loss(leaves[0], leaves[1], batch["targets"], batch["advantages"],
                                   batch["loss_mask"], batch["off_policy_mask"],
                                   old_logprobs=batch["old_logprobs"], config=config,
                                   seq_ids=batch["seq_ids"], bias=leaves[2], backend=backend)
        (loss * scale).backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("budget", [KEEP, kept_budget_mb(16, 77, 21, 67), RECOMPUTE])
def test_upstream_gradient_scales_the_stored_gradients(backend, budget):
    """The kept strategy applies the upstream gradient inside its last d(weight) GEMM (beta =
    alpha = g), the others scale in place: either way .grad after two scaled backward passes
    matches the float64 reference, for each of d(hidden), d(weight) and d(bias)."""
    batch = random_batch(67, 21, 77, seed=7, with_bias=True, zero_adv_fraction=0.4, num_seqs=6)
    config = LuffyLossConfig.luffy(max_len=80).replace(memory_budget_mb=budget)
    expected = _scaled_gradients(cast_batch(batch, torch.float64), "reference", config)
    got = _scaled_gradients(batch, backend, config)
    for name, actual, oracle in zip(("hidden", "weight", "bias"), got, expected):
        assert_close(actual, oracle.float(), 1e-5, f"d({name})", atol=1e-8)


def _bias_view(layout: str, values: torch.Tensor, dtype: torch.dtype):
    """A leaf to take the gradient and the bias [V] seen through a view of it: every other entry
    of a [2V] buffer (stride 2), or one value expanded (stride 0)."""
    if layout == "strided":
        leaf = torch.zeros(2 * values.numel(), dtype=dtype)
        leaf[::2] = values
        leaf.requires_grad_(True)
        return leaf, leaf[::2]
    leaf = torch.full((1,), 0.3, dtype=dtype, requires_grad=True)
    return leaf, leaf.expand(values.numel())


@pytest.mark.parametrize("budget", [KEEP, RECOMPUTE])
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_a_bias_view_is_read_as_the_values_it_shows(layout, budget):
    """The kernels read the bias with stride 1: the recompute strategy's backward and
    token_logprobs passed a strided bias on as it was (d(hidden) off by 0.67 relative, log-probs
    by 2.8; an expanded one read past its storage)."""
    batch = random_batch(40, 12, 37, seed=3, with_bias=True)
    config = LuffyLossConfig.luffy(max_len=60).replace(memory_budget_mb=budget)

    def gradients(backend: str, dtype: torch.dtype) -> list:
        hidden, weight = (batch[name].to(dtype).requires_grad_(True) for name in ("hidden", "weight"))
        leaf, bias = _bias_view(layout, batch["bias"].to(dtype), dtype)
        loss, _ = fused_luffy_loss(hidden, weight, batch["targets"], batch["advantages"],
                                   batch["loss_mask"], batch["off_policy_mask"], config=config,
                                   bias=bias, backend=backend)
        loss.backward()
        logprobs, _ = token_logprobs(hidden.detach(), weight.detach(), batch["targets"],
                                     bias=bias.detach(), backend=backend)
        return [loss.detach(), logprobs, hidden.grad, weight.grad, leaf.grad]

    expected = gradients("reference", torch.float64)
    for name, actual, oracle in zip(("loss", "logprobs", "d(hidden)", "d(weight)", "d(bias)"),
                                    gradients("triton", torch.float32), expected):
        # atol: an expanded bias's gradient is a sum of dL/dz rows, each summing to ~0
        assert_close(actual, oracle.float(), 1e-5, name, atol=1e-6)


def test_triton_token_logprobs_names_a_weight_of_another_dtype():
    """Mixed dtypes reached a GEMM that failed without naming an input (review)."""
    batch = random_batch(5, 4, 6)
    with pytest.raises(ValueError, match="^token_logprobs: `weight`.*bfloat16"):
        token_logprobs(batch["hidden"], batch["weight"].bfloat16(), batch["targets"], backend="triton")


def test_triton_rejects_float64_with_a_clear_error():
    batch = random_batch(5, 4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="^fused_luffy_loss: `hidden` is float64"):
        run_loss(batch, "triton", LuffyLossConfig())
    with pytest.raises(ValueError, match="^token_logprobs: `hidden` is float64"):
        token_logprobs(batch["hidden"], batch["weight"], batch["targets"], backend="triton")
    with pytest.raises(ValueError, match="^token_logprobs: `backend` must be"):
        token_logprobs(batch["hidden"], batch["weight"], batch["targets"], backend="cuda")
    with pytest.raises(ValueError, match="^token_logprobs: `hidden` must be a torch.Tensor"):
        token_logprobs(batch["hidden"].tolist(), batch["weight"], batch["targets"])


def test_kept_chunks_put_zero_advantage_groups_first(monkeypatch):
    """Kept logits in 16-token chunks where every other 8-token sequence has zero advantage (no
    entropy term): the two chunks of those come first and get the forward only; the 32 tokens that
    carry a gradient fill the last two chunks, the only ones with gradient GEMMs, the very last held
    for the backward. The gradients still match the float64 reference."""
    import luffy_fast.kernels.function as function
    from luffy_fast.kernels.gradients import KeptGradients

    batch = random_batch(64, 12, 50, seed=3, mask_fraction=1.0, num_seqs=8)
    batch["seq_ids"] = torch.arange(64) // 8
    seq_adv = torch.tensor([0.7, 0.0, -0.4, 0.0, 1.1, 0.0, -0.9, 0.0])
    batch["advantages"] = seq_adv[batch["seq_ids"]]
    # 16 rows of fp32 logits at V = 50 (dL/dz is written over them) and two hidden rows (H = 12),
    # beside the per-token state of the 64 tokens
    config = LuffyLossConfig.luffy(max_len=8).replace(entropy_coef=0.0,
                                                       memory_budget_mb=kept_budget_mb(16, 50, 12, 64))
    assert function.plan(config, torch.device("cpu"), 64, 50, 4, 12) == ("kept", 16)
    calls = []
    original = KeptGradients.add_chunk

    def counted(self, grad, hidden_rows, rows, last):
        calls.append((sorted(set((rows // 8 % 2).tolist())), last))  # sequence parity of the rows
        return original(self, grad, hidden_rows, rows, last)

    monkeypatch.setattr(KeptGradients, "add_chunk", counted)
    compare_backends(batch, config, torch.float32, "triton")
    assert calls == [([0], False), ([0], True)]  # rows of the advantaged (even) sequences only


@pytest.mark.parametrize("off_policy", [True, False])
@pytest.mark.parametrize("backend, budget", [("triton", "kept"), ("triton", RECOMPUTE),
                                             ("torch", None)])
def test_a_forward_only_token_with_a_nan_logprob_carries_it_as_the_reference_does(backend, budget,
                                                                                 off_policy):
    """With check_finite off, a token of a zero-advantage sequence whose logits overflow has a NaN
    log-prob: the reference's loss and d(weight) are NaN, and so is that token's d(hidden) row
    (autograd's 0 x NaN). The kept pass and the torch backend, which give such tokens the forward
    only, find it and compute its gradient anyway (kernels/function.py: _stray_gradients); every
    other d(hidden) row matches, whether the token is off-policy or on-policy (whose closed-form
    coefficient dropped the NaN of its log-ratio before: loss_math._policy). (The torch backend's
    loss was finite here before.)"""
    batch = random_batch(64, 12, 50, seed=3, mask_fraction=1.0, num_seqs=8)
    batch["seq_ids"] = torch.arange(64) // 8
    batch["advantages"] = torch.tensor([0.7, 0.0, -0.4, 0.0, 1.1, 0.0, -0.9, 0.0])[batch["seq_ids"]]
    batch["hidden"][9] = 3e38  # finite, in sequence 1 (zero advantage); its logits overflow
    batch["off_policy_mask"][9] = off_policy
    budget = kept_budget_mb(16, 50, 12, 64) if budget == "kept" else budget
    config = LuffyLossConfig.luffy(max_len=8).replace(entropy_coef=0.0, check_finite=False,
                                                       memory_budget_mb=budget)
    expected_loss, _, expected = run_loss(batch, "reference", config)
    loss, _, got = run_loss(batch, backend, config)
    assert math.isnan(float(expected_loss)) and math.isnan(float(loss))
    assert bool(torch.isnan(expected["weight"]).all()) and bool(torch.isnan(got["weight"]).all())
    nan_rows = torch.isnan(got["hidden"]).any(dim=1)
    assert torch.equal(nan_rows, torch.isnan(expected["hidden"]).any(dim=1))
    assert nan_rows.nonzero().flatten().tolist() == [9]
    assert_close(got["hidden"][~nan_rows], expected["hidden"][~nan_rows].float(), 1e-5, "d(hidden)")


@pytest.mark.parametrize("logits_dtype, dtype", [(torch.float32, torch.float32),
                                                  (torch.float32, torch.bfloat16),
                                                  (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_grad_logits_in_place_matches_the_separate_buffer_kernel(logits_dtype, dtype, with_entropy):
    """dL/dz written over the logits (bf16 into the first half of each fp32 row; element for
    element when both are bf16: LuffyLossConfig.logits_dtype = "input") equals the kernel that
    writes a separate buffer, entry for entry, in the logits' own memory; tokens with no weight
    get zero rows even when their logits are not finite."""
    from luffy_fast.kernels.backward import grad_logits, grad_logits_in_place

    C, V, H = 19, 77, 8
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(C, V, generator=generator) * 3).to(logits_dtype).float()
    bias = torch.randn(V, generator=generator)
    z = (logits + bias) / 0.7
    lse = torch.logsumexp(z, dim=1)
    targets = torch.randint(0, V, (C,), generator=generator)
    logprobs = z.gather(1, targets[:, None]).squeeze(1) - lse
    coef = torch.randn(C, generator=generator)
    coef[[2, 11]] = 0.0
    entropy_weight = row_max = expected_shift = None
    if with_entropy:
        entropy_weight = torch.rand(C, generator=generator)
        entropy_weight[[2, 11]] = 0.0
        row_max = z.max(dim=1).values
        expected_shift = (z.softmax(dim=1) * (z - row_max[:, None])).sum(dim=1)
    logits[11, 5] = float("nan")  # an inactive token's row
    args = (targets, lse, logprobs, coef, entropy_weight, row_max, expected_shift)
    expected = torch.empty(C, V, dtype=dtype)
    grad_logits(torch.zeros(1, H, dtype=dtype), torch.zeros(V, H, dtype=dtype), bias,
                torch.arange(C), *args, 0.7, expected, logits=logits, logit_rows=torch.arange(C))
    expected[[2, 11]] = 0
    kept = logits.to(logits_dtype)  # exact: the values are logits_dtype numbers
    got = grad_logits_in_place(kept, bias, *args, 0.7, dtype)
    assert got.dtype == dtype and got.shape == (C, V)
    assert got.data_ptr() == kept.data_ptr()  # in place
    assert got.stride(0) == (V if logits_dtype == dtype else 2 * V)
    assert torch.equal(got, expected)
    assert float(expected.float().abs().sum()) > 0


def test_grad_logits_in_place_refuses_dz_wider_than_the_logits():
    from luffy_fast.kernels.backward import grad_logits_in_place

    logits = torch.zeros(3, 10, dtype=torch.bfloat16)
    ones = torch.ones(3)
    with pytest.raises(ValueError, match="cannot be written over"):
        grad_logits_in_place(logits, None, torch.zeros(3, dtype=torch.long), ones, -ones, ones,
                             None, None, None, 1.0, torch.float32)


def test_kept_pass_holds_one_chunk_of_logits_at_a_time(monkeypatch):
    """The budget is one chunk of fp32 logits: when a chunk's GEMM allocates its logits, no earlier
    chunk's may still be alive (dL/dz views of them included), so memory stays within it."""
    import weakref

    import luffy_fast.kernels.function as function

    batch = random_batch(64, 12, 50, seed=4, mask_fraction=1.0, num_seqs=8, zero_adv_fraction=0.4)
    config = LuffyLossConfig.luffy(max_len=16).replace(memory_budget_mb=kept_budget_mb(16, 50, 12, 64))
    alive_at_allocation, earlier = [], []
    original = function.kept_logits

    def tracked(hidden_rows, weight, half):
        alive_at_allocation.append(sum(ref() is not None for ref in earlier))
        logits = original(hidden_rows, weight, half)
        earlier.append(weakref.ref(logits))
        return logits

    monkeypatch.setattr(function, "kept_logits", tracked)
    run_loss(batch, "triton", config)
    assert len(alive_at_allocation) == 4 and alive_at_allocation == [0, 0, 0, 0]


def test_logprobs_keep_relative_precision_from_certain_to_unlikely_targets():
    """Per-token log pi from the split merge against float64, across targets from near-certain
    (log pi ~ -1e-7, where z_y - logsumexp would cancel in fp32) to very unlikely (log pi < -20):
    relative error within 1e-5 everywhere. Vocabulary splits: 3 under the interpreter."""
    generator = torch.Generator().manual_seed(11)
    V, H = 97, 16
    weight = torch.randn(V, H, generator=generator, dtype=torch.float64)
    weight /= weight.norm(dim=1, keepdim=True)
    targets = torch.randint(0, V, (40,), generator=generator)
    scale = torch.linspace(-12.0, 48.0, 40, dtype=torch.float64)  # margin of the target's logit
    hidden = scale[:, None] * weight[targets] + 0.3 * torch.randn(40, H, generator=generator,
                                                                   dtype=torch.float64)
    hidden, weight = hidden.float(), weight.float()  # the oracle sees the same fp32 inputs
    expected, _ = token_logprobs(hidden.double(), weight.double(), targets, backend="reference")
    got, _ = token_logprobs(hidden, weight, targets, backend="triton")
    assert float(expected.max()) > -1e-6 and float(expected.min()) < -20  # both regimes present
    error = ((got.double() - expected).abs() / expected.abs()).max()
    assert float(error) <= 1e-5, float(error)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="watches the kernel launches on the interpreter")
@pytest.mark.parametrize("budget", [KEEP, RECOMPUTE])
def test_every_kernel_launch_runs_with_the_inputs_device_current(monkeypatch, budget):
    """Triton launches a kernel on the current CUDA device, so an LM head on another GPU (a model
    split with device_map="auto") needs its device made current around each launch: the
    op's context (luffy_fast.autograd.op_context) must hold every launch, the recompute
    strategy's backward included, and be entered with the inputs' device."""
    import triton.runtime.interpreter as interpreter

    import luffy_fast.kernels.function as function
    import luffy_fast.ops as ops
    from luffy_fast.autograd import op_context

    entered, launches, depth = [], {"forward": [], "backward": []}, [0]
    phase = ["forward"]

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        depth[0] += 1
        try:
            with op_context(device):
                yield
        finally:
            depth[0] -= 1

    original = interpreter.GridExecutor.__call__

    def launch(executor, *args, **kwargs):
        launches[phase[0]].append(depth[0])
        return original(executor, *args, **kwargs)

    monkeypatch.setattr(ops, "op_context", recording)
    monkeypatch.setattr(function, "op_context", recording)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch)
    batch = random_batch(24, 12, 37, with_bias=True)
    hidden = batch["hidden"].clone().requires_grad_(True)
    loss, _ = fused_luffy_loss(hidden, batch["weight"], batch["targets"], batch["advantages"],
                               batch["loss_mask"], batch["off_policy_mask"], batch["old_logprobs"],
                               LuffyLossConfig(memory_budget_mb=budget), seq_ids=batch["seq_ids"],
                               bias=batch["bias"], backend="triton")
    phase[0] = "backward"
    loss.backward()
    phase[0] = "forward"
    token_logprobs(hidden.detach(), batch["weight"], batch["targets"], backend="triton",
                   memory_budget_mb=budget)
    assert len(launches["forward"]) >= 2
    assert (len(launches["backward"]) > 0) == (budget == RECOMPUTE)  # kept: gradients formed ahead
    assert all(d == 1 for d in launches["forward"] + launches["backward"]), launches
    assert entered and all(device == hidden.device for device in entered)


def test_the_op_context_makes_a_cuda_device_current_and_turns_autocast_off(monkeypatch):
    """Without a GPU: torch.cuda.device is entered with the inputs' device (and left), and
    autocast is off inside whatever the device."""
    from luffy_fast.autograd import op_context

    events = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc):
            events.append(("exit", self.device))

    monkeypatch.setattr(torch.cuda, "device", Device)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with op_context(torch.device("cuda", 1)):
            assert events == [("enter", torch.device("cuda", 1))]
        with op_context(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    assert events == [("enter", torch.device("cuda", 1)), ("exit", torch.device("cuda", 1))]
