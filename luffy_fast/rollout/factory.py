"""`rollout.engine` -> a RolloutEngine: the one place that knows every engine."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from luffy_fast.rollout.base import RolloutEngine


def build_rollout_engine(config, policy: nn.Module, tokenizer, device: torch.device,
                         work_dir: str | Path) -> RolloutEngine:
    """The engine that `config.rollout.engine` names, holding a copy of `policy`'s weights.

    config: a LuffyTrainConfig. Call it before DeepSpeed partitions the policy (ZeRO-3): the
    vLLM engine starts from the policy saved with save_pretrained under `work_dir`, and after
    torch.distributed is initialized, so that an in-process vLLM joins the trainer's ranks
    instead of creating its own.
    """
    rollout = config.rollout
    if rollout.engine == "hf":
        from luffy_fast.rollout.hf import HFGenerateEngine

        return HFGenerateEngine(copy.deepcopy(policy).to(device),
                                pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id,
                                max_batch_size=rollout.max_batch_size)
    if rollout.engine == "vllm":
        from luffy_fast.rollout.vllm import VLLMRolloutEngine

        options = rollout.vllm
        if options.max_model_len is None:
            options = dataclasses.replace(
                options, max_model_len=config.data.max_prompt_length
                + config.data.max_response_length)
        model_dir = Path(work_dir) / "rollout_model"
        model_dir.mkdir(parents=True, exist_ok=True)
        policy.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        return VLLMRolloutEngine(model_dir, options, seed=config.train.seed, device=device)
    raise ValueError(f"rollout.engine: unknown engine {rollout.engine!r} (choose hf or vllm)")
