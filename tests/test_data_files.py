"""luffy_fast/data_files.py on rows and files built here: which files a folder gives, where each
row is, and what a training row in the official layout becomes (or the error naming it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from luffy_fast.data_files import DataError, Row, data_files, read_rows, training_record

QUESTION = [{"role": "user", "content": "q 1"}]


def row(**values) -> Row:
    return Row({"prompt": QUESTION, "reward_model": {"ground_truth": "1"}, **values}, "d.jsonl:3",
               Path("d.jsonl"))


def test_a_folder_gives_its_data_files_by_name_and_a_file_any_case_of_its_suffix(tmp_path):
    for name in ("b.jsonl", "a.parquet", "c.json", "notes.txt", "state.json"):
        (tmp_path / name).write_text("")
    (tmp_path / "shard.jsonl").mkdir()  # a folder, whatever its name
    assert [p.name for p in data_files(tmp_path)] == ["a.parquet", "b.jsonl", "c.json"]
    (tmp_path / "D.JSONL").write_text("")
    assert data_files(tmp_path / "D.JSONL") == [tmp_path / "D.JSONL"]


def test_a_folder_names_at_most_three_files_it_does_not_read(tmp_path):
    for name in ("a.csv", "b.gz", "c.zip", "d.arrow"):
        (tmp_path / name).write_text("")
    with pytest.raises(DataError, match=r"holds files that are not read \(a.csv, b.gz, c.zip, "
                                        r"\.\.\.\): only"):
        data_files(tmp_path, key="data.heldout_source")


def test_blank_lines_are_skipped_and_array_items_counted_from_zero(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    assert [(r.values, r.where) for r in read_rows(jsonl)] == [
        ({"a": 1}, f"{jsonl}:1"), ({"a": 2}, f"{jsonl}:4")]
    array = tmp_path / "d.json"
    array.write_text('  [{"a": 1}, {"a": 2}, 3]')
    with pytest.raises(DataError, match=rf"^{re.escape(str(array))} item 2: expected a JSON object "
                                        r"with the row's fields, got a number \(3\)$"):
        list(read_rows(array))


def test_a_training_row_becomes_its_record():
    record = training_record(row(target="2 </think> \\boxed{1}", data_source=None,
                                 prompt=[{"role": "user", "content": "q 1", "name": "x"}]))
    assert record.messages == QUESTION  # only role and content are kept
    assert record.targets == ["2 </think> \\boxed{1}"] and record.ground_truth == "1"
    assert record.data_source == "" and record.where == "d.jsonl:3"  # null: no label, not "None"
    # a prompt given as one message; a trace message without a role is the assistant's
    record = training_record(row(prompt={"role": "user", "content": "q 1"},
                                 target=[{"content": "t"}], data_source=7))
    assert (record.messages, record.targets, record.data_source) == (QUESTION, ["t"], "7")


@pytest.mark.parametrize("changes, message", [
    ({"prompt": []}, "d.jsonl:3 prompt: expected chat messages or a string, got a list ([])"),
    ({"prompt": "{'role': 'user', 'content': 'q 1'}"},
     "d.jsonl:3 prompt: a string holding chat messages as text"),
    ({"target": [{"role": "assistant", "content": ["t"]}]},
     "d.jsonl:3 target[0]: expected a chat message with a 'content' string or a string, got a "
     "mapping ({'role': 'assistant', 'content': ['t']})"),
    ({"target": True}, "d.jsonl:3 target[0]: expected a chat message with a 'content' string or a "
                       "string, got a boolean (True)"),
    ({"reward_model": {"ground_truth": ["1", "2"]}},
     "d.jsonl:3 reward_model.ground_truth: the ground truth must be a string or a number, got a "
     "list (['1', '2'])"),
    ({"reward_model": {"ground_truth": True}},
     "d.jsonl:3 reward_model.ground_truth: the ground truth must be a string or a number, got a "
     "boolean (True)"),
])
def test_a_bad_training_row_is_named(changes, message):
    with pytest.raises(DataError, match=f"^{re.escape(message)}"):
        training_record(row(**changes))


def test_a_row_without_a_ground_truth_names_the_columns_found():
    bare = Row({"prompt": QUESTION, "data_source": "d"}, "d.parquet row 4", Path("d.parquet"))
    with pytest.raises(DataError, match=r"^d.parquet row 4: the row has no "
                                        r"'reward_model.ground_truth' \(columns found: "
                                        r"data_source, prompt\)$"):
        training_record(bare)


def test_a_long_value_is_cut_in_the_message_and_a_long_trace_kept_whole():
    # the value's repr, quotes included, cut to 60 characters
    with pytest.raises(DataError, match=rf"^d.jsonl:3: 'reward_model' must be a mapping with a "
                                        rf"'ground_truth' \(got a string '{'z' * 59}\.\.\.\)$"):
        training_record(row(reward_model="z" * 80))
    assert training_record(row(target="y" * 80)).targets == ["y" * 80]
