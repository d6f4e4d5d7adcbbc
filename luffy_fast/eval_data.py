"""Evaluation problems from the official layout or the common benchmark layouts.

A row in the official layout (`prompt` + `reward_model.ground_truth`) or in a benchmark's
(`problem` or `question`, with `answer`, `final_answer` or `solution`; MATH-500, AIME, AMC,
Minerva and OlympiadBench ship this way) becomes a `Record` and then a `Sample` without
traces, the record and sample types of the training data (luffy_fast/data_files.py,
luffy_fast/data.py); other names are mapped with `question_key` / `answer_key`. Prompts follow
the official evaluation (docs/algorithm.md §The reference run's settings): the system prompt is
removed and the model's own chat template is applied. A `solution` without a separate answer
is graded against its last `\\boxed{...}` (none: an error). A row without `data_source` is named
after its file, or the nearest folder where the file's name is generic (`source_name`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from luffy_fast.data import Sample, render_prompt, tokenize_texts
from luffy_fast.data_files import (
    DataError,
    Record,
    Row,
    ground_truth_text,
    prompt_messages,
    read_rows,
    training_record,
)

QUESTION_KEYS = ("problem", "question")
ANSWER_KEYS = ("answer", "final_answer", "solution")  # final_answer: OlympiadBench
# file and folder names that say nothing about the benchmark (the Hub's shards: data/test-00000-
# of-00001.parquet): a source is named after the nearest folder that does
GENERIC_NAMES = re.compile(r"^(train|test|validation|valid|val|dev|eval|data|default|main|"
                           r"snapshots)(-\d+-of-\d+)?$|^[0-9a-f]{40}$", re.IGNORECASE)


def source_name(file: Path) -> str:
    """The data source a benchmark file stands for when its rows name none: the file's name,
    or for a generic one (test.jsonl, data/train-00000-of-00001.parquet) its folder's, the
    path taken whole (`test.jsonl` run inside MATH-500/ is MATH-500); in the Hub's cache
    (datasets--owner--name/snapshots/<commit>/...) the data set's name."""
    file = Path(os.path.abspath(file))  # not resolve(): the Hub's files link to hashed blobs
    for name in (file.stem, *(parent.name for parent in file.parents)):
        if name and not GENERIC_NAMES.match(name):
            return name.split("--")[-1] if name.startswith("datasets--") else name
    return file.stem


def last_boxed(text: str) -> Optional[str]:
    """The contents of the last \\boxed{...} in `text` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def _pick(row: Row, key: Optional[str], candidates: tuple[str, ...], what: str) -> str:
    if key is not None:
        if key not in row.values:
            found = ", ".join(sorted(map(str, row.values))) or "none"
            raise DataError(f"{row.where}: the row has no {key!r} ({what}; columns found: {found})")
        return key
    for name in candidates:
        if row.values.get(name) is not None:
            return name
    found = ", ".join(sorted(map(str, row.values))) or "none"
    raise DataError(f"{row.where}: no {what} column: expected 'prompt' with 'reward_model', or "
                    f"one of {list(candidates)} (columns found: {found}); map other names with "
                    f"the question/answer key options")


def eval_record(row: Row, question_key: Optional[str] = None, answer_key: Optional[str] = None,
                data_source: Optional[str] = None, remove_system: bool = True) -> Record:
    """One evaluation row, in either layout, as a record without traces."""
    values = row.values
    source = data_source or values.get("data_source") or source_name(row.file)
    if question_key is None and answer_key is None and "prompt" in values \
            and "reward_model" in values:
        record = training_record(row, traces=False)  # its `target`, if any, is not used
        messages, truth = record.messages, record.ground_truth
    else:
        question = _pick(row, question_key, QUESTION_KEYS, "question")
        answer = _pick(row, answer_key, ANSWER_KEYS, "answer")
        messages = prompt_messages(values[question], f"{row.where} {question}")
        truth = values[answer]
        if isinstance(truth, (list, tuple)) and len(truth) == 1:
            truth = truth[0]  # OlympiadBench's one-answer lists
        if answer == "solution" and isinstance(truth, str):
            boxed = last_boxed(truth)
            if boxed is None:
                raise DataError(f"{row.where} solution: no \\boxed{{...}} answer to grade against;"
                                f" name the answer column with the answer key option")
            truth = boxed
        truth = ground_truth_text(truth, f"{row.where} {answer}")
    if remove_system:
        messages = [m for m in messages if m["role"] != "system"]
    return Record(messages, [], truth, str(source), row.where)


def heldout_record(row: Row) -> Record:
    """A held-out problem for the in-training validation, in either layout; its prompt is the
    training prompt's (system prompt kept, as the official run validates)."""
    return eval_record(row, remove_system=False)


def load_eval_problems(path: str | Path, tokenizer, *, question_key: Optional[str] = None,
                       answer_key: Optional[str] = None, data_source: Optional[str] = None,
                       key: str = "--data") -> list[Sample]:
    """The evaluation problems of a file or folder, rendered with the model's chat template
    (system prompt removed). data_source: the label in the results (default: the row's
    `data_source`, else `source_name`). No problem is ever skipped. The prompts are tokenized
    in batches, as the training data are (luffy_fast.data.tokenize_texts)."""
    records, texts = [], []
    for row in read_rows(path, key):
        records.append(eval_record(row, question_key, answer_key, data_source))
        texts.append(render_prompt(tokenizer, records[-1].messages))
    if not records:
        raise DataError(f"{key}: no problems in {str(path)!r}")
    return [Sample(ids, r.ground_truth, [], r.data_source, r.where)
            for r, ids in zip(records, tokenize_texts(tokenizer, texts))]
