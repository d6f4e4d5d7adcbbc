"""Metric helpers on hand-worked values: the pooled std of no samples, a statistic some ranks
do not log, and repeated phases of the phase timer."""

from __future__ import annotations

import pytest
import torch

from luffy_fast import metrics
from luffy_fast.metrics import PhaseTimer, over_ranks, pooled_std


def test_the_pooled_std_of_no_samples_is_zero():
    assert pooled_std([]) == 0.0
    assert pooled_std([(0.5, 1.0, 0), (2.0, -1.0, 0)]) == 0.0  # ranks without samples
    # parts {0, 2} (std 1, mean 1, n 2) and {4} (std 0, mean 4, n 1): the union {0, 2, 4} has
    # mean 2 and population variance (4 + 0 + 4) / 3 = 8 / 3
    assert pooled_std([(1.0, 1.0, 2), (0.0, 4.0, 1), (3.0, 9.0, 0)]) == pytest.approx((8 / 3) ** 0.5)


def test_a_pooled_statistic_that_a_rank_does_not_log_is_left_as_this_ranks(monkeypatch):
    # rank 1 logged no advantage statistics (no samples): no pooling, rank 0's std stays
    ranks = [{"advantage_std": 0.5, "advantage_mean": 0.0, "samples": 4, "loss": 1.0},
             {"loss": 3.0}]
    monkeypatch.setattr(torch.distributed, "all_gather_object",
                        lambda gathered, mine: gathered.__setitem__(slice(None), ranks))
    merged = over_ranks(ranks[0], 2)
    assert merged["advantage_std"] == 0.5 and merged["loss"] == 2.0 and merged["samples"] == 4


def test_a_repeated_phase_adds_up_its_seconds(monkeypatch):
    clock = iter([10.0, 12.5, 20.0, 21.0, 30.0, 30.25])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    timer = PhaseTimer()
    for name in ("generate", "generate", "update"):
        with timer.phase(name):
            pass
    # generate: (12.5 - 10) + (21 - 20) = 3.5; update: 30.25 - 30 = 0.25
    assert timer.seconds == {"time/generate": 3.5, "time/update": 0.25}
