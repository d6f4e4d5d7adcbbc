"""Where the gradient filter's blocks are, counted on the CPU from the benchmarks' peaked logits.

    python -m benchmarks.filter_blocks [--tokens 2048] [--threshold 2e-5]
    python -m benchmarks.filter_blocks --errors [--tokens 512]


An entry counts as kept when its probability reaches the threshold (the filter's test without the
entropy term: |dL/dz| <= s_t (p + p |z - E_p[z]|)). Prints the share of [tokens x 128] blocks
skipped for several tokens per block, in token order and ordered by target; the share of
128-wide vocabulary tiles negligible for every token of a chunk; and the kept tiles per token.
At the benchmark shape (H = 4096, V = 151936) it takes about 90 s on two cores.

With --errors: the relative error of d(hidden) and d(weight) (in float64, d(weight) on 256 of the
H columns) when the filter drops whole [tokens x 128] blocks, against dropping single entries, at
several thresholds; dL/dz = c (e_y - p) with one coefficient c per 64-token sequence (no entropy
term), and d(hidden) with the kernels' mean-weight-row correction. About 3 minutes at T = 512.
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks.cases import peaked_hidden_weight

TILE_V = 128


def kept_tiles(hidden: torch.Tensor, weight: torch.Tensor, threshold: float,
               rows: int = 128) -> torch.Tensor:
    """[T, V / TILE_V] bool: the vocabulary tiles where each token has an entry at or above
    `threshold`, computed `rows` tokens at a time."""
    V = weight.shape[0]
    tiles = math.ceil(V / TILE_V)
    kept = torch.zeros(hidden.shape[0], tiles, dtype=torch.bool)
    for start in range(0, hidden.shape[0], rows):
        big = torch.softmax(hidden[start:start + rows] @ weight.T, dim=1) >= threshold
        big = torch.nn.functional.pad(big, (0, tiles * TILE_V - V))
        kept[start:start + rows] = big.view(-1, tiles, TILE_V).any(dim=2)
    return kept


def skipped(kept: torch.Tensor, tokens_per_block: int) -> float:
    """Share of [tokens_per_block x TILE_V] blocks with no kept entry."""
    blocks = kept.view(-1, tokens_per_block, kept.shape[1]).any(dim=1)
    return 1.0 - float(blocks.float().mean())


def filter_errors(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  thresholds: tuple[float, ...], block_tokens: tuple[int, ...] = (64, 16)) -> None:
    """Print, per threshold, the kept entries per token and the gradient errors of dropping
    single entries and of dropping whole blocks of `block_tokens` x TILE_V."""
    T, V = hidden.shape[0], weight.shape[0]
    coef = torch.randn(T // 64, generator=torch.Generator().manual_seed(1)).repeat_interleave(64)
    grad = -torch.softmax((hidden @ weight.T).double(), dim=1)
    grad[torch.arange(T), targets] += 1
    grad *= coef[:, None].double()
    w, h = weight.double(), hidden[:, :256].double()
    exact_h, exact_w, w_mean = grad @ w, grad.T @ h, w.mean(dim=0)

    def errors(kept: torch.Tensor) -> str:
        dropped = torch.where(kept, grad, 0.0)
        grad_h = dropped @ w - dropped.sum(dim=1, keepdim=True) * w_mean
        return (f"{float((grad_h - exact_h).norm() / exact_h.norm()):.2e} "
                f"{float((dropped.T @ h - exact_w).norm() / exact_w.norm()):.2e}")

    tiles = math.ceil(V / TILE_V)
    print(f"{'threshold':>9} {'entries/token':>13} {'p99':>6} {'entries: dh dw':>18}"
          + "".join(f" {f'{n} x {TILE_V}: skipped dh dw':>30}" for n in block_tokens))
    for threshold in thresholds:
        big = grad.abs() >= threshold * coef.abs()[:, None].double()
        per_token = big.sum(dim=1).double()
        line = (f"{threshold:>9g} {float(per_token.mean()):>13.1f} "
                f"{float(per_token.quantile(0.99)):>6.0f} {errors(big):>18}")
        padded = torch.nn.functional.pad(big, (0, tiles * TILE_V - V))
        for n in block_tokens:
            blocks = padded.view(T // n, n, tiles, TILE_V).any(dim=3).any(dim=1)
            kept = blocks.repeat_interleave(n, 0).repeat_interleave(TILE_V, 1)[:, :V]
            line += f" {1 - float(blocks.float().mean()):>12.3f} {errors(kept):>17}"
        print(line, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--threshold", type=float, default=2e-5)
    parser.add_argument("--errors", action="store_true",
                        help="gradient errors of block and entry dropping (use --tokens 512)")
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    hidden, weight, targets = peaked_hidden_weight(args.tokens, args.hidden, args.vocab,
                                                   generator, "cpu")
    if args.errors:
        print(f"peaked logits, T = {args.tokens}, H = {args.hidden}, V = {args.vocab}: relative "
              "errors of d(hidden) and d(weight) (dh dw), float64")
        filter_errors(hidden, weight, targets, (3e-6, 1e-5, 2e-5, 1e-4))
        return
    kept = kept_tiles(hidden, weight, args.threshold)
    by_target = kept[torch.argsort(targets, stable=True)]
    print(f"peaked logits, T = {args.tokens}, H = {args.hidden}, V = {args.vocab}, "
          f"p >= {args.threshold:g}; {kept.shape[1]} vocabulary tiles of {TILE_V}")
    print(f"kept tiles per token: {float(kept.float().sum(dim=1).mean()):.1f}")
    for per_block in (1, 8, 16, 32, 64, 128):
        if args.tokens % per_block == 0:
            print(f"blocks of {per_block:>3} x {TILE_V} skipped: token order "
                  f"{skipped(kept, per_block):.3f}, target order {skipped(by_target, per_block):.3f}")
    for chunk in (256, 512, 1024, 2048):
        if args.tokens % chunk == 0:
            print(f"vocabulary tiles negligible for all {chunk} tokens of a chunk: "
                  f"{skipped(kept, chunk):.3f}")


if __name__ == "__main__":
    main()
