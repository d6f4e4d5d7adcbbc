"""The LUFFY trainer: group assembly, the update's numerics, DeepSpeed ZeRO stages, resume."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from helpers import (
    assert_same_gradients,
    hand_made_inputs,
    policy_gradients,
    rollout_batch,
    tiny_config,
    train_until_killed,
)
from luffy_fast import LuffyLossConfig, group_advantages
from luffy_fast.data import Sample
from luffy_fast.distributed import gathered_parameters
from luffy_fast.metrics import read_metrics
from luffy_fast.micro_batches import (
    loss_denominator,
    micro_batches,
    pack_micro_batch,
    plan_micro_batches,
    sequences_with_gradient,
)
from luffy_fast.rollout import Completion
from luffy_fast.rollout_batch import RolloutBatch, assemble_groups, rollout_metrics
from luffy_fast.trainer import LuffyTrainer

IGNORE_INDEX = LuffyLossConfig().ignore_index


def tiny_trainer(tmp_path, *overrides) -> LuffyTrainer:
    return LuffyTrainer(tiny_config(tmp_path, *overrides))




# --------------------------------------------------------------------------- group assembly

def hand_made_batch() -> RolloutBatch:
    return assemble_groups(*hand_made_inputs(), n_off=2)


def test_hand_made_batch_groups_masks_and_advantages():
    batch = hand_made_batch()
    # group 0: two rollouts, then its single trace twice; group 1: two rollouts, both traces
    assert batch.response_ids == [[2, 1], [3, 3, 3], [7, 8, 1], [7, 8, 1],
                                  [4, 1], [5, 1], [3, 1], [4, 4, 1]]
    assert batch.off_policy.tolist() == [False, False, True, True, False, False, True, True]
    assert batch.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch.finished == [True, False, True, True, True, True, True, True]

    batch.rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    batch.advantages = group_advantages(batch.rewards, batch.group_ids)
    # A = R - mean over the mixed group: group 0 mean 0.5, group 1 mean 0.75
    expected = torch.tensor([-0.5, -0.5, 0.5, 0.5, 0.25, -0.75, 0.25, 0.25])
    torch.testing.assert_close(batch.advantages, expected)

    micro = pack_micro_batch(batch, [0, 2, 5])
    # inputs are prompt + response minus the last token; targets are the response, shifted
    assert micro.input_ids[0].tolist() == [5, 6, 2, 5, 6, 7, 8, 9, 5]
    assert micro.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    assert micro.targets.tolist() == [IGNORE_INDEX, 2, 1, IGNORE_INDEX, 7, 8, 1, 5, 1]
    assert micro.loss_mask.tolist() == [False, True, True, False, True, True, True, True, True]
    assert micro.off_policy_mask.tolist() == [False] * 3 + [True] * 4 + [False] * 2
    assert micro.seq_ids.tolist() == [0] * 3 + [2] * 4 + [5] * 2
    assert micro.advantages.tolist() == [-0.5] * 3 + [0.5] * 4 + [-0.75] * 2
    rows, mask = micro.padded_rows()
    assert rows.tolist() == [[5, 6, 2, 0], [5, 6, 7, 8], [9, 5, 0, 0]]
    assert mask.sum().item() == micro.num_tokens

    token = LuffyLossConfig(normalizer="token")
    assert loss_denominator(batch, [0, 2, 5], token) == 2 + 3 + 2
    assert loss_denominator(batch, [0, 2, 5], token.replace(normalizer="seq_mean_token_mean")) == 3
    assert loss_denominator(batch, [0, 2, 5], token.replace(normalizer="constant", max_len=10)) == 30


def test_group_without_traces_and_empty_response_is_an_error():
    samples = [Sample(prompt_ids=[5], ground_truth="x", traces=[])]
    batch = assemble_groups(samples, [[Completion([1], [0.0]), Completion([2, 1], [0.0, 0.0])]], 1)
    assert batch.off_policy.tolist() == [False, False]
    with pytest.raises(ValueError, match="empty response"):
        assemble_groups(samples, [[Completion([], [])]], 0)


def test_micro_batch_plan_respects_the_token_budget():
    lengths = [9, 3, 7, 5, 2, 8]
    packed = plan_micro_batches(lengths, token_budget=12)
    assert sorted(i for b in packed for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 12 for b in packed)
    padded = plan_micro_batches(lengths, token_budget=16, padded=True)
    assert all(len(b) * max(lengths[i] for i in b) <= 16 for b in padded)
    with pytest.raises(ValueError, match="token_budget"):
        plan_micro_batches([20], token_budget=12)


@pytest.mark.parametrize("padded", [False, True])
def test_micro_batches_are_the_plan_packed_part_by_part(padded):
    batch = hand_made_batch()
    batch.advantages = torch.linspace(-1.0, 1.0, len(batch))
    old = [torch.arange(len(r), dtype=torch.float32) - i for i, r in enumerate(batch.response_ids)]
    # sequence lengths (prompt + response - 1) of batch sequences 7, 0, 2, 5, 4: 3, 3, 4, 2, 2
    indices = [7, 0, 2, 5, 4]
    budget = 8 if padded else 6
    micros = list(micro_batches(batch, iter(indices), budget, padded, old, IGNORE_INDEX))
    # first-fit decreasing: packed {4, 2} {3, 3} {2}; padded (rows x longest) {4, 3} {3, 2} {2}
    expected = [[2, 5], [7, 0], [4]] if not padded else [[7, 2], [0, 5], [4]]
    assert [m.sequence_indices for m in micros] == expected
    assert [m.num_tokens for m in micros] == ([6, 6, 2] if not padded else [7, 5, 2])
    # the same micro-batches, field for field, as plan_micro_batches then pack_micro_batch
    plan = plan_micro_batches([batch.sequence_length(i) for i in indices], budget, padded)
    assert len(micros) == len(plan)
    for micro, part in zip(micros, plan):
        packed = pack_micro_batch(batch, [indices[i] for i in part], old, IGNORE_INDEX)
        assert micro.sequence_indices == packed.sequence_indices
        assert micro.lengths == packed.lengths
        for name, value in vars(packed).items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(getattr(micro, name), value, rtol=0, atol=0)
    # without old log-probs, as the no-grad log-prob pass packs them
    assert all(m.old_logprobs is None for m in micro_batches(batch, indices, budget, padded))
    with pytest.raises(ValueError, match="token_budget"):
        next(micro_batches(batch, indices, 3, padded))


def test_lockstep_adds_fillers_up_to_the_count_of_the_rank_with_the_most():
    """ZeRO-3 over several ranks: this rank's 3 micro-batches, then fillers up to the 5 another
    rank runs: the shortest spare sequence with no loss token; the largest count is asked for
    before the first micro-batch (a collective every rank reaches at the same point)."""
    batch = hand_made_batch()
    indices, asked = [7, 0, 2, 5, 4], []

    def lockstep(count):
        asked.append(count)
        return 5

    stream = micro_batches(batch, indices, 6, lockstep=lockstep, spare=[3, 1, 6])
    first = next(stream)
    assert asked == [3] and not first.filler  # asked before the first was handed out
    rest = list(stream)
    fillers = rest[2:]
    assert [m.filler for m in rest] == [False, False, True, True]
    shortest = min([3, 1, 6], key=batch.sequence_length)
    assert all(m.sequence_indices == [shortest] and not m.loss_mask.any() for m in fillers)
    assert len(list(micro_batches(batch, indices, 6, lockstep=lambda count: count))) == 3
    # a rank with nothing to train still takes its turns (here: of the batch's sequences)
    assert [m.filler for m in micro_batches(batch, [], 6, lockstep=lambda count: 2)] == [True] * 2


# --------------------------------------------------------------------------- the update

def test_fused_update_equals_reference_backend(tmp_path):
    trainer = tiny_trainer(tmp_path / "a", "train.loss_backend=torch")
    batch = rollout_batch(trainer)
    fused = policy_gradients(trainer, batch)
    trainer.engine.module.loss_head.backend = "reference"
    reference = policy_gradients(trainer, batch)
    assert_same_gradients(reference, fused, rtol=1e-5)


@pytest.mark.parametrize("normalizer", ["token", "seq_mean_token_mean", "constant"])
def test_gradient_does_not_depend_on_the_micro_batch_split(tmp_path, normalizer):
    trainer = tiny_trainer(tmp_path, f"loss.normalizer={normalizer}", "loss.entropy_coef=0.01")
    batch = rollout_batch(trainer)
    lengths = [batch.sequence_length(i) for i in range(len(batch))]
    trainer.config.train.token_budget = 4096
    assert len(plan_micro_batches(lengths, 4096, padded=True)) == 1
    whole = policy_gradients(trainer, batch)
    # the smallest padded budget that still splits the 16 sequences into exactly 4 micro-batches
    budget = next(b for b in range(max(lengths), 4096)
                  if len(plan_micro_batches(lengths, b, padded=True)) == 4)
    trainer.config.train.token_budget = budget
    split = policy_gradients(trainer, batch)
    assert_same_gradients(whole, split, rtol=1e-5)


def test_logged_token_statistics_do_not_depend_on_the_micro_batch_split(tmp_path):
    """The update's token means (entropy, clip fraction, log-prob, on-policy ratio) over 4
    micro-batches, each weighted by its count of the tokens they are over, equal the op's own
    statistics over the whole mini-batch in one micro-batch."""
    trainer = tiny_trainer(tmp_path, "loss.entropy_coef=0.01", "loss.clip_on_policy=true")
    batch = rollout_batch(trainer)
    old, _ = trainer.compute_logprobs(batch, range(len(batch)))
    generator = torch.Generator().manual_seed(3)
    old = [lp + 0.3 * torch.randn(lp.shape, generator=generator) for lp in old]  # ratios != 1
    lengths = [batch.sequence_length(i) for i in range(len(batch))]
    trainer.config.train.token_budget = 4096
    whole = trainer.accumulate_gradients(batch, list(range(len(batch))), old)
    trainer.config.train.token_budget = next(
        b for b in range(max(lengths), 4096) if len(plan_micro_batches(lengths, b, padded=True)) == 4)
    split = trainer.accumulate_gradients(batch, list(range(len(batch))), old)
    trainer.engine.zero_grad()
    assert (whole["micro_batches"], split["micro_batches"]) == (1, 4)
    assert 0 < whole["clip_fraction"] < 1 and 0 < whole["on_policy_loss_tokens"] < whole["loss_tokens"]
    for name in ("loss_tokens", "on_policy_loss_tokens", "ratio_min", "ratio_max"):
        assert split[name] == whole[name], name
    for name in ("entropy", "clip_fraction", "logprob_mean", "ratio_mean", "loss"):
        assert split[name] == pytest.approx(whole[name], rel=1e-5), name


def test_the_update_plans_micro_batches_as_the_policy_runs_them(tmp_path):
    """On the CPU the policy runs padded rows (policy.uses_packed_attention): every micro-batch
    the update feeds it is at most token_budget tokens with its padding, at a budget where
    packing by token count alone would put more in a micro-batch."""
    trainer = tiny_trainer(tmp_path)
    batch = rollout_batch(trainer)
    assert not trainer.engine.module.packed
    lengths = [batch.sequence_length(i) for i in range(len(batch))]
    budget = next(b for b in range(max(lengths), 4096) if any(
        len(part) * max(lengths[i] for i in part) > b for part in plan_micro_batches(lengths, b)))
    trainer.config.train.token_budget = budget
    module, fed = trainer.engine.module, []
    forward = module.forward
    module.forward = lambda micro, *rest, **options: fed.append(micro) or forward(micro, *rest,
                                                                                  **options)
    trainer.accumulate_gradients(batch, list(range(len(batch))), None)
    trainer.engine.zero_grad()
    assert sorted(i for micro in fed for i in micro.sequence_indices) == list(range(len(batch)))
    assert all(micro.padded_rows()[0].numel() <= budget for micro in fed)


def test_old_logprobs_pass_matches_the_free_path(tmp_path):
    """With unchanged weights, explicit old log-probs give the same gradient as old=None."""
    trainer = tiny_trainer(tmp_path)
    batch = rollout_batch(trainer)
    free = policy_gradients(trainer, batch)
    old, _ = trainer.compute_logprobs(batch, range(len(batch)))
    explicit = policy_gradients(trainer, batch, old_logprobs=old)
    assert_same_gradients(free, explicit, rtol=1e-5)


def test_zero_advantage_sequences_are_skipped_without_changing_the_gradient(tmp_path):
    trainer = tiny_trainer(tmp_path)
    batch = rollout_batch(trainer)
    batch.advantages[::2] = 0.0
    kept = sequences_with_gradient(batch, range(len(batch)), trainer.config.loss)
    assert kept == list(range(1, len(batch), 2))
    skipped = policy_gradients(trainer, batch)
    trainer.config.loss = trainer.config.loss.replace(entropy_coef=1e-30)  # disables the skip
    trainer.engine.module.loss_head.loss_config = trainer.config.loss
    assert sequences_with_gradient(batch, range(len(batch)), trainer.config.loss) == list(range(len(batch)))
    full = policy_gradients(trainer, batch)
    assert_same_gradients(full, skipped, rtol=1e-5)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_few_steps_with_zero(tmp_path, zero_stage):
    trainer = tiny_trainer(tmp_path, f"train.zero_stage={zero_stage}", "train.steps=3",
                           "eval.every=0", "output.save_every=0", "optim.lr=1e-2")
    policy = trainer.engine.module.policy

    def snapshot():
        with gathered_parameters(policy.parameters(), zero_stage):
            return {n: p.detach().clone() for n, p in policy.named_parameters()}

    before = snapshot()
    history = trainer.train()
    after = snapshot()
    assert [row["step"] for row in history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in history)
    assert all(row["reward_off_policy"] == 1.0 for row in history)  # traces are correct
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"
    # the rollout engine received the new weights
    engine_state = dict(trainer.rollout.model.named_parameters())
    for name, value in after.items():
        torch.testing.assert_close(engine_state[name], value)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000003"


def test_a_resumed_run_hands_the_loaded_weights_to_the_rollout_engine(tmp_path):
    """At ZeRO-3 the hf engine samples from its own copy of the policy (rollout/hf.py): a
    resumed run sends it the checkpoint's weights before its first step, or it would sample
    from the initial ones."""
    overrides = ("train.zero_stage=3", "train.steps=1", "eval.every=0", "optim.lr=1e-2")
    first = tiny_trainer(tmp_path, *overrides)
    first.train()
    first.close()
    resumed = tiny_trainer(tmp_path, *overrides)
    initial = {n: p.detach().clone() for n, p in resumed.rollout.model.named_parameters()}
    try:
        assert resumed.train(resume=True) == []  # step 1 of 1 is done: nothing left to train
        policy = resumed.engine.module.policy
        with gathered_parameters(policy.parameters(), 3):
            loaded = {n: p.detach().clone() for n, p in policy.named_parameters()}
        sampling = dict(resumed.rollout.model.named_parameters())
    finally:
        resumed.close()
    assert all(not torch.equal(initial[n], loaded[n]) for n in loaded)  # step 1 moved them all
    for name, value in loaded.items():
        torch.testing.assert_close(sampling[name], value, rtol=0, atol=0)


# --------------------------------------------------------------------------- checkpoints

def _comparable(row: dict) -> dict:
    timing = ("step_seconds", "tokens_per_second", "peak_memory_mb")
    return {k: v for k, v in row.items() if k not in timing and not k.startswith("time/")}


def test_resume_after_a_crash_logs_the_same_next_step(tmp_path, monkeypatch):
    straight = tiny_trainer(tmp_path / "straight", "train.steps=3")
    straight.train()
    expected = read_metrics(tmp_path / "straight" / "metrics.jsonl")

    crashed = tiny_trainer(tmp_path / "crash", "train.steps=3")
    train_until_killed(crashed, 2, monkeypatch)  # in step 3, after the step-2 checkpoint
    # a half-written checkpoint must never become `latest`
    (tmp_path / "crash" / "checkpoints" / ".staging-step-000004").mkdir()
    assert (tmp_path / "crash" / "checkpoints" / "latest").read_text().strip() == "step-000002"

    resumed = tiny_trainer(tmp_path / "crash", "train.steps=3")
    resumed.train(resume=True)
    assert not list((tmp_path / "crash").glob("config.until-step-*"))  # no setting changed
    got = read_metrics(tmp_path / "crash" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [0, 1, 2, 3]
    for mine, theirs in zip(got, expected):
        mine, theirs = _comparable(mine), _comparable(theirs)
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    # the transformers export loads on its own
    from transformers import AutoModelForCausalLM

    export = tmp_path / "crash" / "checkpoints" / "step-000003" / "hf"
    model = AutoModelForCausalLM.from_pretrained(export)
    torch.testing.assert_close(dict(model.named_parameters())["model.norm.weight"],
                               dict(resumed.engine.module.policy.named_parameters())
                               ["model.norm.weight"])
    state = json.loads((export.parent / "trainer_state.json").read_text())
    assert state["step"] == 3


def test_truncated_importance_sampling_hooks_into_the_step(tmp_path):
    """The HF engine samples from an exact copy of the policy: gap 0, every weight 1."""
    trainer = tiny_trainer(tmp_path, "rollout.tis_cap=2.0", "eval.every=0")
    metrics = trainer.training_step(0)
    assert metrics["rollout_logprob_gap_max"] < 1e-4
    assert metrics["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["tis_clipped_fraction"] == 0.0


def test_gradient_checkpointing_gives_the_same_gradient(tmp_path):
    plain = tiny_trainer(tmp_path / "plain")
    checkpointed = tiny_trainer(tmp_path / "ckpt", "model.gradient_checkpointing=true")
    assert checkpointed.engine.module.policy.is_gradient_checkpointing
    batch = rollout_batch(plain)
    assert_same_gradients(policy_gradients(plain, batch), policy_gradients(checkpointed, batch),
                          rtol=1e-5)


def test_two_mini_batches_use_old_logprobs_from_before_the_first_update(tmp_path):
    trainer = tiny_trainer(tmp_path, "train.mini_batch_size=2", "optim.lr=1e-2", "eval.every=0")
    assert trainer.config.optimizer_steps_per_rollout() == 2
    batch = rollout_batch(trainer)
    before = {n: p.detach().clone() for n, p in trainer.engine.module.policy.named_parameters()}
    metrics = trainer.update_policy(batch)
    assert trainer.engine.global_steps == 2
    # the second mini-batch sees weights moved by the first: its ratios are no longer all 1
    assert metrics["ratio_max"] > 1.0 or metrics["ratio_min"] < 1.0
    changed = [n for n, p in trainer.engine.module.policy.named_parameters()
               if not torch.equal(p, before[n])]
    assert changed


@pytest.mark.parametrize("use_std", [False, True])
def test_the_step_trains_on_group_normalized_advantages_of_its_rewards(tmp_path, use_std):
    trainer = tiny_trainer(tmp_path, f"algorithm.advantage_std={str(use_std).lower()}",
                           "eval.every=0")
    seen = []
    real_update = trainer.update_policy
    trainer.update_policy = lambda batch, *rest: seen.append(batch) or real_update(batch, *rest)
    trainer.training_step(0)
    (batch,) = seen
    rewards = batch.rewards.tolist()
    groups = batch.group_ids.tolist()
    # the traces are correct and the untrained policy's rollouts are not: mixed groups
    assert any(len({r for r, g in zip(rewards, groups) if g == group}) > 1 for group in set(groups))
    expected = []
    for reward, group in zip(rewards, groups):  # A = R - group mean, over / (unbiased std + 1e-6)
        members = [r for r, g in zip(rewards, groups) if g == group]
        mean = sum(members) / len(members)
        std = (sum((r - mean) ** 2 for r in members) / (len(members) - 1)) ** 0.5
        expected.append((reward - mean) / (std + 1e-6) if use_std else reward - mean)
    torch.testing.assert_close(batch.advantages.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)


def test_mini_batches_are_whole_groups_in_order(tmp_path):
    # 4 prompts of 3 rollouts + 1 trace (sequences 4g .. 4g + 3 form group g), 2 prompts per
    # mini-batch: the optimizer steps see sequences 0-7, then 8-15, each exactly once.
    trainer = tiny_trainer(tmp_path, "train.mini_batch_size=2", "eval.every=0")
    batch = rollout_batch(trainer)
    assert batch.group_ids.tolist() == [g for g in range(4) for _ in range(4)]
    seen = []
    real_accumulate = trainer.accumulate_gradients
    trainer.accumulate_gradients = lambda b, indices, *rest: (
        seen.append(list(indices)) or real_accumulate(b, indices, *rest))
    trainer.update_policy(batch)
    assert seen == [list(range(0, 8)), list(range(8, 16))]
    # two PPO epochs: the same mini-batches again, one optimizer step each
    seen.clear()
    trainer.config.algorithm.ppo_epochs = 2
    steps = trainer.engine.global_steps
    trainer.update_policy(batch)
    assert seen == [list(range(0, 8)), list(range(8, 16))] * 2
    assert trainer.engine.global_steps == steps + 4


def test_a_resume_with_changed_settings_says_which_and_keeps_the_earlier_ones(tmp_path, capsys):
    import yaml

    first = tiny_trainer(tmp_path, "train.steps=2", "eval.every=0", "train.zero_stage=2")
    first.train()
    resumed = tiny_trainer(tmp_path, "train.steps=3", "eval.every=0", "optim.lr=2e-3",
                           "optim.weight_decay=0.05", "optim.betas=[0.8,0.95]",
                           "optim.grad_clip=0.5", "train.zero_stage=2")
    with pytest.warns(RuntimeWarning) as warned:
        history = resumed.train(resume=True)
    (message,) = [str(w.message) for w in warned if "changed settings" in str(w.message)]
    assert message.startswith("resuming from step 2 with changed settings: optim.betas: "
                              "[0.9, 0.999] -> [0.8, 0.95]; optim.grad_clip: 1.0 -> 0.5; "
                              "optim.lr: 0.001 -> 0.002; optim.weight_decay: 0.0 -> 0.05; "
                              "train.steps: 2 -> 3 (the earlier")
    # the changes apply (the checkpoint's ZeRO-2 optimizer state carried the earlier ones)
    assert history[-1]["learning_rate"] == 2e-3 and resumed.engine.optimizer.clip_grad == 0.5
    groups = resumed.scheduler.optimizer.param_groups
    assert all((g["lr"], g["betas"], g["weight_decay"]) == (2e-3, (0.8, 0.95), 0.05) for g in groups)
    assert f"{tmp_path.name}: resuming from step 2 (" in capsys.readouterr().err
    earlier = yaml.safe_load((tmp_path / "config.until-step-2.yaml").read_text())
    now = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (earlier["optim"]["lr"], earlier["train"]["steps"]) == (1e-3, 2)
    assert (now["optim"]["lr"], now["train"]["steps"]) == (2e-3, 3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def refused_before_the_load(tmp_path, *overrides, match: str) -> LuffyTrainer:
    """A trainer whose `--resume` of the run in tmp_path (to step 2) is a ConfigError matching
    `match`, raised before DeepSpeed's load is called."""
    from luffy_fast.errors import ConfigError

    trainer = tiny_trainer(tmp_path, "train.steps=2", "eval.every=0", *overrides)
    loads = []
    trainer.checkpoints.load = lambda *args: loads.append(args)
    with pytest.raises(ConfigError, match=match):
        trainer.train(resume=True)
    assert loads == []
    return trainer


