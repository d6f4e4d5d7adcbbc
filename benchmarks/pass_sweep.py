"""How fast can the two passes over kept logits go: each pass timed at every tile config of a
grid wider than its autotune list, beside what the memory allows, on one chunk of the dense case
(and the opt-in lean kernels of both, kernels/forward_lean.py and backward_lean.py, beside them).

The kept strategy reads each chunk of GEMM-written logits twice: the statistics pass
(kernels/forward.py, `FROM_LOGITS`: logsumexp, log pi, E_p[z]) and the dL/dz pass written over
them (kernels/backward.py: grad_logits_in_place). Round 4 measured the first at ~1.2 TB/s on
16-bit logits and the second at ~2.7 TB/s. Here each config is set as the autotuner's only one
and timed as the autotuners time one (median), its outputs are checked against the autotuned
default's, and it is set beside two torch rooflines on the same buffer: a row max (reads it all)
and an in-place scale (reads and writes it all). Then the statistics pass's vocabulary split
count is varied around the default at the best config. Writes pass_sweep.txt and
pass_sweep.json under $OUT.

    python -m benchmarks.pass_sweep [--shape T,H,V] [--budget-mb 1024] [--seconds 150]

With BENCH_DRY_RUN=1 (or on a CPU) it runs a toy chunk on the interpreter with two configs a pass.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from luffy_fast import LuffyLossConfig  # noqa: E402
from luffy_fast.kernels import backward, backward_lean, forward, forward_lean  # noqa: E402
from luffy_fast.kernels.function import PER_TOKEN_BYTES  # noqa: E402
from luffy_fast.kernels.utils import tuning_bench  # noqa: E402

DRY = not torch.cuda.is_available() or os.environ.get("BENCH_DRY_RUN") == "1"


def grid(dry: bool) -> list[triton.Config]:
    """Row block x tile width for the memory-bound passes: 18 tiles of 2k to 16k entries, with 4
    warps up to 4k entries and 8 above (the passes take the same config shape; BLOCK_H is
    unused)."""
    if dry:
        return [triton.Config({"BLOCK_T": 4, "BLOCK_V": 32, "BLOCK_H": 16}, num_warps=4),
                triton.Config({"BLOCK_T": 2, "BLOCK_V": 64, "BLOCK_H": 16}, num_warps=4)]
    shapes = [(t, v) for t in (1, 2, 4, 8, 16, 32) for v in (256, 512, 1024, 2048, 4096)
              if 2048 <= t * v <= 16384]
    return [triton.Config({"BLOCK_T": t, "BLOCK_V": v, "BLOCK_H": 16},
                          num_warps=4 if t * v <= 4096 else 8) for t, v in shapes]


def staged(config: triton.Config, stages: int) -> triton.Config:
    return triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=stages)


def label(config: triton.Config) -> str:
    return (f"T{config.kwargs['BLOCK_T']} V{config.kwargs['BLOCK_V']} "
            f"w{config.num_warps} s{config.num_stages}" + (" TMA" if config.kwargs.get("TMA") else "")
            + (" WS" if config.kwargs.get("WS") else ""))


class SweepLog:
    """A sweep's output: lines printed as they come and kept, and both written under $OUT (or
    ./gpu_results) as <name>.txt and <name>.json by `save`, after each part, so that a stage cut
    short keeps what it timed."""

    def __init__(self, name: str) -> None:
        self.name, self.lines = name, []
        self.out = Path(os.environ.get("OUT") or "gpu_results")
        self.out.mkdir(parents=True, exist_ok=True)

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self, result: dict) -> None:
        (self.out / f"{self.name}.json").write_text(json.dumps(result, indent=1))
        (self.out / f"{self.name}.txt").write_text("\n".join(self.lines) + "\n")


def time_ms(run) -> float:
    """Median milliseconds of `run`, timed as the autotuners time a config (kernels/utils.py:
    tuning_bench: CUDA events after a warm-up, the GPU given a head start; wall clock on a CPU)."""
    return tuning_bench(run, quantiles=(0.5,))[0]


class Chunk:
    """One chunk of the dense case's kept logits (random, in `dtype`) with the per-token values
    the dL/dz pass reads, computed by the statistics pass's autotuned default."""

    def __init__(self, rows: int, V: int, dtype: torch.dtype, grad_dtype: torch.dtype,
                 device: torch.device, seed: int = 0) -> None:
        generator = torch.Generator(device).manual_seed(seed)
        self.logits = (torch.randn(rows, V, device=device, generator=generator) * 2).to(dtype)
        self.pristine = self.logits.clone()
        self.grad_dtype, self.temperature = grad_dtype, 1.0
        self.targets = torch.randint(0, V, (rows,), device=device, generator=generator)
        # every other row's target is its largest logit, as a sampled token often is (the lean
        # forward starts a row's max from its target's logit)
        self.targets[::2] = self.logits[::2].argmax(dim=1)
        self.rows = torch.arange(rows, device=device)
        # the forward's dtype flag and H bucket come from these; FROM_LOGITS reads neither
        self.hidden = torch.empty(1, 16, dtype=grad_dtype, device=device)
        self.weight = torch.empty(V, 16, dtype=grad_dtype, device=device)
        self.coef = torch.randn(rows, device=device, generator=generator)
        self.entropy_weight = torch.full((rows,), 1e-3, device=device)
        self.stats = self.forward()

    def forward(self, lean: bool = False):
        """The statistics pass: the split kernel, or the opt-in lean one."""
        if lean:
            return forward_lean.lean_forward(self.logits, None, self.targets, self.temperature,
                                             True)
        return forward.logsumexp_forward(self.hidden, self.weight, None, self.rows, self.targets,
                                         self.temperature, True, logits=self.logits)

    def grad(self, lean: bool = False) -> torch.Tensor:
        """The in-place dL/dz pass: the default kernel, or the opt-in lean one."""
        lse, logprobs, row_max, expected_shift = self.stats
        return backward.grad_logits_in_place(self.logits, None, self.targets, lse, logprobs,
                                             self.coef, self.entropy_weight, row_max,
                                             expected_shift, self.temperature, self.grad_dtype,
                                             lean=lean)

    def fresh_forward(self, lean: bool = False):
        self.logits.copy_(self.pristine)  # the dL/dz pass's timing runs wrote over them
        return self.forward(lean)

    def fresh_grad(self, lean: bool = False) -> torch.Tensor:
        self.logits.copy_(self.pristine)
        return self.grad(lean).clone()


