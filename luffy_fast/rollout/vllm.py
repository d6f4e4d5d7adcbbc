"""Rollouts with vLLM: an offline engine colocated with the trainer, synced after every step.

    engine = VLLMRolloutEngine(model_dir, VLLMConfig(), seed=0)
    groups = engine.generate(prompt_ids, n=8, params=SamplingParams(max_new_tokens=512))
    engine.sleep()                                   # GPU: free weights + KV cache for the update
    ...optimizer step...
    engine.sync_weights(gathered_named_parameters(policy))   # wakes, loads, resets prefix cache

Where the engine runs (docs/design.md). Its core always runs in the trainer's process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so `collective_rpc` reaches the workers without msgpack.
- One training rank, tensor_parallel_size 1: the worker is in-process too; weights are handed
  over as they are.
- One training rank, tensor_parallel_size > 1: vLLM spawns one worker process per
  tensor-parallel rank (`mp`, never forked: a forked worker inherits the trainer's process group);
  each takes local device i. Weights go as CPU tensors through vLLM's shared-memory queue (one
  device-to-host copy per bucket) rather than CUDA IPC handles, whose memory lives on the
  sender's GPU and would be mapped by every worker on GPU 0.
- Several training ranks: every rank is one tensor-parallel rank of an engine inside it (vLLM's
  `external_launcher`, as TRL colocates vLLM); ranks [k*tp, (k+1)*tp) form engine k. No child
  processes, no IPC, no pickled code: each rank loads its full gathered tensors in-process (vLLM
  takes its shard) and sleeps or wakes memory on its own GPU. The ranks of one engine gather
  their prompts, generate them all with the same seeds, and each keeps its own slice. This is the
  layout for TP > 1 on GPUs: worker processes of two training ranks would both take GPUs 0..tp-1.
Weights enter through methods of `LuffyWorkerExtension` (luffy_fast/rollout/vllm_worker.py),
called by name, with the model's own `load_weights` (transformers names; q/k/v and gate/up go
into vLLM's fused layers, lm_head is skipped when embeddings are tied). Importing that module in
a worker also keeps vLLM's CPU linear layers on their own weights, so an in-place reload lands.

What an in-process vLLM does to the trainer's process and what is undone: its teardown destroys
torch's default process group (kept when the trainer created it), its workers reseed `random`,
numpy and torch (their states are restored after start-up), and its CPU worker pins torch's
thread count (restored). vLLM's sleep-mode allocator allows one sleep-mode engine per process.
"""

from __future__ import annotations

import atexit
import gc
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from luffy_fast.rollout.base import (
    Completion,
    RolloutEngine,
    SamplingParams,
    check_generate_args,
    request_seed,
)
from luffy_fast.rollout.vllm_config import VLLMConfig
from luffy_fast.rollout.vllm_setup import (
    VLLMStartupError,
    check_one_sleep_mode_engine,
    default_group_kept,
    destroy_vllm_process_groups,
    engine_kwargs,
    engine_layout,
    gather_engine_prompts,
    prepare_environment,
    start_llm,
)
from luffy_fast.rollout.weights import engine_weight_name, size_capped

# --------------------------------------------------------------------------- the engine