def test_a_zero_checkpoint_resumes_only_on_the_ranks_that_saved_it(tmp_path):
    """ZeRO-1/2/3 optimizer states are partitioned by rank: a checkpoint of 2 ranks on 1 rank is
    a ConfigError naming both counts before DeepSpeed's load (its own error is a traceback)."""
    from luffy_fast.errors import ConfigError

    first = tiny_trainer(tmp_path, "train.steps=1", "eval.every=0", "train.zero_stage=2")
    first.train()
    state_file = tmp_path / "checkpoints" / "step-000001" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert (state["world_size"], state["zero_stage"]) == (1, 2)
    state_file.write_text(json.dumps({**state, "world_size": 2}))  # as two ranks would save it
    resumed = refused_before_the_load(tmp_path, "train.zero_stage=2", match=(
        r"train.zero_stage: .*step-000001 was saved by 2 rank\(s\) at ZeRO-2.* on 1 \(this run: "
        r"ZeRO-2\): resume with 2"))
    checkpoints = resumed.checkpoints  # ZeRO-0 states load on any number of ranks
    checkpoints.check_ranks({"world_size": 2, "zero_stage": 0}, 0, state_file.parent)
    checkpoints.check_ranks({"zero_stage": 2}, 2, state_file.parent)  # saved before the count
    with pytest.raises(ConfigError, match="saved by 3 rank"):
        checkpoints.check_ranks({"world_size": 3, "zero_stage": 1}, 0, state_file.parent)


