"""How fast the gradient filter's block-sparse GEMMs run at a few tile configs each, on one chunk of
the peaked case, beside cuBLAS's dense products of the same chunk.

The filter (LuffyLossConfig.grad_filter, kernels/backward_filtered.py) skips blocks of dL/dz in
two output-stationary Triton GEMMs: d(hidden) = dz W over the vocabulary tiles each token tile
keeps, d(weight) = dz^T h over the token tiles each vocabulary tile keeps. Round 3 timed them at
about a third of cuBLAS's rate per block (BENCHMARKS.md, "The gradient filter's GEMM tiles"). Here
the chunk's dL/dz (c (e_y - p) on peaked logits, one random coefficient per token) and its block
map (an entry at or above `threshold` x |c| keeps its block, the kernel's test without entropy)
are fixed, and each config of `HIDDEN` and `WEIGHT` replaces that kernel's tiles in
`filter_tiles`, is timed (median, kernels/utils.py: tuning_bench) and checked against torch's
fp32 product of the kept blocks (`FilterChunk.expected`). Writes filter_sweep.txt and
filter_sweep.json under $OUT.

    python -m benchmarks.filter_sweep [--shape T,H,V] [--threshold 2e-5] [--seconds 60]

The chunk has the filter's rows at the default budget for T tokens (kernels/function.py: plan).
With BENCH_DRY_RUN=1 (or on a CPU) it runs a toy chunk on the interpreter.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from luffy_fast import LuffyLossConfig  # noqa: E402
from luffy_fast.kernels import backward_filtered  # noqa: E402
from luffy_fast.kernels.function import plan  # noqa: E402
from luffy_fast.kernels.utils import tuning_bench  # noqa: E402

from .cases import peaked_hidden_weight  # noqa: E402
from .pass_sweep import SweepLog  # noqa: E402

DRY = not torch.cuda.is_available() or os.environ.get("BENCH_DRY_RUN") == "1"

# bf16 on a GPU: the first of each list is filter_tiles' default, "narrow" round 3's tiles.
HIDDEN = [
    {"SPAN": 2, "BLOCK_OUT": 256, "GROUP_H": 4, "num_warps": 8, "num_stages": 2},
    {"SPAN": 1, "BLOCK_OUT": 128, "GROUP_H": 4, "num_warps": 8, "num_stages": 3},  # narrow
    {"SPAN": 1, "BLOCK_OUT": 256, "GROUP_H": 4, "num_warps": 8, "num_stages": 2},
    {"SPAN": 2, "BLOCK_OUT": 128, "GROUP_H": 4, "num_warps": 8, "num_stages": 3},
    {"SPAN": 4, "BLOCK_OUT": 128, "GROUP_H": 4, "num_warps": 8, "num_stages": 2},
    {"SPAN": 2, "BLOCK_OUT": 256, "GROUP_H": 8, "num_warps": 8, "num_stages": 2},
    {"SPAN": 2, "BLOCK_OUT": 256, "GROUP_H": 2, "num_warps": 8, "num_stages": 2},
]
WEIGHT = [
    {"BLOCK_OUT": 256, "num_warps": 8, "num_stages": 3},
    {"BLOCK_OUT": 128, "num_warps": 8, "num_stages": 3},  # narrow
    {"BLOCK_OUT": 256, "num_warps": 8, "num_stages": 4},
    {"BLOCK_OUT": 256, "num_warps": 8, "num_stages": 2},
    {"BLOCK_OUT": 128, "num_warps": 4, "num_stages": 4},
]
# The interpreter's: its default first, then the other span and a wider output.
DRY_HIDDEN = [{"SPAN": 2, "BLOCK_OUT": 16, "GROUP_H": 3}, {"SPAN": 1, "BLOCK_OUT": 16, "GROUP_H": 3},
              {"SPAN": 2, "BLOCK_OUT": 32, "GROUP_H": 2}]
DRY_WEIGHT = [{"BLOCK_OUT": 16}, {"BLOCK_OUT": 32}]


class FilterChunk:
    """One chunk's hidden rows and weight (peaked logits, in `dtype`), its dL/dz (NaN in the blocks
    the map skips) and its block map."""

    def __init__(self, rows: int, H: int, V: int, threshold: float, dtype: torch.dtype,
                 device: torch.device, seed: int = 0) -> None:
        generator = torch.Generator(device).manual_seed(seed)
        hidden, weight, targets = peaked_hidden_weight(rows, H, V, generator, device.type)
        self.hidden, self.weight = hidden.to(dtype), weight.to(dtype)
        self.rows = torch.arange(rows, device=device)
        coef = torch.randn(rows, device=device, generator=generator)
        self.logits, self.targets, self.coef = self.hidden.float() @ self.weight.float().T, targets, coef
        dz = torch.softmax(self.logits, dim=1).neg_()
        dz[self.rows, targets] += 1.0
        dz *= coef[:, None]
        tiles = backward_filtered.filter_tiles(dtype)["logits"]
        bt, bv = tiles["BLOCK_T"], tiles["BLOCK_V"]
        large = dz.abs() >= threshold * coef.abs()[:, None]
        padded = torch.zeros(-(-rows // bt) * bt, -(-V // bv) * bv, dtype=torch.bool, device=device)
        padded[:rows, :V] = large
        self.keep = padded.view(-(-rows // bt), bt, -1, bv).any(dim=3).any(dim=1).to(torch.int8)
        kept = self.keep.repeat_interleave(bt, 0)[:rows].repeat_interleave(bv, 1)[:, :V].bool()
        # the filter writes nothing in the blocks it skips: NaN there shows a config reading one
        self.grad_logits = torch.where(kept, dz, float("nan")).to(dtype)
        self.weight_mean = self.weight.float().mean(dim=0)
        self.block_t, self.threshold = bt, threshold

    def kept_fraction(self, span: int = 1) -> float:
        """Blocks a d(hidden) program multiplies with `span` token tiles merged, of all."""
        counts = backward_filtered._kept_lists(self.keep, span)[1]
        return float(counts.sum()) / (counts.numel() * self.keep.shape[1])

    def expected(self, part: str) -> torch.Tensor:
        """`part`'s product in fp32 by torch from the kept blocks (NaN read as 0), with the
        kernel's skipped-mass correction in d(hidden): what every config must give."""
        dz = self.grad_logits.float().nan_to_num(0.0)
        if part == "weight":
            return dz.T @ self.hidden.float()
        skipped_some = self.keep.sum(dim=1) < self.keep.shape[1]
        correction = torch.where(skipped_some.repeat_interleave(self.block_t)[:dz.shape[0]],
                                 dz.sum(dim=1), 0.0)
        return dz @ self.weight.float() - correction[:, None] * self.weight_mean[None, :]

    def run(self, part: str, out: torch.Tensor) -> None:
        """One launch of the d(hidden) (`part` "hidden") or d(weight) kernel into `out`."""
        grads = (out, None, None) if part == "hidden" else (None, out, None)
        backward_filtered.sparse_gradients(backward_filtered.GradLogitBlocks.own(self.grad_logits),
                                           self.keep, self.hidden, self.weight, self.rows, grads,
                                           self.weight_mean)


