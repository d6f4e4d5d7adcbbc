"""What the benchmarks measure: shapes, the two input scenarios, and the plan for each device.

A batch is `n_seqs` equal-length sequences in groups of `group_size` (the last member of each
group is the off-policy trace, as in LUFFY's 7 + 1 groups). Scenarios:
- dense: every group has mixed rewards, so every token carries a gradient; the LUFFY reference
  config (shaping, no clipping, `constant` normalizer, entropy bonus 0.001);
- rlvr: half of the groups have equal rewards (zero advantage) and there is no entropy term, as in
  typical RLVR batches; an implementation that skips inactive tokens should pay off here;
- peaked: the dense batch with logits like a trained LM's (`peaked_hidden_weight`), where the
  gradient filter (LuffyLossConfig.grad_filter) can skip the softmax's negligible tail.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from luffy_fast import LuffyLossConfig

SCENARIOS = ("dense", "rlvr", "peaked")
# The gradient filter threshold the benchmarks and the GPU parity check use. On an H200
# (2026-11-27, peaked logits, T = 2048, H = 4096, V = 151936, fp32) 3e-5 skipped 40 % of the
# blocks at 1.17e-3 relative d(hidden) error, over the 1e-3 bound, and 3e-6 skipped 7 % at
# 2.7e-4; the error grew as the threshold^0.64 between them, which puts 2e-5 at ~9e-4.
GRAD_FILTER = 2e-5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One measured configuration: scenario and shape."""

    scenario: str
    T: int
    H: int
    V: int
    dtype: str = "float32"
    n_seqs: int = 16
    group_size: int = 8

    @property
    def seq_len(self) -> int:
        return self.T // self.n_seqs

    @property
    def shape(self) -> str:
        return f"T={self.T} H={self.H} V={self.V} {self.dtype}"

    @property
    def id(self) -> str:
        return f"{self.scenario}-T{self.T}-H{self.H}-V{self.V}-{self.dtype}"

    def config(self) -> LuffyLossConfig:
        entropy = 0.0 if self.scenario == "rlvr" else 0.001
        return LuffyLossConfig.luffy(max_len=self.seq_len, entropy_coef=entropy)

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"Case.scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.T % self.n_seqs or self.n_seqs % self.group_size:
            raise ValueError(f"Case: T={self.T} must split into {self.n_seqs} sequences "
                             f"in groups of {self.group_size}")


@dataclass
class Inputs:
    """The tensors every implementation gets for one case (flat [T] per-token tensors)."""

    case: Case
    hidden: torch.Tensor  # [T, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad (the LM head is trained)
    targets: torch.Tensor  # [T] int64
    advantages: torch.Tensor  # [T] float32, broadcast from each sequence
    seq_advantages: torch.Tensor  # [n_seqs] float32 (Liger takes one per sequence)
    loss_mask: torch.Tensor  # [T] bool
    off_policy_mask: torch.Tensor  # [T] bool
    seq_ids: torch.Tensor  # [T] int64
    config: LuffyLossConfig

    def zero_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None

    def grad_bytes(self) -> int:
        return sum(t.grad.nbytes for t in (self.hidden, self.weight) if t.grad is not None)


def group_rewards(case: Case) -> torch.Tensor:
    """Per-sequence 0/1 rewards: mixed in every group (dense) or equal in odd groups (rlvr)."""
    n_groups = case.n_seqs // case.group_size
    member = torch.arange(case.group_size)
    mixed = (member % 2 == 0).float()
    mixed[-1] = 1.0  # the off-policy trace is a correct solution
    rows = []
    for group in range(n_groups):
        all_correct = case.scenario == "rlvr" and group % 2 == 1
        rows.append(torch.ones(case.group_size) if all_correct else mixed)
    return torch.stack(rows)  # [n_groups, group_size]


