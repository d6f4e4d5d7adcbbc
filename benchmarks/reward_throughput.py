"""Rewards per second: 1024 responses of ~4k tokens scored by math-verify through the RewardPool.

    python benchmarks/reward_throughput.py [--responses 1024] [--tokens 4096] [--workers N]

The responses imitate a reasoning model's: ~4 characters per token of reasoning with inline
LaTeX, "</think>", then a short answer with \\boxed{...}. A quarter are correct, a quarter wrong,
a quarter have a harder expression to compare (a fraction against a decimal) and a quarter never
close their reasoning (format failures, scored without a parse). The pool is warmed first (its
workers import math-verify), then timed over the whole batch; the in-process path (workers=0)
is timed on a slice for comparison. Not a test: it prints a table and, with --output, a JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from luffy_fast.data import Sample  # noqa: E402
from luffy_fast.reward_pool import RewardPool, default_workers  # noqa: E402
from luffy_fast.rewards import MathVerifyReward  # noqa: E402

SENTENCES = [
    "Let $x$ be the number of apples, so that $3x + 5 = 2x + 12$.",
    "Subtracting $2x$ from both sides gives $x + 5 = 12$, hence $x = 7$.",
    "We check the case $n = 2$: the sum is $\\frac{n(n+1)}{2} = 3$, which matches.",
    "Wait, maybe I should double-check the arithmetic here.",
    "By the Cauchy-Schwarz inequality, $(a^2 + b^2)(c^2 + d^2) \\ge (ac + bd)^2$.",
    "So the area is $\\sqrt{s(s-a)(s-b)(s-c)}$ with $s = 9$.",
]


def response(rng: random.Random, tokens: int, kind: str, answer: int) -> str:
    parts, length = [], 0
    while length < 4 * tokens:  # ~4 characters per token
        parts.append(rng.choice(SENTENCES))
        length += len(parts[-1]) + 1
    reasoning = " ".join(parts)
    if kind == "unclosed":
        return reasoning
    final = {"right": f"\\boxed{{{answer}}}", "wrong": f"\\boxed{{{answer + 1}}}",
             "fraction": f"\\boxed{{\\frac{{{2 * answer}}}{{2}}}}"}[kind]
    return f"{reasoning}\n</think>\n\nThe answer is {final}."


def measure(pool: RewardPool, items: list) -> tuple[float, object]:
    start = time.perf_counter()
    report = pool.score(items)
    return time.perf_counter() - start, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=None, help="default: one per CPU core")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--in-process", type=int, default=64,
                        help="responses also scored with workers=0, for comparison (0: skip)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    rng = random.Random(0)
    kinds = ["right", "wrong", "fraction", "unclosed"]
    items = []
    for i in range(args.responses):
        answer = rng.randrange(2, 1000)
        items.append((response(rng, args.tokens, kinds[i % 4], answer),
                      Sample(prompt_ids=[0], ground_truth=str(answer), data_source="bench")))
    workers = default_workers() if args.workers is None else args.workers
    with RewardPool(MathVerifyReward(), workers=workers, timeout=args.timeout) as pool:
        pool.score(items[:max(1, workers)])  # start the workers: imports not timed
        seconds, report = measure(pool, items)
    expected = [1.0 if kinds[i % 4] in ("right", "fraction") else 0.0 for i in range(len(items))]
    result = {
        "responses": len(items), "tokens_per_response": args.tokens,
        "characters_per_response": sum(len(r) for r, _ in items) / len(items),
        "workers": workers, "cpu_cores": os.cpu_count(), "seconds": seconds,
        "rewards_per_second": len(items) / seconds, "timeouts": report.timeouts,
        "errors": report.errors, "correct_as_expected": report.rewards == expected,
    }
    if args.in_process:
        part = items[:args.in_process]
        with RewardPool(MathVerifyReward(), workers=0) as pool:
            pool.score(part[:1])
            seconds_in, _ = measure(pool, part)
        result["in_process_rewards_per_second"] = len(part) / seconds_in
    for name, value in result.items():
        print(f"{name:>32}: {value:.4g}" if isinstance(value, float) else f"{name:>32}: {value}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
