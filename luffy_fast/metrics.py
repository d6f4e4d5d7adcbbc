"""Metrics: one logger (metrics.jsonl + TensorBoard), one mean/min/max accumulator, a phase
timer with namespaced names (`time/generate`, `time/score`, `time/update`, `time/sync`)."""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from luffy_fast.checkpoint import write_atomic


class MeanMinMax:
    """Running statistics of named values: a weighted mean of each, except the names listed as
    `minimum` / `maximum`, which keep their smallest / largest value."""

    def __init__(self, minimum: Iterable[str] = (), maximum: Iterable[str] = ()) -> None:
        self.minimum, self.maximum = set(minimum), set(maximum)
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self._extremes: dict[str, float] = {}

    def add(self, values: Mapping[str, float], weight: float = 1.0) -> None:
        for name, value in values.items():
            value = float(value)
            if name in self.minimum or name in self.maximum:
                pick = min if name in self.minimum else max
                self._extremes[name] = pick(self._extremes.get(name, value), value)
            else:
                self._sums[name] = self._sums.get(name, 0.0) + value * weight
                self._weights[name] = self._weights.get(name, 0.0) + weight

    def result(self) -> dict[str, float]:
        means = {name: total / self._weights[name] if self._weights[name] else 0.0
                 for name, total in self._sums.items()}
        return {**means, **self._extremes}


class PhaseTimer:
    """Wall-clock seconds per phase of a step, as `time/<phase>` (repeated phases add up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{name}"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    """Per-step metrics to metrics.jsonl and TensorBoard."""

    def __init__(self, directory: Path, tensorboard: bool, resume_step: int = 0) -> None:
        self.path = directory / "metrics.jsonl"
        if resume_step and self.path.exists():  # drop what a crashed run logged past the checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            write_atomic(self.path, "".join(line + "\n" for line in kept))
        elif not resume_step and self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(directory / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
