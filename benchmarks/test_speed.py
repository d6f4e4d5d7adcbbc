"""Forward + backward time of every implementation on the plan's cases.

Each test is one round of one implementation, timed by pytest-benchmark (the first round after
the plan's warm-up rounds); the rounds of a case interleave the implementations, and the report
takes each implementation's median over its rounds.
"""

from __future__ import annotations

import pytest
import torch

from .impls import make_step, skip_reason, synchronize


def test_speed(benchmark, bench, speed_case, speed_round, speed_impl) -> None:
    case, impl = speed_case, speed_impl
    reason = bench.not_timed.get((case, impl)) or bench.plan.too_large(impl, case, "time") \
        or skip_reason(impl, bench.device, bench.dry_run)
    if reason:
        if speed_round == 0:
            bench.record("time", case, impl, status="skipped", note=reason)
        pytest.skip(reason)
    inputs = bench.inputs(case)
    step = make_step(impl, inputs)

    def fwd_bwd() -> None:
        step()
        synchronize(bench.device)

    benchmark.group = case.id
    benchmark.extra_info.update(case=case.to_dict(), impl=impl, round=speed_round)
    warmup = bench.plan.warmup_rounds if speed_round == 0 else 0
    try:
        benchmark.pedantic(fwd_bwd, rounds=1, warmup_rounds=warmup, iterations=1)
    except torch.cuda.OutOfMemoryError as exc:
        note = f"out of memory: {str(exc).splitlines()[0][:200]}"
        bench.not_timed[(case, impl)] = note
        bench.record("time", case, impl, status="oom", note=note)
        inputs.zero_grads()
        bench.free()
        pytest.skip(note)
    except Exception as exc:
        note = f"{type(exc).__name__}: {exc}"[:300]
        bench.not_timed[(case, impl)] = f"failed in an earlier round: {note}"
        bench.record("time", case, impl, status="error", note=note)
        raise
    finally:
        # No empty_cache here: later rounds reuse the CUDA allocator's cached blocks, as a trainer
        # would (the cache is emptied when the case changes and after running out of memory).
        inputs.zero_grads()
    bench.record("time", case, impl, status="ok", round=speed_round, seconds=benchmark.stats.stats.median)
