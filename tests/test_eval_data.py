"""luffy_fast/eval_data.py on rows built here: which label, which answer column and which
messages an evaluation (or held-out validation) problem gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from luffy_fast.data_files import Row
from luffy_fast.eval_data import eval_record, heldout_record

SYSTEM = {"role": "system", "content": "think step by step"}
USER = {"role": "user", "content": "q 3"}


def official_row() -> Row:
    return Row({"prompt": [SYSTEM, USER], "reward_model": {"ground_truth": "3"},
                "data_source": "aime"}, "valid.jsonl:1", Path("valid.jsonl"))


@pytest.mark.parametrize("given, expected", [(None, "aime"), ("AIME24", "AIME24")])
def test_a_label_given_by_the_caller_wins_over_the_rows_data_source(given, expected):
    """load_eval_problems' data_source (eval --source): "the label in the results (default: the
    row's data_source, else source_name)"."""
    assert eval_record(official_row(), data_source=given).data_source == expected


def test_an_evaluation_drops_the_system_prompt_and_a_held_out_problem_keeps_it():
    """The official evaluation removes the system prompt; the in-training validation uses the
    training prompt as it is."""
    assert eval_record(official_row()).messages == [USER]
    assert heldout_record(official_row()).messages == [SYSTEM, USER]


@pytest.mark.parametrize("values, expected", [
    # a parquet null in `answer` (a column of a merged table) is no answer: the solution's box
    ({"problem": "q", "answer": None, "solution": "so \\boxed{5}"}, "5"),
    # a one-element list of a solution is that solution, graded by its last box
    ({"question": "q", "solution": ["so \\boxed{1} and \\boxed{6}"]}, "6"),
])
def test_the_answer_comes_from_the_first_answer_column_that_holds_one(values, expected):
    row = Row(values, "test.parquet row 0", Path("MATH-500/test.parquet"))
    record = eval_record(row)
    assert record.ground_truth == expected and record.data_source == "MATH-500"
