"""Evaluation: k samples per problem, verified rewards, avg@k and pass@k per data source.

The same code serves `luffy-fast eval` and the trainer's in-training validation. Generation goes
through a rollout engine (vLLM or transformers `generate`: luffy_fast/rollout/), scoring through
a RewardPool (luffy_fast/reward_pool.py). pass@k is the unbiased estimator
1 - C(n - c, k) / C(n, k) over n samples with c correct (Chen et al., 2021, "Evaluating Large
Language Models Trained on Code"); avg@n is the mean reward over the n samples, as the LUFFY
paper reports AIME and AMC (avg@32). The macro average weighs every data source equally, as the
paper's "avg" column does. A problem is a training `Sample` (luffy_fast/data.py) without traces;
the reward receives it beside the response, as in training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

from luffy_fast.data import Sample
from luffy_fast.rollout.base import Completion, RolloutEngine, SamplingParams

HELDOUT_SOURCE = "heldout"  # the label of a problem without a data source


@dataclass
class EvalRecord:
    """One generated sample and its score (a line of the generations file)."""

    data_source: str
    problem: int
    sample: int
    ground_truth: str
    response: str
    reward: float
    finished: bool


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def reported_ks(n: int) -> list[int]:
    """pass@k reported for k = 1, 2, 4, ... and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarize(records: Sequence[EvalRecord], n: int) -> dict:
    """Per data source: problems, avg@n, pass@k; and the macro average over sources."""
    per_problem: dict[tuple[str, int], list[float]] = {}
    for record in records:
        per_problem.setdefault((record.data_source, record.problem), []).append(record.reward)
    sources: dict[str, dict] = {}
    for (source, _), rewards in sorted(per_problem.items()):
        if len(rewards) != n:
            raise ValueError(f"{source}: a problem has {len(rewards)} samples, expected {n}")
        correct = sum(1 for r in rewards if r >= 1.0)
        entry = sources.setdefault(source, {"problems": 0, f"avg@{n}": 0.0,
                                            **{f"pass@{k}": 0.0 for k in reported_ks(n)}})
        entry["problems"] += 1
        entry[f"avg@{n}"] += sum(rewards) / n
        for k in reported_ks(n):
            entry[f"pass@{k}"] += pass_at_k(n, correct, k)
    for entry in sources.values():
        for name in entry:
            if name != "problems":
                entry[name] /= entry["problems"]
    metrics = [name for name in next(iter(sources.values()), {}) if name != "problems"]
    macro = {name: sum(e[name] for e in sources.values()) / len(sources) for name in metrics}
    return {"n": n, "sources": sources, "macro": macro}


def format_table(summary: dict) -> str:
    """A plain-text table: one row per source, then the macro average (percentages)."""
    n = summary["n"]
    columns = [f"avg@{n}", f"pass@{n}"] if n > 1 else [f"avg@{n}"]
    width = max([len("macro average")] + [len(s) for s in summary["sources"]])
    lines = [f"{'source':<{width}}  {'problems':>8}  " + "  ".join(f"{c:>8}" for c in columns)]
    for source, entry in summary["sources"].items():
        lines.append(f"{source:<{width}}  {entry['problems']:>8}  "
                     + "  ".join(f"{100 * entry[c]:>8.1f}" for c in columns))
    lines.append(f"{'macro average':<{width}}  {'':>8}  "
                 + "  ".join(f"{100 * summary['macro'][c]:>8.1f}" for c in columns))
    return "\n".join(lines)


