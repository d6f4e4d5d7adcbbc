"""Process group, device, DeepSpeed engine (ZeRO stage, precision, AdamW) and the LR schedule.

One process without a launcher trains in a world of one (gloo on the CPU); under the `deepspeed`
launcher every rank takes its share of each mini-batch (docs/design.md §The trainer).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Callable, Iterable
from typing import Optional

import torch
from torch import nn

from luffy_fast.errors import ConfigError
from luffy_fast.run_files import launched_world_size, rank_and_world, warn_at_start
from luffy_fast.train_config import LuffyTrainConfig


def join_process_group(device_type: str, attempts: int = 5) -> None:
    """Join the launcher's process group (nccl on CUDA, gloo elsewhere), or start a world of one
    process on a free local port. A port found free can be taken by another process before the
    store binds it (busy machines, parallel tests): a world of one then retries on a new port."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    launched = "RANK" in os.environ
    for attempt in range(1 if launched else attempts):
        if not launched:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        try:
            deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                                       verbose=False)
            return
        except RuntimeError as error:  # torch's DistNetworkError is a RuntimeError
            in_use = "EADDRINUSE" in str(error) or "address already in use" in str(error)
            if launched or not in_use or attempt == attempts - 1:
                raise
            for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(name, None)


def init_distributed(device_type: str, config: LuffyTrainConfig) -> tuple[int, int]:
    """Join (or start) the process group; returns (rank, world size). One process without a
    launcher gets a world of size one; the `deepspeed` launcher's environment is used as is."""
    join_process_group(device_type)
    rank, world_size = rank_and_world()
    check_world_size(config, world_size)
    return rank, world_size


def check_world_size(config: LuffyTrainConfig, world_size: Optional[int] = None) -> None:
    """Every rank takes an equal share of each mini-batch's prompts; `world_size` defaults to
    the launcher's WORLD_SIZE (a launched process: RANK set, as join_process_group reads it),
    so that a launched run can check before loading anything."""
    world_size = world_size or (launched_world_size() if "RANK" in os.environ else 1)
    if config.train.mini_batch_size % world_size:
        raise ConfigError(f"train.mini_batch_size: {config.train.mini_batch_size} prompts do not "
                          f"split evenly over {world_size} ranks")


def training_device(config: LuffyTrainConfig,
                    device: Optional[torch.device] = None) -> tuple[torch.device, bool]:
    """This rank's device (its LOCAL_RANK's GPU, else the CPU) and whether it trains in bf16."""
    device = device or (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                        if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cpu" and config.train.cpu_threads:
        torch.set_num_threads(config.train.cpu_threads)
    check_loss_backend(config, device)
    return device, config.model.trains_in_bf16(device)


def check_loss_backend(config: LuffyTrainConfig, device: torch.device) -> None:
    """Before any loading: the loss backend this run gets can run here and takes its options (a
    triton backend off CUDA, or the gradient filter elsewhere, failed after the first
    validation, leaving a run folder that needed --overwrite)."""
    from luffy_fast.ops import default_backend

    backend = config.train.loss_backend
    if backend == "auto":
        backend = default_backend(device)
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"train.loss_backend: 'triton' needs a CUDA device; this run trains on "
                          f"{device.type} (use 'torch' or 'auto')")
    if config.loss.grad_filter is not None and backend != "triton":
        raise ConfigError(f"loss.grad_filter: the gradient filter is an option of the triton "
                          f"backend, and this run's loss runs on the {backend!r} backend "
                          f"(train.loss_backend={config.train.loss_backend!r} on {device.type})")


