"""Forward + backward time of every implementation on the plan's cases (pytest-benchmark median)."""

from __future__ import annotations

import pytest
import torch

from .impls import make_step, skip_reason, synchronize


def test_speed(benchmark, bench, speed_case, speed_impl) -> None:
    case, impl = speed_case, speed_impl
    reason = bench.plan.too_large(impl, case, "time") or skip_reason(impl, bench.device, bench.dry_run)
    if reason:
        bench.record("time", case, impl, status="skipped", note=reason)
        pytest.skip(reason)
    inputs = bench.inputs(case)
    step = make_step(impl, inputs)

    def fwd_bwd() -> None:
        step()
        synchronize(bench.device)

    benchmark.group = case.id
    benchmark.extra_info.update(case=case.to_dict(), impl=impl)
    try:
        benchmark.pedantic(fwd_bwd, rounds=bench.plan.rounds, warmup_rounds=bench.plan.warmup_rounds,
                           iterations=1)
    except torch.cuda.OutOfMemoryError as exc:
        note = str(exc).splitlines()[0][:200]
        bench.record("time", case, impl, status="oom", note=note)
        pytest.skip(f"out of memory: {note}")
    except Exception as exc:
        bench.record("time", case, impl, status="error", note=f"{type(exc).__name__}: {exc}"[:300])
        raise
    finally:
        inputs.zero_grads()
        bench.free()
    stats = benchmark.stats.stats
    bench.record("time", case, impl, status="ok", median_s=stats.median, min_s=stats.min,
                 mean_s=stats.mean, stddev_s=stats.stddev, rounds=stats.rounds)
