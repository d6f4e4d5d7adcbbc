"""Rows of a data set from Parquet, JSONL (or a JSON array) files, or a folder of such shards.

Every row comes with where it is (`file.parquet row 3`, 0-based as pyarrow and pandas count;
`file.jsonl:4`, 1-based lines), so an error in a row names it. Parquet is read with pyarrow;
JSONL line by line, so bad UTF-8, a torn line or a line that is not a JSON object are reported
with the line. A training row in the official LUFFY layout (docs/algorithm.md §The reference
run's settings) becomes a `Record`: chat messages, trace texts, ground truth, data source.
"""

from __future__ import annotations

import decimal
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from luffy_fast.errors import ConfigError

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
# a saved data set's metadata beside its shards (datasets' save_to_disk, the Hub's layout)
METADATA_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
# data that a folder may hold but that is not read: refused, not skipped
UNREAD_DATA = (".gz", ".bz2", ".xz", ".zst", ".zip", ".csv", ".tsv", ".arrow")


class DataError(ConfigError):
    """A data file or row the trainer cannot use; the message starts with the file (and row)."""


@dataclass
class Row:
    values: dict
    where: str  # "path/file.jsonl:4" or "path/file.parquet row 3"
    file: Path


@dataclass
class Record:
    """One training prompt in the official layout, checked."""

    messages: list[dict]  # the prompt as chat messages
    targets: list[str]  # off-policy traces (assistant message texts); may be empty
    ground_truth: str
    data_source: str
    where: str


def data_files(path: str | Path, key: str = "data.source") -> list[Path]:
    """The file at `path`, or the data files in the folder `path` (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        unread = sorted(p.name for p in path.iterdir() if p.suffix.lower() in UNREAD_DATA)
        if unread:
            raise DataError(f"{key}: the folder {str(path)!r} holds files that are not read "
                            f"({', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''}): "
                            f"only uncompressed {'/'.join(DATA_SUFFIXES)} files are; "
                            f"decompress or convert them, or move them out")
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES
                       and p.is_file() and p.name not in METADATA_FILES)
        if not files:
            raise DataError(f"{key}: the folder {str(path)!r} holds no "
                            f"{'/'.join(DATA_SUFFIXES)} files")
        return files
    if not path.is_file():
        raise DataError(f"{key}: no such file or folder {str(path)!r}")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise DataError(f"{key}: {str(path)!r} is not a {'/'.join(DATA_SUFFIXES)} file (the "
                        f"formats read by name)")
    return [path]


def read_rows(path: str | Path, key: str = "data.source") -> Iterator[Row]:
    """Every row of every file under `path`, in order."""
    for file in data_files(path, key):
        if file.suffix.lower() == ".parquet":
            yield from _parquet_rows(file)
        else:
            yield from _json_rows(file)


def _parquet_rows(file: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{file}: not a readable Parquet file ({error})") from None
    index = 0
    batches = parquet.iter_batches(batch_size=4096)
    while True:
        try:  # damage inside the data (the footer intact) shows only when its pages are read
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{file}: not a readable Parquet file: the rows from row {index} on "
                            f"cannot be read ({error})") from None
        if batch is None:
            return
        for values in batch.to_pylist():
            yield Row(values, f"{file} row {index}", file)
            index += 1


def _json_rows(file: Path) -> Iterator[Row]:
    with file.open("rb") as stream:
        head = stream.read(4096).lstrip()
    if head.startswith(b"["):  # a JSON array of objects, as some benchmark files ship
        try:
            items = json.loads(file.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(f"{file}: not valid UTF-8 at byte {error.start}") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{file}:{error.lineno}: not valid JSON ({error.msg})") from None
        for index, item in enumerate(items):
            yield _object_row(item, f"{file} item {index}", file)
        return
    with file.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{file}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not valid UTF-8 (byte {error.start + 1} of the line); "
                                f"JSONL files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                hint = ("; a .json file holds a JSON array of row objects, or one object per line "
                        "(JSONL), not a single object" if head.startswith(b"{") and number == 1
                        and file.suffix.lower() == ".json" else "")
                raise DataError(f"{where}: not valid JSON ({error.msg}, column {error.colno})"
                                + hint) from None
            yield _object_row(item, where, file)


def _object_row(item: Any, where: str, file: Path) -> Row:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object with the row's fields, got "
                        f"{_kind(item)} ({_short(item)})")
    return Row(item, where, file)


def _kind(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number",
             list: "a list", dict: "a mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _missing(row: Row, field: str) -> DataError:
    found = ", ".join(sorted(map(str, row.values))) or "none"
    return DataError(f"{row.where}: the row has no {field!r} (columns found: {found})")


def serialized_messages(text: str, where: str) -> None:
    """Refuse a string that is a list of chat messages written out as text (a data frame's
    nested column through str() or json.dumps), which would be trained on as literal text."""
    head = text.lstrip()[:200]
    if head.startswith(("[{", "{")) and ("'role'" in head or '"role"' in head):
        raise DataError(f"{where}: a string holding chat messages as text ({_short(text)}); "
                        f"store the messages as a list of {{role, content}} (a JSON array, a "
                        f"Parquet list), not as a string")


def message_text(message: Any, where: str) -> str:
    """The text of a chat message ({"role", "content"}) or of a plain string."""
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return message["content"]
    if isinstance(message, str):
        serialized_messages(message, where)
        return message
    raise DataError(f"{where}: expected a chat message with a 'content' string or a string, "
                    f"got {_kind(message)} ({_short(message)})")


def prompt_messages(prompt: Any, where: str) -> list[dict]:
    """A prompt as chat messages: a string is one user message."""
    if isinstance(prompt, str):
        serialized_messages(prompt, f"{where} prompt")
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, dict):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where} prompt: expected chat messages or a string, got "
                        f"{_kind(prompt)} ({_short(prompt)})")
    messages = []
    for i, message in enumerate(prompt):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"{where} prompt[{i}]: expected a message with 'role' and "
                            f"'content' strings, got {_short(message)}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def ground_truth_text(value: Any, where: str) -> str:
    """A ground truth as text; numbers are written out in full (1e-05 as 0.00001), a one-answer
    list is its answer (OlympiadBench's final_answer), empty and non-finite answers refused."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: the ground truth is {value} (a missing value written out?)")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: the ground truth must be a string or a number, got "
                        f"{_kind(value)} ({_short(value)})")
    # a number without an exponent: math-verify reads "1e-05" as e - 5 (Euler's number)
    text = format(decimal.Decimal(repr(value)), "f") if isinstance(value, float) else str(value)
    if not text.strip():
        raise DataError(f"{where}: the ground truth is empty")
    return text


