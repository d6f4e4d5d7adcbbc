"""Shared test helpers: random LUFFY batches and cases, relative-error assertions, and the
comparison of a backend with the float64 reference."""

from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck
from hypothesis import strategies as st

from luffy_fast import LuffyLossConfig, fused_luffy_loss, token_logprobs
from luffy_fast.config import NEEDS_MAX_LEN


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def assert_close(actual, expected, rtol: float, what: str = "", atol: float = 1e-12) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    diff = float((actual.double() - expected.double()).norm())
    scale = float(expected.double().norm())
    assert diff <= rtol * scale + atol, f"{what}: error {diff:.3e} vs scale {scale:.3e} (rtol {rtol})"


def run_loss(batch: dict, backend: str, config, dtype=None):
    """Loss, stats and the gradients of hidden, weight (and bias) for one backend."""
    hidden = batch["hidden"].detach().clone().requires_grad_(True)
    weight = batch["weight"].detach().clone().requires_grad_(True)
    bias = batch.get("bias")
    if bias is not None:
        bias = bias.detach().clone().requires_grad_(True)
    loss, stats = fused_luffy_loss(
        hidden, weight, batch["targets"], batch["advantages"], batch["loss_mask"],
        batch["off_policy_mask"], old_logprobs=batch.get("old_logprobs"), config=config,
        seq_ids=batch.get("seq_ids"), bias=bias, backend=backend)
    loss.backward()
    grads = {"hidden": hidden.grad, "weight": weight.grad}
    if bias is not None:
        grads["bias"] = bias.grad
    return loss.detach(), stats, grads


