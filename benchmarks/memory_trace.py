"""Which allocations make the op's peak memory on a GPU: the CUDA caching allocator's trace of
one forward + backward, replayed to the moment the most bytes were live, with the Python line
that allocated each of them.

For each budget, in one process, as benchmarks/memory.py measures them (a dense case first, then
the RLVR case): a warm-up step and a traced step of the dense case, then the RLVR case's first
step (where a new chunk size autotunes) and its second. Writes memory_trace.txt under $OUT.

    python -m benchmarks.memory_trace [--shape T,H,V] [--impls triton,triton_256mb] [--top 8]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .cases import Case, make_inputs
from .impls import make_step

MiB = 2**20
ROOT = str(Path(__file__).resolve().parent.parent)  # this repository (kernels/ is mapped from it)


def _where(event: dict) -> str:
    """The innermost frame of this project's code that made the allocation."""
    frames = event.get("frames") or []
    for frame in frames:
        name = frame.get("filename", "")
        if name.startswith(ROOT) or "/luffy_fast/" in name:
            return f"{Path(name).name}:{frame.get('line')} {frame.get('name')}"
    return frames[0].get("name", "?") if frames else "?"


def traced_step(step, top: int) -> list[str]:
    """Run `step` once under the allocator's history; the peak and its largest live blocks."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=500000)
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated() - base
    live: dict[int, dict] = {}
    total = best = 0
    at_best: list[dict] = []
    for event in snapshot["device_traces"][torch.cuda.current_device()]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > best:
                best, at_best = total, list(live.values())
        elif event["action"] == "free_requested":
            # a block from before the trace (the step's inputs' old gradients, say) counts too,
            # so that the replayed total is the allocator's, relative to the step's start
            freed = live.pop(event["addr"], None)
            total -= event["size"] if freed is None else freed["size"]
    lines = [f"  peak above the step's start: {peak / MiB:.1f} MiB (allocator), "
             f"{best / MiB:.1f} MiB (replayed trace)"]
    for event in sorted(at_best, key=lambda e: -e["size"])[:top]:
        lines.append(f"    {event['size'] / MiB:9.1f} MiB  {_where(event)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192,4096,151936", help="T,H,V")
    parser.add_argument("--impls", default="triton,triton_256mb")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    T, H, V = (int(x) for x in args.shape.split(","))
    out = Path(os.environ.get("OUT") or "gpu_results")
    out.mkdir(parents=True, exist_ok=True)
    for impl in args.impls.split(","):
        lines = []
        try:
            dense = make_inputs(Case("dense", T, H, V, "bfloat16"), "cuda")
            step = make_step(impl, dense)
            step()  # compile and autotune on the dense case, as memory.py's warm-up does
            lines += [f"== {impl} dense T={T} H={H} V={V}: second step"] + traced_step(step, args.top)
            del dense, step
            torch.cuda.empty_cache()
            rlvr = make_inputs(Case("rlvr", T, H, V, "bfloat16"), "cuda")
            step = make_step(impl, rlvr)
            for which in ("first", "second"):
                lines += [f"== {impl} rlvr T={T}: {which} step"] + traced_step(step, args.top)
            del rlvr, step
            torch.cuda.empty_cache()
        except Exception as error:  # one failure must not hide the others
            lines.append(f"== {impl}: ERROR {error!r}"[:500])
        text = "\n".join(lines)
        print(text, flush=True)
        with open(out / "memory_trace.txt", "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
