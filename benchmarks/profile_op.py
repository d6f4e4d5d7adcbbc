"""Where the fused op's time goes on a GPU: torch.profiler over one forward + backward.

For each (scenario, implementation) pair: the wall time of one step (median of 5, CUDA events),
the CUDA time the profiler saw, and the kernels that took the most of it. The gap between the
two is time the GPU sat idle (host-side work, synchronizations). Last, the config each
autotuned kernel chose per tuning key. Writes profile.txt under $OUT.

    python -m benchmarks.profile_op [--shape T,H,V] [--runs dense:triton,rlvr:triton,...] [--trace]
    python -m benchmarks.profile_op --runs rows    # the opt-in whole-row forward against the default
    python -m benchmarks.profile_op --runs switches   # both opt-in switches (rows, half) and the default
    python -m benchmarks.profile_op --runs lean   # the opt-in lean passes (LUFFY_FAST_LEAN=1)
    python -m benchmarks.profile_op --runs fused  # the statistics in the GEMM (LUFFY_FAST_FUSED_FORWARD=1)
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .cases import Case, make_inputs
from .impls import make_step

DEFAULT_RUNS = "dense:triton,dense:triton_256mb,rlvr:triton,peaked:triton,peaked:triton_filter"
# The opt-in whole-row forward (kernels/forward_rows.py) beside the default, in one process:
# `--runs rows` (benchmarks/impls.py: SWITCHES).
ROW_FORWARD_RUNS = ("dense:gemm_logits,dense:token_logprobs,dense:token_logprobs+rows,dense:triton,"
                    "dense:triton+rows,dense:triton_256mb,dense:triton_256mb+rows,rlvr:triton,"
                    "rlvr:triton+rows")
# Both opt-in switches (the row forward, 16-bit kept logits: benchmarks/impls.py SWITCHES) beside
# the default, at the default budget, at 256 MiB and on the RLVR batch: `--runs switches`.
SWITCH_RUNS = ",".join(
    ["dense:gemm_floor", "dense:gemm_logits", "dense:token_logprobs", "dense:token_logprobs+half",
     "dense:token_logprobs+rows+half"]
    + [f"{scenario}:{impl}{switch}" for scenario, impl in
       (("dense", "triton"), ("dense", "triton_256mb"), ("rlvr", "triton"))
       for switch in ("", "+rows", "+half", "+rows+half")])


def _switch_preset(switch: str, small_budget: str) -> str:
    """Runs of a switch beside the default, each with fp32 and 16-bit kept logits: token_logprobs,
    the loss at the default budget and at `small_budget`'s, and the RLVR batch."""
    switches = ("", f"+{switch}", "+half", f"+{switch}+half")
    return ",".join(
        ["dense:gemm_floor", "dense:gemm_logits"]
        + [f"dense:token_logprobs{on}" for on in switches]
        + [f"{scenario}:{impl}{on}" for scenario, impl in
           (("dense", "triton"), ("dense", small_budget), ("rlvr", "triton")) for on in switches])


# The opt-in lean passes over kept logits (kernels/forward_lean.py, backward_lean.py): `--runs lean`.
LEAN_RUNS = _switch_preset("lean", "triton_256mb")
# The opt-in forward with the statistics in a Triton GEMM's epilogue (kernels/forward_fused.py)
# beside cuBLAS's GEMM and the pass: `--runs fused`. With the switch token_logprobs keeps no
# logits at any budget, and triton_lowmem's forward (the recompute strategy) is the fused kernel.
FUSED_RUNS = _switch_preset("fused", "triton_lowmem")
PRESETS = {"rows": ROW_FORWARD_RUNS, "switches": SWITCH_RUNS, "lean": LEAN_RUNS,
           "fused": FUSED_RUNS}


def wall_ms(step, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def profile_one(scenario: str, impl: str, T: int, H: int, V: int, top: int = 12,
                trace: Path | None = None) -> str:
    inputs = make_inputs(Case(scenario, T, H, V, "bfloat16"), "cuda")
    step = make_step(impl, inputs)
    step(), step()  # compile, autotune, warm the allocator
    torch.cuda.synchronize()
    wall = wall_ms(step)
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace else [])
    with profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    events = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in events)
    lines = [f"== {scenario} {impl} T={T} H={H} V={V} bf16: wall {wall:.1f} ms, "
             f"CUDA {total_us / 1e3:.1f} ms (idle {wall - total_us / 1e3:.1f} ms)"]
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        lines.append(f"  {e.self_device_time_total / 1e3:8.2f} ms  {e.count:5d}x  {e.key[:90]}")
    if trace:  # the host side too: what the CPU did while the GPU waited
        prof.export_chrome_trace(str(trace))
        host = [e for e in averages if e.device_type == torch.autograd.DeviceType.CPU]
        lines.append("  host, by self CPU time:")
        for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:top + 8]:
            lines.append(f"  {e.self_cpu_time_total / 1e3:8.2f} ms  {e.count:5d}x  {e.key[:90]}")
    del inputs, step
    torch.cuda.empty_cache()
    return "\n".join(lines)


def tuning_choices() -> str:
    """The config each autotuned kernel chose, per tuning key (the bucketed sizes, then the
    tensor arguments' dtypes), for the process so far: what a fixed config would have to match."""
    from luffy_fast.kernels import backward, backward_lean, forward, forward_lean, forward_rows

    kernels = (forward._forward_kernel, backward._grad_logits_kernel,
               backward._grad_logits_in_place_kernel, forward_rows._row_forward_kernel,
               forward_lean._lean_forward_kernel, backward_lean._lean_grad_logits_kernel)
    lines = ["== autotune choices"]
    for kernel in kernels:
        tuner = kernel.fn  # under triton.heuristics
        for key, config in tuner.cache.items():
            sizes = [part for part in key if not str(part).startswith("torch.")]
            dtypes = sorted({str(part)[6:] for part in key if str(part).startswith("torch.")})
            lines.append(f"  {tuner.base_fn.__name__} {sizes} {'/'.join(dtypes)}: {config}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192,4096,151936", help="T,H,V")
    parser.add_argument("--runs", default=DEFAULT_RUNS,
                        help="scenario:implementation,... or a preset: 'rows' (ROW_FORWARD_RUNS), "
                             "'switches' (SWITCH_RUNS), 'lean' (LEAN_RUNS), 'fused' (FUSED_RUNS)")
    parser.add_argument("--trace", action="store_true",
                        help="also profile the host and write trace-<scenario>-<impl>.json")
    args = parser.parse_args()
    T, H, V = (int(x) for x in args.shape.split(","))
    out = Path(os.environ.get("OUT") or "gpu_results")
    out.mkdir(parents=True, exist_ok=True)
    runs = PRESETS.get(args.runs, args.runs)
    for run in runs.split(","):
        scenario, impl = run.split(":")
        try:
            trace = out / f"trace-{scenario}-{impl}.json" if args.trace else None
            text = profile_one(scenario, impl, T, H, V, trace=trace)
        except Exception as error:  # one failure must not hide the others
            text = f"== {scenario} {impl}: ERROR {error!r}"[:500]
        print(text, flush=True)
        with open(out / "profile.txt", "a") as f:
            f.write(text + "\n")
    text = tuning_choices()
    print(text, flush=True)
    with open(out / "profile.txt", "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