def only_config(kernel, config: triton.Config) -> triton.Config:
    """Make `config` the autotuner's one config, without the meta-parameters the kernel does not
    take (the in-place pass has no BLOCK_H): it then runs as is. Returns the config installed."""
    tuner = kernel.fn
    kwargs = {k: v for k, v in config.kwargs.items() if k in tuner.arg_names}
    tuner.configs = [triton.Config(kwargs, num_warps=config.num_warps,
                                   num_stages=config.num_stages)]
    return tuner.configs[0]


class KernelConfigs:
    """The kernel's own configs and tuning cache, put back on exit (the sweep changes both)."""

    def __init__(self, kernel) -> None:
        self.tuner = kernel.fn

    def __enter__(self):
        self.configs, self.cache = list(self.tuner.configs), dict(self.tuner.cache)
        return self

    def __exit__(self, *exc) -> None:
        self.tuner.configs = self.configs
        self.tuner.cache.clear()
        self.tuner.cache.update(self.cache)


def agrees(got, expected, tolerance: float) -> bool:
    """Each output within `tolerance` of the expected one, relative in the L2 norm (entry-wise
    tolerances would pass a dL/dz off by 40 %: at V = 151936 nearly every entry is tiny)."""
    pairs = [(g.float(), e.float()) for g, e in zip(got, expected) if e is not None]
    return all(bool(torch.isfinite(g).all()) and float((g - e).norm()) <= tolerance * float(e.norm())
               for g, e in pairs)


def time_configs(name: str, kernel, run, moved: int, check, configs, deadline: float,
                 log) -> list[dict]:
    """Each config as the kernel's only one: its median time, bandwidth and agreement."""
    rows = []
    for config in configs:
        if time.monotonic() > deadline:
            log(f"  {name}: deadline reached")
            break
        installed = only_config(kernel, config)
        try:
            ms = time_ms(run)
            ok = check()
        except Exception as error:  # out of resources, say: the others still run
            rows.append({"config": config, "error": repr(error)[:200]})
            log(f"  {name} {label(config)}: ERROR {rows[-1]['error']}")
            continue
        rows.append({"config": config, "ms": ms, "gb_per_s": moved / ms / 1e6, "agrees": ok,
                     "ran": kernel.fn.best_config is installed})
        log(f"  {name} {label(config)}: {ms:.3f} ms, {rows[-1]['gb_per_s']:.0f} GB/s"
            + ("" if ok else "  DISAGREES"))
    return rows


