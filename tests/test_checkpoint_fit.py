"""benchmarks/checkpoint_fit.py: each head's update at the fewest checkpointed layers that fit a
memory cap. The choice against hand-worked peaks, the out-of-memory paths with a stand-in engine
whose steps report set peaks, and the report's ratio and table from known numbers."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

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
    # 28 layers; 4 fewer checkpointed raise the backward's peak from 30 to 34 (1 per layer); the
    # optimizer step peaks at 32. Predicted peak with k checkpointed: max(30 + (28 - k), 32).
    assert cf.fewest_fitting(28, 30.0, 34.0, 4, 32.0, limit=50.0) == (8, 50.0)
    assert cf.fewest_fitting(28, 30.0, 34.0, 4, 32.0, limit=None) == (0, 58.0)
    assert cf.fewest_fitting(28, 30.0, 34.0, 4, 32.0, limit=31.0) == (28, 32.0)  # nothing fits
    # a peak that fell (noise) counts as no growth: every layer un-checkpointed
    assert cf.fewest_fitting(28, 30.0, 29.0, 4, 32.0, limit=40.0) == (0, 32.0)
    # the optimizer step's peak alone can decide: 30 + (28 - k) <= 33 needs k >= 25
    assert cf.fewest_fitting(28, 30.0, 34.0, 4, 33.0, limit=33.0) == (25, 33.0)


class StandIn:
    """A DeepSpeed engine's stand-in: a tiny Qwen2 as `.module`; steps are the patched ones."""

    builds = 0

    def __init__(self) -> None:
        StandIn.builds += 1
        self.module = tiny_qwen2(layers=2)
        self.module.gradient_checkpointing_enable()


def checkpointed_now(engine) -> int:
    return sum(layer.gradient_checkpointing for layer in checkpointable_layers(engine.module))


@pytest.fixture
def stand_in(monkeypatch):
    """Peaks in MB: the backward 100 + 10 per layer not checkpointed, the optimizer step 105;
    a timed step with fewer than `timed_oom_below` layers checkpointed runs out of memory."""
    settings = {"probe_oom_below": 0, "timed_oom_below": 0}
    StandIn.builds = 0

    def measured_step(engine, micro, memory):
        k = checkpointed_now(engine)
        if k < settings["probe_oom_below"]:
            raise torch.cuda.OutOfMemoryError("simulated")
        return 0.5, (100 + 10 * (2 - k)) * MB, 105 * MB

    def time_size(engine, micro, memory, plan, tokens, allocated_after):
        k = checkpointed_now(engine)
        if k < settings["timed_oom_below"]:
            raise torch.cuda.OutOfMemoryError("simulated")
        return {"tokens_per_second": 1000.0 * (1 + 0.1 * (2 - k)), "peak_mb": 100.0 + 10 * (2 - k)}

    monkeypatch.setattr(cf, "measured_step", measured_step)
    monkeypatch.setattr(tu, "time_size", time_size)
    monkeypatch.setattr(tu, "build_engine", lambda plan, impl, device: (StandIn(), "stand-in"))
    monkeypatch.setenv("BENCH_FIT_CAP_MB", "120")  # limit 0.92 x 120 = 110.4 MB: k >= 1
    return settings


def fit_rows(work: Path) -> dict[str, list[dict]]:
    rows = tu.read_rows(work, "fit-fused")
    return {kind: [r for r in rows if r["kind"] == kind] for kind in
            ("setup", "probe", "fit", "throughput")}


def test_the_fewest_that_fit_is_chosen_and_timed(tmp_path, stand_in):
    cf.run_fit(tu.DRY, "fused", tmp_path)
    rows = fit_rows(tmp_path)
    assert rows["setup"][0]["cap_mb"] == 120 and rows["setup"][0]["layers"] == 2
    assert [r["checkpointed"] for r in rows["probe"]] == [2, 2, 0]  # warm-up, all, 2 fewer
    (fit,) = rows["fit"]
    # max(100 + 10 (2 - k), 105) <= 110.4: k = 1, predicted 110 MB
    assert (fit["fewest_checkpointed"], fit["predicted_peak_mb"]) == (1, 110.0)
    assert fit["limit_mb"] == pytest.approx(0.92 * 120)
    assert [(r["which"], r["checkpointed"], r["status"]) for r in rows["throughput"]] == [
        ("all", 2, "ok"), ("fit", 1, "ok")]
    assert StandIn.builds == 1


def test_a_fitted_size_that_runs_out_of_memory_is_retried_with_more_layers(tmp_path, stand_in):
    stand_in["timed_oom_below"] = 2  # the prediction was too optimistic
    cf.run_fit(tu.DRY, "fused", tmp_path)
    timed = [(r["which"], r["checkpointed"], r["status"]) for r in fit_rows(tmp_path)["throughput"]]
    assert timed == [("all", 2, "ok"), ("fit", 1, "oom"), ("fit", 2, "ok")]  # 1 + 4, at most 2
    assert StandIn.builds == 2  # a fresh engine after the failed step


def test_a_probe_out_of_memory_keeps_every_layer_checkpointed(tmp_path, stand_in):
    stand_in["probe_oom_below"] = 2
    cf.run_fit(tu.DRY, "fused", tmp_path)
    rows = fit_rows(tmp_path)
    assert [(r["checkpointed"], r["status"]) for r in rows["probe"]] == [
        (2, "ok"), (2, "ok"), (0, "oom")]
    assert rows["fit"][0]["fewest_checkpointed"] == 2
    assert [(r["which"], r["checkpointed"]) for r in rows["throughput"]] == [("all", 2), ("fit", 2)]
    assert StandIn.builds == 2


def test_the_report_compares_each_head_at_its_own_fit(tmp_path, capsys):
    plan = replace(tu.REAL)
    for impl, fitted, tps_fit, tps_all in (("fused", 0, 36000.0, 28000.0),
                                           ("naive", 22, 27000.0, 26500.0)):
        for row in ({"kind": "setup", "impl": impl, "layers": 28, "cap_mb": 80 * 1024},
                    {"kind": "fit", "impl": impl, "fewest_checkpointed": fitted},
                    {"kind": "throughput", "impl": impl, "which": "all", "checkpointed": 28,
                     "status": "ok", "tokens_per_second": tps_all, "peak_mb": 30 * 1024},
                    {"kind": "throughput", "impl": impl, "which": "fit", "checkpointed": fitted,
                     "status": "ok", "tokens_per_second": tps_fit, "peak_mb": 70 * 1024}):
            tu.emit(tmp_path, f"fit-{impl}", row)
    summary = tu.report(plan, tmp_path, tmp_path / "out")
    checks = {c["name"]: c for c in summary["checks"]}
    check = checks["tokens/s at 16k in 80 GiB, fused / naive"]
    assert check["value"] == pytest.approx(36000 / 27000) and check["ok"]
    assert "tokens/s at 16k in 80 GiB, fused / liger" not in checks  # liger's fit did not run
    table = capsys.readouterr().out.strip().splitlines()
    fused_line = next(line for line in table if line.startswith("fused ") and "/28" in line)
    assert "0/28" in fused_line and f"{36000 / 28000:.2f}" in fused_line  # its own speed-up
    assert table[-1].startswith("tokens/s at 16k in 80 GiB, fused / naive")
