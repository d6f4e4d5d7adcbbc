"""Tasks: what the policy learns. A task owns its data and its reward, so the trainer never
special-cases one (docs/design.md §Tasks).

    class MyTask(Task):
        def train_samples(self, tokenizer): ...       # prompts, ground truth, off-policy traces
        def reward(self, response, sample): ...       # 1.0 correct, 0.0 wrong
    # train with data.task=my_package.my_module:MyTask

A task is built from the run's config (`Task(config)`) and loaded by name from `data.task`:
"toy" (the demo's digit reversal, luffy_fast/toy/), "math" (OpenR1-Math JSONL + math-verify,
below) or a user's "package.module:Class". Unless it builds its own tokenizer and policy
(`components`, used when model.path is "toy"), they come from the model.path directory.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch

from luffy_fast.data import Sample, load_jsonl_samples, load_tokenizer
from luffy_fast.errors import ConfigError
from luffy_fast.rewards import MathVerifyReward
from luffy_fast.train_config import LuffyTrainConfig

BUILT_IN_TASKS = {"toy": "luffy_fast.toy.task:ToyTask", "math": "luffy_fast.tasks:MathTask"}


class Task:
    """Training and held-out samples, a verifiable reward, optionally a tokenizer and policy."""

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


class MathTask(Task):
    """LUFFY's math data: OpenR1-Math JSONL at data.source (held-out: data.heldout_source),
    scored by math-verify after "</think>"."""

    def __init__(self, config: LuffyTrainConfig) -> None:
        super().__init__(config)
        self._reward = MathVerifyReward()

    def _load(self, path: str, tokenizer) -> list[Sample]:
        data = self.config.data
        return load_jsonl_samples(path, tokenizer, data.max_prompt_length,
                                  data.max_response_length)

    def train_samples(self, tokenizer) -> list[Sample]:
        return self._load(self.config.data.source, tokenizer)

    def heldout_samples(self, tokenizer) -> list[Sample]:
        source = self.config.data.heldout_source
        return self._load(source, tokenizer)[:self.config.eval.num_problems] if source else []

    def reward(self, response: str, sample: Sample) -> float:
        return self._reward(response, sample)


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


def load_components(task: Task, config: LuffyTrainConfig) -> tuple:
    """The task's tokenizer and policy (model.path "toy"), or those of the model.path directory."""
    if config.model.path == "toy":
        components = task.components()
        if components is None:
            raise ConfigError(f"model.path: 'toy' needs a task that builds its own policy; "
                              f"data.task={config.data.task_name!r} does not")
        return components
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(
        config.model.path, dtype=torch.float32, attn_implementation=config.model.attn_implementation)
    return load_tokenizer(config.model.path), policy


def check_samples(samples: Sequence[Sample], config: LuffyTrainConfig) -> None:
    """Enough training prompts for a step, each with the traces the groups need."""
    if not samples:
        raise ConfigError("data.source: no training prompts")
    if len(samples) < config.train.prompts_per_step:
        raise ConfigError(f"train.prompts_per_step: {config.train.prompts_per_step} prompts "
                          f"per step but only {len(samples)} training prompts")
    for i, sample in enumerate(samples):
        if config.rollout.n_off and not sample.traces:
            raise ValueError(f"training sample {i} has no off-policy trace, but "
                             f"rollout.n_off={config.rollout.n_off}")
        if any(len(t) > config.data.max_response_length for t in sample.traces):
            raise ConfigError(f"data.max_response_length: training sample {i} has a trace "
                              f"longer than {config.data.max_response_length} tokens")