def peaked_hidden_weight(T: int, H: int, V: int, gen: torch.Generator, device: str,
                         margin: float = 20.0, spread: float = 2.0, unsure_fraction: float = 0.2,
                         zipf_slope: float = 1.5):
    """fp32 hidden [T, H], weight [V, H] and targets [T] whose logits look like a trained LM's.

    Vocabulary ids run from common to rare (as BPE vocabularies roughly do): targets are drawn
    with Zipf frequencies, and logit dimension 0 carries a log-frequency bias
    -zipf_slope * log(1 + v / 64). The other dimensions: unit weight rows, and each hidden state
    is `margin` x its target's row plus noise of std `spread` on every logit; a fraction of the
    tokens is unsure between the target and another candidate (both at margin / sqrt(2)).
    """
    ranks = torch.arange(V, device=device, dtype=torch.float32)
    zipf = 1.0 / (ranks + 10.0)
    targets = torch.multinomial(zipf, T, replacement=True, generator=gen)
    weight = torch.randn(V, H, device=device, generator=gen)
    weight /= weight.norm(dim=1, keepdim=True)
    hidden = margin * weight[targets]
    unsure = torch.rand(T, device=device, generator=gen) < unsure_fraction
    other = weight[torch.multinomial(zipf, T, replacement=True, generator=gen)]
    hidden = torch.where(unsure[:, None], (hidden + margin * other) / 2**0.5, hidden)
    hidden += spread * torch.randn(T, H, device=device, generator=gen)
    # A hidden coordinate of size `margin` carries the frequency bias, so weight rows keep their
    # unit scale (a large weight coordinate would dominate d(hidden)).
    weight[:, 0] = -zipf_slope / margin * torch.log1p(ranks / 64.0)
    hidden[:, 0] = margin
    return hidden, weight, targets


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    """Deterministic random inputs for `case` on `device` (generated there: fast on a GPU)."""
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    if case.scenario == "peaked":
        hidden, weight, targets = peaked_hidden_weight(case.T, case.H, case.V, gen, device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    else:
        hidden = torch.randn(case.T, case.H, device=device, generator=gen).to(dtype)
        # Weights scaled so that logits have unit variance, like a trained LM head's magnitude.
        weight = (torch.randn(case.V, case.H, device=device, generator=gen) / case.H**0.5).to(dtype)
        targets = torch.randint(0, case.V, (case.T,), device=device, generator=gen)

    rewards = group_rewards(case)
    seq_advantages = (rewards - rewards.mean(dim=1, keepdim=True)).reshape(-1)  # no std division
    seq_ids = torch.arange(case.n_seqs).repeat_interleave(case.seq_len)
    off_policy_seq = torch.arange(case.n_seqs) % case.group_size == case.group_size - 1
    return Inputs(
        case=case,
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        targets=targets,
        advantages=seq_advantages[seq_ids].to(device),
        seq_advantages=seq_advantages.to(device),
        loss_mask=torch.ones(case.T, dtype=torch.bool, device=device),
        off_policy_mask=off_policy_seq[seq_ids].to(device),
        seq_ids=seq_ids.to(device),
        config=case.config(),
    )


# The scenarios an implementation runs (the rest: dense and rlvr only). The peaked case is there
# for the gradient filter: the floor and the exact triton backend beside it.
RUNS_ON = {"gemm_floor": SCENARIOS, "triton": SCENARIOS, "triton_filter": ("peaked",),
           "gemm_logits": ("dense",), "token_logprobs": ("dense",)}
CUDA_IMPLS = ["gemm_floor", "gemm_logits", "naive", "liger", "torch", "triton", "triton_256mb",
              "triton_filter", "token_logprobs"]


# Implementations with opt-in switches to measure beside the plan's own, comma-separated
# (benchmarks/impls.py: SWITCHES), e.g. LUFFY_BENCH_EXTRA_IMPLS=triton+half,triton_256mb+half.
EXTRA_IMPLS = "LUFFY_BENCH_EXTRA_IMPLS"


def base_impl(impl: str) -> str:
    """The implementation without its switches ("triton+half" -> "triton"; impls.variant says
    what the switches set)."""
    return impl.split("+")[0]


def extra_impls() -> list[str]:
    from .impls import variant

    names = [name.strip() for name in os.environ.get(EXTRA_IMPLS, "").split(",") if name.strip()]
    for name in names:
        v = variant(name)  # an unknown switch raises here, naming it
        if not (v.env or v.config) or v.base not in CUDA_IMPLS:
            raise ValueError(f"{EXTRA_IMPLS}: {name!r} is not one of the plan's implementations "
                             f"({', '.join(CUDA_IMPLS)}) with a switch")
    return names


def runs_on(impl: str, case: Case) -> bool:
    """Whether `impl` is measured on `case`'s scenario at all (RUNS_ON)."""
    return case.scenario in RUNS_ON.get(base_impl(impl), ("dense", "rlvr"))


@dataclass
class Plan:
    """Everything one benchmark run measures on one device."""

    device: str
    tag: str  # names the result files: cpu, cuda, or dry-run
    impls: list[str]
    main_cases: list[Case]
    memory_cases: list[Case]  # subset of main_cases whose extra memory is measured
    sweep_cases: list[Case]  # dense, growing T: peak memory only
    rounds: int
    warmup_rounds: int
    # Largest T an implementation is timed at / measured at (to bound the run), by name.
    max_tokens_speed: dict[str, int] = field(default_factory=dict)
    max_tokens_memory: dict[str, int] = field(default_factory=dict)

    def too_large(self, impl: str, case: Case, kind: str) -> Optional[str]:
        """Why `impl` is not run at `case` in this plan (None: it is)."""
        if not runs_on(impl, case):
            return f"{impl} is not run on the {case.scenario} scenario in this plan"
        limits = self.max_tokens_speed if kind == "time" else self.max_tokens_memory
        limit = limits.get(base_impl(impl))
        if limit is not None and case.T > limit:
            return f"{impl} is run up to T={limit} in this plan (keeps the run short)"
        return None


def _int_env(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value else None


def make_plan(device: str, dry_run: bool = False) -> Plan:
    """The CPU plan (fp32, one shape) or the CUDA plan (bf16, three shapes and the peaked case);
    dry-run shrinks it."""
    cuda = device.startswith("cuda")
    if dry_run:
        # The CUDA plan's structure at toy sizes, on whatever device is present.
        # (Small enough for the Triton interpreter when there is no GPU.)
        main = [Case(s, T, H, V) for (H, V) in [(32, 500), (48, 512)] for T in (128, 256)
                for s in ("dense", "rlvr")] + [Case("peaked", 128, 32, 500)]
        memory = [c for c in main if c.scenario == "dense" or c is main[1]]
        sweep = [Case("dense", T, 32, 500) for T in (128, 256, 512)]
        return Plan(device, "dry-run", CUDA_IMPLS + extra_impls(), main, memory, sweep, rounds=1,
                    warmup_rounds=1, max_tokens_speed={"torch": 128, "token_logprobs": 128,
                                                       "gemm_logits": 128},
                    max_tokens_memory={"torch": 256})
    if cuda:
        # (32768, 3584, 152064) was dropped in round 2 to make room for the new rows.
        shapes = [(8192, 4096, 151936), (8192, 3584, 152064), (32768, 4096, 151936)]
        main = [Case(s, T, H, V, "bfloat16") for (T, H, V) in shapes for s in ("dense", "rlvr")]
        main.append(Case("peaked", *shapes[0], "bfloat16"))
        # Extra memory hardly depends on the scenario: both only at the first shape.
        memory = [c for c in main if c.scenario == "dense" or c is main[1]]
        sweep = [Case("dense", T, 4096, 151936, "bfloat16")
                 for T in (4096, 8192, 16384, 32768, 65536, 131072)]
        rounds = _int_env("LUFFY_BENCH_ROUNDS") or 3
        # The torch backend is the CPU path; on a GPU its small chunks make it slow at large T.
        return Plan(device, "cuda", CUDA_IMPLS + extra_impls(), main, memory, sweep, rounds=rounds,
                    warmup_rounds=1,
                    max_tokens_speed={"torch": 8192, "token_logprobs": 8192, "gemm_logits": 8192},
                    max_tokens_memory={"torch": 32768})
    impls = ["naive", "liger", "torch", "triton"]
    main = [Case(s, 4096, 512, 32768) for s in ("dense", "rlvr")]
    # Smaller H and V keep the sweep to about a minute and a half on 2 cores; what grows with T
    # (naive's [T, V] tensors) still dominates.
    sweep = [Case("dense", T, 64, 8192) for T in (1024, 4096, 16384, 65536)]
    rounds = _int_env("LUFFY_BENCH_ROUNDS") or 3
    # No warm-up on the CPU: nothing is compiled or autotuned, and each round costs seconds.
    return Plan(device, "cpu", impls, main, list(main), sweep, rounds=rounds, warmup_rounds=0)
