"""The chunked `torch` backend against the materialized `reference` oracle, on random inputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings

from helpers import SETTINGS, assert_close, compare_backends, loss_case, random_batch, run_loss
from luffy_fast import LuffyLossConfig, fused_luffy_loss, token_logprobs


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
    # clip decisions on bf16-rounded ratios legitimately differ from float64 ones
    assume(scenario != "all_clipped")
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
    """The token mean with float weights w is sum(w L) / sum(w): each token's L_t is the loss of
    the same batch with the one-hot mask on t alone (denominator 1)."""
    batch = random_batch(20, 4, 9, mask_fraction=1.0)
    weights = torch.rand(20, generator=torch.Generator().manual_seed(3))
    for backend in ("reference", "torch"):
        per_token = torch.stack([run_loss(dict(batch, loss_mask=torch.eye(20)[t]), backend,
                                          LuffyLossConfig())[0] for t in range(20)])
        expected = (weights * per_token).sum() / weights.sum()
        loss, _, _ = run_loss(dict(batch, loss_mask=weights), backend, LuffyLossConfig())
        assert_close(loss, expected, 1e-6, "weighted token mean")
        binary, _, _ = run_loss(dict(batch, loss_mask=torch.ones(20)), backend, LuffyLossConfig())
        assert abs(float(binary - expected)) > 1e-3  # the weights matter in this batch


def test_a_token_whose_entropy_weight_underflows_keeps_its_entropy():
    """loss_mask 1e-45 on one token, token normalizer: its weights underflow to 0, so the torch
    backend gives it a forward-only chunk even with the entropy term on; that chunk still has the
    entropies the statistics need (it had none, and the op failed joining the chunks)."""
    batch = random_batch(64, 12, 50, seed=3, mask_fraction=1.0, num_seqs=8)
    batch["loss_mask"] = torch.ones(64)
    batch["loss_mask"][5] = 1e-45
    config = LuffyLossConfig.luffy(max_len=8).replace(entropy_coef=0.01, normalizer="token")
    compare_backends(batch, config, torch.float32, "torch")


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


def test_the_readmes_op_snippet_runs_as_written():
    """README's fused-op example, run on small inputs: its default backend's loss and gradients
    equal the reference backend's on the same call (float64)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(from luffy_fast import fused_luffy_loss.*?)```", readme,
                        re.S).group(1)
    generator = torch.Generator().manual_seed(0)
    T, H, V = 12, 8, 32
    seq_ids = torch.tensor([0] * 3 + [1] * 4 + [2] * 2 + [3] * 3)
    names = {"rewards": torch.tensor([1.0, 0.0, 1.0, 1.0]), "group_ids": torch.tensor([0, 0, 1, 1]),
             "seq_ids": seq_ids,
             "hidden": torch.randn(T, H, dtype=torch.float64, generator=generator,
                                   requires_grad=True),
             "weight": torch.randn(V, H, dtype=torch.float64, generator=generator,
                                   requires_grad=True),
             "targets": torch.randint(0, V, (T,), generator=generator),
             "loss_mask": torch.ones(T, dtype=torch.bool),
             "off_policy_mask": seq_ids == 3}
    exec(snippet, names)
    assert names["advantages"].tolist()[:4] == [0.5] * 3 + [-0.5]  # the first group's, per token
    from luffy_fast import fused_luffy_loss

    hidden = names["hidden"].detach().requires_grad_()
    weight = names["weight"].detach().requires_grad_()
    expected, _ = fused_luffy_loss(hidden, weight, names["targets"], names["advantages"],
                                   names["loss_mask"], names["off_policy_mask"],
                                   config=names["LuffyLossConfig"].luffy(max_len=8192),
                                   seq_ids=seq_ids, backend="reference")
    expected.backward()
    assert_close(names["loss"].detach(), expected.detach(), 1e-12, "loss")
    assert_close(names["hidden"].grad, hidden.grad, 1e-10, "d hidden")
    assert_close(names["weight"].grad, weight.grad, 1e-10, "d weight")


# The fused backends' autograd contract, beside the reference's (whose graph is autograd's own).
FUSED = [("torch", None), ("triton", 64.0), ("triton", 0.002)]  # triton: kept logits, recompute
FUSED_IDS = ["torch", "triton-kept", "triton-recompute"]


def _loss(batch: dict, backend: str, budget, **data):
    hidden = batch["hidden"].detach().clone().requires_grad_(True)
    weight = batch["weight"].detach().clone().requires_grad_(True)
    inputs = {name: batch[name] for name in ("advantages", "loss_mask", "old_logprobs")} | data
    loss, _ = fused_luffy_loss(hidden, weight, batch["targets"], inputs["advantages"],
                               inputs["loss_mask"], batch["off_policy_mask"],
                               old_logprobs=inputs["old_logprobs"], seq_ids=batch["seq_ids"],
                               config=LuffyLossConfig(entropy_coef=0.05, memory_budget_mb=budget),
                               backend=backend)
    return loss, hidden, weight


