"""benchmarks/pass_sweep.py at toy size on the interpreter: every config of both passes is timed
and checked against the autotuned default, and the kernels' own configs are left as they were."""

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

from benchmarks import pass_sweep  # noqa: E402
from helpers import run_gpu_check_stage  # noqa: E402
from luffy_fast import LuffyLossConfig  # noqa: E402
from luffy_fast.kernels import backward, backward_lean, forward, forward_lean  # noqa: E402
from luffy_fast.kernels.function import _kept_chunks, plan  # noqa: E402

on_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                    reason="a toy chunk on Triton's interpreter (tests/conftest.py)")


@on_interpreter
@pytest.mark.parametrize("logits_dtype", [torch.bfloat16, torch.float32])
def test_sweep_times_and_checks_every_config(logits_dtype, monkeypatch):
    """Each config is the one that ran (the kernel's own meta-parameters only), its outputs agree
    with the default's, and the kernels' configs and tuning caches are as before afterwards."""
    tuners = (forward._forward_kernel.fn, forward_lean._lean_forward_kernel.fn,
              backward._grad_logits_in_place_kernel.fn, backward_lean._lean_grad_logits_kernel.fn)
    installed = []
    only_config = pass_sweep.only_config
    monkeypatch.setattr(pass_sweep, "only_config",
                        lambda kernel, config: installed.append((kernel, only_config(kernel, config)))
                        or installed[-1][1])
    chunk = pass_sweep.Chunk(8, 200, logits_dtype, torch.bfloat16, torch.device("cpu"))
    before = [(list(t.configs), dict(t.cache)) for t in tuners]  # after the chunk's own calls
    configs = pass_sweep.grid(dry=True)
    lines = []
    result = pass_sweep.sweep(chunk, configs, deadline=math.inf, log=lines.append)
    assert [(list(t.configs), dict(t.cache)) for t in tuners] == before
    for name in ("statistics", "lean_statistics", "grad_in_place", "lean_grad_in_place"):
        rows = result[name]
        # every config, then the two fastest at 1 and 4 pipeline stages
        assert len(rows) == len(configs) + 4
        assert all(r["agrees"] and r["ran"] and r["ms"] > 0 and r["gb_per_s"] > 0 for r in rows), rows
    for kernel, config in installed:  # BLOCK_H only where the kernel takes it
        assert set(config.kwargs) <= set(kernel.fn.arg_names)
        assert ("BLOCK_H" in config.kwargs) == (kernel is forward._forward_kernel)
    assert {r["splits"] for r in result["splits"]} >= {forward.num_vocab_splits(8, 200)}
    assert sum(r["default"] for r in result["splits"]) == 1
    assert set(result["rooflines"]) == {"read (row max)", "read + write (in-place scale)"}
    assert len(lines) == 2 + 4 * (len(configs) + 4) + len(result["splits"])


@on_interpreter
def test_a_config_that_computes_wrongly_is_flagged(monkeypatch):
    """Agreement is checked, not assumed: a statistics pass 1e-4 off fails it."""
    chunk = pass_sweep.Chunk(8, 200, torch.float32, torch.bfloat16, torch.device("cpu"))
    honest = chunk.forward
    # the default statistics pass computes wrongly, the lean one (same method, lean=True) does not
    monkeypatch.setattr(chunk, "forward", lambda lean=False: honest(lean) if lean
                        else [v * (1 + 1e-4) for v in honest()])
    result = pass_sweep.sweep(chunk, pass_sweep.grid(dry=True)[:1], deadline=math.inf,
                              log=lambda _: None)
    assert [r["agrees"] for r in result["statistics"]] == [False]
    assert all(r["agrees"] for r in result["grad_in_place"])
    assert result["splits"] == []  # no agreeing statistics config to vary the splits at


def test_agreement_is_relative_to_the_whole_output():
    """A dL/dz row of a 151936-entry vocabulary: entries are tiny, so a 40 % error in every one
    of them is far under any entry-wise tolerance, but not under the norm-relative one."""
    expected = torch.softmax(torch.randn(4, 151936), dim=1)
    assert not pass_sweep.agrees([expected * 1.4], [expected], 1e-3)
    assert pass_sweep.agrees([expected * (1 + 1e-5)], [expected], 1e-3)
    assert not pass_sweep.agrees([expected.clone().fill_(float("nan"))], [expected], 1e-3)


@pytest.mark.parametrize("logit_size", [2, 4])
def test_chunk_rows_are_the_ops_chunks(logit_size):
    """The sweep's chunk is the dense case's kept chunk (T = 8192, H = 4096, V = 151936, 1 GiB)."""
    T, H, V = 8192, 4096, 151936
    config = LuffyLossConfig(memory_budget_mb=1024)
    strategy, most = plan(config, torch.device("cpu"), T, V, 2, H, logit_size)
    assert strategy == "kept"
    longest = max(part.stop - part.start for part, _, _ in _kept_chunks(T, T, most))
    assert pass_sweep.chunk_rows(T, H, V, 1024, logit_size, 2) == longest


def test_gpu_check_runs_the_sweep_stage(tmp_path):
    """benchmarks/gpu_check.sh's on-request `sweep` stage, in its dry run: both logits dtypes
    swept, the files where the other stages' go."""
    run_gpu_check_stage("sweep", tmp_path)
    results = json.loads((tmp_path / "pass_sweep.json").read_text())["results"]
    assert [r["logits"] for r in results] == ["bfloat16", "float32"]
    assert all(row["agrees"] for r in results
               for row in r["statistics"] + r["lean_statistics"] + r["grad_in_place"]
               + r["lean_grad_in_place"])
    assert (tmp_path / "sweep.log").read_text().count("== ") == 2
