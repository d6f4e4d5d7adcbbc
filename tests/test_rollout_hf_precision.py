"""The trainer's hf engine: the training weights themselves below ZeRO-3 (no second copy, no fp32
copy in bf16 runs), a copy in the training precision at ZeRO-3, and updated weights seen by the
next generate call."""

from __future__ import annotations

import copy

import pytest
import torch

import luffy_fast.trainer as trainer_module
from helpers import tiny_config
from luffy_fast.distributed import gathered_parameters
from luffy_fast.rollout import HFGenerateEngine, SamplingParams
from luffy_fast.rollout_batch import assemble_groups
from luffy_fast.trainer import LuffyTrainer

PARAMS = SamplingParams(24, temperature=1.0, seed=7)
BF16_LOGPROB_ATOL = 0.1  # bf16 KV-cache decoding vs the trainer's full forward, both in bf16


def trainer_for(tmp_path, *overrides) -> LuffyTrainer:
    return LuffyTrainer(tiny_config(tmp_path, "eval.every=0", "output.save_every=0",
                                    "optim.lr=1e-2", *overrides))


def sample(trainer: LuffyTrainer, engine=None):
    """Completions for the first step's prompts, and their mixed batch (no traces)."""
    samples = trainer.prompt_batch(0)
    completions = (engine or trainer.rollout).generate([s.prompt_ids for s in samples], n=2,
                                                       params=PARAMS)
    return completions, assemble_groups(samples, completions, n_off=0)


def logprob_gap(trainer: LuffyTrainer, completions, batch) -> float:
    """Largest |engine log-prob - trainer log-prob| over every sampled token."""
    current, _ = trainer.compute_logprobs(batch, range(len(batch)))
    engine = [torch.tensor(c.logprobs) for group in completions for c in group]
    return max(float((e - t).abs().max()) for e, t in zip(engine, current))


def replica_engine(trainer: LuffyTrainer) -> HFGenerateEngine:
    """An independent engine over an exact copy of the trainer's current (gathered) weights."""
    policy = trainer.engine.module.policy
    with gathered_parameters(policy.parameters(), trainer.config.train.zero_stage):
        state = {n: p.detach().clone() for n, p in policy.named_parameters()}
    replica = copy.deepcopy(trainer.rollout.model)
    for name, param in replica.named_parameters():
        param.data = state[name].clone()
    return HFGenerateEngine(replica, trainer.tokenizer.pad_token_id,
                            trainer.tokenizer.eos_token_id)


def untimed(row: dict) -> dict:
    """A metrics row without its timings and memory readings (they vary from run to run)."""
    return {k: v for k, v in row.items()
            if not any(part in k for part in ("seconds", "time/", "per_second", "memory"))}


def tokens(completions) -> list[list[int]]:
    return [c.token_ids for group in completions for c in group]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_engine_is_the_training_module_and_sees_each_update(tmp_path, zero_stage):
    trainer = trainer_for(tmp_path, f"train.zero_stage={zero_stage}", "model.precision=bf16")
    policy = trainer.engine.module.policy
    rollout = trainer.rollout
    assert rollout.shares_weights and rollout.model is policy
    shared = dict(policy.named_parameters())
    own = dict(rollout.model.named_parameters())
    assert own.keys() == shared.keys()
    assert all(own[n].data_ptr() == shared[n].data_ptr() for n in own)
    # no fp32 copy anywhere: every parameter the engine reads is the trainer's bf16 one
    assert {p.dtype for p in rollout.model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in rollout.model.parameters()) == sum(
        p.numel() for p in policy.parameters())
    before = replica_engine(trainer)
    trainer.training_step(0)  # rollouts, one optimizer step, the (no-op) sync
    assert trainer.engine.global_steps == 1
    # the next generate call uses the updated weights: identical to an independent engine over
    # a copy of them, and it no longer matches the weights from before the step
    completions, batch = sample(trainer)
    after = replica_engine(trainer)
    expected = sample(trainer, after)[0]
    assert tokens(completions) == tokens(expected)
    for got, want in zip(completions, expected):
        for a, b in zip(got, want):
            assert a.logprobs == b.logprobs
    stale = sample(trainer, before)[0]
    assert tokens(stale) != tokens(completions)
    # and its log-probs are the trainer's, up to bf16 rounding
    assert logprob_gap(trainer, completions, batch) < BF16_LOGPROB_ATOL


