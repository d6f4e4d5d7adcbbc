"""The fused forward (kernels/forward_fused.py, LUFFY_FAST_FUSED_FORWARD=1) against what it
replaces, on one chunk of the dense case: cuBLAS's logits GEMM, alone and followed by the
statistics pass over its output (the default kept strategy's forward), beside the fused kernel
at each of its tile configs (operands by `cp.async` and by TMA) storing 16-bit logits, then at
the fastest one storing fp32 logits and none (token_logprobs), and at split counts around
`wave_splits`' choice; first, each config's results on a small ragged chunk. Every run's
statistics are checked against the default's and its stored logits against cuBLAS's. Writes
fused_sweep.txt and fused_sweep.json under $OUT.

    python -m benchmarks.fused_sweep [--shape T,H,V] [--seconds 45]

With BENCH_DRY_RUN=1 (or on a CPU) it runs a toy chunk on the interpreter.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from luffy_fast import LuffyLossConfig  # noqa: E402
from luffy_fast.gemm import kept_logits  # noqa: E402
from luffy_fast.kernels import forward, forward_fused  # noqa: E402

from .pass_sweep import (  # noqa: E402
    DRY,
    KernelConfigs,
    SweepLog,
    agrees,
    chunk_rows,
    label,
    only_config,
    time_ms,
)

KERNEL = forward_fused._fused_forward_kernel


class Chunk:
    """One kept chunk of the dense case: bf16 hidden rows and LM head, targets; the default
    forward's logits and statistics as the reference."""

    def __init__(self, rows: int, H: int, V: int, device: torch.device, seed: int = 0,
                 exact: bool = False) -> None:
        """`exact` (the interpreter's toy chunk, H <= 16): hidden in {-1, -0.5, 0, 0.5, 1} and
        weight in multiples of 1/16 below 0.5, so that every logit is a bf16 number (the
        interpreter truncates fp32 to bf16 where cuBLAS rounds to nearest)."""
        generator = torch.Generator(device).manual_seed(seed)
        if exact:
            self.hidden = (torch.randint(-2, 3, (rows, H), device=device, generator=generator)
                           / 2).bfloat16()
            self.weight = (torch.randint(-7, 8, (V, H), device=device, generator=generator)
                           / 16).bfloat16()
        else:
            self.hidden = torch.randn(rows, H, device=device, generator=generator).bfloat16()
            self.weight = (torch.randn(V, H, device=device, generator=generator)
                           * (2 / H**0.5)).bfloat16()
        self.targets = torch.randint(0, V, (rows,), device=device, generator=generator)
        self.rows = torch.arange(rows, device=device)
        self.reference = {half: self.default(half) for half in (True, False)}

    def default(self, half: bool):
        """cuBLAS's GEMM, then the statistics pass over its output (16-bit logits when `half`)."""
        logits = kept_logits(self.hidden, self.weight, half)
        return logits, forward.logsumexp_forward(self.hidden, self.weight, None, self.rows,
                                                 self.targets, 1.0, False, logits=logits)

    def fused(self, store, half: bool):
        """The fused kernel storing logits in `store` (a dtype, or None for no logits)."""
        logits = None if store is None else torch.empty(
            self.hidden.shape[0], self.weight.shape[0], dtype=store, device=self.hidden.device)
        return logits, forward_fused.fused_forward(self.hidden, self.weight, None, None,
                                                   self.targets, 1.0, False, logits, half)

    def check(self, got, half: bool) -> bool:
        """Statistics within 1e-4 of the default's (relative, L2) and stored logits within 1e-2
        (16-bit: each entry may round the other way) or 1e-4 (fp32) of cuBLAS's."""
        logits, stats = got
        expected_logits, expected_stats = self.reference[half]
        ok = agrees(stats, expected_stats, 1e-4)
        if logits is not None:
            ok = ok and agrees([logits], [expected_logits], 1e-2 if half else 1e-4)
        return ok


def configs(chunk: Chunk) -> list:
    """The fused kernel's configs for the chunk's dtype, each in its `cp.async` form and, where
    the chunk's operands allow TMA (`_tma_allowed`: aligned rows in order, a GPU with TMA), its
    TMA forms."""
    named = {"hidden_ptr": chunk.hidden, "weight_ptr": chunk.weight, "rows_ptr": None,
             "stride_hidden": chunk.hidden.stride(0), "stride_weight": chunk.weight.stride(0)}
    loads = forward_fused._configs_for(KERNEL.fn.configs, named, TMA_ALLOWED=0)
    if not forward_fused._tma_allowed(named):
        return loads
    return loads + [c for c in forward_fused._configs_for(KERNEL.fn.configs, named, TMA_ALLOWED=2)
                    if c.kwargs.get("TMA")]


def check_ragged(chunk: Chunk, log) -> list:
    """Each config on a chunk whose last token tile is cut to under half (a consumer group of the
    warp-specialized form with no rows), whose vocabulary ends inside a tile and whose H inside
    an H step (TMA's zero fill), at its own split count and at 6 (empty splits): its statistics
    and stored 16-bit logits against the default's. No timing."""
    rows = []
    for config in configs(chunk):
        installed = only_config(KERNEL, config)
        for count in (None, 6):
            name = f"fused {label(installed)}" + (f", {count} splits" if count else "")
            try:
                with forced_splits(count):
                    agrees = chunk.check(chunk.fused(torch.bfloat16, True), True)
            except Exception as error:
                log(f"  {name}: ERROR {repr(error)[:200]}")
                agrees = False
            rows.append({"name": name, "agrees": agrees})
            log(f"  {name}: {'agrees' if agrees else 'DISAGREES'}")
    return rows


