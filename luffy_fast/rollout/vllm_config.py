"""Options of the vLLM rollout engine (`rollout.vllm` in the trainer's config).

Kept apart from luffy_fast.rollout.vllm so that reading a config never imports vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from luffy_fast.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class VLLMConfig:
    """How the colocated vLLM engine runs. None means "pick for the device" (see each field).

    tensor_parallel_size: devices per engine. With several training ranks it must divide their
        number: each rank runs one tensor-parallel rank of an engine in-process (vLLM's
        external_launcher). With one training rank, more than 1 spawns vLLM worker processes.
    gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache); on CPU the
        share of host RAM for the KV cache. None: 0.5 on CUDA, 0.1 on CPU.
    sleep_level: 2 drops the weights and the KV cache during the optimizer step (the sync
        resends every weight anyway, so nothing is copied to host memory; dense unquantized
        models only), 1 offloads the weights to host memory and back, 0 never sleeps.
        None: 2 on CUDA, 0 on CPU (vLLM has no sleep mode on CPU).
    dtype: "auto" follows the trainer's precision (on CUDA bf16, or fp32 with
        model.precision=fp32; fp32 on CPU).
    max_model_len: longest prompt + response; None: data.max_prompt_length +
        data.max_response_length.
    enforce_eager: no CUDA graphs (always eager on CPU).
    sync_bucket_mb: weights are gathered and handed to the engine in buckets of at most this
        size, never the whole model at once.
    enable_prefix_caching: vLLM's prefix cache (reset after every weight sync).
    """

    tensor_parallel_size: int = 1
    gpu_memory_utilization: Optional[float] = None
    sleep_level: Optional[int] = None
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    enforce_eager: bool = False
    sync_bucket_mb: float = 256.0
    enable_prefix_caching: bool = True

    def device_sleep_level(self, on_cpu: bool) -> int:
        """sleep_level, with None resolved for the device (2 on CUDA, 0 on CPU)."""
        return (0 if on_cpu else 2) if self.sleep_level is None else self.sleep_level

    def device_memory_utilization(self, on_cpu: bool) -> float:
        """gpu_memory_utilization, with None resolved for the device (0.5 on CUDA, 0.1 on CPU)."""
        if self.gpu_memory_utilization is None:
            return 0.1 if on_cpu else 0.5
        return self.gpu_memory_utilization

    def validate(self, prefix: str = "rollout.vllm") -> None:
        def fail(name: str, rule: str, value) -> None:
            raise ConfigError(f"{prefix}.{name}: {rule} (got {value!r})")

        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            fail("tensor_parallel_size", "must be an integer >= 1", self.tensor_parallel_size)
        utilization = self.gpu_memory_utilization
        if utilization is not None and not 0 < utilization <= 1:
            fail("gpu_memory_utilization", "must be in (0, 1]", utilization)
        if self.sleep_level not in (None, 0, 1, 2):
            fail("sleep_level", "must be 0, 1 or 2", self.sleep_level)
        if self.dtype not in DTYPES:
            fail("dtype", f"must be one of {list(DTYPES)}", self.dtype)
        if self.max_model_len is not None and self.max_model_len < 2:
            fail("max_model_len", "must be an integer >= 2", self.max_model_len)
        bucket = self.sync_bucket_mb
        if isinstance(bucket, bool) or not isinstance(bucket, (int, float)) or not 0 < bucket < math.inf:
            fail("sync_bucket_mb", "must be a positive finite number", bucket)