def generate_and_score(engine: RolloutEngine, problems: Sequence[Sample], n: int,
                       params: SamplingParams, decode: Callable[[list[int]], str],
                       score: Callable[[list[tuple[str, Any]]], list[float]],
                       per_chunk: Optional[int] = None,
                       done: Optional[Mapping[int, list[EvalRecord]]] = None,
                       save: Optional[Callable[[list[EvalRecord]], None]] = None
                       ) -> list[EvalRecord]:
    """n samples per problem from `engine`, each scored by `score` ((response, problem) pairs ->
    rewards, e.g. `lambda items: pool.score(items).rewards`).

    By chunks of `per_chunk` problems (default: all in one), chunk k sampled with seed + k, so
    that chunk k is the same whatever chunks came before it. A chunk whose problems are all in
    `done` (problem index -> its records, from an interrupted eval) is not generated again;
    `save` receives each generated chunk's records once they are scored."""
    per_chunk = per_chunk or max(1, len(problems))
    by_problem: dict[int, list[EvalRecord]] = dict(done or {})
    for k, first in enumerate(range(0, len(problems), per_chunk)):
        indices = range(first, min(first + per_chunk, len(problems)))
        if all(index in by_problem for index in indices):
            continue
        seeded = params if params.seed is None else replace(params, seed=params.seed + k)
        completions = engine.generate([problems[i].prompt_ids for i in indices], n=n,
                                      params=seeded)
        records = score_completions(problems[first:indices.stop], completions, decode, score,
                                    first=first)
        if save is not None:
            save(records)
        for record in records:
            by_problem.setdefault(record.problem, []).append(record)
    return [record for index in range(len(problems)) for record in by_problem[index]]


def problem_source(problem: Sample) -> str:
    """The data source a problem's scores are counted under."""
    return problem.data_source or HELDOUT_SOURCE


def metric_names(problems: Sequence[Sample], n: int, prefix: str = "val") -> list[str]:
    """The names `validation_metrics` gives an evaluation of `problems` with n samples each
    (known before anything is generated: they depend on the data sources and n only)."""
    records = [EvalRecord(problem_source(p), i, k, "", "", 0.0, True)
               for i, p in enumerate(problems) for k in range(n)]
    return sorted(validation_metrics(summarize(records, n), prefix)) if records else []


def score_completions(problems: Sequence[Sample], completions: Sequence[Sequence[Completion]],
                      decode: Callable[[list[int]], str],
                      score: Callable[[list[tuple[str, Any]]], list[float]],
                      first: int = 0) -> list[EvalRecord]:
    """The records of generated completions (one list per problem), scored by `score`; a
    problem without a data source is counted under HELDOUT_SOURCE. `first`: the index of the
    first problem among all of an eval's."""
    records, items = [], []
    for index, (problem, group) in enumerate(zip(problems, completions), start=first):
        source = problem_source(problem)
        for k, completion in enumerate(group):
            response = decode(completion.token_ids)
            items.append((response, problem))
            records.append(EvalRecord(source, index, k, problem.ground_truth, response, 0.0,
                                      completion.finished))
    for record, reward in zip(records, score(items)):
        record.reward = float(reward)
    return records


def validation_metrics(summary: dict, prefix: str = "val") -> dict:
    """Flat metric names for the trainer's log: val/<source>/avg@n ..., val/macro/avg@n ..."""
    flat = {}
    for source, entry in summary["sources"].items():
        flat.update({f"{prefix}/{source}/{name}": float(value) for name, value in entry.items()
                     if name != "problems"})
    flat.update({f"{prefix}/macro/{name}": float(value) for name, value in summary["macro"].items()})
    return flat


def combined_table(runs: Sequence[tuple[str, dict]]) -> str:
    """One table from several `eval` runs' results ((path, results.json's contents)): each
    source's avg@n at its run's n (avg@32 for AIME, avg@1 = pass@1 for MATH-500), and the macro
    average over all of them: the paper's "avg" column. A source in two runs is an error."""
    rows: dict[str, tuple[str, int, int, float]] = {}
    for path, results in runs:
        n = results["n"]
        for source, entry in results["sources"].items():
            if source in rows:
                raise ValueError(f"table: source {source!r} is in both {rows[source][0]} and "
                                 f"{path}")
            rows[source] = (path, n, entry["problems"], entry[f"avg@{n}"])
    width = max([len("macro average")] + [len(source) for source in rows])
    lines = [f"{'source':<{width}}  {'problems':>8}  {'n':>4}  {'avg@n':>8}"]
    lines += [f"{source:<{width}}  {problems:>8}  {n:>4}  {100 * score:>8.1f}"
              for source, (_, n, problems, score) in rows.items()]
    macro = sum(row[3] for row in rows.values()) / len(rows)
    lines.append(f"{'macro average':<{width}}  {'':>8}  {'':>4}  {100 * macro:>8.1f}")
    return "\n".join(lines)
