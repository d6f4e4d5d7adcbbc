"""Peak extra memory of one implementation, measured in a fresh subprocess.

    python -m benchmarks.memory --impl naive --device cpu --cases '[{"scenario": "dense", ...}]'

prints one JSON line per case. Extra memory = peak - baseline - the gradients' own bytes, where
the baseline is taken with the inputs allocated and no gradients, so what remains is what the
loss implementation needs beyond its inputs and its outputs:
- CPU: resident set size. The kernel's high-water mark (VmHWM) is reset before each case by
  writing 5 to /proc/self/clear_refs, and malloc_trim returns freed heap pages first, so the
  baseline is the current RSS and the peak is VmHWM. Without clear_refs it falls back to polling.
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats; baseline memory_allocated.
Cases run in the order given; once a case runs out of memory (or its predicted extra memory,
extrapolated linearly in T * V from the cases measured so far, would not fit), larger cases are
skipped.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- parent side -------------------------------------------------------------------------------

def measure_in_subprocess(impl: str, device: str, cases: list, timeout_s: float,
                          budget_fraction: float = 0.6) -> list[dict]:
    """Run the cases for `impl` in one fresh Python process; one result dict per case."""
    if not cases:
        return []
    cmd = [sys.executable, "-m", "benchmarks.memory", "--impl", impl, "--device", device,
           "--budget-fraction", str(budget_fraction),
           "--cases", json.dumps([c.to_dict() for c in cases])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        stdout, failure = proc.stdout, (proc.stderr.strip().splitlines() or [""])[-1]
        failure = None if proc.returncode == 0 else f"exit {proc.returncode}: {failure}"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        failure = f"timed out after {timeout_s:.0f} s"
    results = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row["case_id"]] = row
    return [results.get(c.id) or {"case_id": c.id, "impl": impl, "status": "error",
                                  "note": failure or "no result"} for c in cases]


# ---- child side --------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


class CpuPeak:
    """Peak resident memory over a region: VmHWM reset via clear_refs, or a polling thread."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = True
        except OSError:
            self.exact = False
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None

    def start(self) -> int:
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        baseline = _status_kib("VmRSS") * 1024
        if self.exact:
            Path("/proc/self/clear_refs").write_text("5")
        else:
            self._peak, self._stop = baseline, threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return baseline

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _status_kib("VmRSS") * 1024)

    def stop(self) -> int:
        if self.exact:
            return _status_kib("VmHWM") * 1024
        self._stop.set()
        self._thread.join()
        return max(self._peak, _status_kib("VmRSS") * 1024)


CPU_BUDGET_CAP = 8 * 2**30  # the CPU machine is shared: never take more than this


def _memory_budget(device: str, fraction: float) -> float:
    import torch

    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info()
        return fraction * free
    available = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return min(fraction * int(available.group(1)) * 1024, CPU_BUDGET_CAP)


def _child(impl: str, device: str, cases: list[dict], budget_fraction: float) -> None:
    import torch

    from .cases import Case, make_inputs
    from .impls import make_step, synchronize

    cuda = device.startswith("cuda")
    cases = [Case(**c) for c in cases]
    budget = _memory_budget(device, budget_fraction)
    cpu_peak = None if cuda else CpuPeak()

    def emit(case: Case, **row) -> None:
        print(json.dumps({"case_id": case.id, "impl": impl, "device": device, **row}), flush=True)

    # Warm-up: one-time allocations (thread pools, cuBLAS workspace, compiled graphs) happen here.
    first = cases[0]
    warm = first if cuda else Case(first.scenario, first.n_seqs * 16, first.H, first.V, first.dtype,
                                   first.n_seqs, first.group_size)
    inputs = make_inputs(warm, device)
    make_step(impl, inputs)()
    synchronize(device)
    del inputs

    per_logit = 0.0  # largest extra bytes per T * V seen so far, for the extrapolation
    oom_at = None  # T * V of the first case that ran out of memory
    for case in cases:
        predicted = per_logit * case.T * case.V
        if oom_at is not None and case.T * case.V >= oom_at:
            emit(case, status="skipped", note="a smaller case already ran out of memory")
            continue
        if predicted > budget:
            emit(case, status="skipped", predicted_bytes=int(predicted),
                 note=f"predicted {predicted / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB")
            continue
        inputs = make_inputs(case, device)
        step = make_step(impl, inputs)
        try:
            if cuda:
                synchronize(device)
                torch.cuda.reset_peak_memory_stats()
                baseline = torch.cuda.memory_allocated()
                step()
                synchronize(device)
                peak = torch.cuda.max_memory_allocated()
            else:
                baseline = cpu_peak.start()
                step()
                peak = cpu_peak.stop()
        except torch.cuda.OutOfMemoryError as exc:
            oom_at = case.T * case.V
            emit(case, status="oom", note=str(exc).splitlines()[0][:200])
        else:
            grad_bytes = inputs.grad_bytes()
            extra = peak - baseline - grad_bytes
            per_logit = max(per_logit, extra / (case.T * case.V))
            emit(case, status="ok", extra_bytes=int(extra), peak_bytes=int(peak),
                 baseline_bytes=int(baseline), grad_bytes=int(grad_bytes),
                 method="cuda.max_memory_allocated" if cuda
                 else ("VmHWM" if cpu_peak.exact else "RSS polling"))
        del inputs, step
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", required=True, help="JSON list of Case fields")
    parser.add_argument("--budget-fraction", type=float, default=0.6)
    args = parser.parse_args()
    _child(args.impl, args.device, json.loads(args.cases), args.budget_fraction)


if __name__ == "__main__":
    main()
