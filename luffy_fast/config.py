"""Configuration dataclasses: the loss config here; the trainer's tree builds on it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

NORMALIZERS = ("token", "seq_mean_token_mean", "constant", "token_sum_over_max_len")
NEEDS_MAX_LEN = ("constant", "token_sum_over_max_len")  # normalizers whose divisor has max_len
# "normalizer": the entropy term under the policy term's weights; "token_mean": c_ent times the
# token mean of the entropy over the call (docs/algorithm.md §Normalizers).
ENTROPY_AGGREGATIONS = ("normalizer", "token_mean")
# The triton backend's kept logits: fp32, or the 16-bit input dtype ("input").
LOGITS_DTYPES = ("float32", "input")
# MiB of working memory when LuffyLossConfig.memory_budget_mb is None; devices not listed get the
# CPU's. On a GPU, 1 GiB gives ~880-row chunks at V = 152k for the torch backend's two fp32
# [chunk, V] buffers (~1720 rows of the triton backend's kept logits): GEMMs wide enough to run
# at full speed (64 MiB gives ~55-row chunks there).
DEFAULT_MEMORY_BUDGET_MB = {"cuda": 1024.0, "cpu": 64.0}


def default_memory_budget_mb(device: torch.device) -> float:
    """The op's working memory when the config sets none: 1024 MiB on CUDA, 64 MiB elsewhere."""
    return DEFAULT_MEMORY_BUDGET_MB.get(torch.device(device).type, DEFAULT_MEMORY_BUDGET_MB["cpu"])


