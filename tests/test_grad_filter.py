"""The opt-in gradient filter (LuffyLossConfig.grad_filter) of the triton backend, on the CPU
interpreter in float32: exact with a zero threshold, within 1e-3 of the float64 gradient on peaked
(trained-LM-like) logits while skipping blocks of dL/dz, and its stats entry."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import TOLERANCE, assert_close, peaked_batch, random_batch, rel_err, run_loss
from luffy_fast import LuffyLossConfig, fused_luffy_loss, token_logprobs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")

# MiB: logits kept in one chunk, or recomputed in the backward (kernels/function.py: plan).
KEEP, RECOMPUTE = 64.0, 0.002
SKIP_KEY = "grad_filter_skipped_fraction"


def as_float64(batch: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("budget", [KEEP, RECOMPUTE])
@pytest.mark.parametrize("config", [
    LuffyLossConfig.luffy(max_len=80),
    LuffyLossConfig(shaping=False, clip_off_policy=True, entropy_coef=0.2, temperature=0.6,
                    normalizer="seq_mean_token_mean"),
    LuffyLossConfig(),  # on-policy clipping, no entropy: clipped tokens carry no gradient
], ids=["luffy", "unshaped_entropy_temperature", "clipped"])
def test_zero_threshold_is_exact(config, budget):
    # The filtered kernels (block map, sparse GEMMs) with nothing skipped: the float64 gradient.
    # With clipping, a kept chunk's active tokens are not all its rows, so their dL/dz rows over
    # the logits are not 0, 1, 2, ...
    batch = random_batch(67, 21, 77, seed=5, with_bias=True, ignore_some=True, zero_adv_fraction=0.4)
    config = config.replace(memory_budget_mb=budget)
    _, _, expected = run_loss(as_float64(batch), "reference", config)
    loss, stats, grads = run_loss(batch, "triton", config.replace(grad_filter=0.0))
    for name, value in expected.items():
        assert_close(grads[name], value.float(), TOLERANCE[torch.float32], f"d({name})", atol=1e-8)
    assert float(stats[SKIP_KEY]) == 0.0


# Measured here: 11 % of the blocks skipped at 1e-5 (error 2.6e-5), 27 % at 1e-4 (2.7e-4), with
# either strategy.
@pytest.mark.parametrize(("budget", "threshold", "min_skipped"),
                         [(KEEP, 1e-4, 0.2), (RECOMPUTE, 1e-5, 0.05)])
def test_peaked_logits_skip_blocks_within_1e_3(budget, threshold, min_skipped):
    # 64 tokens x 1024 vocabulary entries: 4 x 32 blocks of 16 x 32 under the interpreter.
    batch = peaked_batch(64, 64, 1024, margin=20.0)
    logprobs, _ = token_logprobs(batch["hidden"].double(), batch["weight"].double(),
                                 batch["targets"], backend="reference")
    assert float((logprobs.exp() > 0.9).float().mean()) > 0.7  # most targets are top-1, p > 0.9
    config = LuffyLossConfig.luffy(max_len=64, memory_budget_mb=budget)
    _, _, expected = run_loss(as_float64(batch), "reference", config)
    _, stats, grads = run_loss(batch, "triton", config.replace(grad_filter=threshold))
    errors = {name: rel_err(grads[name], value) for name, value in expected.items()}
    assert max(errors.values()) <= 1e-3, errors
    assert float(stats[SKIP_KEY]) >= min_skipped, float(stats[SKIP_KEY])


def test_skipped_share_of_d_hidden_follows_the_mean_weight_row():
    # A row m added to every weight row shifts each token's logits by h . m: same softmax, same
    # exact d(hidden) (rows of dL/dz sum to zero). Dropping the skipped blocks alone would move
    # d(hidden) by m x (the skipped entries' sum); the filter gives that mass to the mean weight
    # row, so the error stays that of the plain weight.
    batch = peaked_batch(32, 64, 384, margin=20.0, seed=3)
    config = LuffyLossConfig.luffy(max_len=32, memory_budget_mb=KEEP)
    errors = []
    for shift in (0.0, 3.0):
        shifted = dict(batch, weight=batch["weight"] + shift * batch["weight"][0] / batch["weight"][0].norm())
        _, _, expected = run_loss(as_float64(shifted), "reference", config)
        _, stats, grads = run_loss(shifted, "triton", config.replace(grad_filter=1e-4))
        assert float(stats[SKIP_KEY]) > 0.02
        errors.append(rel_err(grads["hidden"], expected["hidden"]))
    assert errors[1] <= 1.5 * errors[0] + 1e-6, errors


@pytest.mark.parametrize("wanted", [("hidden", "bias"), ("weight",)])
def test_zero_threshold_with_some_gradients_wanted(wanted):
    # A frozen LM head with a trained bias, or frozen hidden states: the kernels' optional outputs.
    batch = random_batch(40, 12, 70, seed=2, with_bias=True)
    config = LuffyLossConfig(entropy_coef=0.1)
    results = []
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        tensors = {name: batch[name].to(dtype).requires_grad_(name in wanted)
                   for name in ("hidden", "weight", "bias")}
        loss, _ = fused_luffy_loss(
            tensors["hidden"], tensors["weight"], batch["targets"], batch["advantages"],
            batch["loss_mask"], batch["off_policy_mask"], old_logprobs=batch["old_logprobs"],
            config=config if backend == "reference" else config.replace(grad_filter=0.0),
            seq_ids=batch["seq_ids"], bias=tensors["bias"], backend=backend)
        loss.backward()
        results.append(tensors)
    expected, actual = results
    for name in ("hidden", "weight", "bias"):
        if name in wanted:
            assert_close(actual[name].grad, expected[name].grad.float(), 1e-5, f"d({name})", atol=1e-8)
        else:
            assert actual[name].grad is None


def test_filter_off_reports_nothing_and_skips_nothing():
    batch = peaked_batch(32, 16, 256, margin=20.0)
    config = LuffyLossConfig.luffy(max_len=32)
    _, stats, grads = run_loss(batch, "triton", config)
    assert SKIP_KEY not in stats
    _, _, expected = run_loss(as_float64(batch), "reference", config)
    assert max(rel_err(grads[name], value) for name, value in expected.items()) <= 1e-5


def test_torch_backend_rejects_the_filter():
    batch = random_batch(8, 4, 10)
    with pytest.raises(ValueError, match="grad_filter"):
        run_loss(batch, "torch", LuffyLossConfig(grad_filter=1e-5))


@pytest.mark.parametrize("bad", [-1e-5, 1.0, float("nan"), "1e-5"])
def test_config_rejects_bad_thresholds(bad):
    with pytest.raises(ValueError, match="grad_filter"):
        LuffyLossConfig(grad_filter=bad)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the interpreter's tiles, on CPU tensors")
@pytest.mark.parametrize("with_hidden", [True, False], ids=["all_gradients", "frozen_hidden"])
def test_sparse_gemms_multiply_exactly_the_kept_blocks(with_hidden):
    # The block-sparse GEMMs alone, against float64 products of dL/dz with its skipped blocks
    # zeroed. The skipped blocks of the buffer hold NaN (the filter writes nothing there), so a
    # program that reads one (a merged d(hidden) program reading the block its other token tile
    # skipped) poisons its output. 87 rows: 6 token tiles of 16, merged 2 by 2 into 3 programs,
    # the last tile ragged; 197 vocabulary entries: 7 tiles of 32; H = 52: 4 output tiles, so the
    # d(hidden) programs' second group of 3 H tiles is partial.
    from luffy_fast.kernels.backward_filtered import GradLogitBlocks, filter_tiles, sparse_gradients

    tiles = filter_tiles(torch.float32)
    block_t, block_v = tiles["logits"]["BLOCK_T"], tiles["logits"]["BLOCK_V"]
    assert tiles["hidden"]["SPAN"] == 2 and tiles["hidden"]["GROUP_H"] == 3
    C, V, H, T = 87, 197, 52, 120
    generator = torch.Generator().manual_seed(11)
    num_t, num_v = -(-C // block_t), -(-V // block_v)
    keep = (torch.rand(num_t, num_v, generator=generator) < 0.4).to(torch.int8)
    keep[2] = 0  # a token tile keeping nothing, merged with tile 3
    keep[4, :] = 0
    keep[4, 3] = 1  # one keeping a single block its partner (tile 5) may not
    if with_hidden:
        keep[1] = 1  # one keeping everything: no skipped mass to give the mean weight row
    else:
        keep[:, 6] = 0  # a vocabulary tile nobody keeps: its d(weight) rows stay as they were
    grad_logits = torch.randn(C, V, generator=generator, dtype=torch.float64)
    kept = keep.repeat_interleave(block_t, 0)[:C].repeat_interleave(block_v, 1)[:, :V].bool()
    hidden = torch.randn(T, H, generator=generator, dtype=torch.float64)
    weight = torch.randn(V, H, generator=generator, dtype=torch.float64)
    rows = torch.randperm(T, generator=generator)[:C]
    weight_mean = weight.mean(dim=0)
    start_weight = torch.randn(V, H, generator=generator, dtype=torch.float64)
    start_bias = torch.randn(V, generator=generator, dtype=torch.float64)

    exact = torch.where(kept, grad_logits, 0.0)
    skipped_mass = torch.where(keep.sum(dim=1).repeat_interleave(block_t)[:C] < num_v,
                               exact.sum(dim=1), 0.0)
    expected_hidden = torch.zeros(T, H, dtype=torch.float64)
    expected_hidden[rows] = exact @ weight - skipped_mass[:, None] * weight_mean[None, :]
    expected_weight = start_weight + exact.T @ hidden[rows]
    expected_bias = start_bias + exact.sum(dim=0)

    grads = (torch.zeros(T, H) if with_hidden else None, start_weight.float(), start_bias.float())
    blocks = GradLogitBlocks.own(torch.where(kept, grad_logits, float("nan")).float())
    sparse_gradients(blocks, keep, hidden.float(), weight.float(), rows, grads, weight_mean.float())
    if with_hidden:
        assert_close(grads[0], expected_hidden.float(), 1e-5, "d(hidden)", atol=1e-5)
    assert_close(grads[1], expected_weight.float(), 1e-5, "d(weight)", atol=1e-5)
    assert_close(grads[2], expected_bias.float(), 1e-5, "d(bias)", atol=1e-5)
    if not with_hidden:
        assert torch.equal(grads[1][6 * block_v:], start_weight[6 * block_v:].float())


def test_16_bit_dz_over_fp32_logits_stays_in_each_tiles_own_bytes():
    # The kept strategy's filter writes bf16 dL/dz over the chunk's fp32 logits, in the first half
    # of each [BLOCK_V] tile's bytes, so that a program writes only over what it read (on a GPU
    # the programs run at once, and this test runs there too at the GPU's tiles). Against the
    # same kernels writing into a buffer of their own: the same block map and gradients bit for
    # bit, each kept block at its place in the logits, and every other byte as it was: the tiles'
    # second halves, the skipped blocks, the rows of inactive tokens. Active tokens at scattered
    # rows of the chunk; three token tiles, the last ragged; V: two whole tiles and a ragged one.
    from luffy_fast.kernels.backward_filtered import filter_tiles, filtered_gradients
    from luffy_fast.kernels.gradients import ActiveTokens

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiles = filter_tiles(torch.bfloat16)["logits"]
    block_t, block_v = tiles["BLOCK_T"], tiles["BLOCK_V"]
    C, H, V = 2 * block_t + 8, 16, 2 * block_v + 22
    R = C + 10
    generator = torch.Generator().manual_seed(4)
    hidden = (torch.randint(-2, 3, (C, H), generator=generator) / 2).to(torch.bfloat16)
    weight = (torch.randint(-7, 8, (V, H), generator=generator) / 16).to(torch.bfloat16)
    logits = torch.randn(R, V, generator=generator)  # flat: only a target's block passes 0.2
    positions = torch.randperm(R, generator=generator)[:C].sort().values
    # each token tile's targets in one vocabulary tile: the others (the ragged one always) skipped
    targets = torch.randint(0, 20, (C,), generator=generator) + block_v * ((torch.arange(C) // block_t) % 2)
    z = logits[positions]
    lse = torch.logsumexp(z, dim=1)
    tokens = ActiveTokens(torch.arange(C), targets, lse, z.gather(1, targets[:, None])[:, 0] - lse,
                          torch.randn(C, generator=generator), None, None, None)
    tokens = ActiveTokens(*(t.to(device) if t is not None else None for t in (
        tokens.rows, tokens.targets, tokens.lse, tokens.logprobs, tokens.coef, None, None, None)))
    hidden, weight, logits, positions = (t.to(device) for t in (hidden, weight, logits, positions))
    weight_mean = weight.float().mean(dim=0)

    def run(out, buffer):
        grads = (torch.zeros(C, H, dtype=torch.bfloat16, device=device),
                 torch.zeros(V, H, dtype=torch.bfloat16, device=device), None)
        keep = filtered_gradients(hidden, weight, None, tokens, 1.0, 0.2, out, grads, logits=buffer,
                                  logit_rows=positions, weight_mean=weight_mean)
        return keep.cpu(), [g.cpu() for g in grads[:2]]

    own = torch.full((C, V), float("nan"), dtype=torch.bfloat16, device=device)
    keep, grads = run(own, logits.clone())
    over = logits.clone()
    keep_over, grads_over = run(None, over)
    assert torch.equal(keep_over, keep) and 0 < int(keep.sum()) < keep.numel()
    for got, expected in zip(grads_over, grads):
        assert torch.equal(got, expected)
    own, over, logits = own.cpu(), over.cpu(), logits.cpu()
    after = over.view(torch.bfloat16)  # [R, 2V]
    written = torch.zeros_like(after, dtype=torch.bool)
    for i, row in enumerate(positions.tolist()):
        for j in range(keep.shape[1]):
            width = min(block_v, V - j * block_v)
            if keep[i // block_t, j]:
                place = slice(2 * block_v * j, 2 * block_v * j + width)
                assert torch.equal(after[row, place], own[i, j * block_v: j * block_v + width])
                written[row, place] = True
    # the bits (half an fp32 number read as bf16 may be a NaN pattern)
    assert torch.equal(over.view(torch.int16)[~written], logits.view(torch.int16)[~written])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the interpreter's tiles, on CPU tensors")
def test_block_map_follows_the_documented_rule():
    # The block map against the rule in LuffyLossConfig's docstring, worked out in float64: a
    # block is kept when one of its entries |dL/dz_v| reaches grad_filter x (|g| + |c|) / tau,
    # with dL/dz = (g (e_y - p) + c p (z - E_p[z])) / tau over the logits z = h W^T / tau.
    # Temperature 0.6, entropy on; 40 tokens (3 token tiles, the last ragged) x 150 entries
    # (5 vocabulary tiles, the last ragged). No block's largest entry lies within 1 % of the
    # threshold, so float32 rounding cannot flip a block.
    from luffy_fast.kernels.backward_filtered import filter_tiles, filtered_gradients
    from luffy_fast.kernels.gradients import ActiveTokens

    tiles = filter_tiles(torch.float32)["logits"]
    block_t, block_v = tiles["BLOCK_T"], tiles["BLOCK_V"]
    C, V, H, tau, threshold = 40, 150, 64, 0.6, 2e-3
    assert -(-C // block_t) == 3 and -(-V // block_v) == 5
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(V, H, generator=generator, dtype=torch.float64) / H**0.5
    # Peaked tokens (h = 12 w_y: z_y ~ 20, the rest ~ N(0, 2.5^2)) with their targets in vocabulary
    # tile 0 (token tile 0) or tiles 2 and 4 (token tile 2); token tile 1 flat (h = w_y / 2).
    tile = torch.arange(C) // block_t
    offset = torch.tensor([0, 0, 2 * block_v])[tile] + block_v * 2 * (torch.arange(C) % 2) * (tile == 2)
    targets = (offset + torch.randint(0, V - 4 * block_v, (C,), generator=generator)).clamp_max(V - 1)
    hidden = torch.tensor([12.0, 0.5, 12.0], dtype=torch.float64)[tile, None] * weight[targets]
    coef = torch.randn(C, generator=generator, dtype=torch.float64)
    entropy_weight = 0.3 * torch.randn(C, generator=generator, dtype=torch.float64)

    z = hidden @ weight.T / tau
    lse = torch.logsumexp(z, dim=1)
    p = (z - lse[:, None]).exp()
    row_max = z.max(dim=1).values
    expected_shift = (p * z).sum(dim=1) - row_max
    one_hot = torch.nn.functional.one_hot(targets, V).double()
    dz = (coef[:, None] * (one_hot - p) + entropy_weight[:, None] * p * (z - (p * z).sum(1, True))) / tau
    ratio = dz.abs() / (threshold * (coef.abs() + entropy_weight.abs())[:, None] / tau)
    padded = torch.nn.functional.pad(ratio, (0, 5 * block_v - V, 0, 3 * block_t - C))
    block_max = padded.reshape(3, block_t, 5, block_v).amax(dim=(1, 3))
    assert float((block_max - 1).abs().min()) > 0.01, block_max
    expected = (block_max >= 1).to(torch.int8)
    assert 0 < int(expected.sum()) < expected.numel()

    f32 = lambda t: t.float().contiguous()  # noqa: E731
    tokens = ActiveTokens(torch.arange(C), targets, f32(lse),
                          f32(z.gather(1, targets[:, None])[:, 0] - lse), f32(coef),
                          f32(entropy_weight), f32(row_max), f32(expected_shift))
    grads = (torch.zeros(C, H), torch.zeros(V, H), None)
    keep = filtered_gradients(f32(hidden), f32(weight), None, tokens, tau, threshold,
                              torch.full((C, V), float("nan")), grads,
                              weight_mean=f32(weight.mean(dim=0)))
    assert torch.equal(keep, expected), (keep, expected)
