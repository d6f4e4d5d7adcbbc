"""benchmarks/gpu_vllm_check.sh's stages at toy size on the CPU (BENCH_DRY_RUN): the plumbing
of the GPU check, with its numbers checked (the sync really lands, the group is kept)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def stage(*args, work):
    run = subprocess.run([sys.executable, "-m", "benchmarks.vllm_check", *args, "--work",
                          str(work), "--dry-run"], cwd=REPO, capture_output=True, text=True,
                         timeout=1800)  # a watchdog only: the stage takes ~30 s unloaded
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run.stdout


def test_cycle_stage_and_report_at_toy_size(tmp_path):
    stage("prepare", work=tmp_path)
    stage("cycle", "--level", "2", work=tmp_path)
    result = json.loads((tmp_path / "results" / "cycle_level2.json").read_text())
    assert result["ok"] and result["dry_run"] and result["sleep_level"] == 0  # CPU: no sleep
    assert result["gap_same_weights"] <= 1e-4
    assert result["gap_before_sync"] > 0.3  # the perturbed weights are not in the engine yet
    assert result["gap_after_sync1"] <= 1e-4 and result["gap_after_sync2"] <= 1e-4
    assert result["group_kept"]
    assert result["generated_tokens"] > 0 and result["generated_tokens_after"] > 0
    table = stage("report", "--out", str(tmp_path / "out"), work=tmp_path)
    assert "gap_after_sync1" in table and "cycle_level2" in table
    assert "cycle_level2" in json.loads((tmp_path / "out" / "vllm_check.json").read_text())