def sweep(chunk: Chunk, configs, deadline: float, log) -> dict:
    """The passes at every config (the statistics and dL/dz passes, each with its opt-in lean
    kernel beside it), then the split counts; each pass stops after 22 % of the time to
    `deadline`, so that all five parts get timed."""
    nbytes = chunk.logits.numel() * chunk.logits.element_size()
    grad_bytes = chunk.logits.numel() * torch.empty(0, dtype=chunk.grad_dtype).element_size()
    expected_grad = chunk.fresh_grad()
    rooflines = {
        "read (row max)": (time_ms(lambda: torch.amax(chunk.pristine, dim=1)), nbytes),
        "read + write (in-place scale)": (time_ms(lambda: chunk.pristine.mul_(1.0)), 2 * nbytes),
    }
    result = {"rows": chunk.logits.shape[0], "vocab": chunk.logits.shape[1],
              "logits": str(chunk.logits.dtype)[6:], "grad": str(chunk.grad_dtype)[6:],
              "rooflines": {name: {"ms": ms, "gb_per_s": b / ms / 1e6}
                            for name, (ms, b) in rooflines.items()},
              "statistics": [], "lean_statistics": [], "grad_in_place": [],
              "lean_grad_in_place": [], "splits": []}
    for name in rooflines:
        log(f"  roofline {name}: {result['rooflines'][name]['ms']:.3f} ms, "
            f"{result['rooflines'][name]['gb_per_s']:.0f} GB/s")
    passes = (("statistics", forward._forward_kernel, chunk.forward, nbytes,
               lambda: agrees(chunk.fresh_forward(), chunk.stats, 1e-5)),
              ("lean_statistics", forward_lean._lean_forward_kernel,
               lambda: chunk.forward(lean=True), nbytes,
               lambda: agrees(chunk.fresh_forward(lean=True), chunk.stats, 1e-5)
               and torch.equal(chunk.logits, chunk.pristine)),
              ("grad_in_place", backward._grad_logits_in_place_kernel, chunk.grad, nbytes + grad_bytes,
               lambda: agrees([chunk.fresh_grad()], [expected_grad], 1e-3)),
              ("lean_grad_in_place", backward_lean._lean_grad_logits_kernel,
               lambda: chunk.grad(lean=True), nbytes + grad_bytes,
               lambda: agrees([chunk.fresh_grad(lean=True)], [expected_grad], 1e-3)))
    fastest = {}
    share = 0.22 * (deadline - time.monotonic())
    for name, kernel, run, moved, check in passes:
        until = time.monotonic() + share
        with KernelConfigs(kernel):
            rows = time_configs(name, kernel, run, moved, check, configs, until, log)
            # the two fastest again with shallower and deeper software pipelining
            best = sorted((r for r in rows if r.get("agrees")), key=lambda r: r["ms"])[:2]
            again = [staged(r["config"], stages) for r in best for stages in (1, 4)]
            rows += time_configs(name, kernel, run, moved, check, again, until, log)
            fastest[name] = min((r for r in rows if r.get("agrees")), key=lambda r: r["ms"],
                                default=None)
            result[name] = [{**r, "config": label(r["config"])} for r in rows]
    if fastest.get("statistics") and time.monotonic() < deadline:
        config = fastest["statistics"]["config"]
        default = forward.num_vocab_splits
        with KernelConfigs(forward._forward_kernel):
            only_config(forward._forward_kernel, config)
            base = default(*chunk.logits.shape)
            try:
                for splits in sorted({max(1, base // 2), base, 2 * base, 4 * base}):
                    forward.num_vocab_splits = lambda n, v, s=splits: s
                    ms = time_ms(chunk.forward)
                    result["splits"].append({"config": label(config), "splits": splits,
                                             "default": splits == base, "ms": ms,
                                             "gb_per_s": nbytes / ms / 1e6})
                    log(f"  statistics at {label(config)}, {splits} splits: {ms:.3f} ms")
            finally:
                forward.num_vocab_splits = default
    return result


def chunk_rows(T: int, H: int, V: int, budget_mb: float, logit_size: int, hidden_size: int) -> int:
    """Rows of the dense case's kept chunks (kernels/function.py: plan, then equal chunks)."""
    budget = budget_mb * 2**20 - T * PER_TOKEN_BYTES
    most = int(budget // (V * logit_size + 2 * H * hidden_size))
    return -(-T // -(-T // most))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192,4096,151936", help="T,H,V of the dense case")
    parser.add_argument("--budget-mb", type=float, help="the chunks' budget (default: the op's)")
    parser.add_argument("--seconds", type=float, default=150, help="stop sweeping after this")
    args = parser.parse_args()
    T, H, V = (int(x) for x in args.shape.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget_mb = args.budget_mb or LuffyLossConfig().memory_budget_bytes(device) / 2**20
    log = SweepLog("pass_sweep")

    deadline = time.monotonic() + args.seconds
    cases = [(torch.bfloat16, 2), (torch.float32, 4)]  # 16-bit kept logits, then fp32 ones
    results = []
    for index, (dtype, size) in enumerate(cases):
        if time.monotonic() > deadline:
            log(f"== {str(dtype)[6:]} logits: no time left")
            break
        rows = 8 if DRY else chunk_rows(T, H, V, budget_mb, size, 2)
        vocab = 200 if DRY else V
        log(f"== {str(dtype)[6:]} logits, bf16 dL/dz, chunk of {rows} x {vocab}")
        chunk = Chunk(rows, vocab, dtype, torch.bfloat16, device)
        share = (deadline - time.monotonic()) / (len(cases) - index)
        results.append(sweep(chunk, grid(DRY), time.monotonic() + share, log))
        del chunk
        log.save({"shape": [T, H, V], "results": results})


if __name__ == "__main__":
    main()