def random_batch(T: int, H: int, V: int, dtype=torch.float32, seed: int = 0, *, off_fraction=0.5,
                 mask_fraction=0.8, zero_adv_fraction=0.0, num_seqs: int = 4, with_old=True,
                 with_bias=False, ignore_some=False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5 * 2
    seq_ids = torch.randint(0, num_seqs, (T,), generator=gen).sort().values
    seq_adv = torch.randn(num_seqs, generator=gen, dtype=torch.float64)
    seq_adv[torch.rand(num_seqs, generator=gen) < zero_adv_fraction] = 0
    batch = {
        "hidden": hidden.to(dtype),
        "weight": weight.to(dtype),
        "targets": torch.randint(0, V, (T,), generator=gen),
        "advantages": seq_adv[seq_ids].to(dtype),
        "loss_mask": torch.rand(T, generator=gen) < mask_fraction,
        "off_policy_mask": torch.rand(T, generator=gen) < off_fraction,
        "seq_ids": seq_ids,
    }
    if ignore_some:
        batch["targets"][torch.rand(T, generator=gen) < 0.2] = -100
    if with_old:
        batch["old_logprobs"] = (-torch.rand(T, generator=gen, dtype=torch.float64) * 6).to(dtype)
    if with_bias:
        batch["bias"] = (torch.randn(V, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    return batch


TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-5, torch.bfloat16: 1e-2}


@st.composite
def loss_case(draw):
    """A random batch and config covering the op's options and its corner cases."""
    T = draw(st.integers(1, 300))
    V = draw(st.integers(2, 300))
    H = draw(st.integers(1, 70))
    scenario = draw(st.sampled_from(["mixed", "mixed", "mixed", "all_masked", "zero_advantage",
                                     "all_clipped", "all_off_policy"]))
    normalizer = draw(st.sampled_from(["token", "seq_mean_token_mean", "constant",
                                       "token_sum_over_max_len"]))
    clip_on, clip_off = draw(st.booleans()), draw(st.booleans())
    config = LuffyLossConfig(
        gamma=draw(st.sampled_from([0.1, 0.5])),
        shaping=draw(st.booleans()),
        clip_low=0.2, clip_high=draw(st.sampled_from([0.2, 0.28])),
        clip_on_policy=clip_on,
        clip_off_policy=clip_off,
        dual_clip=draw(st.sampled_from([None, 3.0])) if clip_on or clip_off else None,
        entropy_coef=draw(st.sampled_from([0.0, 0.0, 0.01, 0.3])),
        temperature=draw(st.sampled_from([1.0, 0.6, 1.7])),
        normalizer=normalizer,
        entropy_aggregation=draw(st.sampled_from(["normalizer", "token_mean"])),
        max_len=draw(st.integers(T, 2 * T + 5)) if normalizer in NEEDS_MAX_LEN else None,
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
    for key in ("logprob_mean", "entropy_mean", "ratio_mean", "ratio_min", "ratio_max"):
        if key in stats:
            assert_close(stats[key], expected_stats[key], max(rtol, 1e-6), key, atol=1e-6)
    if dtype == torch.float64:  # in lower precision a ratio at a clip bound may round across it
        assert float(stats["clip_fraction"]) == float(expected_stats["clip_fraction"])


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- trainer tests

# A tiny toy-task run: 2-layer 32-wide policy, 3-digit problems, groups of 3 rollouts + 1 trace
TINY = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
    "model.num_attention_heads=2", "model.num_key_value_heads=1",
    "data.num_digits=3", "data.max_response_length=24", "data.max_prompt_length=8",
    "rollout.n_on=3", "rollout.n_off=1",
    "loss.normalizer=token", "loss.entropy_coef=0.0", "loss.clip_on_policy=false",
    "optim.lr=1e-3", "optim.weight_decay=0.0", "optim.warmup_steps=2",
    "train.prompts_per_step=4", "train.mini_batch_size=4", "train.token_budget=4096",
    "train.seed=3", "eval.every=2", "eval.num_problems=8",
    "output.save_every=2", "output.tensorboard=false", "output.progress_bar=false",
]


def tiny_config(output_dir, *overrides):
    """The TINY trainer config writing to `output_dir`, with extra dotted overrides."""
    from luffy_fast.train_config import load_config

    return load_config(None, [*TINY, f"output.dir={output_dir}", *overrides])


def train_until_killed(trainer, step: int, monkeypatch) -> None:
    """Train until `step` (0-based) starts, then stop as a kill would (a KeyboardInterrupt
    from inside the loop); the trainer's own `finally` blocks run."""
    import pytest

    real_step = trainer.training_step

    def killed_at(number):
        if number == step:
            raise KeyboardInterrupt(f"killed in step {step + 1}")
        return real_step(number)

    monkeypatch.setattr(trainer, "training_step", killed_at)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()


# The trainer sets these when it starts a world of one process in the test process (DeepSpeed
# needs them there afterwards); a subprocess that inherited them would take itself for a launched
# rank and bind this process's store port.
PROCESS_GROUP_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict:
    """os.environ for a child process that starts its own process group, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARIABLES}
    env.update(extra)
    return env


def run_gpu_check_stage(stage: str, out) -> str:
    """benchmarks/gpu_check.sh's dry run of one on-request stage, results under `out`; asserts it
    passed and returns its output."""
    import subprocess
    import sys
    from pathlib import Path

    env = subprocess_env(BENCH_DRY_RUN="1", OUT=str(out), GPU_CHECK_STAGES=stage,
                         PYTHON=sys.executable)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and f"{stage}: ok" in log, log[-3000:]
    return log


def nucleus_logprobs(policy, prompt, continuation, top_p: float, temperature=1.0):
    """The log-prob of each continuation token under the renormalized top-p nucleus of the
    policy's tempered distribution, and whether each token is inside its nucleus (a token stays
    while the mass before it is below top_p; the most likely always stays)."""
    ids = torch.tensor([list(prompt) + list(continuation)])
    with torch.no_grad():
        logits = policy(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    ordered, order = logits.softmax(-1).sort(-1, descending=True)
    keep = torch.zeros_like(ordered, dtype=torch.bool).scatter(
        -1, order, (ordered.cumsum(-1) - ordered) < top_p)
    drawn = torch.tensor(continuation)[:, None]
    logprobs = logits.masked_fill(~keep, float("-inf")).log_softmax(-1)
    return logprobs.gather(-1, drawn)[:, 0], keep.gather(-1, drawn)[:, 0]


def hand_made_inputs():
    """Two prompts with two sampled completions each (one cut short) and three traces: the
    hand-worked mixed batch of tests/test_trainer.py and tests/test_rollout_batch.py."""
    from luffy_fast.data import Sample
    from luffy_fast.rollout import Completion

    samples = [Sample(prompt_ids=[5, 6], ground_truth="x", traces=[[7, 8, 1]]),
               Sample(prompt_ids=[9], ground_truth="y", traces=[[3, 1], [4, 4, 1]])]
    completions = [[Completion([2, 1], [-0.5, -0.1]), Completion([3, 3, 3], [-1.0] * 3, False)],
                   [Completion([4, 1], [-0.2, -0.3]), Completion([5, 1], [-0.4, -0.6])]]
    return samples, completions


def policy_gradients(trainer, batch, old_logprobs=None) -> dict[str, torch.Tensor]:
    """The policy's gradient from one accumulate_gradients over the whole rollout batch."""
    trainer.engine.zero_grad()
    trainer.accumulate_gradients(batch, list(range(len(batch))), old_logprobs)
    grads = {name: p.grad.detach().clone() for name, p in
             trainer.engine.module.policy.named_parameters() if p.grad is not None}
    trainer.engine.zero_grad()
    return grads


def gradient_differences(a: dict, b: dict) -> dict[str, float]:
    """Per parameter, max |a - b| / max |a| (the same parameters on both sides)."""
    assert a.keys() == b.keys() and a
    return {name: float((a[name] - b[name]).abs().max() / a[name].abs().max().clamp_min(1e-12))
            for name in a}


def assert_same_gradients(a: dict, b: dict, rtol: float) -> None:
    for name, error in gradient_differences(a, b).items():
        assert error <= rtol, f"{name}: relative difference {error:.2e}"


def rollout_batch(trainer, step: int = 0):
    """A real mixed batch from the trainer's own rollout engine, with advantages."""
    from luffy_fast.rollout import SamplingParams
    from luffy_fast.rollout_batch import assemble_groups, score_responses

    samples = trainer.prompt_batch(step)
    completions = trainer.rollout.generate([s.prompt_ids for s in samples], n=3,
                                           params=SamplingParams(24, seed=11))
    batch = assemble_groups(samples, completions, n_off=1)
    batch.rewards = score_responses(batch, samples, trainer.task.reward, trainer.decode)
    # varied advantages so every sequence carries gradient (rewards are all 0 or 1 here)
    batch.advantages = torch.linspace(-1.0, 1.0, len(batch))
    return batch


def peaked_batch(T: int, H: int, V: int, margin: float, seed: int = 0, unsure_fraction=0.2) -> dict:
    """Logits like a trained LM's: each hidden state points at its target's (unit) weight row,
    z_y = margin, the rest of the vocabulary spread around 0 with std margin / sqrt(H); a fifth of
    the tokens are unsure between the target and another candidate (both at margin / sqrt(2))."""
    batch = random_batch(T, H, V, seed=seed, mask_fraction=1.0, off_fraction=0.3)
    gen = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    weight /= weight.norm(dim=1, keepdim=True)
    targets = torch.randint(0, V, (T,), generator=gen)
    hidden = margin * weight[targets]
    unsure = torch.rand(T, generator=gen) < unsure_fraction
    other = weight[torch.randint(0, V, (T,), generator=gen)]
    hidden[unsure] = margin * (weight[targets[unsure]] + other[unsure]) / math.sqrt(2)
    batch.update(hidden=hidden.float(), weight=weight.float(), targets=targets)
    return batch


def tiny_qwen2(layers: int = 2, **config):
    """A seeded tiny Qwen2 (vocabulary 64, hidden 32, `layers` layers), with config overrides."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2)
    return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, **{**shape, **config}))


FORWARD_OUTPUTS = ("logsumexp", "log pi", "max", "E_p[z] - max")
# The largest error relative to float64 (forward_errors) that a forward kernel's fp32 output may
# have on the interpreter, whatever its inputs' dtype: ~6-8x the largest measured over the forward
# kernels' tests (test_forward_fused/_lean/_rows: logsumexp 1.7e-7, max 1.5e-7, log pi 6.1e-6,
# E_p[z] - max 6.3e-6).
FORWARD_BOUNDS = {"logsumexp": 1e-6, "log pi": 5e-5, "max": 1e-6, "E_p[z] - max": 5e-5}


def forward_errors(got, expected) -> dict:
    """Each of a forward kernel's outputs `got` against float64 `expected` (forward_oracle): the
    largest error relative to each value (log pi spans -1e-16 to -50), by name. E_p[z] - max is
    left out where it is None (without entropy)."""
    errors = {}
    for name, value, oracle in zip(FORWARD_OUTPUTS, got, expected, strict=True):
        if value is None:
            assert name == "E_p[z] - max", name
            continue
        assert value.shape == oracle.shape and bool(torch.isfinite(value).all()), name
        errors[name] = float(((value.double() - oracle).abs() / oracle.abs().clamp_min(1e-30)).max())
    return errors


def assert_no_worse(error: float, other_error: float, floor: float, bound: float, what="") -> None:
    """A kernel's `error` against float64 no worse than `floor` or twice another kernel's
    (`other_error`), that allowance capped at `bound`, which the other kernel's own error must
    keep too: a bug both kernels share fails."""
    assert other_error <= bound, f"{what}: the other kernel's error {other_error:.3e} > {bound:.0e}"
    assert error <= max(floor, min(2 * other_error, bound)), (
        f"{what}: error {error:.3e}, the other kernel's {other_error:.3e} (floor {floor:.0e}, "
        f"bound {bound:.0e})")


def assert_forward_outputs(got, other, expected, floor: float) -> None:
    """A forward kernel's four outputs `got` against float64 `expected` (forward_oracle), each no
    worse than `floor` or twice another kernel's error (`other`), relative to each value (log pi
    spans -1e-16 to -50), with both kernels' errors capped at FORWARD_BOUNDS (assert_no_worse).
    E_p[z] - max is None in both without entropy."""
    errors, other_errors = forward_errors(got, expected), forward_errors(other, expected)
    assert errors.keys() == other_errors.keys()
    for name, error in errors.items():
        assert_no_worse(error, other_errors[name], floor, FORWARD_BOUNDS[name], name)


def forward_oracle(logits: torch.Tensor, bias, targets, temperature: float):
    """float64 per-token outputs of the forward kernels from raw logits [N, V] (+ bias) and a
    temperature: logsumexp, log pi, max and E_p[z] - max (a -inf logit takes no part in it)."""
    z = logits.double()
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    lse = torch.logsumexp(z, dim=1)
    top = z.max(dim=1).values
    p = torch.softmax(z, dim=1)
    shifted = torch.where(p > 0, z - top[:, None], torch.zeros_like(z))
    # log pi: z_y - lse cancels as pi -> 1 (to 0 for a target 40 nats ahead, where log pi is
    # -1e-16); there -log1p(the others' sum / exp(z_y)) keeps float64's relative precision
    target = z.gather(1, targets[:, None])
    others = torch.exp(z - target).scatter(1, targets[:, None], 0.0).sum(dim=1)
    logprobs = torch.where(others < 1, -torch.log1p(others), target.squeeze(1) - lse)
    return lse, logprobs, top, (p * shifted).sum(dim=1)
