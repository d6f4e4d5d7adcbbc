"""benchmarks/checkpoint_fit.py: each head's update at the fewest checkpointed layers that fit a
memory cap. The choice against hand-worked peaks, the out-of-memory paths with a stand-in engine
whose steps report set peaks (and which checks that a failed engine is freed before the next is
built), the cap's device index, and the report's ratio and table from known numbers."""

from __future__ import annotations

import gc
import sys
import weakref
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import tiny_qwen2

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import checkpoint_fit as cf  # noqa: E402
from benchmarks import trainer_update as tu  # noqa: E402
from luffy_fast.model_loading import checkpointable_layers  # noqa: E402

MB = tu.MIB


def test_fewest_fitting_by_hand():
    # 28 layers. Backward peaks: 30 at 27 checkpointed, 34 at 23 (1 per layer below 27); 31 with
    # all 28 (one input more than 27, measured). Optimizer step peaks 30-32.
    peaks = {28: (31.0, 32.0), 27: (30.0, 31.0), 23: (34.0, 30.0)}
    # predicted with k < 28: max(30 + (27 - k), 32) <= 50 needs k >= 7
    assert cf.fewest_fitting(28, peaks, limit=50.0) == (7, 50.0)
    assert cf.fewest_fitting(28, peaks, limit=None) == (0, 57.0)
    assert cf.fewest_fitting(28, peaks, limit=31.0) == (28, 32.0)  # nothing fits: all
    # the step's peak alone can decide: 30 + (27 - k) <= 32 from k = 25 on
    assert cf.fewest_fitting(28, peaks, limit=32.0) == (25, 32.0)
    # a peak that fell (noise) counts as no growth
    assert cf.fewest_fitting(28, {28: (31.0, 32.0), 27: (30.0, 31.0), 23: (29.0, 30.0)},
                             limit=40.0) == (0, 32.0)


class StandIn:
    """A DeepSpeed engine's stand-in: a tiny Qwen2 as `.module`; steps are the patched ones.
    Building one checks that every earlier one is already freed (the failed engine must not
    hold its memory while the next is built)."""

    built: list[weakref.ref] = []

    def __init__(self) -> None:
        gc.collect()
        assert all(ref() is None for ref in StandIn.built), "the previous engine is still alive"
        StandIn.built.append(weakref.ref(self))
        self.module = tiny_qwen2(layers=2)
        self.module.gradient_checkpointing_enable()

    def destroy(self) -> None:
        """DeepSpeed removes its hooks here; a stand-in has none."""


def checkpointed_now(engine) -> int:
    return sum(layer.gradient_checkpointing for layer in checkpointable_layers(engine.module))


@pytest.fixture
def stand_in(monkeypatch):
    """Peaks in MB, as on a GPU: with k of 2 layers checkpointed (the first k), the backward
    holds 80 + 2 per checkpointed input + 10 per kept layer's values (one recomputed layer's
    when k = 2); the optimizer step 95. A probe or a timed step with fewer than
    `probe_oom_below` / `timed_oom_below` layers checkpointed runs out of memory."""
    settings = {"probe_oom_below": 0, "timed_oom_below": 0}
    StandIn.built = []

    def measured_step(engine, micro, memory):
        k = checkpointed_now(engine)
        if k < settings["probe_oom_below"]:
            raise torch.cuda.OutOfMemoryError("simulated")
        return 0.5, (80 + 2 * k + 10 * (2 - k if k < 2 else 1)) * MB, 95 * MB

    def time_size(engine, micro, memory, plan, tokens, allocated_after):
        k = checkpointed_now(engine)
        if k < settings["timed_oom_below"]:
            raise torch.cuda.OutOfMemoryError("simulated")
        return {"tokens_per_second": 1000.0 * (1 + 0.1 * (2 - k)), "peak_mb": 100.0 + 10 * (2 - k)}

    monkeypatch.setattr(cf, "measured_step", measured_step)
    monkeypatch.setattr(tu, "time_size", time_size)
    monkeypatch.setattr(tu, "build_engine", lambda plan, impl, device: (StandIn(), "stand-in"))
    monkeypatch.setenv("BENCH_FIT_CAP_MB", "105")  # limit 0.92 x 105 = 96.6 MB
    return settings


def fit_rows(work: Path) -> dict[str, list[dict]]:
    rows = tu.read_rows(work, "fit-fused")
    return {kind: [r for r in rows if r["kind"] == kind] for kind in
            ("setup", "probe", "fit", "throughput")}


