"""`rollout.engine` -> a RolloutEngine: the one place that knows every engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from luffy_fast.rollout.base import RolloutEngine
from luffy_fast.run_files import rank_and_world


def build_rollout_engine(config, policy: nn.Module, tokenizer, device: torch.device,
                         work_dir: str | Path) -> RolloutEngine:
    """The engine that `config.rollout.engine` names, over `policy`'s weights.

    config: a LuffyTrainConfig. Call it before DeepSpeed partitions the policy (ZeRO-3): the hf
    engine shares the policy module below ZeRO-3 and copies it at ZeRO-3; the vLLM engine
    starts from the policy saved with save_pretrained under `work_dir`, and after
    torch.distributed is initialized, so that an in-process vLLM joins the trainer's ranks
    instead of creating its own.
    """
    rollout = config.rollout
    if rollout.engine == "hf":  # the policy itself below ZeRO-3, else a copy (rollout/hf.py)
        from luffy_fast.rollout.hf import trainer_hf_engine

        return trainer_hf_engine(policy, tokenizer, device, config.train.zero_stage,
                                 bf16=config.model.trains_in_bf16(device),
                                 max_batch_size=rollout.max_batch_size)
    if rollout.engine == "vllm":
        from luffy_fast.rollout.vllm import VLLMRolloutEngine

        options = vllm_options(config, device)
        model_dir = Path(work_dir) / "rollout_model"
        model_dir.mkdir(parents=True, exist_ok=True)
        policy.save_pretrained(model_dir)  # transformers writes on rank 0 only
        tokenizer.save_pretrained(model_dir)
        if rank_and_world()[1] > 1:
            torch.distributed.barrier()  # the other ranks' engines read rank 0's files
        return VLLMRolloutEngine(model_dir, options, seed=config.train.seed, device=device)
    raise ValueError(f"rollout.engine: unknown engine {rollout.engine!r} (choose hf or vllm)")


def vllm_options(config, device: torch.device):
    """`rollout.vllm` with its automatic values filled in: the window, the prompt and response
    limits; on a GPU the dtype, the trainer's precision (bf16 or fp32: an fp32 policy sampled in
    bf16 would not be the policy trained, and the rollout-correction gap would grow)."""
    options = config.rollout.vllm
    if options.max_model_len is None:
        options = dataclasses.replace(options, max_model_len=config.data.max_prompt_length
                                      + config.data.max_response_length)
    if options.dtype == "auto" and device.type == "cuda":
        dtype = "bfloat16" if config.model.trains_in_bf16(device) else "float32"
        options = dataclasses.replace(options, dtype=dtype)
    return options
