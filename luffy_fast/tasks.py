"""Tasks: what the policy learns. A task owns its data and its reward, so the trainer never
special-cases one (docs/design.md §Tasks).

    class MyTask(Task):
        def train_samples(self, tokenizer): ...       # prompts, ground truth, off-policy traces
        def reward(self, response, sample): ...       # 1.0 correct, 0.0 wrong
    # train with data.task=my_package.my_module:MyTask

A task is built from the run's config (`Task(config)`) and loaded by name from `data.task`:
"toy" (the demo's digit reversal, luffy_fast/toy/), "math" (the official layout from Parquet,
JSONL or a folder of shards, math-verify; below) or a user's "package.module:Class". Unless it
builds its own tokenizer and policy (`components`, used when model.path is "toy"), they come
from the model.path directory.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import torch

from luffy_fast.data import DataLimits, DataReport, Sample, load_samples
from luffy_fast.data_files import DataError
from luffy_fast.errors import ConfigError
from luffy_fast.model_loading import load_model_tokenizer, load_policy
from luffy_fast.rewards import MathVerifyReward, RewardFunction
from luffy_fast.run_files import say_at_start
from luffy_fast.train_config import LuffyTrainConfig

BUILT_IN_TASKS = {"toy": "luffy_fast.toy.task:ToyTask", "math": "luffy_fast.tasks:MathTask"}


class Task:
    """Training and held-out samples, a verifiable reward, optionally a tokenizer and policy."""

    # what loading the training data did (kept, skipped, truncated), when the task reports it
    data_report: Optional[DataReport] = None

    def __init__(self, config: LuffyTrainConfig) -> None:
        self.config = config

    def components(self) -> tuple | None:
        """(tokenizer, policy) built by the task itself (when model.path is "toy"), or None:
        load them from model.path."""
        return None

    def train_samples(self, tokenizer) -> list[Sample]:
        """The prompts to train on, tokenized, with ground truth and off-policy traces."""
        raise NotImplementedError

    def heldout_samples(self, tokenizer) -> list[Sample]:
        """Problems for the held-out accuracy (never trained on); none by default."""
        return []

    def reward(self, response: str, sample: Sample) -> float:
        """The verifiable reward of one decoded response to `sample`'s prompt."""
        raise NotImplementedError

    # Reward processes when reward.workers is unset (luffy_fast/reward_pool.py): None, one per
    # CPU core; 0, in the trainer's process (cheap, trusted rewards: no process start-up).
    reward_workers: int | None = None

    def reward_function(self) -> RewardFunction:
        """What the reward pool calls; it must pickle when the pool has worker processes
        (default: the bound `reward`, which pickles the task with it)."""
        return self.reward


class MathTask(Task):
    """LUFFY's math data: OpenR1-Math JSONL at data.source (held-out: data.heldout_source),
    scored by math-verify after "</think>"."""

    def __init__(self, config: LuffyTrainConfig) -> None:
        super().__init__(config)
        self._reward = MathVerifyReward()

    def _load(self, path: str, tokenizer, key: str) -> tuple[list[Sample], DataReport]:
        data = self.config.data
        limits = DataLimits(data.max_prompt_length, data.max_response_length, data.trace_overflow)
        cache = data_cache_dir(self.config)
        if cache is None:
            return load_samples(path, tokenizer, limits, key=key)
        from luffy_fast.data_cache import load_cached_samples

        return load_cached_samples(path, tokenizer, limits, cache, key=key)

    def train_samples(self, tokenizer) -> list[Sample]:
        samples, self.data_report = self._load(self.config.data.source, tokenizer, "data.source")
        return samples

    def heldout_samples(self, tokenizer) -> list[Sample]:
        source = self.config.data.heldout_source
        if not source:
            return []
        from luffy_fast.eval_data import heldout_record

        data = self.config.data
        limits = DataLimits(data.max_prompt_length, data.max_response_length)
        samples, report = load_samples(source, tokenizer, limits, record=heldout_record,
                                       key="data.heldout_source")  # official or benchmark layout
        skipped = len(report.skipped_prompts)
        if skipped and not samples:
            raise DataError(f"data.heldout_source: every one of the {skipped} held-out problems "
                            f"of {source} is longer than data.max_prompt_length "
                            f"({data.max_prompt_length} tokens with the chat template)")
        kept = evenly_spread(samples, self.config.eval.num_problems)
        if skipped or len(kept) < len(samples):
            say_at_start(f"held-out data {source}: {report.rows} rows, {skipped} skipped (prompt "
                         f"too long); validating on {len(kept)} of the {len(samples)} left, "
                         f"evenly spread (eval.num_problems; null: all)")
        return kept

    def reward(self, response: str, sample: Sample) -> float:
        return self._reward(response, sample)

    def reward_function(self) -> RewardFunction:
        return self._reward  # pickles without the task's data


