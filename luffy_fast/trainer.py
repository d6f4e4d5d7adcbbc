"""The LUFFY trainer: rollouts, mixed on/off-policy groups, and the fused-loss update on DeepSpeed.

One training step (docs/algorithm.md §One training step):

    samples     = next prompt batch (ground truth + off-policy traces)
    completions = rollout engine: n_on samples per prompt from the current policy
    batch       = mixed groups: the completions plus n_off traces appended as responses
    rewards     = verifiable reward of every member (traces scored like the rest)
    advantages  = group_advantages over each mixed group
    update      = fused_luffy_loss on token-budget micro-batches, one optimizer step per
                  mini-batch, the loss scale independent of the micro-batch split
    sync        = new weights to the rollout engine

Each concern lives in its own module (docs/design.md §The trainer): the task (tasks.py), the
rollout batch (rollout_batch.py), micro-batches (micro_batches.py), the fused-loss policy
(policy.py), DeepSpeed and the LR schedule (distributed.py), checkpoints (checkpoint.py) and
metrics (metrics.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Optional

import torch
from torch import Tensor

from luffy_fast.advantages import group_advantages
from luffy_fast.checkpoint import CheckpointManager
from luffy_fast.data import Sample
from luffy_fast.distributed import (
    all_reduce_sum,
    apply_optimizer_settings,
    build_engine,
    check_world_size,
    init_distributed,
    lockstep_counts,
    release_engine,
    training_device,
)
from luffy_fast.metrics import (
    TOKEN_COUNTS,
    MeanMinMax,
    MetricsLogger,
    PhaseTimer,
    over_ranks,
    progress_display,
)
from luffy_fast.micro_batches import (
    loss_denominator,
    micro_batches,
    mini_batch_indices,
    sequences_with_gradient,
)
from luffy_fast.model_loading import check_model_options, prepare_policy
from luffy_fast.nonfinite import NonFiniteGuard
from luffy_fast.policy import PolicyWithFusedLoss, sequence_logprobs
from luffy_fast.reward_pool import task_reward_pool
from luffy_fast.rollout.base import Completion, RolloutEngine, SamplingParams
from luffy_fast.rollout.correction import behaviour_logprobs, rollout_correction, weight_advantages
from luffy_fast.rollout.factory import build_rollout_engine
from luffy_fast.rollout.weights import gathered_named_parameters
from luffy_fast.rollout_batch import RolloutBatch, assemble_groups, reward_items, rollout_metrics
from luffy_fast.run_files import ensure_writable_dir, say, warn_at_start, write_run_config
from luffy_fast.sampler import data_metrics, prompt_sampler, rank_share
from luffy_fast.tasks import Task, load_task, load_task_data, prepare_components
from luffy_fast.train_config import LuffyTrainConfig
from luffy_fast.validation import Validation, check_validation

TokenWeights = Optional[list[Optional[Tensor]]]  # per-sequence TIS weights (rollout/correction.py)


def loss_metrics(stats: dict) -> dict:
    """The op's statistics of a micro-batch as logged, with the token counts that weigh them
    (metrics.TOKEN_COUNTS)."""
    names = ("logprob_mean", "clip_fraction", "ratio_mean", "ratio_min", "ratio_max")
    metrics = {name: float(stats[name]) for name in names}
    if "entropy_mean" in stats:
        metrics["entropy"] = float(stats["entropy_mean"])
    on, off = int(stats["num_on_policy_tokens"]), int(stats["num_off_policy_tokens"])
    return {**metrics, "loss_tokens": on + off, "on_policy_loss_tokens": on}


BAR = ("reward_on_policy", "loss", "heldout_accuracy")  # the progress bar's metrics


def warn_of_idle_settings(heldout_samples, config) -> None:
    """Start-up warnings of settings that would do nothing (and errors: check_validation)."""
    check_validation(heldout_samples, config, report=warn_at_start)
    if config.rollout.n_on == 0:
        warn_at_start("rollout.n_on=0: each group is its traces alone, and traces that all score "
                      "the same (the official data's are all correct) have zero advantage")


class LuffyTrainer:
    """Runs LUFFY (or on-policy GRPO with n_off = 0) from a LuffyTrainConfig. The task defaults
    to the one `data.task` names; tests and embedding code may pass their own task or engine."""

    def __init__(self, config: LuffyTrainConfig, *, task: Optional[Task] = None,
                 rollout_engine: Optional[RolloutEngine] = None,
                 device: Optional[torch.device] = None) -> None:
        config.validate()
        check_world_size(config)  # before anything loads on every rank
        self.config = config
        self.output_dir = ensure_writable_dir(config.output.dir)
        self.device, bf16 = training_device(config, device)
        check_model_options(config.model, self.device)
        self.task = task or load_task(config)
        self.tokenizer, build_policy = prepare_components(self.task, config)  # data, then policy
        self.train_samples, self.heldout_samples = load_task_data(self.task, self.tokenizer, config)
        warn_of_idle_settings(self.heldout_samples, config)
        self.rewards = task_reward_pool(self.task, config.reward.workers, config.reward.timeout)
        self.sampler = prompt_sampler(self.train_samples, config)
        policy = prepare_policy(build_policy(), config.model)  # Liger kernels, checkpointing
        self.rank, self.world_size = init_distributed(self.device.type, config)
        self.lockstep = lockstep_counts(config.train.zero_stage, self.world_size, self.device)
        # before DeepSpeed partitions the policy: the hf engine shares it below ZeRO-3 and
        # copies it at ZeRO-3 (rollout/hf.py); vLLM starts from a saved copy
        self.rollout = rollout_engine or build_rollout_engine(
            config, policy, self.tokenizer, self.device, self.output_dir)
        backend = None if config.train.loss_backend == "auto" else config.train.loss_backend
        module = PolicyWithFusedLoss(policy, config.loss.replace(check_finite=False), backend)
        self.engine, self.scheduler = build_engine(module, config, bf16)
        self.nonfinite = NonFiniteGuard(config.train.max_nonfinite_steps)
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", config.output.keep_checkpoints,
                                             self.rank, self.world_size, config.rollout.vllm.sync_bucket_mb)
        self.validation = Validation(self.heldout_samples, config, self.rewards,
                                     self.checkpoints.root, self.rank, self.world_size)
        self.step = 0

    # ------------------------------------------------------------------ one LUFFY step

    def prompt_batch(self, step: int) -> list[Sample]:
        """This rank's slice of every mini-batch of the seeded shuffle's batch for `step`."""
        mine = rank_share(self.sampler.batch(step), self.config.train.mini_batch_size,
                          self.rank, self.world_size)
        return [self.train_samples[i] for i in mine]

    def training_step(self, step: int) -> dict:
        """One LUFFY step (docs/algorithm.md §One training step); returns the step's metrics."""
        config, timer = self.config, PhaseTimer(self.device)
        start = time.perf_counter()
        # 1. a batch of prompts, each with its ground truth and off-policy traces
        samples = self.prompt_batch(step)
        # 2. n_on on-policy rollouts per prompt
        with timer.phase("generate"):
            completions = self.sample_rollouts(samples, step)
        with timer.phase("score"):
            # 3. mixed groups: the rollouts plus n_off traces appended as responses
            batch = assemble_groups(samples, completions, config.rollout.n_off)
            # 4. the reward of every member, traces included (scored while the correction runs)
            pending = self.rewards.submit(reward_items(batch, samples, self.decode))
        with timer.phase("update"):
            self.rollout.sleep()  # engines that can free device memory for the update
            # several optimizer steps: old log-probs in one no-grad pass, reused by the correction
            old = (self.compute_logprobs(batch, range(len(batch)))[0]
                   if config.optimizer_steps_per_rollout() > 1 else None)
            token_weights, correction = self.rollout_correction(batch, completions, old)
        with timer.phase("score"):
            scores = pending.result()
            batch.rewards = torch.tensor(scores.rewards, dtype=torch.float32)
            # 5. group-normalized advantages over each mixed group
            batch.advantages = group_advantages(batch.rewards, batch.group_ids,
                                                use_std=config.algorithm.advantage_std)
        # 6. the mixed-policy loss over all response tokens, and the optimizer steps
        with timer.phase("update"):
            update = self.update_policy(batch, token_weights, old)
        # 7. the new weights to the rollout engine
        with timer.phase("sync"):
            self.sync_rollout_weights()
            self.rollout.wake()
        seconds = time.perf_counter() - start
        trained_tokens = sum(batch.sequence_length(i) for i in range(len(batch)))
        return over_ranks({**rollout_metrics(batch), **scores.metrics(),
                           **update, **correction, **(self.rollout.metrics() if completions else {}),
                           **timer.metrics(), **data_metrics(self.task.data_report, self.sampler, step),
                           "step_seconds": seconds,
                           "tokens_per_second": trained_tokens / max(seconds, 1e-9)}, self.world_size)

    def sample_rollouts(self, samples: Sequence[Sample], step: int) -> list[list[Completion]]:
        """n_on completions per prompt, seeded by step (a resumed run samples the same)."""
        rollout = self.config.rollout
        if not rollout.n_on:
            return []
        params = SamplingParams(max_new_tokens=self.config.data.max_response_length,
                                temperature=rollout.temperature, top_p=rollout.top_p,
                                seed=self.config.train.seed * 1_000_003 + step)
        return self.rollout.generate([s.prompt_ids for s in samples], n=rollout.n_on,
                                     params=params)

    def rollout_correction(self, batch: RolloutBatch, completions: Sequence[Sequence[Completion]],
                           current: Optional[list[Tensor]] = None) -> tuple[TokenWeights, dict]:
        """Gap between the engine's and the trainer's log-probs (`current`, if already computed)
        of the sampled tokens, and the truncated importance weights when rollout.tis_cap is set
        (rollout/correction.py). Skipped for the hf engine without a cap (the training weights)."""
        cap = self.config.rollout.tis_cap
        if not completions or (cap is None and self.config.rollout.engine == "hf"):
            return None, {}
        behaviour = behaviour_logprobs(batch.off_policy.tolist(), batch.group_ids.tolist(),
                                       completions)
        sampled = [i for i, values in enumerate(behaviour) if values is not None]
        current = self.compute_logprobs(batch, sampled)[0] if current is None else current
        trainer = [current[i] if values is not None else None for i, values in enumerate(behaviour)]
        return rollout_correction(behaviour, trainer, cap)

    def update_policy(self, batch: RolloutBatch, token_weights: TokenWeights = None,
                      old_logprobs: Optional[list[Tensor]] = None) -> dict:
        """Optimizer steps over the mini-batches (old log-probs computed if needed and not given);
        the metrics are means over the optimizer steps, the token means (metrics.TOKEN_COUNTS)
        over all the steps' tokens, the ratio's extremes over all of them."""
        config = self.config
        groups_per_mini = config.train.mini_batch_size // self.world_size  # this rank's share
        num_minis = config.train.prompts_per_step // config.train.mini_batch_size
        if old_logprobs is None and config.optimizer_steps_per_rollout() > 1:
            old_logprobs = self.compute_logprobs(batch, range(len(batch)))[0]
        steps = MeanMinMax(minimum=("ratio_min",), maximum=("ratio_max",), weighted_by=TOKEN_COUNTS)
        for _ in range(config.algorithm.ppo_epochs):
            for mini in range(num_minis):
                indices = mini_batch_indices(batch, mini, groups_per_mini)
                learning_rate = self.scheduler.get_last_lr()[0]
                result = self.accumulate_gradients(batch, indices, old_logprobs, token_weights)
                # a non-finite loss or gradient norm: no update (docs/robustness.md)
                result["grad_norm"] = self.nonfinite.optimizer_step(self.engine, self.step)
                result["learning_rate"] = learning_rate
                steps.add(result)
        return {**steps.result(), **self.nonfinite.metrics()}

    def accumulate_gradients(self, batch: RolloutBatch, indices: Sequence[int],
                             old_logprobs: Optional[list[Tensor]],
                             token_weights: TokenWeights = None) -> dict:
        """Forward and backward over a mini-batch's token-budget micro-batches; each one's loss
        is rescaled by its denominator over the mini-batch's (docs/algorithm.md §Normalizers),
        so the summed gradient does not depend on the split."""
        config = self.config
        denominator = loss_denominator(batch, indices, config.loss)
        if self.world_size > 1:
            # DeepSpeed averages gradients over ranks: normalize by the global denominator,
            # times the world size, so the update equals one process on the whole mini-batch
            denominator = all_reduce_sum(denominator, self.device) / self.world_size
        trained = sequences_with_gradient(batch, indices, config.loss)
        over_micro_batches = MeanMinMax(minimum=("ratio_min",), maximum=("ratio_max",),
                                        summed=("loss_tokens", "on_policy_loss_tokens"),
                                        weighted_by=TOKEN_COUNTS)
        loss_total, count = 0.0, 0
        self.engine.train()
        for micro in micro_batches(batch, trained, config.train.token_budget,
                                   not self.engine.module.packed, old_logprobs,
                                   config.loss.ignore_index, self.lockstep, spare=indices):
            if micro.filler:  # ZeRO-3: this rank's share of the others' gathers, no gradient
                self.engine.backward(self.engine(micro.to(self.device))[0])
                continue
            count += 1
            if token_weights is not None:  # TIS: A' = w * A on sampled tokens
                micro.advantages = weight_advantages(micro.advantages, micro.loss_mask,
                                                     micro.seq_ids, micro.sequence_indices,
                                                     token_weights)
            loss, stats = self.engine(micro.to(self.device))
            scaled = loss * (stats["denominator"].to(loss.dtype) / max(denominator, 1e-30))
            loss_total += self.nonfinite.backward(self.engine, scaled)
            over_micro_batches.add(loss_metrics(stats))
        return {"loss": loss_total, "micro_batches": count, **over_micro_batches.result()}

    def compute_logprobs(self, batch: RolloutBatch, indices: Iterable[int],
                         with_entropy: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        """Per-response-token log-probs (and entropies) in one no-grad pass per micro-batch."""
        return sequence_logprobs(self.engine, batch, indices, self.config.train.token_budget,
                                 self.device, self.engine.module.packed,
                                 self.config.loss.ignore_index, with_entropy, self.lockstep)

    def sync_rollout_weights(self) -> None:
        """Step 7: the new weights to the rollout engine (ZeRO-3: gathered bucket by bucket)."""
        self.rollout.sync_weights(gathered_named_parameters(
            self.engine.module.policy, bucket_mb=self.config.rollout.vllm.sync_bucket_mb))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def evaluate(self) -> dict:
        """Validation by the eval command's code (luffy_fast/validation.py) and the policy's
        mean token entropy on its own held-out responses."""
        return self.validation.run(self.rollout, self.decode, lambda batch: torch.cat(
            self.compute_logprobs(batch, range(len(batch)), with_entropy=True)[1]))

    # ------------------------------------------------------------------ the loop

    def train(self, resume: bool = False) -> list[dict]:
        """Run to train.steps; with resume, continue from the latest checkpoint if any.

        Every rank trains its share of each step; rank 0 logs, shows the bar, publishes.
        """
        config = self.config
        # the same data in the same order as the checkpoint's run, or an error before the load
        latest, start_step, saved = self.checkpoints.resume(self.engine, resume,
                                                            self.sampler.check_trainer_state)
        if latest is not None:  # a changed optim section applies from here on
            apply_optimizer_settings(self.engine, self.scheduler, config.optim)
            self.nonfinite.load_state_dict(saved.get("nonfinite"))  # skipped steps in a row
            self.sync_rollout_weights()
        self.validation.start(resuming=latest is not None)
        lead, history, bar, logger = self.rank == 0, [], None, None
        if lead:
            write_run_config(self.output_dir, config, latest, start_step, saved)
            logger = MetricsLogger.for_run(self.output_dir, config, resume_step=start_step)
        try:
            if start_step == 0 and config.eval.every and self.validation.problems:
                say(lead, self.output_dir, f"validation of {len(self.validation.problems)} problems")
                evaluation = {"step": 0, **self.evaluate()}
                if logger:
                    logger.log(evaluation)
            # after the first validation, so that its time is not the first step's
            bar, progress = progress_display(config.output, lead, start_step, config.train.steps,
                                             self.output_dir.name)
            for step in bar:
                self.step = step + 1  # the step under way (its warnings), then the one done
                metrics = {"step": self.step, **self.training_step(step)}
                last, best = self.step == config.train.steps, None
                if config.eval.every and (self.step % config.eval.every == 0 or last):
                    metrics.update(self.evaluate())
                    best = self.validation.keep_best(metrics, self.step, self.engine, self.tokenizer)
                if logger:
                    logger.log(metrics)
                history.append(metrics)
                progress.step(self.step, metrics)
                # drawn with the step count, which moves when the next step starts
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in BAR if k in metrics}, refresh=False)
                if last or (config.output.save_every and self.step % config.output.save_every == 0):
                    self.checkpoints.save(self.engine, self.tokenizer, self.step, config.to_dict(),
                                          {"sampler": self.sampler.state_dict(self.step),
                                           "nonfinite": self.nonfinite.state_dict()},
                                          link_from=best)
        finally:
            if bar is not None:
                bar.close()
            if logger:
                logger.close()
        return history

    def close(self) -> None:
        """Stops the rollout engine and the reward workers, and lets the DeepSpeed engine go."""
        try:
            self.rollout.close()
            self.rewards.close()
        finally:
            release_engine(self.engine)