def learning_rate_lambda(config: LuffyTrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to min_lr_ratio over the remaining steps.

    After the warm-up this is transformers' get_cosine_with_min_lr_schedule_with_warmup (tested
    equal), but its warm-up starts at 0, so the first optimizer step would not move the weights;
    here step k of the warm-up runs at (k + 1) / warmup_steps of the peak, as in every run so far.
    """
    optim = config.optim
    total = config.train.steps * config.optimizer_steps_per_rollout()
    if optim.warmup_steps > total:  # a short trial run of a real recipe, say: not an error
        warn_at_start(f"optim.warmup_steps: {optim.warmup_steps} is more than the run's {total} "
                      f"optimizer steps: the learning rate never reaches optim.lr "
                      f"({optim.warmup_steps / total:.3g} x the steps are warm-up)")

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


def build_engine(module: nn.Module, config: LuffyTrainConfig, bf16: bool):
    """The DeepSpeed engine over `module` with a torch AdamW (no CPU-Adam build) and the LR
    schedule; returns (engine, scheduler)."""
    import deepspeed

    from luffy_fast.nonfinite import CheckedAdamW

    optim = config.optim
    options = dict(lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    ds_config = deepspeed_config(config, bf16)
    if config.train.zero_stage == 0 and not bf16:
        # DeepSpeed steps this optimizer as is: it clips, reports the gradient norm and skips
        # non-finite steps itself, as DeepSpeed's own optimizers do (docs/robustness.md)
        optimizer = CheckedAdamW(module.parameters(), max_norm=optim.grad_clip, **options)
        ds_config["gradient_clipping"] = 0.0
    else:
        optimizer = torch.optim.AdamW(module.parameters(), **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_lambda(config))
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, scheduler


def release_engine(engine) -> None:
    """Lets the engine, the policy and its optimizer states be freed once the caller drops
    them. DeepSpeed (0.19) holds them past the last reference in three places: ZeRO-1/2/3's
    gradient hooks, from C++ out of the garbage collector's reach, until `destroy()` removes
    them; ZeRO-3's module-level forward stack, which keeps the policy (and, after a forward cut
    short, its submodules); and ZeRO-3's class-wide cache of the parameters each submodule
    releases, keyed on the policy's modules from the second step on. Without this a second
    trainer in one process (a notebook, a sweep, the demo's runs) finds the first one's memory
    still taken."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import (
        PartitionedParameterCoordinator,
    )

    engine.destroy()
    ours = {id(module) for module in engine.module.modules()}
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [module for module in stack if id(module) not in ours]
    # an lru_cache under DeepSpeed's NVTX wrapper, which keeps no __wrapped__: found in its closure
    cached = getattr(PartitionedParameterCoordinator,
                     "_PartitionedParameterCoordinator__params_to_release", None)
    for cell in getattr(cached, "__closure__", None) or ():
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def apply_optimizer_settings(engine, scheduler, optim) -> None:
    """A resumed run's `optim` settings (learning rate, betas, eps, weight decay, gradient
    clipping) over those the checkpoint restored with the optimizer and LR-schedule states, so
    that a change on --resume takes effect (the schedule's position is kept; its shape is the
    config's already)."""
    if hasattr(engine.optimizer, "clip_grad"):  # ZeRO-1/2 and bf16 wrappers restore their own
        engine.optimizer.clip_grad = optim.grad_clip
    groups = scheduler.optimizer.param_groups  # the torch AdamW that steps, under any ZeRO wrapper
    for group in groups:
        group.update(betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
                     initial_lr=optim.lr)
    scheduler.base_lrs = [optim.lr] * len(groups)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in groups:
        group["lr"] = optim.lr * factor
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports


def gathered_parameters(parameters: Iterable[nn.Parameter], zero_stage: int):
    """A context in which ZeRO-3 parameters are whole (read-only); a no-op below stage 3."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(parameters), modifier_rank=None)


def lockstep_counts(zero_stage: int, world_size: int,
                    device: torch.device) -> Optional[Callable[[int], int]]:
    """ZeRO-3 over several ranks gathers the parameters in every forward and backward on all
    ranks together, so each pass over micro-batches must have as many on every rank: a function
    from this rank's count to the largest of any rank (an all-reduce), for micro_batches'
    `lockstep`; None where the counts may differ (ZeRO-0/1/2 reduce only in step())."""
    if zero_stage != 3 or world_size == 1:
        return None

    def largest(count: int) -> int:
        value = torch.tensor([count], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return int(value)

    return largest


def all_reduce_sum(value: float, device: torch.device) -> float:
    """The sum of `value` over all ranks (float64)."""
    total = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total)
