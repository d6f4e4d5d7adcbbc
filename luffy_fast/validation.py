"""In-training validation and the best checkpoint.

Validation runs the code of `luffy-fast eval` (luffy_fast/evaluation.py) on the task's held-out
problems: `eval.n` samples per problem, scored through the trainer's reward pool, avg@n and
pass@k per data source and their macro average in the metrics (val/<source>/avg@n, ...,
val/macro/avg@n). With `eval.best_metric` set, the checkpoint with the best value of that metric
so far (higher is better) is kept under checkpoints/best/: written and published atomically
like the regular ones (best/latest names it), never pruned by them, with best/best.json saying
which metric, value and step (docs/design.md §Evaluation). The regular checkpoint of the step
just kept as the best hard-links its files (CheckpointManager.save's `link_from`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from torch import Tensor

from luffy_fast.checkpoint import CheckpointManager
from luffy_fast.errors import ConfigError
from luffy_fast.evaluation import (
    metric_names,
    score_completions,
    summarize,
    validation_metrics,
)
from luffy_fast.metrics import over_ranks
from luffy_fast.reward_pool import RewardPool
from luffy_fast.rollout.base import RolloutEngine, SamplingParams
from luffy_fast.rollout_batch import RolloutBatch, assemble_groups
from luffy_fast.run_files import from_every_rank, rank_zero_value, write_atomic


def check_validation(problems: Sequence[Any], config, report: Callable[[str], None]) -> None:
    """Start-up check of the `eval` section against the held-out problems: raises ConfigError
    when eval.best_metric names a metric that validation will not log; `report`s settings that
    would do nothing (validation without held-out problems, a best metric without validation)."""
    evaluation = config.eval
    best = evaluation.best_metric
    if evaluation.every and not problems:
        report(f"eval.every={evaluation.every}, but the task has no held-out problems"
               + ("" if config.data.heldout_source else " (data.heldout_source is not set)")
               + ": no validation will run"
               + (", and no checkpoint is kept as the best by eval.best_metric" if best else ""))
    elif best is not None and not evaluation.every:
        report(f"eval.best_metric={best!r}, but eval.every=0: no validation will run, and no "
               f"checkpoint is kept as the best")
    elif best is not None and best not in (names := metric_names(problems, evaluation.n)):
        raise ConfigError(f"eval.best_metric: {best!r} is not among the validation metrics of "
                          f"this run's held-out problems ({', '.join(names)})")


class Validation:
    """The held-out problems, how to sample them, and the best value seen of `best_metric`."""

    def __init__(self, samples: Sequence[Any], config, pool: RewardPool, checkpoint_root: Path,
                 rank: int = 0, world_size: int = 1) -> None:
        """config: the run's LuffyTrainConfig (its `eval` section, the response limit, the seed)."""
        self.config, evaluation = config, config.eval
        self.problems = list(samples)  # evaluation problems are the samples themselves
        self.n, self.best_metric = evaluation.n, evaluation.best_metric
        self.params = SamplingParams(max_new_tokens=config.data.max_response_length,
                                     temperature=evaluation.temperature,
                                     top_p=evaluation.top_p, seed=config.train.seed)
        self.pool, self.rank, self.world_size = pool, rank, world_size
        self.best = CheckpointManager(Path(checkpoint_root) / "best", keep=1, rank=rank,
                                      world_size=world_size,
                                      bucket_mb=config.rollout.vllm.sync_bucket_mb)
        self.best_value: Optional[float] = None

    def run(self, engine: RolloutEngine, decode: Callable[[list[int]], str],
            token_entropy: Optional[Callable[[RolloutBatch], Tensor]] = None) -> dict:
        """Metrics of one validation pass; with `token_entropy` (the policy's entropy at each
        response token of a batch), also the mean over the held-out responses."""
        if not self.problems:
            return {}
        # each rank validates its share of the problems (all of them when there are fewer
        # problems than ranks); the scored records are gathered, so every rank logs the same
        world = self.world_size if len(self.problems) >= self.world_size else 1
        mine = range(self.rank % world, len(self.problems), world)
        problems = [self.problems[i] for i in mine]
        completions = engine.generate([p.prompt_ids for p in problems], n=self.n,
                                      params=self.params)
        reports = []

        def score(items: list) -> list[float]:
            reports.append(self.pool.score(items))
            return reports[-1].rewards

        records = score_completions(problems, completions, decode, score)
        for record in records:
            record.problem = mine[record.problem]  # its place among all the problems
        entropy = (0.0, 0)
        if token_entropy is not None:
            values = token_entropy(assemble_groups(problems, completions, n_off=0))
            entropy = (float(values.sum()), values.numel())
        shares = from_every_rank((records, entropy), world)
        records = [record for share, _ in shares for record in share]
        metrics = validation_metrics(summarize(records, self.n))
        metrics["heldout_accuracy"] = sum(r.reward >= 1.0 for r in records) / len(records)
        metrics.update(over_ranks(reports[-1].metrics("val_reward"), world))
        if token_entropy is not None:
            total, count = (sum(part) for part in zip(*(e for _, e in shares)))
            metrics["heldout_entropy"] = total / count if count else 0.0
        return metrics

    def start(self, resuming: bool) -> None:
        """A resumed run continues from the best value saved; a fresh one from none (its start
        cleared an old run's best/ with the rest: CheckpointManager.resume_point)."""
        info = self.best.root / "best.json"
        if resuming and info.is_file():
            saved = json.loads(info.read_text())
            if saved.get("metric") == self.best_metric:
                self.best_value = float(saved["value"])

    def keep_best(self, metrics: dict, step: int, engine, tokenizer) -> Optional[Path]:
        """Save `engine`'s checkpoint under best/ when `metrics` improve on the best value of
        `best_metric`; returns its folder (the same on every rank), or None when it did not."""
        name = self.best_metric
        if name is None or not self.problems:
            return None
        if name not in metrics:
            known = ", ".join(sorted(k for k in metrics if k.startswith("val/")))
            raise ConfigError(f"eval.best_metric: {name!r} is not among this run's validation "
                              f"metrics ({known})")
        # rank 0's value (the one it logs): ranks sampling with their own seeds must still agree
        # on whether to save, a collective operation
        value = rank_zero_value(float(metrics[name]), self.best.world_size)
        if self.best_value is not None and value <= self.best_value:
            return None
        self.best_value = value
        path = self.best.save(engine, tokenizer, step, self.config.to_dict())
        if self.best.rank == 0:
            self.best.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self.best.root / "best.json", json.dumps(
                {"metric": name, "value": value, "step": step, "checkpoint": path.name}) + "\n")
        return path
