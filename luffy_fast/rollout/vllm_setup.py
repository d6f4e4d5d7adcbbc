"""vLLM's side of the rollout engine (luffy_fast.rollout.vllm): the `LLM(...)` arguments, the
functions that run inside the engine's workers, the CPU weight-layout patch, and the clean-up of
vLLM's process groups. Nothing here imports vLLM at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from luffy_fast.rollout.vllm_config import VLLMConfig


class VLLMStartupError(RuntimeError):
    """The vLLM engine could not start; the message names the cause."""


# --------------------------------------------------------------------------- CPU weight layout

def keep_cpu_linear_weights_unpacked() -> None:
    """Make vLLM's CPU backend compute linear layers with `F.linear` on their own weight.

    Applies to engines created afterwards in this process (the dispatch runs while loading).
    3-D weights (MoE experts, convolutions) keep vLLM's own handling.
    """
    import vllm.model_executor.layers.utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "keeps_weights_unpacked", False):
        return

    def dispatch_keeping_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:
            original(layer, remove_weight)
            return
        layer.cpu_linear = torch.nn.functional.linear  # called as (x, layer.weight, bias)

    dispatch_keeping_weight.keeps_weights_unpacked = True  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight


# --------------------------------------------------------------------------- worker side

def load_weights_on_worker(worker: Any, weights: list[tuple[str, Any]], ipc: bool) -> set[str]:
    """Runs on each vLLM worker: load (name, tensor) pairs, or (name, CUDA IPC handle) pairs,
    into its model. Returns the names of the engine parameters written."""
    if ipc:
        weights = [(name, rebuild(*args)) for name, (rebuild, args) in weights]
    loaded = worker.model_runner.model.load_weights(weights=iter(weights))
    return set(loaded) if loaded is not None else set()


def engine_parameter_names(worker: Any) -> set[str]:
    return {name for name, _ in worker.model_runner.model.named_parameters()}


def cuda_ipc_handle(tensor: torch.Tensor) -> tuple:
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(tensor.contiguous())


def engine_kwargs(config: VLLMConfig, model_path: Path, seed: int, on_cpu: bool,
                  sleep_level: int) -> dict:
    """vLLM `LLM(...)` arguments for the options, on this device and process group."""
    dtype = config.dtype
    if dtype == "auto":
        dtype = "float32" if on_cpu else "bfloat16"
    utilization = config.gpu_memory_utilization
    if utilization is None:
        utilization = 0.1 if on_cpu else 0.5
    kwargs = dict(
        model=str(model_path), dtype=dtype, seed=seed,
        logprobs_mode="processed_logprobs",
        gpu_memory_utilization=utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=on_cpu or config.enforce_eager,
        enable_prefix_caching=config.enable_prefix_caching,
        enable_sleep_mode=sleep_level > 0,
    )
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    world = torch.distributed.get_world_size() \
        if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
    if world > 1:
        if config.tensor_parallel_size != 1:
            raise VLLMStartupError(
                "rollout.vllm.tensor_parallel_size: with several training ranks each rank "
                "runs its own engine in-process, so it must be 1 "
                f"(got {config.tensor_parallel_size})")
        kwargs["distributed_executor_backend"] = "external_launcher"  # reuse our ranks
    elif config.tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "mp"
    return kwargs


def destroy_vllm_process_groups(world: bool) -> None:
    """vLLM's own groups; the default process group too when vLLM created it (a trainer that
    initialized it first keeps it)."""
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    except ImportError:
        return
    destroy_model_parallel()
    if world:
        destroy_distributed_environment()
