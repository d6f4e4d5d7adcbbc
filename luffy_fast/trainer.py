"""The LUFFY trainer: rollouts, mixed on/off-policy groups, and the fused-loss update on DeepSpeed.

One training step follows LUFFY_SPEC.md section 1:

    samples     = next prompt batch (ground truth + off-policy traces)
    completions = rollout engine: n_on samples per prompt from the current policy
    batch       = mixed groups: the completions plus n_off traces appended as responses
    rewards     = verifiable reward of every member (traces scored like the rest)
    advantages  = group_advantages over each mixed group
    update      = fused_luffy_loss on packed token-budget micro-batches, one optimizer step per
                  mini-batch, the loss scale independent of the micro-batch split
    sync        = new weights to the rollout engine

The policy never computes full logits in training: `PolicyWithFusedLoss` runs the decoder for the
last hidden states and hands them with the LM-head weight to `fused_luffy_loss`, inside a module
that owns the weight, so that ZeRO-3 gathers it for the call.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from luffy_fast import fused_luffy_loss, group_advantages, token_logprobs
from luffy_fast.config import LuffyLossConfig
from luffy_fast.data import Sample, load_jsonl_samples, load_tokenizer, toy_samples
from luffy_fast.rewards import MathVerifyReward, RewardFunction, ToyReverseReward
from luffy_fast.rollout import Completion, RolloutEngine, SamplingParams
from luffy_fast.rollout.correction import behaviour_logprobs, rollout_correction, weight_advantages
from luffy_fast.rollout.factory import build_rollout_engine
from luffy_fast.rollout.weights import gathered_named_parameters
from luffy_fast.train_config import ConfigError, LuffyTrainConfig

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- rollout batch

@dataclass
class RolloutBatch:
    """All members of all groups of one step, one entry per sequence (on- and off-policy)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    off_policy: Tensor  # [N] bool: the response is a trace, not a policy sample
    group_ids: Tensor  # [N] int64: index of the prompt in the step's batch
    finished: list[bool]  # the response ended with EOS
    rewards: Optional[Tensor] = None  # [N] float32
    advantages: Optional[Tensor] = None  # [N] float32

    def __len__(self) -> int:
        return len(self.response_ids)

    def sequence_length(self, index: int) -> int:
        """Tokens fed to the model for one sequence: prompt + response minus the last token."""
        return len(self.prompt_ids[index]) + len(self.response_ids[index]) - 1


def assemble_groups(samples: Sequence[Sample], completions: Sequence[Sequence[Completion]],
                    n_off: int) -> RolloutBatch:
    """Mixed groups: each prompt's policy completions, then n_off of its traces as responses.

    Traces are appended directly (never generated). A prompt with fewer than n_off traces reuses
    them in turn; one with none gets no off-policy members.
    """
    if completions and len(completions) != len(samples):
        raise ValueError(f"got completions for {len(completions)} prompts, expected {len(samples)}")
    prompt_ids, response_ids, off_policy, group_ids, finished = [], [], [], [], []
    for group, sample in enumerate(samples):
        members = [(c.token_ids, False, c.finished) for c in (completions[group] if completions
                                                              else [])]
        if sample.traces:
            members += [(sample.traces[k % len(sample.traces)], True, True) for k in range(n_off)]
        for response, is_trace, done in members:
            if not response:
                raise ValueError(f"prompt {group}: empty response (a trace or completion has "
                                 "no tokens)")
            prompt_ids.append(list(sample.prompt_ids))
            response_ids.append(list(response))
            off_policy.append(is_trace)
            group_ids.append(group)
            finished.append(done)
    return RolloutBatch(prompt_ids, response_ids, torch.tensor(off_policy, dtype=torch.bool),
                        torch.tensor(group_ids, dtype=torch.long), finished)


def score_responses(batch: RolloutBatch, samples: Sequence[Sample], reward_fn: RewardFunction,
                    decode) -> Tensor:
    """Verifiable reward of every member (off-policy traces are scored like the rest)."""
    rewards = [float(reward_fn(decode(batch.response_ids[i]), samples[int(batch.group_ids[i])]))
               for i in range(len(batch))]
    return torch.tensor(rewards, dtype=torch.float32)


# --------------------------------------------------------------------------- micro-batches

