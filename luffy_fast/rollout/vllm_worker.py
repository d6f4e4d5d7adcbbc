"""Code that runs inside vLLM's workers: the trainer's own process when the engine runs
in-process (tensor_parallel_size 1, or one rank of `external_launcher`), and each spawned worker
process otherwise.

vLLM imports this module in every worker (`worker_extension_cls`) before it loads the model and
mixes `LuffyWorkerExtension` into the worker class, so `collective_rpc("luffy_load_weights", ...)`
calls a method by name: no pickled code crosses a process boundary. Importing the module also
applies the CPU weight-layout patch in that process (a spawned worker never sees a patch made in
the trainer).

On CPU, vLLM repacks each linear weight for oneDNN after loading and drops the original, so an
in-place reload would leave the linear layers stale. `keep_cpu_linear_weights_unpacked` replaces
that dispatch with plain `torch.nn.functional.linear` on the layer's own weight, so every sync
lands (docs/design.md).
"""

from __future__ import annotations

from typing import Any

import torch


class LuffyWorkerExtension:
    """Methods added to vLLM's worker class; `self` is the worker."""

    model_runner: Any

    def luffy_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        """Load (transformers name, full tensor) pairs with the model's own `load_weights` (it
        maps names onto fused layers and takes this worker's tensor-parallel shard); returns the
        engine parameters written."""
        loaded = self.model_runner.model.load_weights(weights=iter(weights))
        return set(loaded) if loaded is not None else set()

    def luffy_parameter_names(self) -> set[str]:
        return {name for name, _ in self.model_runner.model.named_parameters()}


def keep_cpu_linear_weights_unpacked() -> None:
    """Make vLLM's CPU backend compute linear layers with `F.linear` on their own weight.

    Applies to models loaded afterwards in this process (the dispatch runs while loading).
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


def _patch_if_cpu() -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        keep_cpu_linear_weights_unpacked()


_patch_if_cpu()  # at import, i.e. in each worker before its model loads
