"""Metrics: one logger (metrics.jsonl + TensorBoard), one mean/min/max accumulator, a phase
timer with namespaced names (`time/generate`, `time/score`, `time/update`, `time/sync`).

metrics.jsonl is always valid JSON: non-finite numbers are written as null, and a torn line (a
crash or a full disk mid-write) is dropped with a warning on resume (docs/robustness.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from luffy_fast.errors import ConfigError
from luffy_fast.run_files import from_every_rank, naming_full_disk, warn, write_atomic

if TYPE_CHECKING:
    from luffy_fast.train_config import LuffyTrainConfig


class MeanMinMax:
    """Running statistics of named values: a weighted mean of each, except the names listed as
    `minimum` / `maximum` (the smallest / largest value), `summed` (the total), and the names in
    `weighted_by`, whose mean is weighted by the value of the name it maps to (a token mean by its
    token count: TOKEN_COUNTS) instead of `add`'s weight, and whose extremes leave out values of
    weight zero; where all their weights are zero, the plain mean or extreme of what was added
    (the statistic's value when it has no tokens)."""

    def __init__(self, minimum: Iterable[str] = (), maximum: Iterable[str] = (),
                 summed: Iterable[str] = (), weighted_by: Optional[Mapping[str, str]] = None) -> None:
        self.minimum, self.maximum, self.summed = set(minimum), set(maximum), set(summed)
        self.weighted_by = dict(weighted_by or {})
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self._extremes: dict[str, float] = {}
        self._plain: dict[str, list[float]] = {}  # weighted_by names: sum and count of values
        self._unweighted: dict[str, float] = {}  # weighted_by extremes of the zero-weight values

    def add(self, values: Mapping[str, float], weight: float = 1.0) -> None:
        for name, value in values.items():
            value = float(value)
            if name in self.minimum or name in self.maximum:
                pick = min if name in self.minimum else max
                weightless = (name in self.weighted_by
                              and not float(values.get(self.weighted_by[name], 0.0)))
                kept = self._unweighted if weightless else self._extremes
                kept[name] = pick(kept.get(name, value), value)
            elif name in self.summed:
                self._extremes[name] = self._extremes.get(name, 0.0) + value
            else:
                share = weight
                if name in self.weighted_by:
                    share = float(values.get(self.weighted_by[name], 0.0))
                    plain = self._plain.setdefault(name, [0.0, 0])
                    plain[0], plain[1] = plain[0] + value, plain[1] + 1
                self._sums[name] = self._sums.get(name, 0.0) + value * share
                self._weights[name] = self._weights.get(name, 0.0) + share

    def result(self) -> dict[str, float]:
        means = {}
        for name, total in self._sums.items():
            if self._weights[name]:
                means[name] = total / self._weights[name]
            elif name in self._plain:
                means[name] = self._plain[name][0] / self._plain[name][1]
            else:
                means[name] = 0.0
        return {**means, **self._unweighted, **self._extremes}


# a token statistic: the count of the tokens it is over, which weighs its mean over micro-batches,
# optimizer steps and ranks (and an extreme leaves out the parts without such tokens); the counts
# are logged with it: loss_tokens and on_policy_loss_tokens per optimizer step (a step's mean),
# sampled_tokens per step
TOKEN_COUNTS = {"logprob_mean": "loss_tokens", "entropy": "loss_tokens",
                "clip_fraction": "loss_tokens", "ratio_mean": "on_policy_loss_tokens",
                "ratio_min": "on_policy_loss_tokens", "ratio_max": "on_policy_loss_tokens",
                "rollout_logprob_gap_mean": "sampled_tokens", "tis_weight_mean": "sampled_tokens",
                "tis_clipped_fraction": "sampled_tokens"}
# the means over a step's samples, weighted over the ranks by each rank's count of them (a rank's
# share of traces differs where prompts have none)
SAMPLE_COUNTS = {"advantage_mean": "samples", "zero_advantage_fraction": "samples",
                 "reward_off_policy": "off_policy_samples",
                 "response_length_off_policy": "off_policy_samples"}
# summed over the ranks: counts (also every */errors and */timeouts) and throughputs; the
# largest: times and memory (the slowest rank)
SUMMED_OVER_RANKS = ("micro_batches", "tokens_per_second", "generated_tokens",
                     "generate_tokens_per_second", *dict.fromkeys(TOKEN_COUNTS.values()),
                     *dict.fromkeys(SAMPLE_COUNTS.values()))
LARGEST_OVER_RANKS = ("peak_memory_mb",)  # and peak_memory_mb/<phase>
# population standard deviations over all ranks' samples, pooled from each rank's std, the mean
# and the count it maps to: var = Σ n (std² + mean²) / Σ n - mean²
POOLED_OVER_RANKS = {"advantage_std": ("advantage_mean", "samples")}


def over_ranks(metrics: Mapping, world_size: int) -> dict:
    """A step's metrics over the data-parallel ranks, each of which holds an equal share of the
    step's prompts: counts and throughputs summed, `*_min` the smallest, `*_max`, `time/*`,
    `*_seconds` and peak memory the largest, token means (TOKEN_COUNTS) weighted by each rank's
    token count, sample means (SAMPLE_COUNTS) by its sample count, `advantage_std` pooled
    (POOLED_OVER_RANKS), every other number the mean of the ranks' values (exact for means
    over equal shares: on-policy rewards and lengths, the loss). A collective: every rank
    calls it with its own metrics and gets the same result."""
    if world_size == 1:
        return dict(metrics)
    numbers = [{name: value for name, value in rank.items() if isinstance(value, (int, float))}
               for rank in from_every_rank(dict(metrics), world_size)]
    names = {name for rank in numbers for name in rank}
    stats = MeanMinMax(minimum={name for name in names if name.endswith("_min")},
                       maximum={name for name in names if name.endswith(("_max", "_seconds"))
                                or name.startswith(("time/", *LARGEST_OVER_RANKS))},
                       summed={name for name in names if name in SUMMED_OVER_RANKS
                               or name.endswith(("/errors", "/timeouts"))},
                       weighted_by={**TOKEN_COUNTS, **SAMPLE_COUNTS})
    for rank in numbers:
        stats.add(rank)
    pooled = {name: pooled_std([(rank[name], rank[mean], rank[count]) for rank in numbers])
              for name, (mean, count) in POOLED_OVER_RANKS.items()
              if all(name in rank and mean in rank and count in rank for rank in numbers)}
    return {**metrics, **stats.result(), **pooled}


def pooled_std(parts: Iterable[tuple[float, float, float]]) -> float:
    """The population std of the union of parts, from each part's (std, mean, size)."""
    parts = [part for part in parts if part[2]]
    size = sum(n for _, _, n in parts)
    if not size:
        return 0.0
    square_mean = sum(n * (std * std + mean * mean) for std, mean, n in parts) / size
    mean = sum(n * mean for _, mean, n in parts) / size
    return math.sqrt(max(square_mean - mean * mean, 0.0))


class PhaseTimer:
    """Wall-clock seconds per phase of a step, as `time/<phase>` (repeated phases add up), and
    on a GPU each phase's peak allocated memory, `peak_memory_mb/<phase>`: the update's own
    (`peak_memory_mb/update`) apart from generation's, whose engine (vLLM's weights and KV
    cache) sleeps during the update. `metrics()` adds the step's peak, `peak_memory_mb` (on the
    CPU the process's peak resident memory, which cannot be reset)."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.seconds: dict[str, float] = {}
        self.device = device
        self.peaks: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        on_gpu = self.device is not None and self.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{name}"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
            if on_gpu:
                key = f"peak_memory_mb/{name}"
                self.peaks[key] = max(self.peaks.get(key, 0.0), peak_memory_mb(self.device))

    def metrics(self) -> dict[str, float]:
        """The phases' seconds and peaks, and the step's peak memory."""
        overall = max([peak_memory_mb(self.device or torch.device("cpu")), *self.peaks.values()])
        return {**self.seconds, **self.peaks, "peak_memory_mb": overall}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def finite_or_none(metrics: Mapping) -> dict:
    """`metrics` with every non-finite float replaced by None (JSON null)."""
    return {name: None if isinstance(value, float) and not math.isfinite(value) else value
            for name, value in metrics.items()}


class MetricsLogger:
    """Per-step metrics to metrics.jsonl, TensorBoard and, from `for_run`, Weights & Biases.

    resume_step > 0 keeps the lines up to that step (a crashed run may have logged past its
    checkpoint) and TensorBoard purges the later points; 0 starts both in a folder that
    run_files.start_fresh has cleared of an old run's (the trainer's start does).
    """

    def __init__(self, directory: Path, tensorboard: bool, resume_step: int = 0) -> None:
        self.path = directory / "metrics.jsonl"
        self.logged_before = 0  # the last step the run had logged before this (re)start
        if resume_step and self.path.exists():  # drop what a crashed run logged past the checkpoint
            rows = read_metrics(self.path)
            self.logged_before = max((row.get("step", 0) for row in rows), default=0)
            kept = [row for row in rows if row.get("step", 0) <= resume_step]
            write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self.writer, self.wandb, self.wandb_from = None, None, 0
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(directory / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def log(self, metrics: dict) -> None:
        metrics = finite_or_none(metrics)
        line = json.dumps(metrics, allow_nan=False) + "\n"

        def append() -> None:
            with self.path.open("a") as out:
                out.write(line)

        naming_full_disk(self.path, "metrics", append)
        step = metrics["step"]
        scalars = {name: value for name, value in metrics.items()
                   if name != "step" and isinstance(value, (int, float))}  # nulls left out
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb is not None and step >= self.wandb_from:
            self.wandb.log(scalars, step=step)

    @classmethod
    def for_run(cls, directory: Path, config: LuffyTrainConfig,
                resume_step: int = 0) -> MetricsLogger:
        """The logger of a training run: TensorBoard and Weights & Biases as its `output`
        section says. A resumed W&B run is sent no step it was sent before the restart: online
        W&B resumes after its last step, but an offline run starts again at 0 (its segments are
        joined by `wandb sync`), so the steps logged before the restart are skipped too."""
        logger = cls(directory, config.output.tensorboard, resume_step)
        if config.output.wandb_project:
            try:
                logger.wandb = open_wandb(directory, config, resume_step)
            except BaseException:
                logger.close()
                raise
            logger.wandb_from = max(logger.wandb.step, logger.logged_before + 1 if resume_step
                                    else 0)
        return logger

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:  # a run stopped by an error or a signal is marked failed
            self.wandb.finish(exit_code=0 if sys.exc_info()[0] is None else 1)


WANDB_ID = "wandb_id"  # the W&B run id of a run folder (a RUN_FILES entry)


def open_wandb(directory: Path, config: LuffyTrainConfig, resume_step: int) -> Any:
    """The W&B run of a run folder: its id is kept in `wandb_id`, so `--resume` continues the
    same W&B run (its steps past the checkpoint, redone with the same metrics, are not sent
    twice) and a fresh start begins a new one. W&B's own settings come from its environment
    variables (WANDB_ENTITY, WANDB_MODE=offline, ...); its local files go to `wandb/`."""
    import secrets

    import wandb

    id_file = directory / WANDB_ID
    run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)
        write_atomic(id_file, run_id + "\n")
    try:
        return wandb.init(project=config.output.wandb_project, id=run_id, resume="allow",
                          name=config.output.wandb_name or Path(directory).resolve().name,
                          config=config.to_dict(), dir=str(directory))
    except Exception as error:  # wandb's errors (no login, no network, ...) share no base class
        raise ConfigError(f"output.wandb_project: W&B could not start the run ("
                          f"{type(error).__name__}: {error}); log in (WANDB_API_KEY), or set "
                          f"WANDB_MODE=offline to log without a network") from error


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not a JSON object (torn by a crash or a full
    disk mid-write), or whose step is not an integer (a file edited by hand), is dropped with a
    warning naming it."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            warn(f"{path}: line {number} is not a complete JSON object (torn write?); dropped: "
                 f"{line[:80]!r}")
            continue
        step = row.get("step", 0)
        if not isinstance(step, int) or isinstance(step, bool):
            warn(f"{path}: line {number} has a step that is not an integer ({step!r}); dropped")
            continue
        rows.append(row)
    return rows


def progress_display(output, lead: bool, start_step: int, total: int, name: str):
    """(tqdm bar, ProgressLog) for rank 0 (`lead`): the bar on a terminal when
    output.progress_bar is on, else plain lines every output.log_every steps."""
    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, total), initial=start_step, total=total, desc=name,
               disable=not (lead and ProgressLog.bar_wanted(output.progress_bar)))
    return bar, ProgressLog(output.log_every if lead and bar.disable else 0, total, start_step,
                            name=name)


class ProgressLog:
    """Plain progress lines every `every` steps and at the last (0: never), where no progress
    bar is shown: stderr is not a terminal (cluster logs) or output.progress_bar is off."""

    def __init__(self, every: int, total: int, start_step: int, stream=None, name: str = "") -> None:
        self.every, self.total, self.stream, self.name = every, total, stream, name
        self.since, self.last_step = time.perf_counter(), start_step

    @staticmethod
    def bar_wanted(enabled: bool) -> bool:
        """A carriage-return bar only where it renders: output.progress_bar and a terminal."""
        return enabled and sys.stderr.isatty()

    def step(self, step: int, metrics: Mapping) -> None:
        if not self.every or (step % self.every and step != self.total):
            return
        now = time.perf_counter()
        seconds = (now - self.since) / max(step - self.last_step, 1)
        self.since, self.last_step = now, step
        line = progress_line(step, self.total, metrics, seconds)
        print(f"{self.name}: {line}" if self.name else line, file=self.stream or sys.stdout,
              flush=True)


def progress_line(step: int, total: int, metrics: Mapping, seconds_per_step: float) -> str:
    """One plain log line: the step and its headline metrics."""
    parts = [f"step {step}/{total}"]
    for name in ("loss", "reward_on_policy", "reward_off_policy", "grad_norm", "heldout_accuracy",
                 "nonfinite/skipped_steps"):
        value = metrics.get(name)
        if isinstance(value, (int, float)):
            parts.append(f"{name} {value:.4g}")
        elif name in metrics:
            parts.append(f"{name} {value}")
    parts.append(f"{seconds_per_step:.2f} s/step")
    return " | ".join(parts)