@pytest.mark.parametrize("backend,budget", FUSED, ids=FUSED_IDS)
def test_a_second_backward_is_refused_by_name(backend, budget):
    """The fused backends hand out the gradients their forward formed, once: a second backward
    (retain_graph) failed with "'NoneType' object has no attribute 'scaled'"."""
    loss, hidden, _ = _loss(random_batch(12, 6, 37), backend, budget)
    (first,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    with pytest.raises(RuntimeError, match=r"^fused_luffy_loss: a second backward through the "
                                           r"same loss \(retain_graph\) is not supported"):
        loss.backward()
    reference, hidden, _ = _loss(random_batch(12, 6, 37), "reference", None)
    (once,) = torch.autograd.grad(reference, hidden, retain_graph=True)
    reference.backward()  # the reference's graph is autograd's: twice works
    assert_close(hidden.grad, once, 1e-12, "reference, second backward")
    assert_close(first, once.float(), 1e-5, "first backward against the reference")


@pytest.mark.parametrize("backend,budget", FUSED, ids=FUSED_IDS)
def test_gradients_of_the_gradients_are_refused(backend, budget):
    """The fused backends' gradients are formed in the forward: with create_graph they came
    back with no graph, so a gradient penalty built on them silently added nothing."""
    loss, hidden, _ = _loss(random_batch(12, 6, 37), backend, budget)
    with pytest.raises(RuntimeError, match=r"^fused_luffy_loss: create_graph is not supported"):
        torch.autograd.grad(loss, hidden, create_graph=True)
    reference, hidden, _ = _loss(random_batch(12, 6, 37), "reference", None)
    (grad,) = torch.autograd.grad(reference, hidden, create_graph=True)
    assert grad.requires_grad  # the reference's are differentiable


@pytest.mark.parametrize("backend,budget", [("reference", None), *FUSED],
                         ids=["reference", *FUSED_IDS])
def test_no_gradient_flows_into_advantages_old_logprobs_or_the_mask(backend, budget):
    """They are data: the reference sent gradients into them when they required grad (a
    critic's advantages not detached, say), the fused backends did not: now none does, and the
    policy's gradients are those of detached inputs."""
    batch = random_batch(16, 6, 37, mask_fraction=1.0)
    data = {"advantages": batch["advantages"].clone().requires_grad_(True),
            "old_logprobs": batch["old_logprobs"].clone().requires_grad_(True),
            "loss_mask": torch.rand(16, generator=torch.Generator().manual_seed(1)).requires_grad_()}
    loss, hidden, weight = _loss(batch, backend, budget, **data)
    loss.backward()
    assert [data[name].grad for name in data] == [None, None, None]
    plain, plain_hidden, plain_weight = _loss(batch, backend, budget,
                                              loss_mask=data["loss_mask"].detach())
    plain.backward()
    assert_close(hidden.grad, plain_hidden.grad, 1e-12, "d(hidden)")
    assert_close(weight.grad, plain_weight.grad, 1e-12, "d(weight)")


@pytest.mark.parametrize("backend,budget", [("reference", None), *FUSED],
                         ids=["reference", *FUSED_IDS])
def test_autocast_leaves_the_op_in_its_own_precision(backend, budget):
    """Under torch.autocast (bf16 on the CPU) the torch backend failed in a scatter (bf16
    logits), the reference and token_logprobs returned bf16-rounded numbers (0.047 off) and the
    triton backend's d(hidden) was off by 2.6e-3: the op now turns autocast off inside (the
    fused backends' backward too, even when called under autocast) and gives what it gives
    without autocast."""
    batch = random_batch(16, 8, 37)
    loss, hidden, weight = _loss(batch, backend, budget)
    loss.backward()
    logprobs, _ = token_logprobs(batch["hidden"], batch["weight"], batch["targets"],
                                 backend=backend, memory_budget_mb=budget)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_loss, cast_hidden, cast_weight = _loss(batch, backend, budget)
        if backend != "reference":  # autograd's own backward follows autocast: called outside
            cast_loss.backward()
        cast_logprobs, _ = token_logprobs(batch["hidden"], batch["weight"], batch["targets"],
                                          backend=backend, memory_budget_mb=budget)
    if backend == "reference":
        cast_loss.backward()
    assert cast_logprobs.dtype == torch.float32
    for name, got, expected in (("loss", cast_loss, loss), ("logprobs", cast_logprobs, logprobs),
                                ("d(hidden)", cast_hidden.grad, hidden.grad),
                                ("d(weight)", cast_weight.grad, weight.grad)):
        assert_close(got.detach(), expected.detach(), 1e-6, name)


@pytest.mark.parametrize("backend,budget", FUSED[1:], ids=FUSED_IDS[1:])  # torch: traced, fine
def test_the_op_inside_torch_compile_gives_what_it_gives_eagerly(backend, budget):
    """A user's torch.compile'd loss function around the op: dynamo traced into the triton
    backend's kernel launches and failed (on the interpreter, in its pointer arithmetic); the
    triton entry points now run as launched (a graph break). Loss, gradients and log-probs equal
    the eager op's, at two token counts (the second a recompile or a fresh graph)."""
    torch._dynamo.reset()

    def loss_and_logprobs(batch, hidden, weight):
        loss, _ = fused_luffy_loss(hidden * 1.0, weight, batch["targets"], batch["advantages"],
                                   batch["loss_mask"], batch["off_policy_mask"],
                                   old_logprobs=batch["old_logprobs"], seq_ids=batch["seq_ids"],
                                   config=LuffyLossConfig(entropy_coef=0.05,
                                                          memory_budget_mb=budget),
                                   backend=backend)
        logprobs, _ = token_logprobs(hidden.detach(), weight.detach(), batch["targets"],
                                     backend=backend, memory_budget_mb=budget)
        return 2 * loss, logprobs

    compiled = torch.compile(loss_and_logprobs, backend="aot_eager")
    for T in (16, 23):
        batch = random_batch(T, 8, 37, seed=T)
        results = []
        for function in (loss_and_logprobs, compiled):
            hidden = batch["hidden"].clone().requires_grad_(True)
            weight = batch["weight"].clone().requires_grad_(True)
            loss, logprobs = function(batch, hidden, weight)
            loss.backward()
            results.append((loss.detach(), logprobs, hidden.grad, weight.grad))
        names = ("loss", "logprobs", "d(hidden)", "d(weight)")
        for name, got, expected in zip(names, *reversed(results)):
            assert_close(got, expected, 1e-6, f"{name} at T={T}")
    torch._dynamo.reset()


def test_the_heads_logprob_pass_takes_the_loss_configs_memory_budget(monkeypatch):
    """FusedLossHead(logprobs_only) sized its chunks by the device's default budget (1 GiB on
    CUDA), whatever the loss config's memory_budget_mb."""
    import luffy_fast.chunked as chunked
    from luffy_fast.policy import FusedLossHead

    seen = []
    real = chunked.chunked_token_logprobs
    monkeypatch.setattr(chunked, "chunked_token_logprobs",
                        lambda *args: seen.append(args[4].memory_budget_mb) or real(*args))
    batch = random_batch(10, 6, 37)
    head = FusedLossHead(torch.nn.Linear(6, 37, bias=False),
                         LuffyLossConfig(memory_budget_mb=0.05), backend="torch")
    micro = SimpleNamespace(targets=batch["targets"])
    logprobs, _ = head(batch["hidden"], micro, logprobs_only=True)
    assert seen == [0.05]
    expected, _ = token_logprobs(batch["hidden"], head.weight, batch["targets"], backend="reference")
    assert_close(logprobs, expected, 1e-6, "logprobs")


@pytest.mark.parametrize("with_entropy", [False, True])
def test_float64_token_logprobs_over_many_chunks_are_float64_log_softmax(with_entropy):
    """A 0.01 MiB budget over V = 50 gives chunks of 26 tokens (chunked.chunk_size), so 100 tokens
    take four; each chunk's log-probs are its own tokens' targets', in float64 (the oracle:
    log_softmax of the float64 logits, to 1e-12)."""
    batch = random_batch(100, 8, 50, dtype=torch.float64, seed=4)
    targets = batch["targets"].clamp_min(0)
    lp, ent = token_logprobs(batch["hidden"], batch["weight"], targets, with_entropy=with_entropy,
                             backend="torch", memory_budget_mb=0.01)
    log_p = torch.log_softmax(batch["hidden"] @ batch["weight"].T, -1)
    assert lp.dtype == torch.float64
    assert_close(lp, log_p.gather(1, targets[:, None]).squeeze(1), 1e-12, "logprobs")
    if with_entropy:
        assert_close(ent, -(log_p.exp() * log_p).sum(-1), 1e-12, "entropy")


def test_a_near_certain_tokens_logprob_keeps_its_relative_precision():
    """W = I, h = [20, 0, 0] in float32, target 0: log pi = -log1p(2 e^-20) = -4.1223072e-9 by
    hand. z_y - logsumexp rounds that to 0 in float32; the torch backend forms it from the other
    entries' probabilities (chunked._softmax_parts), in the loss's statistics and in
    token_logprobs with entropies."""
    hidden, weight = torch.tensor([[20.0, 0.0, 0.0]]), torch.eye(3)
    expected = -4.1223072363804075e-09
    _, stats = fused_luffy_loss(hidden, weight, torch.tensor([0]), torch.ones(1),
                                torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool),
                                backend="torch")
    assert float(stats["logprob_mean"]) == pytest.approx(expected, rel=1e-5)
    lp, _ = token_logprobs(hidden, weight, torch.tensor([0]), with_entropy=True, backend="torch")
    assert float(lp[0]) == pytest.approx(expected, rel=1e-5)
