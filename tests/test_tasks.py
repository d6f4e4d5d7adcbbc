"""What a task's data must satisfy before a run starts, the held-out problems' even spread, and
where tokenized data are cached (luffy_fast/tasks.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from luffy_fast.data import Sample
from luffy_fast.errors import ConfigError
from luffy_fast.tasks import MathTask, check_samples, data_cache_dir, evenly_spread
from luffy_fast.train_config import load_config
from math_helpers import LONG_TRACE_ROWS, SKIPPED_ROWS, math_rows, math_tokenizer, write_jsonl

# prompt 3 + trace 4 tokens, prompt 5 + trace 1 token
SAMPLES = [Sample([1, 2, 3], "1", traces=[[4, 4, 4, 1]], where="a"),
           Sample([1, 2, 3, 4, 5], "2", traces=[[1]], where="b")]


def config(*overrides):
    return load_config(None, ["data.max_response_length=4", "train.prompts_per_step=2",
                              "train.mini_batch_size=2", *overrides])


def test_evenly_spread_positions():
    # positions index * 10 // 4 = 0, 2, 5, 7 (not multiples of 10 // 4 = 2)
    assert evenly_spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert evenly_spread(list(range(10)), None) == list(range(10))
    assert evenly_spread(list(range(3)), 5) == [0, 1, 2]


def test_the_longest_sequence_against_the_token_budget():
    # with policy samples: the longer prompt + max_response_length = 5 + 4 = 9 tokens
    check_samples(SAMPLES, config("train.token_budget=9"))
    with pytest.raises(ConfigError, match=r"train.token_budget: 8 tokens per micro-batch, but the "
                                          r"longest sequence is 9 tokens \(the prompt of b "):
        check_samples(SAMPLES, config("train.token_budget=8"))
    # traces only (n_on = 0): each prompt + its longest trace, max(3 + 4, 5 + 1) = 7
    check_samples(SAMPLES, config("train.token_budget=7", "rollout.n_on=0", "rollout.n_off=2"))
    with pytest.raises(ConfigError, match=r"longest sequence is 7 tokens \(the prompt of a "):
        check_samples(SAMPLES, config("train.token_budget=6", "rollout.n_on=0", "rollout.n_off=2"))


def test_enough_prompts_and_traces_within_the_response_length():
    check_samples(SAMPLES, config())  # 2 prompts for 2 per step; a trace of exactly 4 tokens
    with pytest.raises(ConfigError, match="train.prompts_per_step: 4 prompts per step but only 2"):
        check_samples(SAMPLES, config("train.prompts_per_step=4", "train.mini_batch_size=4"))
    with pytest.raises(ConfigError, match="data.max_response_length: a training sample has a "
                                          "trace longer than 3 tokens"):
        check_samples(SAMPLES, config("data.max_response_length=3"))


def test_prompts_without_a_trace_are_named_five_at_most():
    def bare(count):  # the first without a row name: named by its index
        return [Sample([1, 2], "1", where=f"row {i}" if i else None) for i in range(count)]

    for count, named in ((5, "sample 0, row 1, row 2, row 3, row 4"),
                         (6, "sample 0, row 1, row 2, row 3, row 4, ...")):
        with pytest.raises(ConfigError) as error:
            check_samples(bare(count), config("rollout.n_off=1"))
        assert str(error.value) == (
            f"data.source: {count} of {count} training prompts have no off-policy trace, but "
            f"rollout.n_off=1 needs one each: {named} (add a 'target' to those rows, remove them, "
            f"or set rollout.n_off=0)")
    check_samples(bare(2), config("rollout.n_off=0"))  # no traces needed


def test_where_tokenized_data_are_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LUFFY_FAST_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    base = config()
    assert data_cache_dir(base) == tmp_path / "home" / ".cache" / "luffy_fast" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_cache_dir(base) == tmp_path / "xdg" / "luffy_fast" / "data"
    monkeypatch.setenv("LUFFY_FAST_CACHE", str(tmp_path / "mine"))
    assert data_cache_dir(base) == tmp_path / "mine" / "data"

    def with_cache_dir(value):
        return dataclasses.replace(base, data=dataclasses.replace(base.data, cache_dir=value))

    assert data_cache_dir(with_cache_dir(str(tmp_path / "set"))) == Path(tmp_path / "set")
    assert data_cache_dir(with_cache_dir("")) is None  # "": no cache


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_the_math_tasks_traces_over_the_response_length_as_data_trace_overflow_says(tmp_path,
                                                                                   overflow):
    """math_rows: rows 3, 7, 11, 19 keep their prompt and have a trace of 11 tokens > 8 (row 15's
    prompt is skipped): cut to 8 tokens, or dropped (those rows are left without a trace)."""
    data = write_jsonl(tmp_path / "train.jsonl", math_rows())
    base = load_config(None, [f"data.source={data}", "data.max_prompt_length=8",
                              "data.max_response_length=8", f"data.trace_overflow={overflow}"])
    task = MathTask(dataclasses.replace(base, data=dataclasses.replace(base.data, cache_dir="")))
    samples = task.train_samples(math_tokenizer())
    long_rows = [i for i in LONG_TRACE_ROWS if i not in SKIPPED_ROWS]
    assert long_rows == [3, 7, 11, 19] and len(samples) == 16
    report = task.data_report
    assert (report.truncated_traces, report.dropped_traces) == (
        (4, 0) if overflow == "truncate" else (0, 4))
    kept_rows = [i for i in range(20) if i not in SKIPPED_ROWS]
    lengths = {i: [len(t) for t in s.traces] for i, s in zip(kept_rows, samples)}
    assert all(lengths[i] == ([8] if overflow == "truncate" else []) for i in long_rows)
    assert all(lengths[i] == [4] for i in kept_rows if i not in long_rows)