def test_fp32_shared_engine_logprobs_equal_the_trainers_after_a_step(tmp_path):
    trainer = trainer_for(tmp_path, "train.zero_stage=2")
    assert trainer.rollout.shares_weights
    stale = replica_engine(trainer)
    trainer.training_step(0)
    completions, batch = sample(trainer)
    assert logprob_gap(trainer, completions, batch) < 1e-4
    # the pre-step weights give other log-probs for the same tokens: the check has teeth
    assert logprob_gap(trainer, *sample(trainer, stale)) > 1e-3


def test_zero3_engine_keeps_a_copy_in_the_training_precision(tmp_path):
    trainer = trainer_for(tmp_path, "train.zero_stage=3", "model.precision=bf16")
    rollout, policy = trainer.rollout, trainer.engine.module.policy
    assert not rollout.shares_weights
    assert {p.dtype for p in rollout.model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in rollout.model.parameters())
    # buffers (the rotary frequencies) stay as DeepSpeed leaves the trained module's: fp32
    assert {n: b.dtype for n, b in rollout.model.named_buffers()} == {
        n: b.dtype for n, b in policy.named_buffers()}
    trainer.training_step(0)
    with gathered_parameters(policy.parameters(), 3):
        trained = {n: p.detach().clone() for n, p in policy.named_parameters()}
    own = dict(rollout.model.named_parameters())
    for name, value in trained.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(own[name], value), name  # synced bit for bit
    completions, batch = sample(trainer)
    assert logprob_gap(trainer, completions, batch) < BF16_LOGPROB_ATOL


def test_samples_equal_those_of_an_exact_fp32_copy(tmp_path, monkeypatch):
    """fp32: generating from the live weights gives the run an exact copy gave, step for step."""
    shared = trainer_for(tmp_path / "shared", "train.steps=3", "eval.every=2")
    assert shared.rollout.shares_weights
    history = shared.train()

    def copy_engine(config, policy, tokenizer, device, work_dir):  # the engine before sharing
        return HFGenerateEngine(copy.deepcopy(policy).to(device), tokenizer.pad_token_id,
                                tokenizer.eos_token_id, config.rollout.max_batch_size)

    monkeypatch.setattr(trainer_module, "build_rollout_engine", copy_engine)
    copied = trainer_for(tmp_path / "copied", "train.steps=3", "eval.every=2")
    assert not copied.rollout.shares_weights
    reference = copied.train()
    for a, b in zip(history, reference):
        assert untimed(a) == untimed(b)
    assert len(history) == len(reference) == 3 and "heldout_accuracy" in history[1]


def test_generation_under_gradient_checkpointing_uses_the_kv_cache(tmp_path):
    trainer = trainer_for(tmp_path, "model.gradient_checkpointing=true")
    policy = trainer.engine.module.policy
    assert trainer.rollout.shares_weights and policy.is_gradient_checkpointing
    trainer.engine.train()
    lengths = []
    hook = policy.get_input_embeddings().register_forward_hook(
        lambda module, args, out: lengths.append(args[0].shape[1]))
    try:
        completions, _ = sample(trainer)
    finally:
        hook.remove()
    assert policy.training  # the trainer's mode is restored after the call
    # with the cache, the prompt runs once and every later step feeds one new token
    assert lengths[0] > 1 and set(lengths[1:]) == {1}
    assert len(lengths) == max(len(c.token_ids) for group in completions for c in group)
