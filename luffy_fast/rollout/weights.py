"""The trainer's weights as (name, tensor) pairs for a rollout engine, without ever holding the
whole model gathered: plain modules hand out their parameters as they are, DeepSpeed ZeRO-3
modules are gathered in size-capped buckets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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


def full_size(tensor: torch.Tensor) -> int:
    """Bytes of `tensor` whole: a ZeRO-3 parameter's gathered size, not its local shard's."""
    return int(getattr(tensor, "ds_numel", tensor.numel())) * tensor.element_size()


def size_capped(entries: Iterable[tuple[str, torch.Tensor]], cap: float
                ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(name, tensor) entries in consecutive groups of at most `cap` bytes at full size, or of
    one entry alone where it is bigger than that."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in entries:
        entry_size = full_size(tensor)
        if bucket and size + entry_size > cap:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += entry_size
    if bucket:
        yield bucket


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
    for bucket in size_capped(module.named_parameters(), bucket_mb * 2**20):
        partitioned = [param for _, param in bucket if is_zero3_partitioned(param)]
        if not partitioned:
            yield from ((engine_weight_name(name), param.detach()) for name, param in bucket)
            continue
        import deepspeed

        # modifier_rank=None: read-only gather, nothing is scattered back on exit
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            copies = [(engine_weight_name(name), param.detach().clone()
                       if is_zero3_partitioned(param) else param.detach())
                      for name, param in bucket]
        yield from copies