@contextmanager
def forced_splits(count: Optional[int]):
    """The fused kernel's launches at `count` vocabulary splits inside (None: its own choice)."""
    chosen = forward_fused._splits
    if count is not None:
        forward_fused._splits = lambda n, v, meta: count
    try:
        yield
    finally:
        forward_fused._splits = chosen


def sweep(chunk: Chunk, deadline: float, log, ragged: Optional[Chunk] = None) -> dict:
    """Each part stops at `deadline`; the kernel's configs and tuning cache are put back. With a
    `ragged` chunk, every config is checked on it first (`check_ragged`)."""
    result = {"rows": chunk.hidden.shape[0], "hidden": chunk.hidden.shape[1],
              "vocab": chunk.weight.shape[0], "baseline": {}, "configs": [], "stores": [],
              "splits": [], "ragged": []}
    if ragged is not None:
        log(f"== each config on a ragged chunk: {ragged.hidden.shape[0]} tokens, "
            f"H = {ragged.hidden.shape[1]}, V = {ragged.weight.shape[0]}")
        with KernelConfigs(KERNEL):
            result["ragged"] = check_ragged(ragged, log)
        log("== the dense case's chunk")

    def timed(name: str, run, half: bool) -> dict:
        ms = time_ms(run)
        row = {"name": name, "ms": ms, "agrees": chunk.check(run(), half)}
        log(f"  {name}: {ms:.3f} ms" + ("" if row["agrees"] else "  DISAGREES"))
        return row

    for name, run in (("cuBLAS GEMM, bf16 logits", lambda: kept_logits(chunk.hidden, chunk.weight, True)),
                      ("cuBLAS GEMM, fp32 logits", lambda: kept_logits(chunk.hidden, chunk.weight, False))):
        result["baseline"][name] = time_ms(run)
        log(f"  {name}: {result['baseline'][name]:.3f} ms")
    for half in (True, False):
        name = f"cuBLAS GEMM + statistics pass, {'bf16' if half else 'fp32'} logits"
        result["baseline"][name] = timed(name, lambda h=half: chunk.default(h), half)["ms"]
    with KernelConfigs(KERNEL):
        for config in configs(chunk):
            if time.monotonic() > deadline:
                break
            installed = only_config(KERNEL, config)
            try:
                row = timed(f"fused {label(installed)}, bf16 logits stored",
                            lambda: chunk.fused(torch.bfloat16, True), True)
            except Exception as error:  # out of resources, say: the others still run
                log(f"  fused {label(installed)}: ERROR {repr(error)[:200]}")
                continue
            result["configs"].append({**row, "config": installed})
        fastest = min((r for r in result["configs"] if r["agrees"]), key=lambda r: r["ms"],
                      default=None)
        if fastest is not None:
            only_config(KERNEL, fastest["config"])
            for store, half, what in ((torch.float32, False, "fp32 logits stored"),
                                      (None, False, "no logits (token_logprobs)")):
                if time.monotonic() < deadline:
                    result["stores"].append(timed(f"fused {label(fastest['config'])}, {what}",
                                                  lambda s=store, h=half: chunk.fused(s, h), half))
            chosen = forward_fused._splits(chunk.hidden.shape[0], chunk.weight.shape[0],
                                           fastest["config"].kwargs)
            default_rule = forward.num_vocab_splits(chunk.hidden.shape[0], chunk.weight.shape[0])
            counts = sorted({max(1, chosen // 2), chosen, 2 * chosen, default_rule} - {chosen})
            for count in counts:
                if time.monotonic() > deadline:
                    break
                with forced_splits(count):
                    row = timed(f"fused {label(fastest['config'])}, {count} splits (chosen: "
                                f"{chosen}{'; the split kernel rule' if count == default_rule else ''})",
                                lambda: chunk.fused(torch.bfloat16, True), True)
                result["splits"].append({**row, "splits": count, "chosen": chosen})
    for rows in (result["configs"], result["stores"], result["splits"]):
        for row in rows:
            if "config" in row:
                row["config"] = label(row["config"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192,4096,151936", help="T,H,V of the dense case")
    parser.add_argument("--seconds", type=float, default=45, help="stop sweeping after this")
    args = parser.parse_args()
    T, H, V = (int(x) for x in args.shape.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log = SweepLog("fused_sweep")

    deadline = time.monotonic() + args.seconds
    budget_mb = LuffyLossConfig().memory_budget_bytes(device) / 2**20
    rows, H, V = (19, 16, 200) if DRY else (chunk_rows(T, H, V, budget_mb, 2, 2), H, V)
    log(f"== the fused forward: a chunk of {rows} tokens, H = {H}, V = {V}, bf16 (16-bit kept "
        "logits' chunk at the default budget)")
    # the dense chunk's integer alignments (no recompilation), ragged against 128 x 128 x 64
    ragged = Chunk(*((21, 16, 77) if DRY else (150, 80, 1008)), device, exact=DRY)
    log.save({"shape": [T, H, V],
              **sweep(Chunk(rows, H, V, device, exact=DRY), deadline, log, ragged)})


if __name__ == "__main__":
    main()
