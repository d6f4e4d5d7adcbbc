"""The triton backend's host work per chunk: operations launched and host syncs.

On a GPU each torch op or kernel launch costs the host about 16 µs, and a host sync empties the
GPU's queue; at small memory budgets (many chunks) that host work, not the GPU, set the op's time
(BENCHMARKS.md, GPU round 3: 1674 launches at 256 MiB). These tests count, on the interpreter,
what each extra chunk adds: the torch ops that launch work and the Triton kernel launches, and
the ops that make the host wait for the device. Counts, not times: nothing here depends on the
machine's speed.
"""

from __future__ import annotations

import collections
import os
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import random_batch, run_loss
from luffy_fast import LuffyLossConfig
from luffy_fast.kernels.function import PER_TOKEN_BYTES, plan

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="counts kernel launches through the Triton interpreter (TRITON_INTERPRET=1)")

# Ops that only make views or allocate: no kernel launch on a GPU.
NO_LAUNCH = {"detach", "view", "_unsafe_view", "slice", "select", "squeeze", "unsqueeze",
             "permute", "t", "transpose", "expand", "as_strided", "alias", "reshape", "lift_fresh",
             "empty", "empty_strided", "new_empty", "set_", "_reshape_alias"}
# Ops whose result the host must read before it can go on (a sync on a GPU).
SYNCS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "masked_select"}


class _OpCounter(TorchDispatchMode):
    """Counts launching ops and syncs made by the host, not those the interpreter makes inside a
    kernel it simulates (it runs kernels with torch tensors)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.in_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_kernel and name not in NO_LAUNCH:
            self.counts["sync" if name in SYNCS else "launch"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting():
    import triton.runtime.interpreter as interpreter

    counter = _OpCounter()
    original = interpreter.GridExecutor.__call__

    def launch(executor, *args, **kwargs):
        counter.counts["launch"] += 1
        counter.in_kernel += 1
        try:
            return original(executor, *args, **kwargs)
        finally:
            counter.in_kernel -= 1

    interpreter.GridExecutor.__call__ = launch
    try:
        with counter:
            yield counter.counts
    finally:
        interpreter.GridExecutor.__call__ = original


T, H, V = 480, 12, 40


def _kept_budget_mb(rows: int) -> float:
    return (rows * (V * 4 + 2 * H * 4) + T * PER_TOKEN_BYTES) / 2**20


def _host_work(batch: dict, rows: int, entropy_coef: float) -> tuple[collections.Counter, int]:
    config = LuffyLossConfig.luffy(max_len=64).replace(entropy_coef=entropy_coef,
                                                        memory_budget_mb=_kept_budget_mb(rows))
    assert plan(config, torch.device("cpu"), T, V, 4, H) == ("kept", rows)
    run_loss(batch, "triton", config)  # autotuning and first-call work out of the count
    with counting() as counts:
        run_loss(batch, "triton", config)
    return counts


def _per_chunk(batch: dict, entropy_coef: float) -> tuple[float, float, int]:
    """(launches, syncs) that each extra chunk adds: 120-row chunks against 40-row ones; and the
    syncs of the call with 120-row chunks."""
    few, many = _host_work(batch, 120, entropy_coef), _host_work(batch, 40, entropy_coef)
    extra_chunks = T // 40 - T // 120
    return ((many["launch"] - few["launch"]) / extra_chunks,
            (many["sync"] - few["sync"]) / extra_chunks, few["sync"])


# The syncs of a call, whatever its chunks: prepare_inputs' nonzero and unique (the sequences),
# gradient_last's count of the tokens that may carry a gradient, check_finite's one scalar check,
# and the backward's check of its gradients. Counted, they show that the counter sees syncs.
SYNCS_PER_CALL = 5


@pytest.mark.parametrize("row_forward", [False, True])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_a_gradient_chunk_costs_nine_launches_and_no_sync(entropy_coef, row_forward, monkeypatch):
    """Every token carries a gradient. Per chunk: the hidden rows' gather, the logits GEMM, the
    forward and merge kernels, the epilogue, dL/dz in place, and the d(hidden) GEMM with its
    scatter and the d(weight) GEMM: 9 (before kernels/epilogue.py: 40, or 48 with entropy). The
    opt-in row forward has no merge: 8."""
    monkeypatch.setenv("LUFFY_FAST_ROW_FORWARD", "1" if row_forward else "0")
    batch = random_batch(T, H, V, seed=2, mask_fraction=1.0, num_seqs=12)
    launches, syncs, call_syncs = _per_chunk(batch, entropy_coef)
    assert syncs == 0 and call_syncs == SYNCS_PER_CALL, (syncs, call_syncs)
    assert launches == (8 if row_forward else 9), launches


def test_a_forward_only_chunk_costs_five_launches_and_no_sync():
    """Every advantage is 0 (no entropy term): every chunk is forward-only, and each costs the
    gather, the GEMM, the forward and merge kernels and the epilogue; the check for a stray
    non-finite token is one sync for all of them, not one per chunk (before: 41 launches and a
    sync per chunk): one more than a call without forward-only chunks makes."""
    batch = random_batch(T, H, V, seed=2, mask_fraction=1.0, num_seqs=12)
    batch["advantages"] = torch.zeros_like(batch["advantages"])
    launches, syncs, call_syncs = _per_chunk(batch, 0.0)
    assert syncs == 0 and call_syncs == SYNCS_PER_CALL + 1, (syncs, call_syncs)  # + the check
    assert launches == 5, launches
