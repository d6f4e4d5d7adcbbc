"""Starting and stopping vLLM in the trainer's process (luffy_fast/rollout/vllm_setup.py) without
an engine: the `LLM(...)` arguments, the environment, what start-up may change in the process and
is put back, the prompts an engine's ranks gather, and which process groups teardown destroys."""

import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import luffy_fast.rollout.vllm_setup as vllm_setup
from luffy_fast.rollout.vllm_config import VLLMConfig
from luffy_fast.rollout.vllm_setup import (
    EngineLayout,
    VLLMStartupError,
    engine_kwargs,
    engine_layout,
    gather_engine_prompts,
)

WORKER = "luffy_fast.rollout.vllm_worker.LuffyWorkerExtension"


def test_engine_arguments_carry_every_option_and_the_device_defaults():
    one = EngineLayout(1, 0, 1)
    gpu = engine_kwargs(VLLMConfig(), Path("/m"), 3, False, 2, one)
    assert gpu == dict(model="/m", dtype="bfloat16", seed=3, logprobs_mode="processed_logprobs",
                       gpu_memory_utilization=0.5, tensor_parallel_size=1, enforce_eager=False,
                       enable_prefix_caching=True, enable_sleep_mode=True,
                       worker_extension_cls=WORKER)
    # on the CPU: fp32, a tenth of the RAM for the KV cache, always eager, no sleep mode
    cpu = engine_kwargs(VLLMConfig(), Path("/m"), 3, True, 0, one)
    assert cpu == dict(gpu, dtype="float32", gpu_memory_utilization=0.1, enforce_eager=True,
                       enable_sleep_mode=False)
    options = VLLMConfig(tensor_parallel_size=2, gpu_memory_utilization=0.3, dtype="float16",
                         max_model_len=64, enforce_eager=True, enable_prefix_caching=False)
    set_by_hand = engine_kwargs(options, Path("/m"), 3, False, 1, EngineLayout(1, 0, 2))
    assert set_by_hand == dict(gpu, dtype="float16", gpu_memory_utilization=0.3,
                               tensor_parallel_size=2, enforce_eager=True,
                               enable_prefix_caching=False, max_model_len=64,
                               distributed_executor_backend="mp")


def test_one_training_rank_runs_any_tensor_parallel_size():
    # without a process group: rank 0 of 1, vLLM's worker processes take the TP ranks
    layout = engine_layout(VLLMConfig(tensor_parallel_size=3))
    assert layout == EngineLayout(world=1, rank=0, tensor_parallel=3)
    assert layout.backend == "mp"


ENVIRONMENT = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_WORKER_MULTIPROC_METHOD", "RANK",
               "LOCAL_RANK", "VLLM_CPU_OMP_THREADS_BIND")


@pytest.mark.parametrize("layout, device, on_cpu, rank, local_rank, bind", [
    (EngineLayout(1, 0, 1), "cpu", True, None, None, None),
    (EngineLayout(1, 0, 2), "cpu", True, None, None, "nobind"),  # spawned CPU workers
    (EngineLayout(1, 0, 2), "cuda", False, None, None, None),
    (EngineLayout(4, 3, 2), "cuda:1", False, "3", "1", None),  # the device this rank trains on
    (EngineLayout(4, 3, 2), "cpu", True, "3", "3", None),  # in-process on the CPU: binds as is
])
def test_environment_for_each_layout(monkeypatch, layout, device, on_cpu, rank, local_rank, bind):
    pytest.importorskip("vllm")
    for name in ENVIRONMENT:
        monkeypatch.setenv(name, "unset")  # monkeypatch puts every one back afterwards
        monkeypatch.delenv(name)
    vllm_setup.prepare_environment(layout, on_cpu, torch.device(device))
    assert [os.environ.get(name) for name in ENVIRONMENT] == ["0", "spawn", rank, local_rank, bind]


def test_an_environment_cached_by_a_previous_engine_is_read_again(monkeypatch):
    envs = pytest.importorskip("vllm.envs")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    envs.enable_envs_cache()  # what a started engine does
    try:
        assert envs.VLLM_ENABLE_V1_MULTIPROCESSING
        vllm_setup.prepare_environment(EngineLayout(1, 0, 1), True, torch.device("cpu"))
        assert not envs.VLLM_ENABLE_V1_MULTIPROCESSING
    finally:
        envs.disable_envs_cache()