@dataclass
class MicroBatch:
    """Sequences packed into one row without padding; positions restart at 0 per sequence."""

    input_ids: Tensor  # [1, T]
    position_ids: Tensor  # [1, T]
    targets: Tensor  # [T] int64, IGNORE_INDEX outside responses
    advantages: Tensor  # [T] float32
    loss_mask: Tensor  # [T] bool
    off_policy_mask: Tensor  # [T] bool
    seq_ids: Tensor  # [T] int64: index of the sequence in the rollout batch
    old_logprobs: Optional[Tensor]  # [T] float32 or None (old policy = current policy)
    sequence_indices: list[int]
    lengths: list[int]  # tokens of each sequence, in order

    def padded_rows(self, pad_token_id: int = 0) -> tuple[Tensor, Tensor]:
        """The same sequences as [B, L] right-padded rows and their attention mask."""
        width = max(self.lengths)
        rows = torch.full((len(self.lengths), width), pad_token_id, dtype=torch.long,
                          device=self.input_ids.device)
        mask = torch.zeros_like(rows)
        for row, piece in enumerate(torch.split(self.input_ids[0], self.lengths)):
            rows[row, :len(piece)] = piece
            mask[row, :len(piece)] = 1
        return rows, mask

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device) -> MicroBatch:
        moved = {name: (value.to(device) if isinstance(value, Tensor) else value)
                 for name, value in vars(self).items()}
        return MicroBatch(**moved)


