"""The implementations the benchmarks compare: each is one forward + backward on `Inputs`.

- gemm_floor: the bare LM-head GEMMs (logits = h W^T, then dL/dh = G W and dL/dW = G^T h with a
  random [T, V] gradient G): the time no fused loss can beat (CUDA plan only).
- naive: materialized logits + float32 log_softmax + autograd (benchmarks/naive.py).
- liger: Liger-Kernel's LigerFusedLinearGRPOLoss (benchmarks/liger_baseline.py).
- torch / triton: luffy_fast.fused_luffy_loss with that backend; triton_256mb and triton_lowmem
  at a 256 / 128 MiB memory budget; triton_filter with the gradient filter (cases.GRAD_FILTER).
- gemm_logits / token_logprobs: one bare h W^T, and luffy_fast.token_logprobs (no grad, triton).
- any of these with "+<switch>" (SWITCHES): the same with an opt-in switched on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Optional

import torch

from luffy_fast import fused_luffy_loss, token_logprobs

from .cases import GRAD_FILTER, Case, Inputs, make_inputs
from .liger_baseline import liger_grpo_loss, liger_import_error
from .naive import naive_luffy_loss

# The triton backend under small memory budgets: 256 MiB (issue 13's target; kept logits in
# ~440-token chunks at V = 152k) and 128 MiB (its recompute strategy: logits never written).
TRITON_VARIANTS = {"triton_256mb": {"memory_budget_mb": 256}, "triton_lowmem": {"memory_budget_mb": 128},
                   "triton_filter": {"grad_filter": GRAD_FILTER}}
LUFFY_IMPLS = ("torch", "triton", "reference", *TRITON_VARIANTS)
# Opt-in switches, named as a suffix of any implementation: "triton+rows" is "triton" with
# LUFFY_FAST_ROW_FORWARD=1 (kernels/forward_rows.py, read from the environment at each call);
# "+lean" with LUFFY_FAST_LEAN=1 (kernels/forward_lean.py, backward_lean.py); "+narrow" with
# LUFFY_FAST_FILTER_TILES=narrow (the gradient filter's round-3 GEMM tiles); "+fused" with
# LUFFY_FAST_FUSED_FORWARD=1 (kernels/forward_fused.py: the statistics in a Triton GEMM's
# epilogue); "+half" sets LuffyLossConfig.logits_dtype = "input" (16-bit kept logits);
# "triton+lean+half" both.
SWITCHES = {"rows": {"env": {"LUFFY_FAST_ROW_FORWARD": "1"}},
            "lean": {"env": {"LUFFY_FAST_LEAN": "1"}},
            "fused": {"env": {"LUFFY_FAST_FUSED_FORWARD": "1"}},
            "narrow": {"env": {"LUFFY_FAST_FILTER_TILES": "narrow"}},
            "half": {"config": {"logits_dtype": "input"}}}
# The implementations whose LuffyLossConfig the config switches change (the triton backend's).
CONFIG_SWITCHABLE = ("triton", *TRITON_VARIANTS, "token_logprobs")


@dataclass(frozen=True)
class Variant:
    """An implementation name split into its base and what its switches set."""

    base: str
    env: dict = field(default_factory=dict)  # environment variables
    config: dict = field(default_factory=dict)  # LuffyLossConfig fields


def variant(impl: str) -> Variant:
    base, *names = impl.split("+")
    unknown = [name for name in names if name not in SWITCHES]
    if unknown:
        raise ValueError(f"unknown switch {unknown[0]!r} in {impl!r} (known: {sorted(SWITCHES)})")
    found = Variant(base, {k: v for n in names for k, v in SWITCHES[n].get("env", {}).items()},
                    {k: v for n in names for k, v in SWITCHES[n].get("config", {}).items()})
    if found.config and base not in CONFIG_SWITCHABLE:  # the other backends ignore those fields
        raise ValueError(f"{impl!r}: {base!r} takes no LuffyLossConfig switch (those apply to "
                         f"{', '.join(CONFIG_SWITCHABLE)})")
    return found


def switched(step: Callable, env: dict[str, str]) -> Callable:
    """`step` run with the environment `env` set, and the previous values put back after."""
    if not env:
        return step

    def run():
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            return step()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return run


def _luffy(inputs: Inputs, backend: str, overrides: dict) -> torch.Tensor:
    config = inputs.config.replace(**overrides)
    if backend in TRITON_VARIANTS:
        backend, config = "triton", config.replace(**TRITON_VARIANTS[backend])
    loss, _stats = fused_luffy_loss(inputs.hidden, inputs.weight, inputs.targets, inputs.advantages,
                                    inputs.loss_mask, inputs.off_policy_mask, config=config,
                                    seq_ids=inputs.seq_ids, backend=backend)
    return loss


def loss_fn(impl: str) -> Callable[[Inputs], torch.Tensor]:
    """The scalar-loss function of a loss implementation (not gemm_floor)."""
    v = variant(impl)
    compute = _loss_fn(v.base, v.config)
    return (lambda x: switched(lambda: compute(x), v.env)()) if v.env else compute


def _loss_fn(impl: str, overrides: dict) -> Callable[[Inputs], torch.Tensor]:
    if impl == "naive":
        return lambda x: naive_luffy_loss(x.hidden, x.weight, x.targets, x.advantages, x.loss_mask,
                                          x.off_policy_mask, x.seq_ids, x.config)
    if impl == "liger":
        return liger_grpo_loss
    if impl in LUFFY_IMPLS:
        return lambda x: _luffy(x, impl, overrides)
    raise ValueError(f"unknown implementation {impl!r}")


class GemmFloor:
    """The three LM-head GEMMs at a case's shape, with their [T, V] operands preallocated."""

    def __init__(self, inputs: Inputs):
        h, w = inputs.hidden.detach(), inputs.weight.detach()
        gen = torch.Generator(device=h.device).manual_seed(1)
        self.h, self.w = h, w
        self.grad_logits = torch.randn(h.shape[0], w.shape[0], device=h.device, generator=gen,
                                       dtype=h.dtype)
        if h.is_cuda:  # the fill (2.5 GB at T = 8192) must not run inside a timed round
            torch.cuda.synchronize(h.device)

    def __call__(self) -> None:
        logits = self.h @ self.w.T
        grad_hidden = self.grad_logits @ self.w
        grad_weight = self.grad_logits.T @ self.h
        del logits, grad_hidden, grad_weight