def training_record(row: Row, traces: bool = True) -> Record:
    """A row in the official layout: `prompt`, `reward_model.ground_truth`, optional `target`
    (an assistant message, a string or a list of them; not read with traces=False, as for
    evaluation) and `data_source`."""
    values, where = row.values, row.where
    if "prompt" not in values:
        raise _missing(row, "prompt")
    if "reward_model" not in values:
        raise _missing(row, "reward_model.ground_truth")
    reward_model = values["reward_model"]
    if not isinstance(reward_model, dict):
        raise DataError(f"{where}: 'reward_model' must be a mapping with a 'ground_truth' "
                        f"(got {_kind(reward_model)} {_short(reward_model)})")
    if reward_model.get("ground_truth") is None:
        keys = ", ".join(sorted(reward_model)) or "none"
        raise DataError(f"{where}: the row has no 'reward_model.ground_truth' "
                        f"(reward_model keys found: {keys})")
    truth = ground_truth_text(reward_model["ground_truth"], f"{where} reward_model.ground_truth")
    targets = values.get("target") if traces else None
    if targets is None:
        targets = []
    elif not isinstance(targets, list):
        targets = [targets]
    texts = []
    for i, target in enumerate(targets):
        if isinstance(target, dict) and target.get("role", "assistant") != "assistant":
            raise DataError(f"{where} target[{i}]: a trace is an assistant message, got role "
                            f"{target.get('role')!r} (a copied chat?)")
        text = message_text(target, f"{where} target[{i}]")
        if not text.strip():
            raise DataError(f"{where} target[{i}]: the trace is empty")
        texts.append(text)
    source = values.get("data_source")
    return Record(prompt_messages(values["prompt"], where), texts, truth,
                  "" if source is None else str(source), where)