class VLLMRolloutEngine(RolloutEngine):
    """A vLLM offline engine behind the trainer's RolloutEngine interface.

    model_path: a transformers directory (config, weights, tokenizer) with the policy's
        architecture; its weights are replaced by the first `sync_weights`.
    seed: the engine's seed; data-parallel rank k (training rank // tensor_parallel_size) uses
        seed + k for unseeded requests and folds k into every seeded request's seed.
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
        self.sleep_level = config.device_sleep_level(self.on_cpu)
        if self.on_cpu and self.sleep_level:
            raise VLLMStartupError("rollout.vllm.sleep_level: vLLM has no sleep mode on CPU; "
                                   "use 0")
        self._check_model_dir()
        self.layout = engine_layout(config)
        if self.layout.world == 1 and self.device.type == "cuda" and (self.device.index or 0):
            raise VLLMStartupError(f"vLLM engine: {self.device} asked for, but an engine of one "
                                   "process runs on the current CUDA device 0 (vLLM ignores the "
                                   "index): select the GPU with CUDA_VISIBLE_DEVICES instead")
        self._timings: dict[str, float] = {}
        self._sleeping: set[str] = set()  # vLLM memory tags released by sleep()
        self._weights_discarded = False  # level-2 sleep: weights are garbage until a full sync
        self._llm = None
        self._keep_default_group = False
        self._llm = self._start(seed)
        self._engine_parameters = set(self._rpc("luffy_parameter_names")[0])
        atexit.register(_close_at_exit, weakref.ref(self))

    def _check_model_dir(self) -> None:
        path = self.model_path
        if not path.is_dir():
            raise VLLMStartupError(f"vLLM engine: model directory {str(path)!r} does not exist")
        if not (path / "config.json").is_file():
            raise VLLMStartupError(f"vLLM engine: {str(path)!r} has no config.json (expected a "
                                   "transformers model directory saved with save_pretrained)")

    def _start(self, seed: int):
        prepare_environment(self.layout, self.on_cpu, self.device)
        if self.sleep_level:
            check_one_sleep_mode_engine()
        kwargs = engine_kwargs(self.config, self.model_path, seed, self.on_cpu, self.sleep_level,
                               self.layout)
        self._keep_default_group = (torch.distributed.is_available()
                                    and torch.distributed.is_initialized())
        start = time.perf_counter()
        llm = start_llm(kwargs, self.device, self._keep_default_group)
        self.start_seconds = time.perf_counter() - start
        return llm

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 params: SamplingParams) -> list[list[Completion]]:
        """With an engine shared by several training ranks, every rank of it calls this
        together (each with its own prompts) and gets its own prompts' completions."""
        check_generate_args(prompts, n)
        if params.seed is None and params.temperature > 0 and self.layout.tensor_parallel > 1 \
                and self.layout.backend == "external_launcher":  # each rank's own RNG state
            raise ValueError("SamplingParams.seed: the tensor-parallel ranks of one engine must "
                             "draw the same tokens, which needs a seed when sampling")
        everyone, mine = gather_engine_prompts(self.layout, prompts)
        if not everyone:
            return []
        self._ensure_awake()
        from vllm import SamplingParams as VLLMSamplingParams

        dp_rank = self.layout.data_parallel_rank
        requests = [{"prompt_token_ids": list(p)} for p in everyone]
        settings = [VLLMSamplingParams(
            n=n, temperature=params.temperature, top_p=params.top_p,
            max_tokens=params.max_new_tokens, logprobs=0, detokenize=False,
            seed=None if params.seed is None else request_seed(params.seed, i, dp_rank))
            for i in range(len(everyone))]
        start = time.perf_counter()
        outputs = self._llm.generate(requests, settings, use_tqdm=self.show_progress)[mine]
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

        pairs, mine = gather_engine_prompts(self.layout, list(zip(prompts, continuations)))
        requests = [{"prompt_token_ids": list(p) + list(c)} for p, c in pairs]
        settings = VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0,
                                      detokenize=False)
        outputs = self._llm.generate(requests, settings, use_tqdm=False)[mine]
        scores = []
        for prompt, continuation, output in zip(prompts, continuations, outputs):
            entries = output.prompt_logprobs[len(prompt):]
            scores.append([entry[token].logprob for entry, token in zip(entries, continuation)])
        return scores

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's weights in batches of at most `sync_bucket_mb` (a bigger tensor
        alone), then reset the prefix cache.

        After a level-2 sleep every parameter must be sent (the engine's copy was discarded;
        reloading by resending holds for dense unquantized models, whose loaded tensors are the
        parameters themselves).
        """
        if self._llm is None:
            raise RuntimeError("the vLLM engine is closed")
        wake = self._wake({"weights"})  # the KV cache stays released until generation
        start = time.perf_counter()
        loaded: set[str] = set()
        named = ((engine_weight_name(name), tensor.detach()) for name, tensor in named_tensors)
        for batch in size_capped(named, self.config.sync_bucket_mb * 2**20):
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
        if self.layout.worker_processes:  # pickled through vLLM's shared-memory queue
            batch = [(name, tensor.to("cpu")) for name, tensor in batch]
        loaded: set[str] = set()
        for names in self._rpc("luffy_load_weights", batch):
            loaded |= set(names)
        return loaded

    def _rpc(self, method: str, *args) -> list:
        return self._llm.collective_rpc(method, args=args)

    # ------------------------------------------------------------------ sleep mode (GPU)

    def sleep(self) -> None:
        """Release the engine's GPU memory for the optimizer step (no-op when sleep_level is 0).

        Level 2 (the CUDA default) discards the weights (the next `sync_weights` must send every
        parameter) and level 1 offloads them to host memory; both drop the KV cache. The weights
        sleep whenever they are awake, whether or not the KV cache was woken since.
        """
        if not self.sleep_level or "weights" in self._sleeping:
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
        gc.collect()  # the trainer's freed blocks back to the device before vLLM maps memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._llm.wake_up(tags=sorted(tags))
        self._sleeping -= tags
        return time.perf_counter() - start

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Shut the engine down (its worker processes too) and free its memory; the trainer's
        process group survives. Safe to call twice."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            if self._sleeping:
                # vLLM's CUDA allocator unmaps every pooled allocation again when the engine's
                # pools are released, also those sleep() unmapped; the driver error it leaves
                # fails the next sleep-mode engine's allocations (vllm#36651): remap first
                try:
                    llm.wake_up()
                except Exception:  # closing anyway
                    pass
            with default_group_kept(self._keep_default_group):
                llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            self._sleeping = set()
            destroy_vllm_process_groups(keep_default=self._keep_default_group)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _completion(sample: Any) -> Completion:
    tokens = list(sample.token_ids)
    logprobs = [float(entry[token].logprob) for entry, token in zip(sample.logprobs, tokens)]
    return Completion(tokens, logprobs, finished=sample.finish_reason == "stop")


def _close_at_exit(reference: weakref.ref) -> None:
    engine = reference()
    if engine is not None:
        engine.close()
