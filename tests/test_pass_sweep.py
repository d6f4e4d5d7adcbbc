"""benchmarks/pass_sweep.py at toy size on the interpreter: every config of both passes is timed
and checked against the autotuned default, and the kernels' own configs are left as they were."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) leaves the root out
    sys.path.insert(0, str(ROOT))

from benchmarks import pass_sweep  # noqa: E402
from luffy_fast import LuffyLossConfig  # noqa: E402
from luffy_fast.kernels import backward, forward  # noqa: E402
from luffy_fast.kernels.function import _kept_chunks, plan  # noqa: E402


@pytest.mark.parametrize("logits_dtype", [torch.bfloat16, torch.float32])
def test_sweep_times_and_checks_every_config(logits_dtype):
    tuners = (forward._forward_kernel.fn, backward._grad_logits_in_place_kernel.fn)
    before = [list(t.configs) for t in tuners]
    chunk = pass_sweep.Chunk(8, 200, logits_dtype, torch.bfloat16, torch.device("cpu"))
    configs = pass_sweep.grid(dry=True)
    lines = []
    result = pass_sweep.sweep(chunk, configs, reps=1, deadline=math.inf, log=lines.append)
    assert [list(t.configs) for t in tuners] == before
    for name in ("statistics", "grad_in_place"):
        rows = result[name]
        # every config, then the two fastest at 1 and 4 pipeline stages
        assert len(rows) == len(configs) + 4
        assert all(r["agrees"] and r["ms"] > 0 and r["gb_per_s"] > 0 for r in rows), rows
    assert {r["splits"] for r in result["splits"]} >= {forward.num_vocab_splits(8, 200)}
    assert sum(r["default"] for r in result["splits"]) == 1
    assert set(result["rooflines"]) == {"read (row max)", "read + write (in-place scale)"}
    assert len(lines) == 2 + 2 * (len(configs) + 4) + len(result["splits"])


def test_a_config_that_computes_wrongly_is_flagged(monkeypatch):
    """Agreement is checked, not assumed: a statistics pass that returns other numbers fails it."""
    chunk = pass_sweep.Chunk(8, 200, torch.float32, torch.bfloat16, torch.device("cpu"))
    honest = chunk.forward
    monkeypatch.setattr(chunk, "forward", lambda: [v + 1e-2 for v in honest()])
    result = pass_sweep.sweep(chunk, pass_sweep.grid(dry=True)[:1], reps=1, deadline=math.inf,
                              log=lambda _: None)
    assert [r["agrees"] for r in result["statistics"]] == [False]
    assert all(r["agrees"] for r in result["grad_in_place"])
    assert result["splits"] == []  # no agreeing statistics config to vary the splits at


@pytest.mark.parametrize("logit_size", [2, 4])
def test_chunk_rows_are_the_ops_chunks(logit_size):
    """The sweep's chunk is the dense case's kept chunk (T = 8192, H = 4096, V = 151936, 1 GiB)."""
    T, H, V = 8192, 4096, 151936
    config = LuffyLossConfig(memory_budget_mb=1024)
    strategy, most = plan(config, torch.device("cpu"), T, V, 2, H, logit_size)
    assert strategy == "kept"
    longest = max(part.stop - part.start for part, _, _ in _kept_chunks(T, T, most))
    assert pass_sweep.chunk_rows(T, H, V, 1024, logit_size, 2) == longest
