"""The performance targets of docs/design.md, each beside the ratio a run measured.

CPU plan: the CPU targets. CUDA plan (and its dry run): issue 13's round-2 targets, from the
speed and memory records and, where the GPU parity check wrote benchmarks/gpu_parity.py's JSON
into the same folder, its precision rows (fp32 at the LM-head shape, the gradient filter's error).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from luffy_fast.config import DEFAULT_MEMORY_BUDGET_MB

from .cases import base_impl

FLAT_LIMIT, FLAT_FROM = 1.25, 4096  # "flat in T": extra memory grows at most 1.25 × from T=4096 on
OURS = {"cpu": "torch", "dry-run": "triton", "cuda": "triton"}  # dry-run mirrors the CUDA plan
# The triton memory budgets by plan (the device defaults; the dry run is on a CPU).
BUDGET_MIB = {"triton": {"cuda": DEFAULT_MEMORY_BUDGET_MB["cuda"],
                         "dry-run": DEFAULT_MEMORY_BUDGET_MB["cpu"]},
              "triton_256mb": {"cuda": 256, "dry-run": 256}}


def load_parity(out_dir: Path) -> Optional[dict]:
    path = Path(out_dir) / "gpu_parity.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def targets(summary: dict, parity: Optional[dict] = None) -> list[dict]:
    """Each target with its measured value (None: not measured) and whether it is met."""
    tag = summary["meta"].get("tag", "cpu")
    ours = OURS.get(tag, "torch")
    gpu = tag in ("cuda", "dry-run")
    out = []

    def check(name: str, value: Optional[float], limit: float, at_most: bool, where: str) -> None:
        met = None if value is None else (value <= limit if at_most else value >= limit)
        out.append({"target": name, "where": where, "measured": value, "limit": limit, "met": met})

    for entry in summary["cases"].values():
        case, impls = entry["case"], entry["impls"]
        ratio = lambda impl, key, impls=impls: impls.get(impl, {}).get("ratios", {}).get(key)  # noqa: E731
        # each target also for the implementation with opt-in switches, where measured
        variants = lambda impl, impls=impls: [impl] + sorted(  # noqa: E731
            name for name in impls if name.startswith(impl + "+"))
        where = f"{case['scenario']} T={case['T']} H={case['H']} V={case['V']}"
        if not gpu:
            if case["scenario"] == "rlvr":
                check(f"{ours} time ≤ 0.75 × naive (rlvr)", ratio(ours, "time_vs_naive"), 0.75, True, where)
                continue
            check(f"{ours} time ≤ 1.0 × naive", ratio(ours, "time_vs_naive"), 1.0, True, where)
            check(f"{ours} extra memory ≤ 0.08 × naive", ratio(ours, "memory_vs_naive"), 0.08, True, where)
            check(f"{ours} ≥ 1.25 × faster than Liger", ratio(ours, "liger_speedup"), 1.25, False, where)
            continue
        if case["scenario"] == "rlvr":
            for impl in variants("triton"):
                check(f"{impl} ≤ 0.80 × bare GEMMs (rlvr)", ratio(impl, "time_vs_floor"), 0.80, True, where)
        elif case["scenario"] == "peaked":
            check("grad filter ≤ 0.90 × bare GEMMs (peaked)", ratio("triton_filter", "time_vs_floor"),
                  0.90, True, where)
        else:
            for impl in variants("triton"):
                check(f"{impl} ≤ 1.05 × bare GEMMs (default budget)", ratio(impl, "time_vs_floor"), 1.05,
                      True, where)
            for impl in variants("triton_256mb"):
                check(f"{impl} ≤ 1.10 × bare GEMMs at 256 MiB", ratio(impl, "time_vs_floor"), 1.10,
                      True, where)
                memory = impls.get(impl, {}).get("memory") or {}
                if memory:
                    mib = memory.get("extra_bytes") / 2**20 if memory.get("status") == "ok" else None
                    check(f"{impl}: extra memory ≤ 256 (MiB)", mib, 256, True, where)
            check("triton ≥ 10 × faster than Liger", ratio("triton", "liger_speedup"), 10.0, False, where)
            check("torch backend ≤ 1.5 × naive", ratio("torch", "time_vs_naive"), 1.5, True, where)
            for impl in variants("token_logprobs") if "token_logprobs" in impls else []:
                check(f"{impl} ≤ 1.1 × one bare GEMM", ratio(impl, "time_vs_one_gemm"), 1.1, True, where)

    # Flat in T: extra memory at the largest swept T over that at T = 4096 (docs/design.md's range
    # starts there; below it a chunked implementation's buffers are not full yet).
    swept = {name for e in summary["sweep"].values() for name in e["impls"]}
    for impl in [ours, "triton_256mb", *sorted(n for n in swept if "+" in n)] if gpu else [ours]:
        points = sorted((e["case"]["T"], e["impls"][impl]["extra_bytes"]) for e in summary["sweep"].values()
                        if e["impls"].get(impl, {}).get("status") == "ok" and e["case"]["T"] >= FLAT_FROM)
        if len(points) >= 2:
            (t0, m0), (t1, m1) = points[0], points[-1]
            check(f"{impl} extra memory flat in T (growth ≤ {FLAT_LIMIT} ×)", m1 / m0 if m0 else None,
                  FLAT_LIMIT, True, f"sweep T={t0}…{t1}")
            # the other half of "flat within the budget": the triton budgets are upper bounds
            budget = BUDGET_MIB.get(base_impl(impl), {}).get(tag)
            if budget:
                check(f"{impl} extra memory within its {budget:g} MiB budget at every T (MiB)",
                      max(m for _, m in points) / 2**20, budget, True, f"sweep T={t0}…{t1}")
    if gpu and parity:
        out += parity_targets(parity)
    return out


def parity_targets(parity: dict) -> list[dict]:
    """The precision targets from gpu_parity.json's tagged rows (worst case of each)."""
    out = []
    for tag, name, limit in (("fp32_lm_head", "fp32 grads ≤ 2e-5 vs float64", 2e-5),
                             ("grad_filter", "grad filter error ≤ 1e-3 (peaked, fp32)", 1e-3)):
        rows = [r for r in parity.get("rows", []) if r.get("target") == tag]
        if not rows:
            continue
        errors = [max(r.get("d_hidden", float("nan")), r.get("d_weight", float("nan"))) for r in rows]
        worst = max(errors) if all(e == e for e in errors) else float("nan")
        r0 = rows[0]
        out.append({"target": name, "where": f"T={r0['T']} H={r0['H']} V={r0['V']} ({len(rows)} runs)",
                    "measured": worst, "limit": limit, "met": worst <= limit})
    return out
