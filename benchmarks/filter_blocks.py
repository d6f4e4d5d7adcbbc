"""Where the gradient filter's blocks are, counted on the CPU from the benchmarks' peaked logits.

    python -m benchmarks.filter_blocks [--tokens 2048] [--threshold 2e-5]

An entry counts as kept when its probability reaches the threshold (the filter's test without the
entropy term: |dL/dz| <= s_t (p + p |z - E_p[z]|)). Prints the share of [tokens x 128] blocks
skipped for several tokens per block, in token order and ordered by target; the share of
128-wide vocabulary tiles negligible for every token of a chunk; and the kept tiles per token.
At the benchmark shape (H = 4096, V = 151936) it takes about 90 s on two cores.
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--threshold", type=float, default=2e-5)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    hidden, weight, targets = peaked_hidden_weight(args.tokens, args.hidden, args.vocab,
                                                   generator, "cpu")
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
