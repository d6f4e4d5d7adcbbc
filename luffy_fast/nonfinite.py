"""The trainer's non-finite policy (docs/robustness.md): an optimizer step whose loss or gradient
norm is not finite is skipped, counted and logged; after `train.max_nonfinite_steps` skips in a
row the run stops with NonFiniteTrainingError.

The skip is DeepSpeed's own overflow path at every ZeRO stage: its ZeRO and bf16 optimizers
drop a step whose global gradient norm is not finite (gradients cleared, optimizer state kept,
no LR-schedule step, `engine.skipped_steps` + 1). fp32 at ZeRO-0 steps a client optimizer as
is, so there `CheckedAdamW` does the same, and it also reports the norm that DeepSpeed leaves
unset at that stage. A non-finite loss makes its gradient non-finite (`poison_if_nonfinite`), so
the one check covers both, identically on every rank.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from luffy_fast.run_files import warn


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class CheckedAdamW(torch.optim.AdamW):
    """AdamW that measures the global gradient norm before stepping, clips to `max_norm`
    (0: no clipping) and skips the update when the norm is not finite, exposing `overflow` and
    `_global_grad_norm` as DeepSpeed's own optimizers do. For fp32 ZeRO-0, where DeepSpeed has
    already averaged the gradients over ranks when it calls step()."""

    def __init__(self, params, max_norm: float = 0.0, **adamw_options) -> None:
        super().__init__(params, **adamw_options)
        self.max_norm = max_norm
        self.overflow = False
        self._global_grad_norm: Optional[float] = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            self._global_grad_norm = math.inf  # as DeepSpeed reports a skipped step
            self.zero_grad(set_to_none=True)
            return None
        if self.max_norm > 0:
            # it takes the parameters and scales their .grad (given the gradients themselves,
            # whose own .grad is None, it clipped nothing)
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm)
        return super().step(closure)


def poison_if_nonfinite(loss: Tensor, value: float) -> Tensor:
    """`loss` times NaN when its value is not finite: its gradient is then not finite either, so
    the optimizer's check drops the step even where the loss's gradient alone would be finite."""
    return loss if math.isfinite(value) else loss * math.nan


def optimizer_step(engine) -> tuple[Optional[float], bool]:
    """engine.step(); returns (global gradient norm or None when not finite, whether the update
    was applied)."""
    skipped_before = engine.skipped_steps
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    applied = engine.skipped_steps == skipped_before and (norm is None or math.isfinite(norm))
    return (norm if norm is not None and math.isfinite(norm) else None), applied


class NonFiniteGuard:
    """Counts skipped optimizer steps; raises after `max_consecutive` in a row (0: never)."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self.unreported = 0

    def backward(self, engine, loss: Tensor) -> float:
        """engine.backward(loss), its gradient made non-finite when it is; returns its value."""
        value = float(loss.detach())
        engine.backward(poison_if_nonfinite(loss, value))
        return value

    def optimizer_step(self, engine, step: int) -> float:
        """engine.step(), recorded; returns the gradient norm (NaN when not finite)."""
        norm, applied = optimizer_step(engine)
        self.unreported += not applied
        self.record(applied, step)
        return math.nan if norm is None else norm

    def state_dict(self) -> dict:
        """The counts a checkpoint keeps, so that a resumed run stops where the whole run
        would (pre-empted segments never reached max_consecutive)."""
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """A checkpoint's counts (none in checkpoints saved before they were kept: zero)."""
        self.consecutive, self.total = (state or {}).get("consecutive", 0), (state or {}).get("total", 0)

    def metrics(self) -> dict:
        """Skipped optimizer steps since the last call: `nonfinite/skipped_steps`."""
        skipped, self.unreported = self.unreported, 0
        return {"nonfinite/skipped_steps": skipped}

    def record(self, applied: bool, step: int) -> None:
        if applied:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        warn(f"step {step}: non-finite loss or gradient norm; optimizer step skipped "
             f"({self.consecutive} in a row, {self.total} in all)")
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"step {step}: {self.consecutive} optimizer steps in a row had a non-finite loss "
                f"or gradient norm (train.max_nonfinite_steps = {self.max_consecutive}); "
                f"stopping. The weights and the last checkpoint are from the last finite step; "
                f"lower optim.lr, check the data, or raise train.max_nonfinite_steps")
