"""Peak extra memory of each implementation (its own subprocess), at the plan's cases and over
the scaling sweep in T (drawn as a log-log plot by the report at the end of the run)."""

from __future__ import annotations

import pytest

from .impls import skip_reason
from .memory import measure_in_subprocess


def test_memory(bench, memory_impl) -> None:
    impl, plan = memory_impl, bench.plan
    cases = list(dict.fromkeys(plan.memory_cases + sorted(plan.sweep_cases, key=lambda c: c.T)))
    reason = skip_reason(impl, bench.device, bench.dry_run)
    if reason:
        for case in cases:
            bench.record("memory", case, impl, status="skipped", note=reason,
                         sweep=case in plan.sweep_cases)
        pytest.skip(reason)
    skipped = {c: plan.too_large(impl, c, "memory") for c in cases}
    measured = [c for c in cases if not skipped[c]]
    timeout = 120 if bench.dry_run else (900 if bench.device == "cpu" else 300)
    fraction = 0.6 if bench.device == "cpu" else 0.9
    rows = measure_in_subprocess(impl, bench.device, measured, timeout_s=timeout, budget_fraction=fraction)
    results = dict(zip(measured, rows))
    rows = [results.get(c) or {"status": "skipped", "note": skipped[c]} for c in cases]
    for case, row in zip(cases, rows):
        fields = {k: v for k, v in row.items() if k not in ("case_id", "impl")}
        if case in plan.memory_cases:
            bench.record("memory", case, impl, **fields)
        if case in plan.sweep_cases:
            bench.record("memory", case, impl, sweep=True, **fields)
    failed = [f"{case.id}: {row.get('note')}" for case, row in zip(cases, rows) if row["status"] == "error"]
    assert not failed, f"memory measurement failed for {impl}: {failed}"