class ReseedingLLM:
    """What vLLM's start-up does to the process it runs in: reseeds random, numpy and torch,
    pins torch's threads, disables torch.set_num_threads and sets OMP_NUM_THREADS."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        torch.set_num_threads(1)
        torch.set_num_threads = lambda threads: None
        os.environ["OMP_NUM_THREADS"] = "1"


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


@pytest.mark.parametrize("omp_threads", [None, "3"])
def test_start_up_leaves_random_state_and_threads_as_they_were(monkeypatch, omp_threads):
    vllm = pytest.importorskip("vllm")
    monkeypatch.setattr(vllm, "LLM", ReseedingLLM, raising=False)
    monkeypatch.setattr(torch, "set_num_threads", torch.set_num_threads)  # back even if broken
    monkeypatch.setenv("OMP_NUM_THREADS", "unset")
    if omp_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS")
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp_threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        expected = draws()
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        llm = vllm_setup.start_llm({"model": "/m"}, torch.device("cpu"), keep_default_group=False)
        assert llm.kwargs == {"model": "/m"}
        assert draws() == expected
        assert torch.get_num_threads() == 2
        assert os.environ.get("OMP_NUM_THREADS") == omp_threads
        torch.set_num_threads(3)  # the trainer can set it again
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("error, hint", [
    (ValueError("No available memory for the cache blocks."),
     " — not enough memory for the model and its KV cache: raise "
     "rollout.vllm.gpu_memory_utilization or lower rollout.vllm.max_model_len"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     " — not enough memory for the model and its KV cache: raise "
     "rollout.vllm.gpu_memory_utilization or lower rollout.vllm.max_model_len"),
    (RuntimeError("Engine core initialization failed."), ""),
])
def test_a_failed_start_destroys_vllms_groups_and_names_model_and_cause(monkeypatch, error, hint):
    vllm = pytest.importorskip("vllm")

    def failing(**kwargs):
        raise error

    monkeypatch.setattr(vllm, "LLM", failing, raising=False)
    destroyed = []
    monkeypatch.setattr(vllm_setup, "destroy_vllm_process_groups",
                        lambda keep_default: destroyed.append(keep_default))
    with pytest.raises(VLLMStartupError) as raised:
        vllm_setup.start_llm({"model": "/models/m"}, torch.device("cpu"), keep_default_group=True)
    assert str(raised.value) == ("vLLM engine failed to start for '/models/m': "
                                 f"{type(error).__name__}: {error}{hint}")
    assert destroyed == [True]  # vLLM's half-built groups, the trainer's kept


def test_the_ranks_of_one_engine_gather_their_prompts_in_rank_order(monkeypatch):
    state = pytest.importorskip("vllm.distributed.parallel_state")
    monkeypatch.setattr(state, "get_tp_group", lambda: SimpleNamespace(
        world_size=3, rank_in_group=1, cpu_group="engine 0's CPU group"))
    parts = [[[1], [2, 2]], None, [[4]]]  # ranks 0 and 2 send these, rank 1 its own

    def all_gather_object(gathered, mine, group):
        assert group == "engine 0's CPU group"
        gathered[:] = parts[:1] + [mine] + parts[2:]

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    everyone, mine = gather_engine_prompts(EngineLayout(world=3, rank=1, tensor_parallel=3),
                                           [[3], [3, 3]])
    assert everyone == [[1], [2, 2], [3], [3, 3], [4]]
    assert mine == slice(2, 4)

    def no_collective(*args, **kwargs):
        raise AssertionError("an engine of one rank has nothing to gather")

    monkeypatch.setattr(torch.distributed, "all_gather_object", no_collective)
    for layout in (EngineLayout(3, 1, 1), EngineLayout(1, 0, 2), EngineLayout(1, 0, 1)):
        assert gather_engine_prompts(layout, [[3], [3, 3]]) == ([[3], [3, 3]], slice(0, 2))


def test_vllms_teardown_spares_the_trainers_group_only_when_asked(monkeypatch):
    state = pytest.importorskip("vllm.distributed.parallel_state")
    destroyed = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group",
                        lambda *args: destroyed.append("trainer's group"))
    monkeypatch.setattr(state, "destroy_model_parallel", lambda: destroyed.append("model parallel"))
    original = state.destroy_distributed_environment

    def vllm_world():
        return SimpleNamespace(destroy=lambda: destroyed.append("vLLM's world"))

    monkeypatch.setattr(state, "_WORLD", vllm_world())
    vllm_setup.destroy_vllm_process_groups(keep_default=True)
    assert destroyed == ["model parallel", "vLLM's world"] and state._WORLD is None
    assert state.destroy_distributed_environment is original  # the guard is lifted afterwards

    destroyed.clear()
    monkeypatch.setattr(state, "_WORLD", vllm_world())
    vllm_setup.destroy_vllm_process_groups(keep_default=False)  # vLLM created the default group
    assert destroyed == ["model parallel", "vLLM's world", "trainer's group"]