@dataclass(frozen=True)
class LuffyLossConfig:
    """Every knob of the mixed-policy loss (docs/algorithm.md).

    gamma / shaping: off-policy shaping f(p) = p / (p + gamma), or the raw probability when off.
    clip_low / clip_high: PPO clip range [1 - clip_low, 1 + clip_high] for the ratio.
    clip_on_policy / clip_off_policy: whether that range applies to each side.
    dual_clip: c > 1 caps the loss of negative-advantage tokens at -c * A where PPO clipping
        applies (None: off; with clipping off on both sides, an error).
    entropy_coef: weight of the entropy bonus (subtracted from the loss).
    temperature: logits are h . W^T / temperature.
    normalizer: "token", "seq_mean_token_mean", "constant" (sum / (num_sequences * max_len)) or
        "token_sum_over_max_len" (sum / max_len per call, the official code's scale; a trainer
        sums such calls' losses, docs/algorithm.md §Normalizers).
    entropy_aggregation: how the entropy bonus is aggregated: "normalizer" (the policy term's
        weights w_t) or "token_mean" (c_ent x the call's token-mean entropy, the official code's).
    ignore_index: target id that marks a token as not part of the loss.
    memory_budget_mb: working memory the op may use beyond inputs and gradients, in MiB. None:
        the device's default, `default_memory_budget_mb`: 1024 MiB on CUDA, 64 MiB elsewhere.
        The torch backend sizes its token chunks from it; the triton backend keeps chunks of the
        forward's logits for the backward (no recompute) when they fit in it.
    grad_filter: opt-in gradient filter of the triton backend (None: off, the exact gradient).
        Blocks of dL/dz (a tile of tokens x a tile of the vocabulary) whose every entry is below
        grad_filter x its token's gradient scale (|g_t| + |c_t|) / temperature are skipped, with
        their share of the gradient GEMMs (d(hidden) gets their total, known exactly since each
        row of dL/dz sums to zero, along the mean weight row); roughly, blocks whose probabilities
        are all below grad_filter. Saves time when the logits are peaked (a trained LM's); 1e-5 .. 1e-4 is a
        typical range, 0 skips nothing. stats["grad_filter_skipped_fraction"] reports the share of
        blocks skipped (with the recompute strategy it is filled when the backward runs). The
        torch backend rejects it; the reference backend ignores it (it is the exact oracle).
    logits_dtype: the dtype of the logits the triton backend keeps between its GEMM and its
        kernels: "float32" (the default: fp32 accumulation written out in fp32), or "input",
        the 16-bit input dtype itself (bf16/fp16 inputs; fp32 inputs keep fp32), as a bf16
        model's LM head writes logits for the naive loss and the official code. Half the bytes
        for the GEMM to write and the kernels to read, and twice the tokens per chunk at a memory
        budget: on an H200 (T = 8192, H = 4096, V = 151936) 1.13 x the bare GEMMs against
        1.19 x, 1.25 x against 1.50 x at 256 MiB (docs/design.md). The log-probs and gradients
        then carry the logits' bf16 rounding: ~1e-2 relative gradient error against float64 on
        peaked logits, 2-8 x fp32 logits' case by case. The torch and reference backends keep
        fp32 logits.
    check_finite: after the forward, raise ValueError naming `hidden`, `weight` or `bias` when
        a loss token's log-probability or the loss is not finite (a non-finite input there, or
        logits that overflow). Costs one scalar check: the value is in the forward's statistics
        already. The trainer turns it off and skips such steps instead (docs/robustness.md).
    """

    gamma: float = 0.1
    shaping: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_on_policy: bool = True
    clip_off_policy: bool = False
    dual_clip: Optional[float] = None
    entropy_coef: float = 0.0
    temperature: float = 1.0
    normalizer: str = "token"
    entropy_aggregation: str = "normalizer"
    max_len: Optional[int] = None
    ignore_index: int = -100
    memory_budget_mb: Optional[float] = None
    grad_filter: Optional[float] = None
    logits_dtype: str = "float32"
    check_finite: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"LuffyLossConfig.{name}: {why} (got {getattr(self, name)!r})")

        def number(value) -> bool:  # a bool is an int to Python, but never a setting's number
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("shaping", "clip_on_policy", "clip_off_policy", "check_finite"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        if self.normalizer not in NORMALIZERS:
            raise bad("normalizer", f"must be one of {NORMALIZERS}")
        if self.normalizer in NEEDS_MAX_LEN and self.max_len is None:
            raise bad("max_len", f"the {self.normalizer!r} normalizer needs max_len (the response "
                                 "length)")
        if self.entropy_aggregation not in ENTROPY_AGGREGATIONS:
            raise bad("entropy_aggregation", f"must be one of {ENTROPY_AGGREGATIONS}")
        if self.max_len is not None and not (integer(self.max_len) and self.max_len > 0):
            raise bad("max_len", "must be a positive integer")
        if not (integer(self.ignore_index) and -2**63 <= self.ignore_index < 2**63):
            raise bad("ignore_index", "must be an integer that fits in int64 (as targets do)")
        for name in ("gamma", "temperature"):
            value = getattr(self, name)
            if not (number(value) and math.isfinite(value) and value > 0):
                raise bad(name, "must be a positive finite number")
        for name in ("clip_low", "clip_high", "entropy_coef"):
            value = getattr(self, name)
            if not (number(value) and math.isfinite(value) and value >= 0):
                raise bad(name, "must be a non-negative finite number")
        if self.memory_budget_mb is not None and not (
                number(self.memory_budget_mb) and 0 < self.memory_budget_mb <= 2**40):
            raise bad("memory_budget_mb", "must be None or a positive number of MiB, at most "
                                          "2**40 (1 EiB)")
        if self.grad_filter is not None and not (
                number(self.grad_filter) and 0 <= self.grad_filter < 1):
            raise bad("grad_filter", "must be None (off) or a number in [0, 1)")
        if self.logits_dtype not in LOGITS_DTYPES:
            raise bad("logits_dtype", f"must be one of {LOGITS_DTYPES}")
        if self.clip_low >= 1:
            raise bad("clip_low", "must be below 1 so that 1 - clip_low stays positive")
        if self.dual_clip is not None and not (
                number(self.dual_clip) and math.isfinite(self.dual_clip) and self.dual_clip > 1):
            raise bad("dual_clip", "must be None or a number greater than 1")
        if self.dual_clip is not None and not (self.clip_on_policy or self.clip_off_policy):
            raise bad("dual_clip", "caps the PPO-clipped loss, and clipping is off on both sides "
                                   "(set clip_on_policy or clip_off_policy, or leave it None)")

    def replace(self, **changes) -> LuffyLossConfig:
        return dataclasses.replace(self, **changes)

    def memory_budget_bytes(self, device: torch.device) -> int:
        """`memory_budget_mb`, or the default for `device`, in bytes."""
        return int((self.memory_budget_mb or default_memory_budget_mb(device)) * 2**20)

    @classmethod
    def luffy(cls, max_len: int = 8192, **overrides) -> LuffyLossConfig:
        """The LUFFY reference run: shaping with gamma 0.1, no clipping, Dr. GRPO normalizer."""
        settings = dict(gamma=0.1, shaping=True, clip_on_policy=False, clip_off_policy=False,
                        entropy_coef=0.001, normalizer="constant", max_len=max_len)
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def luffy_official_scale(cls, max_len: int = 8192, **overrides) -> LuffyLossConfig:
        """`luffy()` with the official code's loss scale: sum / max_len per micro-batch (summed
        over micro-batches) and the entropy bonus as a token mean per micro-batch."""
        return cls.luffy(max_len, **{"normalizer": "token_sum_over_max_len",
                                     "entropy_aggregation": "token_mean", **overrides})

    @classmethod
    def grpo(cls, **overrides) -> LuffyLossConfig:
        """On-policy GRPO: PPO clipping with epsilon 0.2 and a token-mean normalizer."""
        settings = dict(clip_low=0.2, clip_high=0.2, clip_on_policy=True, entropy_coef=0.0,
                        normalizer="token")
        settings.update(overrides)
        return cls(**settings)