def test_a_closed_trainer_lets_its_engine_go(tmp_path):
    """After close() nothing holds the DeepSpeed engine, the policy or the optimizer states:
    ZeRO's gradient hooks held them from C++ (and ZeRO-3's forward stack the policy), so a
    second trainer in one process found the first one's memory still taken; at ZeRO-3 from the
    second step on, a class-wide cache of DeepSpeed's held the policy's modules too."""
    for stage in (2, 3):
        trainer = tiny_trainer(tmp_path / f"zero{stage}", "train.steps=2", "eval.every=0",
                               f"train.zero_stage={stage}")
        trainer.train()
        trainer.close()
        engine = trainer.engine
        held = [weakref.ref(engine), weakref.ref(engine.module), weakref.ref(engine.optimizer)]
        del trainer, engine
        gc.collect()
        assert [ref() for ref in held] == [None, None, None], f"ZeRO-{stage}"


def test_a_resume_at_another_optimizer_layout_is_refused_before_the_load(tmp_path):
    """DeepSpeed loads a checkpoint's optimizer states only at its ZeRO stage (1 and 2 share
    theirs) and precision; anything else failed inside its load (a KeyError, an AssertionError,
    a missing file): a ConfigError naming the key and the saved value, before the load."""
    from luffy_fast.checkpoint import check_optimizer_layout
    from luffy_fast.errors import ConfigError

    first = tiny_trainer(tmp_path, "train.steps=1", "eval.every=0", "train.zero_stage=2")
    first.train()
    first.close()
    saved = tmp_path / "checkpoints" / "step-000001"
    state = json.loads((saved / "trainer_state.json").read_text())
    assert (state["zero_stage"], state["bf16"]) == (2, False)
    refused_before_the_load(tmp_path, "train.zero_stage=3", match=(
        r"train.zero_stage: .*step-000001 was saved at ZeRO-2, and DeepSpeed cannot load its "
        r"optimizer states at ZeRO-3 .*resume with train.zero_stage=2$")).close()
    resumed = tiny_trainer(tmp_path, "train.steps=2", "eval.every=0", "train.zero_stage=1")
    resumed.train(resume=True)  # ZeRO-1 loads ZeRO-2's states
    resumed.close()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000002"
    after = tmp_path / "checkpoints" / "step-000002" / "trainer_state.json"
    assert json.loads(after.read_text())["zero_stage"] == 1
    for stage, wanted in ((0, 0), (3, 3), (1, 2), (2, 1), (2, 2)):  # what loads
        check_optimizer_layout({"zero_stage": stage, "bf16": True}, wanted, True, saved)
    check_optimizer_layout({"zero_stage": 0}, 0, True, saved)  # saved before bf16 was recorded
    # saved before the stage was recorded: its settings' stage, or nothing to check against
    check_optimizer_layout({"config": {"train": {"zero_stage": 2}}}, 2, True, saved)
    check_optimizer_layout({"step": 5}, 3, True, saved)
    with pytest.raises(ConfigError, match="saved at ZeRO-3, .* at ZeRO-2"):
        check_optimizer_layout({"config": {"train": {"zero_stage": 3}}}, 2, True, saved)
    model = {"config": {"model": {"path": "/models/q"}}}
    with pytest.raises(ConfigError, match=r"model.precision: .* was saved in bf16, and DeepSpeed "
                                          r"cannot load its optimizer states in fp32: resume with "
                                          r"model.precision=bf16, or start a new run from its "
                                          r"weights: model.path=.*step-000001/hf"):
        check_optimizer_layout({**model, "zero_stage": 0, "bf16": True}, 0, False, saved)
    with pytest.raises(ConfigError, match="saved at ZeRO-0, .* at ZeRO-1"):
        check_optimizer_layout({"zero_stage": 0, "bf16": False}, 1, False, saved)


