"""Evaluation metrics against hand-computed values, with a scripted generator."""

from __future__ import annotations

import json

import pytest

from luffy_fast.data import Sample
from luffy_fast.eval_store import EvalStore
from luffy_fast.evaluation import (
    EvalRecord,
    combined_table,
    format_table,
    generate_and_score,
    pass_at_k,
    summarize,
    validation_metrics,
)
from luffy_fast.rollout.base import Completion, RolloutEngine, SamplingParams

# Token 1 decodes to "right", token 0 to "wrong"; a problem's script is its n samples.
SCRIPTS = {
    (10,): [1, 0, 0, 0],  # aime, 1 of 4 correct
    (11,): [0, 0, 0, 0],  # aime, 0 of 4
    (12,): [1, 1, 1, 1],  # amc, 4 of 4
    (13,): [0, 1, 1, 0],  # amc, 2 of 4
}


class ScriptedEngine(RolloutEngine):
    def generate(self, prompts, n, params):
        return [[Completion([token], [0.0]) for token in SCRIPTS[tuple(p)][:n]] for p in prompts]

    def sync_weights(self, named_tensors):
        pass

    def close(self):
        pass


def problems():
    sources = ["aime", "aime", "amc", "amc"]
    return [Sample([10 + i], "right", data_source=source) for i, source in enumerate(sources)]


def score(items):
    return [float(response == problem.ground_truth) for response, problem in items]


def test_unbiased_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError, match="k="):
        pass_at_k(4, 1, 5)


def test_avg_and_pass_at_k_per_source_and_macro(tmp_path):
    records = generate_and_score(ScriptedEngine(), problems(), n=4,
                                 params=SamplingParams(max_new_tokens=4, temperature=0.6),
                                 decode=lambda ids: "right" if ids == [1] else "wrong", score=score)
    summary = summarize(records, n=4)
    aime, amc = summary["sources"]["aime"], summary["sources"]["amc"]
    assert aime["problems"] == amc["problems"] == 2
    assert aime["avg@4"] == pytest.approx((0.25 + 0.0) / 2)
    assert aime["pass@1"] == pytest.approx(0.125)
    assert aime["pass@2"] == pytest.approx((0.5 + 0.0) / 2)
    assert aime["pass@4"] == pytest.approx(0.5)
    assert amc["avg@4"] == pytest.approx((1.0 + 0.5) / 2)
    assert amc["pass@2"] == pytest.approx((1.0 + 5 / 6) / 2)
    assert amc["pass@4"] == pytest.approx(1.0)
    assert summary["macro"]["avg@4"] == pytest.approx((0.125 + 0.75) / 2)
    assert summary["macro"]["pass@4"] == pytest.approx((0.5 + 1.0) / 2)

    table = format_table(summary).splitlines()
    assert table[0].split() == ["source", "problems", "avg@4", "pass@4"]
    assert table[1].split() == ["aime", "2", "12.5", "50.0"]
    assert table[-1].split() == ["macro", "average", "43.8", "75.0"]

    store = EvalStore(tmp_path, {"n": 4})  # the files `luffy-fast eval --output` writes
    store.append(records)
    results, generations = store.finish(summary, {"n": 4}), store.generations
    assert json.loads(results.read_text())["macro"]["pass@4"] == pytest.approx(0.75)
    lines = [json.loads(line) for line in generations.read_text().splitlines()]
    assert len(lines) == 16 and sum(line["reward"] for line in lines) == 7
    assert validation_metrics(summary)["val/amc/avg@4"] == pytest.approx(0.75)


def test_a_problem_with_missing_samples_is_an_error():
    records = generate_and_score(ScriptedEngine(), problems()[:1], n=4,
                                 params=SamplingParams(max_new_tokens=4), decode=str, score=score)
    with pytest.raises(ValueError, match="expected 8"):
        summarize(records, n=8)


def test_a_problem_is_the_sample_its_reward_receives_and_unlabelled_ones_count_as_heldout():
    labelled, unlabelled = Sample([10], "right", data_source="aime"), Sample([12], "right")
    received = []

    def record_items(items):
        received.extend(problem for _, problem in items)
        return score(items)

    records = generate_and_score(ScriptedEngine(), [labelled, unlabelled], n=2,
                                 params=SamplingParams(max_new_tokens=4),
                                 decode=lambda ids: "right" if ids == [1] else "wrong",
                                 score=record_items)
    assert len(received) == 4
    assert all(a is b for a, b in zip(received, [labelled] * 2 + [unlabelled] * 2))
    assert [(r.data_source, r.problem, r.reward) for r in records] == [
        ("aime", 0, 1.0), ("aime", 0, 0.0), ("heldout", 1, 1.0), ("heldout", 1, 1.0)]
    assert unlabelled.data_source == ""  # the label is the record's, the sample is unchanged


@pytest.mark.parametrize("n, c, k", [(4, 1, 0), (4, 5, 1), (4, -1, 1)])
def test_pass_at_k_refuses_k_below_one_and_c_outside_0_to_n(n, c, k):
    """k = 0 gave 1 - C(n-c, 0)/C(n, 0) = 0 and c > n gave 1.0 (n - c < k) without a word."""
    with pytest.raises(ValueError, match=rf"n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)


def records_of(source, rewards_per_problem):
    return [EvalRecord(source, i, k, "", "", reward, True)
            for i, rewards in enumerate(rewards_per_problem) for k, reward in enumerate(rewards)]


def test_partial_rewards_enter_avg_at_n_but_only_a_full_reward_is_a_pass():
    """One problem, n = 4, rewards (1, 0.5, 0.5, 0): avg@4 = 2/4 = 0.5 (the mean reward); one
    sample is correct (reward >= 1), so pass@1 = 1/4 and pass@2 = 1 - C(3,2)/C(4,2) = 1/2
    (counting the 0.5s as passes would give 3/4 and 1)."""
    summary = summarize(records_of("s", [[1.0, 0.5, 0.5, 0.0]]), n=4)
    entry = summary["sources"]["s"]
    assert entry["avg@4"] == pytest.approx(0.5)
    assert entry["pass@1"] == pytest.approx(0.25)
    assert entry["pass@2"] == pytest.approx(0.5)


def test_the_macro_average_weighs_sources_not_problems():
    """Source a: 1 problem solved (avg@1 = 1); source b: 3 problems, none solved (0). The paper's
    avg column: (1 + 0) / 2 = 0.5 (weighing by problems would give 1/4)."""
    summary = summarize(records_of("a", [[1.0]]) + records_of("b", [[0.0], [0.0], [0.0]]), n=1)
    assert summary["macro"]["avg@1"] == pytest.approx(0.5)


def test_the_combined_tables_macro_weighs_sources_not_problems():
    """Run 1: aime, 2 problems, n = 4, avg@4 0.5 (pass@4 0.75, not shown); run 2: math, 6
    problems, n = 1, avg@1 0.25. Rows in percent; macro (50 + 25) / 2 = 37.5 (weighing by
    problems would give 31.2)."""
    aime = {"n": 4, "sources": {"aime": {"problems": 2, "avg@4": 0.5, "pass@4": 0.75}}}
    math500 = {"n": 1, "sources": {"math": {"problems": 6, "avg@1": 0.25, "pass@1": 0.25}}}
    rows = [line.split() for line in combined_table([("a", aime), ("b", math500)]).splitlines()]
    assert rows == [["source", "problems", "n", "avg@n"], ["aime", "2", "4", "50.0"],
                    ["math", "6", "1", "25.0"], ["macro", "average", "37.5"]]