def evenly_spread(items: Sequence, count: Optional[int]) -> list:
    """`count` of `items` at evenly spaced positions, in order (all of them for None or a count
    at least their number): a file ordered by source keeps each source's share, where its first
    rows would drop the last sources."""
    if count is None or count >= len(items):
        return list(items)
    return [items[index * len(items) // count] for index in range(count)]


def load_task_data(task: Task, tokenizer, config: LuffyTrainConfig) -> tuple[list[Sample], list[Sample]]:
    """A run's training samples (checked) and held-out samples. What loading the training data
    did (`task.data_report`) is the run's start-up line, from rank 0."""
    samples = task.train_samples(tokenizer)
    if task.data_report is not None:
        say_at_start(f"training data {task.data_report.summary()}")
    check_samples(samples, config)
    return samples, task.heldout_samples(tokenizer)


def load_task(config: LuffyTrainConfig) -> Task:
    """The task `data.task` names, built from `config`."""
    name = config.data.task_name
    module_name, _, class_name = BUILT_IN_TASKS.get(name, name).partition(":")
    try:
        task_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"data.task: cannot load {name!r} ({error})") from None
    if not (isinstance(task_class, type) and issubclass(task_class, Task)):
        raise ConfigError(f"data.task: {name!r} is not a luffy_fast.tasks.Task subclass")
    return task_class(config)


def data_cache_dir(config: LuffyTrainConfig) -> Optional[Path]:
    """Where tokenized data are cached: data.cache_dir, else $LUFFY_FAST_CACHE or
    ~/.cache/luffy_fast (by $XDG_CACHE_HOME), under data/; None when data.cache_dir is ""."""
    if config.data.cache_dir is not None:
        return Path(config.data.cache_dir) if config.data.cache_dir else None
    root = os.environ.get("LUFFY_FAST_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "luffy_fast"
    return Path(root) / "data"


def prepare_components(task: Task, config: LuffyTrainConfig) -> tuple[object, Callable[[], object]]:
    """The tokenizer now, and a function that loads the policy: the data are read and checked
    in between, so a bad row fails before any weight is read. Both come from the task when
    model.path is "toy", else from the model.path directory (luffy_fast/model_loading.py)."""
    if config.model.path == "toy":
        components = task.components()
        if components is None:
            raise ConfigError(f"model.path: 'toy' needs a task that builds its own policy; "
                              f"data.task={config.data.task_name!r} does not")
        tokenizer, policy = components
        return tokenizer, lambda: policy
    from luffy_fast.model_loading import check_attention, model_config

    model_config(config.model)  # model.path checked (and its config read) before the data
    check_attention(config.model)
    return load_model_tokenizer(config.model), lambda: load_policy(config.model, torch.float32)



def check_samples(samples: Sequence[Sample], config: LuffyTrainConfig) -> None:
    """Enough training prompts for a step, each with the traces the groups need, and every
    sequence within the token budget: checked from the data at start-up, not after rollouts."""
    source = config.data.source
    if not samples:
        raise ConfigError(f"data.source: no training prompts in {source!r} (empty, or every "
                          f"prompt is longer than data.max_prompt_length="
                          f"{config.data.max_prompt_length})")
    if len(samples) < config.train.prompts_per_step:
        raise ConfigError(f"train.prompts_per_step: {config.train.prompts_per_step} prompts "
                          f"per step but only {len(samples)} training prompts")
    if config.rollout.n_off:
        bare = [s.where or f"sample {i}" for i, s in enumerate(samples) if not s.traces]
        if bare:
            shown = ", ".join(bare[:5]) + (", ..." if len(bare) > 5 else "")
            raise ConfigError(f"data.source: {len(bare)} of {len(samples)} training prompts have "
                              f"no off-policy trace, but rollout.n_off={config.rollout.n_off} "
                              f"needs one each: {shown} (add a 'target' to those rows, remove "
                              f"them, or set rollout.n_off=0)")
    if any(len(t) > config.data.max_response_length for s in samples for t in s.traces):
        raise ConfigError(f"data.max_response_length: a training sample has a trace longer "
                          f"than {config.data.max_response_length} tokens")
    response = config.data.max_response_length if config.rollout.n_on else 0
    longest, where = max((len(s.prompt_ids) + max([response, *map(len, s.traces)]),
                          s.where or f"sample {i}") for i, s in enumerate(samples))
    if longest > config.train.token_budget:
        raise ConfigError(f"train.token_budget: {config.train.token_budget} tokens per "
                          f"micro-batch, but the longest sequence is {longest} tokens (the prompt "
                          f"of {where} + a response of up to data.max_response_length="
                          f"{config.data.max_response_length}); raise train.token_budget to at "
                          f"least {longest}")