def test_rollout_metrics_leave_out_the_members_a_batch_does_not_have():
    batch = hand_made_batch()
    batch.rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    batch.advantages = group_advantages(batch.rewards, batch.group_ids)
    metrics = rollout_metrics(batch)
    # on-policy: rollouts 0, 1, 4, 5 with rewards 0, 0, 1, 0 and lengths 2, 3, 2, 2
    assert metrics["reward_on_policy"] == 0.25 and metrics["response_length_on_policy"] == 2.25
    assert metrics["truncated_fraction"] == 0.25  # rollout 1 was cut
    # off-policy: traces 2, 3, 6, 7 with rewards 1 and lengths 3, 3, 2, 3
    assert metrics["reward_off_policy"] == 1.0 and metrics["response_length_off_policy"] == 2.75
    grpo = assemble_groups(*hand_made_inputs(), n_off=0)
    grpo.rewards = torch.tensor([0.0, 0.0, 1.0, 0.0])
    grpo.advantages = group_advantages(grpo.rewards, grpo.group_ids)
    metrics = rollout_metrics(grpo)
    assert "reward_off_policy" not in metrics and "response_length_off_policy" not in metrics
    assert metrics["reward_on_policy"] == 0.25


def test_the_zero3_export_gathers_the_weights_a_bucket_at_a_time(tmp_path, monkeypatch):
    """The checkpoint's transformers export gathered the whole model on every rank at once (a
    7B model's weights beside vLLM's memory); now rollout.vllm.sync_bucket_mb at a time, and the
    export holds the trained weights all the same."""
    from safetensors.torch import load_file

    import luffy_fast.checkpoint as checkpoint

    gathers = []

    def recorded(parameters, zero_stage):
        gathers.append(sum(p.ds_numel * p.element_size() for p in parameters))
        return gathered_parameters(parameters, zero_stage)

    monkeypatch.setattr(checkpoint, "gathered_parameters", recorded)
    trainer = tiny_trainer(tmp_path, "train.zero_stage=3", "train.steps=1", "eval.every=0",
                           "rollout.vllm.sync_bucket_mb=0.01")  # 10 KiB, as the weight sync
    trainer.train()
    policy = trainer.engine.module.policy
    with gathered_parameters(policy.parameters(), 3):
        expected = {name: p.detach().clone() for name, p in policy.state_dict(keep_vars=True).items()}
    trainer.close()
    largest = max(p.ds_numel * p.element_size() for p in policy.parameters())
    assert len(gathers) > 3 and max(gathers) <= max(0.01 * 2**20, largest)
    exported = load_file(tmp_path / "checkpoints" / "step-000001" / "hf" / "model.safetensors")
    # every weight; the head's is tied to the embedding, which transformers may save once
    assert set(expected) - {"lm_head.weight"} <= set(exported) <= set(expected)
    for name, value in exported.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_a_step_that_samples_no_rollouts_logs_no_rollout_entropy(tmp_path):
    """With rollout.n_on=0 the hf engine's latest generate call was the validation's, whose
    entropy every step logged as its rollout_entropy."""
    trainer = tiny_trainer(tmp_path, "rollout.n_on=0", "rollout.n_off=2", "train.steps=2",
                           "eval.every=1")
    history = trainer.train()
    trainer.close()
    assert [row["step"] for row in history] == [1, 2] and "heldout_entropy" in history[0]
    assert not [row for row in history if "rollout_entropy" in row]
    # every member a trace: 4 prompts x rollout.n_off (2), the toy's single trace twice
    assert [(row["samples"], row["off_policy_samples"]) for row in history] == [(8, 8)] * 2
    sampled = tiny_trainer(tmp_path / "sampled", "train.steps=1", "eval.every=0")
    assert "rollout_entropy" in sampled.train()[0]
    sampled.close()