def plan_micro_batches(lengths: Sequence[int], token_budget: int,
                       padded: bool = False) -> list[list[int]]:
    """Split sequences into micro-batches of at most `token_budget` tokens (first-fit decreasing).

    Packed (padded=False), a micro-batch costs the sum of its lengths; padded, it costs
    rows x longest row. Returns lists of indices into `lengths`; a sequence longer than the
    budget is an error.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    used: list[int] = []
    for index in order:
        length = lengths[index]
        if length > token_budget:
            raise ValueError(f"a sequence of {length} tokens does not fit "
                             f"train.token_budget={token_budget}")
        for slot, bin_ in enumerate(bins):
            # sorted by decreasing length, so a bin's first sequence is its longest
            cost = (len(bin_) + 1) * lengths[bin_[0]] if padded else used[slot] + length
            if cost <= token_budget:
                bin_.append(index)
                used[slot] += length
                break
        else:
            bins.append([index])
            used.append(length)
    return [sorted(b) for b in bins]


def pack_micro_batch(batch: RolloutBatch, indices: Sequence[int],
                     old_logprobs: Optional[Sequence[Tensor]] = None) -> MicroBatch:
    ids, positions, targets, advantages, off_policy, seq_ids, old = [], [], [], [], [], [], []
    for index in indices:
        prompt, response = batch.prompt_ids[index], batch.response_ids[index]
        sequence = prompt + response
        length = len(sequence) - 1
        ids.append(torch.tensor(sequence[:-1], dtype=torch.long))
        positions.append(torch.arange(length))
        target = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
        target[len(prompt) - 1:] = torch.tensor(response, dtype=torch.long)
        targets.append(target)
        advantage = 0.0 if batch.advantages is None else float(batch.advantages[index])
        advantages.append(torch.full((length,), advantage, dtype=torch.float32))
        off_policy.append(torch.full((length,), bool(batch.off_policy[index])))
        seq_ids.append(torch.full((length,), index, dtype=torch.long))
        if old_logprobs is not None:
            values = torch.zeros(length, dtype=torch.float32)
            values[len(prompt) - 1:] = old_logprobs[index]
            old.append(values)
    targets_flat = torch.cat(targets)
    return MicroBatch(
        input_ids=torch.cat(ids)[None], position_ids=torch.cat(positions)[None],
        targets=targets_flat, advantages=torch.cat(advantages),
        loss_mask=targets_flat != IGNORE_INDEX, off_policy_mask=torch.cat(off_policy),
        seq_ids=torch.cat(seq_ids), old_logprobs=torch.cat(old) if old_logprobs is not None else None,
        sequence_indices=list(indices), lengths=[len(p) for p in positions])


def loss_denominator(batch: RolloutBatch, indices: Sequence[int], config: LuffyLossConfig) -> float:
    """The normalizer's denominator over a whole mini-batch (same definition as the op's
    stats["denominator"] for one call): each micro-batch's loss is rescaled by
    denominator_micro / denominator_mini, so the gradient does not depend on the split."""
    tokens = sum(len(batch.response_ids[i]) for i in indices)
    sequences = sum(1 for i in indices if batch.response_ids[i])
    if config.normalizer == "token":
        return float(tokens)
    if config.normalizer == "seq_mean_token_mean":
        return float(sequences)
    return float(sequences * config.max_len)


# --------------------------------------------------------------------------- the policy module

class FusedLossHead(nn.Module):
    """The LM head as a loss: owns the head's weight (shared, not copied), so that ZeRO-3
    gathers it when this module runs, and computes the LUFFY loss from hidden states."""

    def __init__(self, lm_head: nn.Module, loss_config: LuffyLossConfig,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self.weight = lm_head.weight
        self.bias = getattr(lm_head, "bias", None)
        self.loss_config = loss_config
        self.backend = backend

    def forward(self, hidden: Tensor, micro: MicroBatch, logprobs_only: bool = False,
                with_entropy: bool = False):
        if logprobs_only:
            targets = micro.targets.clamp_min(0)
            return token_logprobs(hidden, self.weight, targets,
                                  temperature=self.loss_config.temperature, bias=self.bias,
                                  with_entropy=with_entropy, backend=self.backend)
        return fused_luffy_loss(
            hidden, self.weight, micro.targets, micro.advantages.to(hidden.dtype),
            micro.loss_mask, micro.off_policy_mask, old_logprobs=micro.old_logprobs,
            config=self.loss_config, seq_ids=micro.seq_ids, bias=self.bias, backend=self.backend)


def uses_packed_attention(policy: nn.Module) -> bool:
    """Whether micro-batches run as one packed row (padding removed) or as padded rows.

    transformers builds a block-diagonal causal mask from position_ids that restart at 0, so a
    packed row is exact for every attention kernel; but only flash-attention's varlen kernel
    makes it cheap: sdpa and eager then attend over the whole [T, T] square, slower on short
    sequences than padding (measured on the CPU). So: packed with flash-attention, else padded
    rows, grouped by length, with the padding dropped before the loss.
    """
    implementation = getattr(policy.config, "_attn_implementation", "") or ""
    return implementation.startswith("flash_attention")


class PolicyWithFusedLoss(nn.Module):
    """A causal LM whose forward returns the LUFFY loss (or per-token log-probs), never logits."""

    def __init__(self, policy: nn.Module, loss_config: LuffyLossConfig,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self.policy = policy
        self.loss_head = FusedLossHead(policy.get_output_embeddings(), loss_config, backend)
        self.packed = uses_packed_attention(policy)

    def forward(self, micro: MicroBatch, logprobs_only: bool = False, with_entropy: bool = False):
        decoder = self.policy.get_decoder()
        if self.packed:
            hidden = decoder(input_ids=micro.input_ids, position_ids=micro.position_ids,
                             use_cache=False).last_hidden_state[0]
        else:
            rows, mask = micro.padded_rows()
            hidden = decoder(input_ids=rows, attention_mask=mask,
                             use_cache=False).last_hidden_state[mask.bool()]  # back to [T, H]
        return self.loss_head(hidden, micro, logprobs_only=logprobs_only,
                              with_entropy=with_entropy)


# --------------------------------------------------------------------------- DeepSpeed set-up

def init_distributed(device_type: str) -> None:
    """One process without a launcher gets a world of size one; the `deepspeed` launcher's
    environment is used as is."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                               verbose=False)


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def learning_rate_lambda(config: LuffyTrainConfig):
    """Linear warm-up, then constant or cosine decay to min_lr_ratio over the remaining steps."""
    optim = config.optim
    total = config.train.steps * config.optimizer_steps_per_rollout()

    def factor(optimizer_step: int) -> float:
        if optimizer_step < optim.warmup_steps:
            return (optimizer_step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = (optimizer_step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine

    return factor


def deepspeed_config(config: LuffyTrainConfig, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # micro-batch counts vary with packing: backward() accumulates, step() is the boundary
        "managed_gradient_accumulation": False,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": config.train.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _gathered(parameters: Iterable[nn.Parameter], zero_stage: int):
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(parameters), modifier_rank=None)


# --------------------------------------------------------------------------- output helpers

def ensure_writable_dir(path: str | Path, key: str = "output.dir") -> Path:
    """Create `path` if needed and prove it is writable, or raise naming the cause."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{key}: {str(path)!r} is not writable "
                          f"({error.strerror or error})") from None
    return path


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    """Per-step metrics to metrics.jsonl and TensorBoard."""

    def __init__(self, directory: Path, tensorboard: bool, resume_step: int = 0) -> None:
        self.path = directory / "metrics.jsonl"
        if resume_step and self.path.exists():  # drop what a crashed run logged past the checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            _write_atomic(self.path, "".join(line + "\n" for line in kept))
        elif not resume_step and self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(directory / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- the trainer

def build_toy_components(config: LuffyTrainConfig):
    """Tokenizer, policy, train and held-out samples, and reward of the embedded demo task."""
    from luffy_fast.toy.model import TinyQwen2Config, build_policy, build_tokenizer
    from luffy_fast.toy.task import sample_problems

    tokenizer = build_tokenizer(config.data.num_digits)
    model = config.model
    shape = TinyQwen2Config(hidden_size=model.hidden_size,
                            intermediate_size=model.intermediate_size,
                            num_hidden_layers=model.num_hidden_layers,
                            num_attention_heads=model.num_attention_heads,
                            num_key_value_heads=model.num_key_value_heads,
                            max_position_embeddings=max(128, 2 * config.data.max_response_length))
    policy = build_policy(tokenizer, shape, seed=config.train.seed)
    available = 10**config.data.num_digits * (1 - config.data.heldout_fraction)
    train = sample_problems(min(20000, int(0.4 * available)), config.data.num_digits, "train",
                            config.train.seed, config.data.heldout_fraction)
    heldout = sample_problems(config.eval.num_problems, config.data.num_digits, "heldout",
                              config.train.seed, config.data.heldout_fraction)
    return (tokenizer, policy, toy_samples(train, tokenizer), toy_samples(heldout, tokenizer),
            ToyReverseReward())


def build_components(config: LuffyTrainConfig):
    if config.model.path == "toy" and config.data.source == "toy":
        return build_toy_components(config)
    if config.model.path == "toy" or config.data.source == "toy":
        raise ConfigError("model.path: the toy policy and the toy data go together "
                          f"(model.path={config.model.path!r}, data.source={config.data.source!r})")
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(config.model.path)
    policy = AutoModelForCausalLM.from_pretrained(
        config.model.path, dtype=torch.float32, attn_implementation=config.model.attn_implementation)
    limits = (config.data.max_prompt_length, config.data.max_response_length)
    train = load_jsonl_samples(config.data.source, tokenizer, *limits)
    heldout = (load_jsonl_samples(config.data.heldout_source, tokenizer, *limits)
               [:config.eval.num_problems] if config.data.heldout_source else [])
    return tokenizer, policy, train, heldout, MathVerifyReward()


class LuffyTrainer:
    """Runs LUFFY (or on-policy GRPO with n_off = 0) from a LuffyTrainConfig.

    Components default to what the config names (the toy task, or a model directory and a
    JSONL file); tests and embedding code may pass their own.
    """

    def __init__(self, config: LuffyTrainConfig, *, components=None,
                 rollout_engine: Optional[RolloutEngine] = None,
                 device: Optional[torch.device] = None) -> None:
        import deepspeed

        config.validate()
        self.config = config
        self.output_dir = ensure_writable_dir(config.output.dir)
        self.device = device or (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                                 if torch.cuda.is_available() else torch.device("cpu"))
        if self.device.type == "cpu" and config.train.cpu_threads:
            torch.set_num_threads(config.train.cpu_threads)
        bf16 = config.model.precision == "bf16" or (config.model.precision == "auto"
                                                     and self.device.type == "cuda")
        (self.tokenizer, policy, self.train_samples, self.heldout_samples,
         self.reward_fn) = components or build_components(config)
        if not self.train_samples:
            raise ConfigError("data.source: no training prompts")
        if len(self.train_samples) < config.train.prompts_per_step:
            raise ConfigError(f"train.prompts_per_step: {config.train.prompts_per_step} prompts "
                              f"per step but only {len(self.train_samples)} training prompts")
        for i, sample in enumerate(self.train_samples):
            if config.rollout.n_off and not sample.traces:
                raise ValueError(f"training sample {i} has no off-policy trace, but "
                                 f"rollout.n_off={config.rollout.n_off}")
            if any(len(t) > config.data.max_response_length for t in sample.traces):
                raise ConfigError(f"data.max_response_length: training sample {i} has a trace "
                                  f"longer than {config.data.max_response_length} tokens")
        if config.model.gradient_checkpointing:
            policy.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})

        init_distributed(self.device.type)
        self.rank, self.world_size = rank_and_world()
        per_rank = config.train.mini_batch_size // self.world_size
        if per_rank * self.world_size != config.train.mini_batch_size:
            raise ConfigError(f"train.mini_batch_size: {config.train.mini_batch_size} prompts do not "
                              f"split evenly over {self.world_size} ranks")
        # before DeepSpeed partitions the policy: the engine starts from a full copy
        self.rollout = rollout_engine or build_rollout_engine(
            config, policy, self.tokenizer, self.device, self.output_dir)
        backend = None if config.train.loss_backend == "auto" else config.train.loss_backend
        module = PolicyWithFusedLoss(policy, config.loss, backend)
        optim = config.optim
        optimizer = torch.optim.AdamW(module.parameters(), lr=optim.lr, betas=optim.betas,
                                      eps=optim.eps, weight_decay=optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_lambda(config))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(config, bf16))
        self.step = 0

    # ------------------------------------------------------------------ one LUFFY step

    def prompt_batch(self, step: int) -> list[Sample]:
        """The step's prompts: a seeded draw, so a resumed run sees the same batches."""
        rng = random.Random(f"{self.config.train.seed}:{step}")
        picks = rng.sample(range(len(self.train_samples)), self.config.train.prompts_per_step)
        # data parallel: each rank takes its slice of every mini-batch
        mini = self.config.train.mini_batch_size
        share = mini // self.world_size
        mine = [picks[start + self.rank * share: start + (self.rank + 1) * share]
                for start in range(0, len(picks), mini)]
        return [self.train_samples[i] for chunk in mine for i in chunk]

    def training_step(self, step: int) -> dict:
        """One LUFFY step (LUFFY_SPEC.md section 1); returns the step's metrics."""
        config = self.config
        start = time.perf_counter()
        # 1. a batch of prompts, each with its ground truth and off-policy traces
        samples = self.prompt_batch(step)
        # 2. n_on on-policy rollouts per prompt
        completions = self.sample_rollouts(samples, step)
        rollout_seconds = time.perf_counter() - start
        # 3. mixed groups: the rollouts plus n_off traces appended as responses
        batch = assemble_groups(samples, completions, config.rollout.n_off)
        # 4. the verifiable reward of every member, traces included
        batch.rewards = score_responses(batch, samples, self.reward_fn, self.decode)
        # 5. group-normalized advantages over each mixed group
        batch.advantages = group_advantages(batch.rewards, batch.group_ids,
                                            use_std=config.algorithm.advantage_std)
        # 6. the mixed-policy loss over all response tokens, and the optimizer steps
        engine_metrics = {**getattr(self.rollout, "last_timings", {}),
                          **getattr(self.rollout, "last_metrics", {})}
        if hasattr(self.rollout, "sleep"):  # engines that can free device memory for the update
            self.rollout.sleep()
        token_weights, correction = self.rollout_correction(batch, completions)
        update = self.update_policy(batch, token_weights)
        # 7. the new weights to the rollout engine
        self.sync_rollout_weights()

        seconds = time.perf_counter() - start
        trained_tokens = sum(batch.sequence_length(i) for i in range(len(batch)))
        return {**self.batch_metrics(batch), **update, **correction, **engine_metrics,
                "rollout_seconds": rollout_seconds, "step_seconds": seconds,
                "tokens_per_second": trained_tokens / max(seconds, 1e-9),
                "peak_memory_mb": peak_memory_mb(self.device)}

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

    def rollout_correction(self, batch: RolloutBatch, completions: Sequence[Sequence[Completion]]
                           ) -> tuple[Optional[list[Optional[Tensor]]], dict]:
        """Gap between the engine's and the trainer's log-probs of the sampled tokens, and the
        truncated importance weights when rollout.tis_cap is set (luffy_fast.rollout.correction).

        Skipped for the transformers engine without a cap: it samples from an exact copy of the
        trainer's weights, so the gap is zero and the extra no-grad pass would be wasted.
        """
        cap = self.config.rollout.tis_cap
        if not completions or (cap is None and self.config.rollout.engine == "hf"):
            return None, {}
        behaviour = behaviour_logprobs(batch.off_policy.tolist(), batch.group_ids.tolist(),
                                       completions)
        sampled = [i for i, values in enumerate(behaviour) if values is not None]
        current, _ = self.compute_logprobs(batch, sampled)
        trainer = [current[i] if values is not None else None for i, values in enumerate(behaviour)]
        return rollout_correction(behaviour, trainer, cap)

    def update_policy(self, batch: RolloutBatch,
                      token_weights: Optional[list[Optional[Tensor]]] = None) -> dict:
        """Optimizer steps over the rollout batch's mini-batches, each split into micro-batches."""
        config = self.config
        groups_per_mini = config.train.mini_batch_size // self.world_size  # this rank's share
        num_minis = config.train.prompts_per_step // config.train.mini_batch_size
        old_logprobs = None
        if num_minis > 1 or config.algorithm.ppo_epochs > 1:
            old_logprobs = self.compute_logprobs(batch, range(len(batch)))[0]
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        extremes: dict[str, float] = {}
        for _ in range(config.algorithm.ppo_epochs):
            for mini in range(num_minis):
                in_mini = ((batch.group_ids >= mini * groups_per_mini)
                           & (batch.group_ids < (mini + 1) * groups_per_mini))
                indices = torch.nonzero(in_mini).flatten().tolist()
                for name, value in self.optimizer_step(batch, indices, old_logprobs,
                                                       token_weights).items():
                    totals[name] = totals.get(name, 0.0) + value
                    counts[name] = counts.get(name, 0) + 1
                    extremes[name] = (min if name == "ratio_min" else max)(
                        extremes.get(name, value), value)
        # means over the optimizer steps; the ratio's extremes over all of them
        result = {name: totals[name] / counts[name] for name in totals}
        result.update({name: extremes[name] for name in ("ratio_min", "ratio_max")
                       if name in extremes})
        return result

    def optimizer_step(self, batch: RolloutBatch, indices: Sequence[int],
                       old_logprobs: Optional[list[Tensor]],
                       token_weights: Optional[list[Optional[Tensor]]] = None) -> dict:
        """One optimizer step on a mini-batch (the sequences at `indices`)."""
        learning_rate = self.scheduler.get_last_lr()[0]
        result = self.accumulate_gradients(batch, indices, old_logprobs, token_weights)
        self.engine.step()
        result["learning_rate"] = learning_rate
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            result["grad_norm"] = float(grad_norm)
        return result

    def accumulate_gradients(self, batch: RolloutBatch, indices: Sequence[int],
                             old_logprobs: Optional[list[Tensor]],
                             token_weights: Optional[list[Optional[Tensor]]] = None) -> dict:
        """Forward and backward over a mini-batch's token-budget micro-batches.

        Each micro-batch's normalized loss is rescaled by its denominator over the mini-batch's
        (LUFFY_SPEC.md section 6), so the summed gradient does not depend on the split.
        """
        config = self.config
        denominator = loss_denominator(batch, indices, config.loss)
        if self.world_size > 1:
            # DeepSpeed averages gradients over ranks: normalize by the global denominator,
            # times the world size, so the update equals one process on the whole mini-batch
            total = torch.tensor([denominator], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(total)
            denominator = float(total) / self.world_size
        indices = self.sequences_with_gradient(batch, indices)
        plan = plan_micro_batches([batch.sequence_length(i) for i in indices],
                                  config.train.token_budget, padded=not self.engine.module.packed)
        sums: dict[str, float] = {"tokens": 0.0}
        extremes: dict[str, float] = {}
        loss_total = 0.0
        self.engine.train()
        for part in plan:
            micro = pack_micro_batch(batch, [indices[i] for i in part], old_logprobs)
            if token_weights is not None:  # TIS: A' = w * A on sampled tokens
                micro.advantages = weight_advantages(micro.advantages, micro.loss_mask,
                                                     micro.seq_ids, micro.sequence_indices,
                                                     token_weights)
            loss, stats = self.engine(micro.to(self.device))
            scaled = loss * (stats["denominator"].to(loss.dtype) / max(denominator, 1e-30))
            self.engine.backward(scaled)
            loss_total += float(scaled.detach())
            tokens = float(micro.loss_mask.sum())
            sums["tokens"] += tokens
            for name in ("logprob_mean", "entropy_mean", "clip_fraction", "ratio_mean"):
                if name in stats:
                    sums[name] = sums.get(name, 0.0) + float(stats[name]) * tokens
            extremes["ratio_min"] = min(extremes.get("ratio_min", math.inf), float(stats["ratio_min"]))
            extremes["ratio_max"] = max(extremes.get("ratio_max", -math.inf), float(stats["ratio_max"]))
        tokens = max(sums.pop("tokens"), 1.0)
        result = {"loss": loss_total, "micro_batches": len(plan), **extremes}
        result.update({name: value / tokens for name, value in sums.items()})  # token-weighted
        if "entropy_mean" in result:
            result["entropy"] = result.pop("entropy_mean")
        return result

    def sequences_with_gradient(self, batch: RolloutBatch, indices: Sequence[int]) -> list[int]:
        """Drop sequences whose loss gradient is exactly zero (advantage 0, no entropy bonus).

        They still count in the mini-batch's denominator, so the update is unchanged; a
        mini-batch left empty keeps its shortest sequence so every optimizer step sees a
        backward pass (its gradient is zero).
        """
        if self.config.loss.entropy_coef > 0:
            return list(indices)
        kept = [i for i in indices if float(batch.advantages[i]) != 0.0]
        if not kept and indices:
            kept = [min(indices, key=batch.sequence_length)]
        return kept

    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch, indices: Iterable[int],
                         with_entropy: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        """Per-response-token log-probs (and entropies) in one no-grad pass per micro-batch."""
        indices = list(indices)
        logprobs: list[Tensor] = [torch.empty(0)] * len(batch)
        entropies: list[Tensor] = [torch.empty(0)] * len(batch)
        plan = plan_micro_batches([batch.sequence_length(i) for i in indices],
                                  self.config.train.token_budget,
                                  padded=not self.engine.module.packed)
        was_training = self.engine.training
        self.engine.eval()
        for part in plan:
            micro = pack_micro_batch(batch, [indices[i] for i in part])
            values, entropy = self.engine(micro.to(self.device), logprobs_only=True,
                                          with_entropy=with_entropy)
            values, mask = values.float().cpu(), micro.loss_mask
            entropy = entropy.float().cpu() if entropy is not None else None
            for index in micro.sequence_indices:
                rows = mask & (micro.seq_ids == index)
                logprobs[index] = values[rows]
                if entropy is not None:
                    entropies[index] = entropy[rows]
        self.engine.train(was_training)
        return logprobs, entropies

    def sync_rollout_weights(self) -> None:
        """Step 7: the new weights to the rollout engine (ZeRO-3: gathered bucket by bucket)."""
        self.rollout.sync_weights(gathered_named_parameters(
            self.engine.module.policy, bucket_mb=self.config.rollout.vllm.sync_bucket_mb))

    # ------------------------------------------------------------------ metrics and evaluation

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    @staticmethod
    def batch_metrics(batch: RolloutBatch) -> dict:
        on, off = ~batch.off_policy, batch.off_policy
        rewards, advantages = batch.rewards, batch.advantages
        lengths = torch.tensor([len(r) for r in batch.response_ids], dtype=torch.float32)
        metrics = {
            "reward_on_policy": float(rewards[on].mean()) if on.any() else 0.0,
            "reward_off_policy": float(rewards[off].mean()) if off.any() else 0.0,
            "accuracy_on_policy": float((rewards[on] >= 1).float().mean()) if on.any() else 0.0,
            "advantage_mean": float(advantages.mean()),
            "advantage_std": float(advantages.std()) if len(advantages) > 1 else 0.0,
            "advantage_min": float(advantages.min()),
            "advantage_max": float(advantages.max()),
            "zero_advantage_fraction": float((advantages == 0).float().mean()),
            "response_length_on_policy": float(lengths[on].mean()) if on.any() else 0.0,
            "response_length_off_policy": float(lengths[off].mean()) if off.any() else 0.0,
            "truncated_fraction": float(1 - torch.tensor(batch.finished)[on].float().mean())
            if on.any() else 0.0,
        }
        return metrics

    def evaluate(self) -> dict:
        """Held-out accuracy (eval temperature; 0 = greedy) and the policy's mean token entropy
        on its own held-out responses."""
        if not self.heldout_samples:
            return {}
        config = self.config
        completions = self.rollout.generate(
            [s.prompt_ids for s in self.heldout_samples], n=1,
            params=SamplingParams(max_new_tokens=config.data.max_response_length,
                                  temperature=config.eval.temperature, top_p=config.eval.top_p,
                                  seed=config.train.seed))
        batch = assemble_groups(self.heldout_samples, completions, n_off=0)
        rewards = score_responses(batch, self.heldout_samples, self.reward_fn, self.decode)
        _, entropies = self.compute_logprobs(batch, range(len(batch)), with_entropy=True)
        entropy = torch.cat(entropies)
        return {"heldout_accuracy": float((rewards >= 1).float().mean()),
                "heldout_entropy": float(entropy.mean()) if entropy.numel() else 0.0}

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self, step: int) -> Path:
        """DeepSpeed state + transformers export + trainer state, published atomically: written
        to a temporary folder, renamed into place, then the `latest` pointer is replaced."""
        root = self.checkpoint_root
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:06d}"
        staging = root / f".staging-step-{step:06d}"
        if self.rank == 0 and staging.exists():
            shutil.rmtree(staging)
        if self.world_size > 1:
            torch.distributed.barrier()
        self.engine.save_checkpoint(str(staging), tag="deepspeed", save_latest=False)
        policy = self.engine.module.policy
        with _gathered(policy.parameters(), self.config.train.zero_stage):
            state = {name: tensor.detach().cpu().clone()
                     for name, tensor in policy.state_dict().items()}
        if self.rank == 0:
            policy.save_pretrained(staging / "hf", state_dict=state)
            self.tokenizer.save_pretrained(staging / "hf")
            (staging / "trainer_state.json").write_text(json.dumps(
                {"step": step, "config": self.config.to_dict()}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            _write_atomic(root / "latest", final.name + "\n")
            self._prune_checkpoints(keep=final.name)
        if self.world_size > 1:
            torch.distributed.barrier()
        return final

    def _prune_checkpoints(self, keep: str) -> None:
        saved = sorted(p for p in self.checkpoint_root.glob("step-*") if p.is_dir())
        for old in saved[:-self.config.output.keep_checkpoints]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Optional[Path]:
        pointer = self.checkpoint_root / "latest"
        if not pointer.exists():
            return None
        path = self.checkpoint_root / pointer.read_text().strip()
        return path if (path / "trainer_state.json").exists() else None

    def load_checkpoint(self, path: Path) -> int:
        load_path, _ = self.engine.load_checkpoint(str(path), tag="deepspeed")
        if load_path is None:
            raise RuntimeError(f"could not load the DeepSpeed state from {path}")
        state = json.loads((path / "trainer_state.json").read_text())
        self.sync_rollout_weights()
        return int(state["step"])

    # ------------------------------------------------------------------ the loop

    def train(self, resume: bool = False) -> list[dict]:
        """Run to train.steps; with resume, continue from the latest checkpoint if any.

        Every rank trains on its share of each step's prompts; rank 0 logs its metrics, shows
        the progress bar and publishes checkpoints.
        """
        from tqdm.auto import tqdm

        config = self.config
        start_step = 0
        if resume:
            latest = self.latest_checkpoint()
            if latest is not None:
                start_step = self.load_checkpoint(latest)
        lead = self.rank == 0
        logger = None
        if lead:
            (self.output_dir / "config.yaml").write_text(_to_yaml(config.to_dict()))
            logger = MetricsLogger(self.output_dir, config.output.tensorboard, resume_step=start_step)
        history = []
        bar = tqdm(range(start_step, config.train.steps), initial=start_step,
                   total=config.train.steps, disable=not (config.output.progress_bar and lead),
                   desc=self.output_dir.name, dynamic_ncols=True)
        try:
            if start_step == 0 and config.eval.every:
                evaluation = {"step": 0, **self.evaluate()}
                if logger:
                    logger.log(evaluation)
            for step in bar:
                metrics = {"step": step + 1, **self.training_step(step)}
                self.step = step + 1
                last = self.step == config.train.steps
                if config.eval.every and (self.step % config.eval.every == 0 or last):
                    metrics.update(self.evaluate())
                if logger:
                    logger.log(metrics)
                history.append(metrics)
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in
                                 ("reward_on_policy", "loss", "heldout_accuracy") if k in metrics})
                if (config.output.save_every and self.step % config.output.save_every == 0) \
                        or last:
                    self.save_checkpoint(self.step)
        finally:
            bar.close()
            if logger:
                logger.close()
        return history

    def close(self) -> None:
        self.rollout.close()


def _to_yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)