def test_the_fewest_that_fit_is_chosen_and_timed(tmp_path, stand_in):
    cf.run_fit(tu.DRY, "fused", tmp_path)
    rows = fit_rows(tmp_path)
    assert rows["setup"][0]["cap_mb"] == 105 and rows["setup"][0]["layers"] == 2
    # all (the warm-up), L - 1, and L - 1 - 4 clipped at 0
    assert [(r["checkpointed"], r["backward_peak_mb"]) for r in rows["probe"]] == [
        (2, 94), (1, 92), (0, 100)]
    (fit,) = rows["fit"]
    # k = 0: 100 > 96.6; k = 1: max(92, 95) = 95 fits
    assert (fit["fewest_checkpointed"], fit["predicted_peak_mb"]) == (1, 95.0)
    assert fit["limit_mb"] == pytest.approx(0.92 * 105)
    assert [(r["which"], r["checkpointed"], r["status"]) for r in rows["throughput"]] == [
        ("all", 2, "ok"), ("fit", 1, "ok")]
    assert len(StandIn.built) == 1


def test_a_fitted_size_that_runs_out_of_memory_is_retried_with_more_layers(tmp_path, stand_in):
    stand_in["timed_oom_below"] = 2  # the prediction was too optimistic
    cf.run_fit(tu.DRY, "fused", tmp_path)
    timed = [(r["which"], r["checkpointed"], r["status"]) for r in fit_rows(tmp_path)["throughput"]]
    assert timed == [("all", 2, "ok"), ("fit", 1, "oom"), ("fit", 2, "ok")]  # 1 + 4, at most 2
    assert len(StandIn.built) == 2  # a fresh engine, built after the failed one was freed


def test_a_probe_out_of_memory_keeps_the_fewest_that_ran(tmp_path, stand_in):
    stand_in["probe_oom_below"] = 2
    cf.run_fit(tu.DRY, "fused", tmp_path)
    rows = fit_rows(tmp_path)
    assert [(r["checkpointed"], r["status"]) for r in rows["probe"]] == [(2, "ok"), (1, "oom")]
    assert rows["fit"][0]["fewest_checkpointed"] == 2
    assert [(r["which"], r["checkpointed"]) for r in rows["throughput"]] == [("all", 2), ("fit", 2)]
    assert len(StandIn.built) == 2


def test_the_cap_is_set_on_the_current_device_by_index(monkeypatch):
    """torch.cuda.set_per_process_memory_fraction needs a device index; the trainer check's
    device is torch.device("cuda"), which has none."""
    calls = []

    def set_fraction(fraction, device=None):
        calls.append((fraction, torch.cuda._utils._get_device_index(device, optional=False)))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(total_memory=139 * tu.GIB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.delenv("BENCH_FIT_CAP_GIB", raising=False)
    assert cf.cap_bytes(torch.device("cuda")) == 78 * tu.GIB
    assert calls == [(pytest.approx(78 / 139), 0)]
    monkeypatch.setattr(torch.cuda, "get_device_properties",  # a card smaller than the cap
                        lambda index: SimpleNamespace(total_memory=60 * tu.GIB))
    assert cf.cap_bytes(torch.device("cuda", 0)) == 60 * tu.GIB and calls[-1] == (1.0, 0)


def test_the_report_compares_each_head_at_its_own_fit(tmp_path, capsys):
    plan = replace(tu.REAL)
    for impl, fitted, tps_fit, tps_all in (("fused", 0, 36000.0, 28000.0),
                                           ("naive", 22, 27000.0, 26500.0)):
        for row in ({"kind": "setup", "impl": impl, "layers": 28, "cap_mb": 78 * 1024},
                    {"kind": "fit", "impl": impl, "fewest_checkpointed": fitted},
                    {"kind": "throughput", "impl": impl, "which": "all", "checkpointed": 28,
                     "status": "ok", "tokens_per_second": tps_all, "peak_mb": 30 * 1024},
                    {"kind": "throughput", "impl": impl, "which": "fit", "checkpointed": fitted,
                     "status": "ok", "tokens_per_second": tps_fit, "peak_mb": 70 * 1024}):
            tu.emit(tmp_path, f"fit-{impl}", row)
    summary = tu.report(plan, tmp_path, tmp_path / "out")
    checks = {c["name"]: c for c in summary["checks"]}
    check = checks["tokens/s at 16k in 78 GiB, fused / naive"]
    assert check["value"] == pytest.approx(36000 / 27000) and check["ok"]
    assert "tokens/s at 16k in 78 GiB, fused / liger" not in checks  # liger's fit did not run
    table = capsys.readouterr().out.strip().splitlines()
    fused_line = next(line for line in table if line.startswith("fused ") and "/28" in line)
    assert "0/28" in fused_line and f"{36000 / 28000:.2f}" in fused_line  # its own speed-up
    assert table[-1].startswith("tokens/s at 16k in 78 GiB, fused / naive")
