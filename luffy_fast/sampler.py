"""Which prompts each step trains on: epoch-wise shuffling without replacement, seeded.

As the official run's data loader (a torch RandomSampler over a generator seeded once, batches
of `prompts_per_step`, the last incomplete batch of an epoch dropped): each epoch RandomSampler
draws `torch.randperm(n)` from the generator, and a second one for its (here empty) tail, so
epoch e's order is the (2e+1)-th permutation drawn from `torch.Generator().manual_seed(seed)`;
this sampler visits prompts in the order of that loader over the same data
(docs/algorithm.md §The reference run's settings). Its position (`state_dict`) is saved in
every checkpoint and checked on `--resume`, which continues the same order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from luffy_fast.errors import ConfigError


class EpochSampler:
    """Batches of `batch_size` indices into `size` prompts; every epoch a fresh permutation."""

    def __init__(self, size: int, batch_size: int, seed: int, data: Optional[str] = None) -> None:
        if batch_size > size:
            raise ConfigError(f"train.prompts_per_step: {batch_size} prompts per step but only "
                              f"{size} training prompts")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.data = data  # a fingerprint of the prompts (data_fingerprint), checked on resume
        self._order: list[int] = []
        self._order_epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size

    def order(self, epoch: int) -> list[int]:
        """The permutation of epoch `epoch` (regenerated from the seed after a resume)."""
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.seed)
            for _ in range(2 * epoch):  # RandomSampler draws a second, empty, tail each epoch
                torch.randperm(self.size, generator=generator)
            order = torch.randperm(self.size, generator=generator)
            self._order, self._order_epoch = order.tolist(), epoch
        return self._order

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of step `step` (0-based)."""
        return divmod(step, self.batches_per_epoch)

    def batch(self, step: int) -> list[int]:
        """The prompt indices of step `step`: a function of the step alone, so a resumed run
        draws exactly what the uninterrupted run would have drawn."""
        epoch, batch = self.position(step)
        start = batch * self.batch_size
        return self.order(epoch)[start:start + self.batch_size]

    def state_dict(self, step: int) -> dict:
        """The position after `step` steps, and what the order depends on (for the checkpoint)."""
        epoch, batch = self.position(step)
        state = {"epoch": epoch, "batch": batch, "seed": self.seed, "size": self.size,
                 "batch_size": self.batch_size}
        return state if self.data is None else {**state, "data": self.data}

    def check_state(self, state: dict, step: int) -> None:
        """A checkpoint's sampler state must be this sampler's at `step`: the data, batch size
        and seed unchanged, or the order would silently differ from the interrupted run's."""
        saved = (state.get("size"), state.get("batch_size"), state.get("seed"))
        now = (self.size, self.batch_size, self.seed)
        if saved != now:
            key = next(key for key, a, b in zip(
                ("data.source", "train.prompts_per_step", "train.seed"), saved, now) if a != b)
            raise ConfigError(
                f"{key}: the checkpoint's run drew batches of {saved[1]} from {saved[0]} "
                f"prompts with seed {saved[2]}; this run has batches of {self.batch_size} from "
                f"{self.size} prompts with seed {self.seed} (the data, train.prompts_per_step or "
                f"train.seed changed since the checkpoint)")
        if None not in (state.get("data"), self.data) and state["data"] != self.data:
            raise ConfigError(f"data.source: the {self.size} training prompts are not the "
                              f"checkpoint's run's (as many, but other prompts, answers or "
                              f"traces: the data or its tokenization changed since the checkpoint),"
                              f" so its order would index other prompts")
        if (state.get("epoch"), state.get("batch")) != self.position(step):
            raise ConfigError(f"data.source: the checkpoint's sampler position "
                              f"{state.get('epoch')}:{state.get('batch')} is not step {step}'s")

    def check_trainer_state(self, trainer_state: dict) -> None:
        """check_state against a checkpoint's trainer state (checkpoint.read_trainer_state) at
        its step; cheap, so a resume can run it before the DeepSpeed load. Older checkpoints,
        saved without a sampler state, are trusted."""
        saved = trainer_state.get("sampler")
        if saved is not None:
            self.check_state(saved, int(trainer_state["step"]))


def rank_share(picks: list[int], mini_batch_size: int, rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s prompts among a step's `picks`: its equal slice of every mini-batch."""
    share = mini_batch_size // world_size
    return [i for start in range(0, len(picks), mini_batch_size)
            for i in picks[start + rank * share: start + (rank + 1) * share]]


def data_fingerprint(samples: Sequence) -> str:
    """A hash of the training samples' prompts, answers and trace lengths (one pass: 0.34 s for
    46k prompts of 200 tokens, measured on a CPU): a resume over other data of the same size is
    refused."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(np.asarray(sample.prompt_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray([len(t) for t in sample.traces], dtype=np.int64).tobytes())
        digest.update(sample.ground_truth.encode() + b"\0")
    return digest.hexdigest()[:16]


def prompt_sampler(samples: Sequence, config) -> EpochSampler:
    """The run's sampler over its training samples; with train.epochs set, train.steps becomes
    epochs x batches per epoch (the run's length, which the learning-rate schedule reads)."""
    sampler = EpochSampler(len(samples), config.train.prompts_per_step, config.train.seed,
                           data_fingerprint(samples))
    if config.train.epochs:
        config.train.steps = config.train.epochs * sampler.batches_per_epoch
    return sampler


def data_metrics(report, sampler: EpochSampler, step: int) -> dict:
    """The epoch of `step`'s prompts, and what loading the data skipped or cut
    (a luffy_fast.data.DataReport, or None when the task gives none)."""
    return {"data/epoch": sampler.position(step)[0],
            **(report.metrics() if report is not None else {})}
