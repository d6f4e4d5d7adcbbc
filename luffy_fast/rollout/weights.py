"""The trainer's weights as (name, tensor) pairs for a rollout engine, without ever holding the
whole model gathered: plain modules hand out their parameters as they are, DeepSpeed ZeRO-3
modules are gathered in size-capped buckets.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

# Name parts that wrappers insert: torch.compile and activation checkpointing, anywhere.
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module")


def engine_weight_name(name: str) -> str:
    """The transformers checkpoint name of a parameter: wrapper parts removed, and the leading
    "module." that DDP / DeepSpeed engines add."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_PARTS]
    while len(parts) > 1 and parts[0] == "module":
        parts.pop(0)
    return ".".join(parts)


def is_zero3_partitioned(param: nn.Parameter) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitions (it carries `ds_id`)."""
    return hasattr(param, "ds_id")


def _full_numel(param: nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def gathered_named_parameters(module: nn.Module, bucket_mb: float = 256
                              ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (transformers name, full detached tensor) for every parameter of `module`.

    Plain parameters are yielded as they are (no copy). ZeRO-3 parameters are gathered a bucket
    at a time (at most `bucket_mb` of full-size parameters, or one parameter if it alone is
    bigger) and yielded as copies, because DeepSpeed frees the gathered storage when the bucket
    is released: a consumer may keep a yielded tensor as long as it likes. Shared (tied)
    parameters come once, under their first name, as in `named_parameters()`.
    """
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be positive (got {bucket_mb})")
    cap = bucket_mb * 2**20
    bucket: list[tuple[str, nn.Parameter]] = []
    bucket_bytes = 0
    for name, param in module.named_parameters():
        if not is_zero3_partitioned(param):
            yield from _flush(bucket)
            bucket, bucket_bytes = [], 0
            yield engine_weight_name(name), param.detach()
            continue
        size = _full_numel(param) * param.element_size()
        if bucket and bucket_bytes + size > cap:
            yield from _flush(bucket)
            bucket, bucket_bytes = [], 0
        bucket.append((name, param))
        bucket_bytes += size
    yield from _flush(bucket)


def _flush(bucket: list[tuple[str, nn.Parameter]]) -> Iterator[tuple[str, torch.Tensor]]:
    if not bucket:
        return
    import deepspeed

    # modifier_rank=None: read-only gather, nothing is scattered back on exit
    with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
        copies = [(engine_weight_name(name), p.detach().clone()) for name, p in bucket]
    yield from copies
