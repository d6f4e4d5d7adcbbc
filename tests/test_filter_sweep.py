"""benchmarks/filter_sweep.py at toy size on the interpreter: each config of the filter's two GEMM
kernels is timed and checked against torch's product of the kept blocks, a wrong one is flagged,
and filter_tiles is left as it was."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) leaves the root out
    sys.path.insert(0, str(ROOT))

from benchmarks import filter_sweep  # noqa: E402
from luffy_fast.kernels import backward_filtered  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="a toy chunk on Triton's interpreter (tests/conftest.py)")


class Miscompiled(filter_sweep.FilterChunk):
    """A stand-in for a config the compiler gets wrong: 32-wide d(hidden) outputs are off."""

    def run(self, part, out):
        super().run(part, out)
        if part == "hidden" and backward_filtered.filter_tiles(torch.float32)["hidden"]["BLOCK_OUT"] == 32:
            out += 0.1


def test_each_config_is_timed_and_checked_and_a_wrong_one_is_flagged():
    chunk = Miscompiled(40, 40, 300, 2e-5, torch.float32, torch.device("cpu"))
    assert 0.0 < chunk.kept_fraction() < 1.0  # the peaked logits leave blocks to skip
    assert chunk.grad_logits.isnan().any()  # in the skipped blocks, which no kernel reads
    original = backward_filtered.filter_tiles
    lines = []
    hidden = filter_sweep.sweep(chunk, "hidden", filter_sweep.DRY_HIDDEN, math.inf, lines.append)
    weight = filter_sweep.sweep(chunk, "weight", filter_sweep.DRY_WEIGHT, math.inf, lines.append)
    assert backward_filtered.filter_tiles is original
    for rows, configs in ((hidden, filter_sweep.DRY_HIDDEN), (weight, filter_sweep.DRY_WEIGHT)):
        assert rows[0]["dense_ms"] > 0
        assert [r["config"] for r in rows[1:]] == configs
        assert all(r["ms"] > 0 for r in rows[1:])
    wide = [r["config"]["BLOCK_OUT"] == 32 for r in hidden[1:]]
    assert [not r["agrees"] for r in hidden[1:]] == wide and any(wide)
    assert all(r["agrees"] for r in weight[1:])
    assert sum("DISAGREES" in line for line in lines) == 1


def test_the_default_config_gives_the_op_products(tmp_path, monkeypatch):
    # The first config's d(hidden) and d(weight) are the float64 products of the kept blocks
    # (the sweep checks the other configs against it), and the files are written.
    monkeypatch.setenv("OUT", str(tmp_path))
    filter_sweep.main(["--seconds", "600"])
    saved = json.loads((tmp_path / "filter_sweep.json").read_text())
    parts = [r["part"] for r in saved["results"] if "dense_ms" in r]
    assert parts == ["hidden", "weight"]
    assert saved["results"][0]["part"] == "over_logits" and saved["results"][0]["agrees"]
    assert all(r.get("agrees") for r in saved["results"] if "config" in r)
    chunk = filter_sweep.FilterChunk(40, 40, 300, 2e-5, torch.float32, torch.device("cpu"))
    dz = chunk.grad_logits.double().nan_to_num(0.0)  # NaN marks the skipped blocks
    out = torch.zeros(40, 40)
    chunk.run("hidden", out)
    correction = torch.where(chunk.keep.sum(1).repeat_interleave(chunk.block_t)[:40] < chunk.keep.shape[1],
                             dz.sum(1), 0.0)
    expected = dz @ chunk.weight.double() - correction[:, None] * chunk.weight_mean.double()
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-6)
    out = torch.zeros(300, 40)
    chunk.run("weight", out)
    assert torch.allclose(out.double(), dz.T @ chunk.hidden.double(), rtol=1e-5, atol=1e-6)


def test_the_chunk_has_the_ops_rows():
    from luffy_fast import LuffyLossConfig
    from luffy_fast.kernels.function import _kept_chunks, plan

    T, H, V, device = 8192, 4096, 151936, torch.device("cuda")  # the default budget on a GPU
    strategy, most = plan(LuffyLossConfig(grad_filter=2e-5), device, T, V, element_size=2,
                          hidden_size=H)
    assert strategy == "kept"
    longest = max(part.stop - part.start for part, _, _ in _kept_chunks(T, T, most))
    assert filter_sweep.chunk_rows(T, H, V, 2e-5, device) == longest
    # dL/dz written over the logits: the exact path's chunks
    assert longest == max(p.stop - p.start for p, _, _ in _kept_chunks(
        T, T, plan(LuffyLossConfig(), device, T, V, element_size=2, hidden_size=H)[1]))


def test_gpu_check_runs_the_filter_stage(tmp_path):
    """benchmarks/gpu_check.sh's on-request `filter` stage, in its dry run."""
    from helpers import run_gpu_check_stage

    run_gpu_check_stage("filter", tmp_path)
    results = json.loads((tmp_path / "filter_sweep.json").read_text())["results"]
    assert [r["part"] for r in results if "dense_ms" in r] == ["hidden", "weight"]
    assert all(r["agrees"] for r in results if "config" in r)
    assert [r["agrees"] for r in results if r["part"] == "over_logits"] == [True]
    assert (tmp_path / "filter_sweep.log").read_text().count("== ") == 4