class Tiles:
    """Within the block, `filter_tiles` gives `config` as `part`'s launch (the rest unchanged)."""

    def __init__(self, part: str, config: dict) -> None:
        self.part, self.config = part, config

    def __enter__(self):
        self.original = backward_filtered.filter_tiles
        original, part, config = self.original, self.part, self.config

        def patched(dtype):
            launches = original(dtype)
            launches[part] = {**launches[part], **config}
            return launches

        backward_filtered.filter_tiles = patched
        return self

    def __exit__(self, *exc) -> None:
        backward_filtered.filter_tiles = self.original


def check_over_logits(chunk: FilterChunk, log) -> dict:
    """The whole filter at its default tiles (block map, dL/dz, both GEMMs) for every other token
    of the chunk, writing dL/dz over the chunk's fp32 logits (the kept strategy's way) and into a
    buffer of its own: the same block map and gradients bit for bit, or a race (programs writing
    over logits others have not read yet) or a misplaced block shows."""
    from luffy_fast.kernels.gradients import ActiveTokens

    positions = torch.arange(0, chunk.rows.numel(), 2, device=chunk.rows.device)
    z = chunk.logits[positions]
    lse = torch.logsumexp(z, dim=1)
    targets = chunk.targets[positions]
    tokens = ActiveTokens(positions, targets, lse, z.gather(1, targets[:, None])[:, 0] - lse,
                          chunk.coef[positions], None, None, None)

    def run(out, logits):
        grads = (torch.zeros_like(chunk.hidden), torch.zeros_like(chunk.weight), None)
        keep = backward_filtered.filtered_gradients(
            chunk.hidden, chunk.weight, None, tokens, 1.0, chunk.threshold, out, grads,
            logits=logits, logit_rows=positions, weight_mean=chunk.weight_mean)
        return keep, grads

    own = torch.empty((positions.numel(), chunk.logits.shape[1]), dtype=chunk.hidden.dtype,
                      device=chunk.hidden.device)
    keep, grads = run(own, chunk.logits)
    keep_over, grads_over = run(None, chunk.logits.clone())
    result = {"part": "over_logits", "same_map": bool(torch.equal(keep, keep_over)),
              "same_gradients": all(bool(torch.equal(a, b)) for a, b in zip(grads[:2], grads_over[:2])),
              "kept": float(keep.float().mean())}
    result["agrees"] = result["same_map"] and result["same_gradients"]
    log(f"== dL/dz over the fp32 logits against a buffer of its own ({positions.numel()} tokens, "
        f"{result['kept']:.1%} of blocks kept): {'the same' if result['agrees'] else 'DIFFERENT'}")
    return result


