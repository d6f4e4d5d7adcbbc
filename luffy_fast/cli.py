"""Command line: `luffy-fast train|demo` (also `python -m luffy_fast ...`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from luffy_fast.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="luffy-fast", description=(
        "LUFFY: reinforcement learning with verifiable rewards under off-policy guidance."))
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a YAML config",
                                description="Train from a YAML config; trailing dotted.key=value "
                                            "pairs override it (e.g. optim.lr=1e-6).")
    train.add_argument("--config", required=True, help="YAML file (see configs/)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in output.dir")
    train.add_argument("overrides", nargs="*", metavar="dotted.key=value")

    demo = commands.add_parser("demo", help="LUFFY vs on-policy GRPO on the embedded toy task",
                               description="Train LUFFY and on-policy GRPO on digit reversal with "
                                           "a tiny random-initialized Qwen2, on the CPU.")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--runs", default="luffy,grpo",
                      help="comma-separated: luffy, grpo, luffy_no_shaping")
    demo.add_argument("--resume", action="store_true")
    demo.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                      help="applied to every run (e.g. train.steps=100)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from luffy_fast.train_config import load_config
            from luffy_fast.trainer import LuffyTrainer

            config = load_config(args.config, args.overrides)
            trainer = LuffyTrainer(config)
            try:
                trainer.train(resume=args.resume)
            finally:
                trainer.close()
            print(f"done: metrics and checkpoints in {config.output.dir}")
        else:
            from luffy_fast.toy.demo import format_summary, run_demo

            runs = [r.strip() for r in args.runs.split(",") if r.strip()]
            summary = run_demo(args.output_dir, runs, args.overrides, resume=args.resume)
            print(format_summary(summary))
            print(f"summary: {args.output_dir}/summary.json  plot: {args.output_dir}/demo.png")
    except ConfigError as error:
        print(f"luffy-fast: configuration error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