def make_step(impl: str, inputs: Inputs) -> Callable[[], Optional[torch.Tensor]]:
    """A closure running one forward + backward (gradients reset first); returns the loss.
    gemm_logits and token_logprobs are forward only (no grad)."""
    v = variant(impl)
    return switched(_base_step(v, inputs), v.env)


def _base_step(v: Variant, inputs: Inputs) -> Callable[[], Optional[torch.Tensor]]:
    if v.base == "gemm_floor":
        return GemmFloor(inputs)
    h, w = inputs.hidden.detach(), inputs.weight.detach()
    if v.base == "gemm_logits":
        return lambda: h @ w.T
    if v.base == "token_logprobs":
        return lambda: token_logprobs(h, w, inputs.targets, backend="triton", **v.config)[0]
    compute = _loss_fn(v.base, v.config)

    def step() -> torch.Tensor:
        inputs.zero_grads()
        loss = compute(inputs)
        loss.backward()
        return loss.detach()

    return step


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@cache
def _backend_error(backend: str, device: str) -> Optional[str]:
    """None when the luffy_fast backend runs a tiny case on `device`, else the error."""
    try:
        inputs = make_inputs(Case("dense", 32, 16, 64, n_seqs=8, group_size=4), device)
        make_step(backend, inputs)()
    except Exception as exc:
        return f"luffy_fast backend {backend!r} unavailable on {device}: {type(exc).__name__}: {exc}"
    return None


def skip_reason(impl: str, device: str, dry_run: bool = False) -> Optional[str]:
    """Why `impl` cannot be benchmarked on `device` (None: it can)."""
    base = variant(impl).base
    cuda = device.startswith("cuda")
    if base == "liger":
        return liger_import_error()
    if base == "triton" or base in TRITON_VARIANTS or base == "token_logprobs":
        if not cuda and not dry_run:
            return "triton backend: CUDA only (on the CPU it runs in the slow Triton interpreter)"
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            return "triton backend on the CPU needs TRITON_INTERPRET=1 set before Python starts"
        return _backend_error(impl, device)  # with its switches: their path is probed too
    if base == "torch":
        return _backend_error(impl, device)
    if base in ("gemm_floor", "gemm_logits") and not cuda and not dry_run:
        return "the GEMM floor is measured in the CUDA plan"
    return None