def sweep(chunk: FilterChunk, part: str, configs: list[dict], deadline: float, log) -> list[dict]:
    """Each config of `part` timed and checked against the first's output."""
    size = chunk.hidden.shape if part == "hidden" else chunk.weight.shape
    dense = dense_product(chunk, part)
    dense_ms = tuning_bench(dense, quantiles=(0.5,))[0]
    kept = {span: chunk.kept_fraction(span) for span in (1, 2, 4)}
    log(f"== d({part}): cuBLAS dense product {dense_ms:.3f} ms; blocks kept by token tiles of "
        f"{chunk.block_t} rows: {kept[1]:.1%} (2 merged: {kept[2]:.1%}, 4: {kept[4]:.1%})")
    rows, expected = [], chunk.expected(part)
    for config in configs:
        if time.monotonic() > deadline:
            log(f"  {config}: deadline reached")
            break
        out = torch.zeros(size, dtype=chunk.hidden.dtype, device=chunk.hidden.device)  # as the op's
        row = {"part": part, "config": config}
        try:
            with Tiles(part, config):
                chunk.run(part, out)  # the check's run (d(weight) accumulates: from zero)
                result = out.float().clone()
                row["ms"] = tuning_bench(lambda out=out: chunk.run(part, out), quantiles=(0.5,))[0]
        except Exception as error:  # a config that does not compile or fit: say so and go on
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            log(f"  {config}: {row['error']}")
            rows.append(row)
            continue
        scale = float(expected.norm()) or 1.0
        row["rel_diff"] = float((result - expected).norm()) / scale
        row["agrees"] = row["rel_diff"] <= 2e-2  # a bf16 output; an fp32 one gets ~1e-6
        row["x_dense"] = row["ms"] / dense_ms
        verdict = "" if row["agrees"] else f"  DISAGREES (relative difference {row['rel_diff']:.2e})"
        log(f"  {config}: {row['ms']:.3f} ms = {row['x_dense']:.2f} x dense{verdict}")
        rows.append(row)
    return [{"part": part, "dense_ms": dense_ms, "kept": kept}] + rows


def dense_product(chunk: FilterChunk, part: str):
    """cuBLAS's product that `part`'s kernel replaces, on the same chunk."""
    if part == "hidden":
        return lambda: chunk.grad_logits @ chunk.weight
    return lambda: chunk.grad_logits.T @ chunk.hidden


def chunk_rows(T: int, H: int, V: int, threshold: float, device: torch.device) -> int:
    """Rows of the filter's kept chunks at the default budget, bf16 inputs and fp32 logits
    (kernels/function.py: plan, then equal chunks)."""
    config = LuffyLossConfig(grad_filter=threshold)
    most = plan(config, device, T, V, element_size=2, hidden_size=H)[1]
    return -(-T // -(-T // most))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192,4096,151936", help="T,H,V of the peaked case")
    parser.add_argument("--threshold", type=float, default=2e-5, help="the filter's threshold")
    parser.add_argument("--seconds", type=float, default=60, help="stop sweeping after this")
    args = parser.parse_args(argv)
    T, H, V = (int(x) for x in args.shape.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if DRY else torch.bfloat16
    if DRY:
        rows, H, V = 40, 40, 300
    else:
        rows = chunk_rows(T, H, V, args.threshold, device)
    log = SweepLog("filter_sweep")

    deadline = time.monotonic() + args.seconds
    log(f"== the filter's GEMMs on a chunk of {rows} x {V}, H = {H}, {str(dtype)[6:]}, "
        f"threshold {args.threshold:g}")
    chunk = FilterChunk(rows, H, V, args.threshold, dtype, device)
    results = [check_over_logits(chunk, log)]
    for part, configs in (("hidden", DRY_HIDDEN if DRY else HIDDEN),
                          ("weight", DRY_WEIGHT if DRY else WEIGHT)):
        share = (deadline - time.monotonic()) / (2 if part == "hidden" else 1)
        results += sweep(chunk, part, configs, time.monotonic() + share, log)
        log.save({"shape": [T, H, V], "rows": rows, "threshold": args.threshold,
                  "results": results})


if __name__ == "__main__":
    main()
