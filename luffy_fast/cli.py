"""Command line: `luffy-fast train|eval|table|plot|demo` (also `python -m luffy_fast ...`)."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from luffy_fast.checkpoint import CheckpointManager, NoCheckpointError
from luffy_fast.errors import ConfigError
from luffy_fast.nonfinite import NonFiniteTrainingError
from luffy_fast.run_files import (
    DiskFullError,
    check_run_dir,
    claim_run_dir,
    launched_rank,
    launched_world_size,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="luffy-fast", description=(
        "LUFFY: reinforcement learning with verifiable rewards under off-policy guidance."),
        epilog="--debug, anywhere on the line, shows the traceback of an error (without it an "
               "error is one line naming the input, and the exit code is 2).")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a YAML config",
                                description="Train from a YAML config; trailing dotted.key=value "
                                            "pairs override it (e.g. optim.lr=1e-6).")
    train.add_argument("--config", required=True, help="YAML file (see configs/)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in output.dir")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in output.dir (its metrics, TensorBoard "
                            "and checkpoints); without it or --resume, such a folder is an error")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config and the data, show the first prompt, the model's "
                            "size and a per-GPU memory estimate; no weights are read")
    train.add_argument("--world-size", type=int, default=None,
                       help="--dry-run: GPUs of the planned run (default: $WORLD_SIZE or 1)")
    train.add_argument("overrides", nargs="*", metavar="dotted.key=value")

    from luffy_fast.eval_cli import add_eval_parser

    add_eval_parser(commands)  # luffy-fast eval and table (luffy_fast/eval_cli.py)
    from luffy_fast.plots import add_plot_parser

    add_plot_parser(commands)  # luffy-fast plot (luffy_fast/plots.py)

    demo = commands.add_parser("demo", help="LUFFY vs on-policy GRPO on the embedded toy task",
                               description="Train LUFFY and on-policy GRPO on digit reversal with "
                                           "a tiny random-initialized Qwen2, on the CPU.")
    demo.add_argument("--output-dir", default="runs/demo",
                      help="a folder per run, the summary and the plot (default: runs/demo)")
    demo.add_argument("--runs", default="luffy,grpo",
                      help="comma-separated: luffy, grpo, luffy_no_shaping (default: luffy,grpo)")
    demo.add_argument("--resume", action="store_true",
                      help="continue each run from its latest checkpoint, if any")
    demo.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                      help="applied to every run (e.g. train.steps=100)")
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments; flags may come anywhere, also after the dotted overrides (`... optim.lr=1e-6
    --resume`): argparse stops the overrides at the first flag, so later `key=value` words are
    added back."""
    parser = _parser()
    # the DeepSpeed launcher adds --local_rank=N (LOCAL_RANK is in the environment too)
    argv = [word for word in argv if not re.fullmatch(r"--local[-_]rank=\d+", word)]
    args, extra = parser.parse_known_args(argv)
    for flag in ("--resume", "--overwrite"):  # also before the command: `--resume train ...`
        if flag in extra and getattr(args, flag[2:], None) is False:
            setattr(args, flag[2:], True)
            extra = [word for word in extra if word != flag]
    stray = [word for word in extra if "=" not in word or word.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        parser.error("--resume and --overwrite contradict each other: --resume continues the run "
                     "in output.dir (eval: the eval in --output), --overwrite replaces it")
    if getattr(args, "world_size", None) is not None and args.world_size < 1:
        parser.error(f"--world-size: must be at least 1, got {args.world_size}")
    return args


# Failures a user causes (a config key, a file, a folder, a run to resume): a message naming
# the input and exit code 2, no traceback unless --debug (docs/robustness.md).
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, NoCheckpointError)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's pre-emption, `kill`, a launcher stopping its ranks): the run stops
    as on Ctrl-C, its `finally` blocks closing the log, the reward workers and the engines."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def resume_hint(command: str, run_dir: Optional[str]) -> str:
    """What `--resume` will continue from, for the interrupt message (`run_dir`: eval's
    --output, if any)."""
    if command == "eval":
        return (f"; `--resume` with the same arguments keeps the problems done in "
                f"{str(Path(run_dir) / 'generations.jsonl')!r}" if run_dir
                else "; nothing was kept: with `--output DIR` an eval saves its samples as they are "
                     "scored and `--resume` continues it")
    if run_dir is None:
        return "; `--resume` continues from the last checkpoint"
    try:
        with warnings.catch_warnings():  # a broken pointer's fallback warns; here it is named
            warnings.simplefilter("ignore")
            latest = CheckpointManager(Path(run_dir) / "checkpoints", keep=1).latest()
    except NoCheckpointError:
        latest = None
    return (f"; `--resume` continues from {latest}" if latest
            else "; no checkpoint to resume from yet: start over with `--overwrite`")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line: shows the traceback of an error
    args = _parse([word for word in argv if word != "--debug"])
    # SIGTERM stops a run as Ctrl-C does, where it would end the process (not where a parent
    # set it to be ignored, nor from a thread, which cannot set handlers)
    takes_sigterm = (threading.current_thread() is threading.main_thread()
                     and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if takes_sigterm:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args, debug)
    finally:
        if takes_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def quiet_library_progress(command: str, terminal: bool) -> None:
    """transformers' own progress bars (loading the weights, writing the shards of every
    checkpoint) off where they would break into the run's bar or fill a log file: in train and
    demo, and in eval off a terminal."""
    if command != "eval" or not terminal:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def _run(args: argparse.Namespace, debug: bool) -> int:
    run_dir = None  # a training run's folder, for the interrupt message
    if args.command not in ("plot", "table"):  # these need no transformers
        quiet_library_progress(args.command, sys.stderr.isatty())
    try:
        if args.command == "train":
            from luffy_fast.train_config import load_config
            from luffy_fast.trainer import LuffyTrainer

            config = load_config(args.config, args.overrides)
            run_dir = config.output.dir
            if args.dry_run:
                from luffy_fast.dry_run import dry_run

                return dry_run(config, args.world_size or launched_world_size())
            # before any loading; a launched rank's number from the launcher (no process group yet)
            rank = launched_rank()
            with claim_run_dir(config.output.dir, rank):
                check_run_dir(config.output.dir, args.resume, args.overwrite, rank=rank)
                trainer = LuffyTrainer(config)
                try:
                    trainer.train(resume=args.resume)
                finally:
                    trainer.close()
            if rank == 0:
                print(f"done: metrics and checkpoints in {config.output.dir}")
        elif args.command == "eval":
            from luffy_fast.eval_cli import run_eval

            run_dir = args.output
            return run_eval(args)
        elif args.command == "table":
            from luffy_fast.eval_cli import run_table

            return run_table(args)
        elif args.command == "plot":
            from luffy_fast.plots import run_plot

            return run_plot(args)
        else:
            from luffy_fast.toy.demo import format_summary, run_demo

            runs = [r.strip() for r in args.runs.split(",") if r.strip()]
            summary = run_demo(args.output_dir, runs, args.overrides, resume=args.resume)
            print(format_summary(summary))
            print(f"summary: {args.output_dir}/summary.json  plot: {args.output_dir}/demo.png")
    except USER_ERRORS as error:
        if debug:
            raise
        kind = "configuration error" if isinstance(error, ConfigError) else "error"
        # an error in the settings or the data is the same on every rank of a node (the same
        # command line, files and packages): the node's first rank alone reports it
        if not isinstance(error, ConfigError) or launched_rank("LOCAL_RANK") == 0:
            print(f"{error_prefix()}{kind}: {error}\n(--debug shows the traceback)",
                  file=sys.stderr)
        return 2
    except (DiskFullError, NonFiniteTrainingError) as error:
        if debug:
            raise
        print(f"{error_prefix()}{error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        if debug:
            raise
        terminated = isinstance(stop, Terminated)
        if launched_rank() == 0:
            print(f"luffy-fast: {'terminated (SIGTERM)' if terminated else 'interrupted'}"
                  f"{resume_hint(args.command, run_dir)}", file=sys.stderr)
        return 143 if terminated else 130
    return 0


def error_prefix() -> str:
    """An error line's start: "luffy-fast: ", naming the rank on ranks other than 0. An error
    in the settings or the data is reported by each node's first rank, an interrupt by rank 0
    (the launcher signals every rank), any other error by every rank that has it (its own
    disk, its own files)."""
    rank = launched_rank()
    return f"luffy-fast [rank {rank}]: " if rank else "luffy-fast: "


if __name__ == "__main__":
    sys.exit(main())
