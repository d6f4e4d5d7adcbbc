"""benchmarks/fused_sweep.py at toy size on the interpreter: the fused forward's every config
(in both load forms), store and split count is timed and checked against cuBLAS's GEMM + the
statistics pass, a wrong result is flagged, and the kernel's configs are left as they were."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from benchmarks import fused_sweep  # the repository root is on sys.path (tests/conftest.py)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="a toy chunk on Triton's interpreter (tests/conftest.py)")
def test_sweep_times_and_checks_each_part(monkeypatch):
    from luffy_fast.kernels import forward_fused

    chunk = fused_sweep.Chunk(19, 16, 200, torch.device("cpu"), exact=True)
    tuner = fused_sweep.KERNEL.fn
    before = (list(tuner.configs), dict(tuner.cache))
    lines = []
    ragged = fused_sweep.Chunk(21, 16, 77, torch.device("cpu"), seed=1, exact=True)
    result = fused_sweep.sweep(chunk, deadline=math.inf, log=lines.append, ragged=ragged)
    assert (list(tuner.configs), dict(tuner.cache)) == before
    assert forward_fused._splits.__name__ == "_splits"  # put back
    assert len(result["baseline"]) == 4 and len(result["configs"]) == len(tuner.configs)
    # the interpreter's one tile, loaded by cp.async and by TMA
    assert [row["name"].split(",")[0] for row in result["configs"]] == [
        "fused T16 V32 w4 s3", "fused T16 V32 w4 s3 TMA"]
    assert [row["name"].split(", ")[-1] for row in result["stores"]] == [
        "fp32 logits stored", "no logits (token_logprobs)"]
    # the interpreter's 3 splits: half of it (1) and twice it (6)
    assert [row["splits"] for row in result["splits"]] == [1, 6]
    # the ragged chunk: each form at its own split count and at 6 (of 3 vocabulary tiles)
    assert [row["name"] for row in result["ragged"]] == [
        "fused T16 V32 w4 s3", "fused T16 V32 w4 s3, 6 splits",
        "fused T16 V32 w4 s3 TMA", "fused T16 V32 w4 s3 TMA, 6 splits"]
    assert all(row["agrees"] for part in ("configs", "stores", "splits", "ragged")
               for row in result[part])
    assert not any("DISAGREES" in line for line in lines)
    # a wrong statistic or a wrong stored logit shows
    fused = chunk.fused
    monkeypatch.setattr(chunk, "fused", lambda store, half: (
        lambda got: (got[0], (got[1][0] * 1.001, *got[1][1:])))(fused(store, half)))
    assert not chunk.check(chunk.fused(torch.bfloat16, True), True)
    logits, stats = fused(torch.float32, False)
    logits[3, 7] += 1.0
    assert not chunk.check((logits, stats), False)


def test_gpu_check_runs_the_fused_stage(tmp_path):
    """benchmarks/gpu_check.sh's on-request `fused` stage, in its dry run."""
    from helpers import run_gpu_check_stage

    run_gpu_check_stage("fused", tmp_path)
    result = json.loads((tmp_path / "fused_sweep.json").read_text())
    assert result["configs"] and all(row["agrees"] for row in result["configs"])
    assert "the fused forward" in (tmp_path / "fused_sweep.log").read_text()
