"""An eval's generations on disk as they come, so that an interrupted `luffy-fast eval` loses
only the chunk under way: `--resume` continues it (docs/robustness.md).

With `--output DIR`, the eval writes `DIR/eval_settings.json` before generating anything, then
appends each chunk's records (`--save-every` samples, in whole problems) to
`DIR/generations.jsonl` once they are scored, and `DIR/results.json` at the end. Chunk k always
holds the same problems and samples with seed + k (luffy_fast/evaluation.py:
generate_and_score), so a resumed eval generates the chunks the interrupted one had not
finished as it would have. `--resume` keeps the complete chunks at the head of the file, cuts off
a chunk that a crash left half written, and refuses settings other than the saved ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

from luffy_fast.data import Sample
from luffy_fast.errors import ConfigError
from luffy_fast.evaluation import EvalRecord, problem_source
from luffy_fast.run_files import naming_full_disk, warn, write_atomic

SETTINGS, GENERATIONS, RESULTS = "eval_settings.json", "generations.jsonl", "results.json"
EVAL_FILES = (SETTINGS, GENERATIONS, RESULTS)
RECORD_FIELDS = {field.name for field in fields(EvalRecord)}


def problems_per_chunk(save_every: int, n: int) -> int:
    """Problems per chunk: `save_every` samples rounded down to whole problems (at least one)."""
    return max(1, save_every // n)


class EvalStore:
    """The eval files of one `--output` folder: checked and prepared by `open` (before any
    model loads), then `completed`, `append` for each chunk and `finish`."""

    def __init__(self, directory: Path, settings: dict) -> None:
        self.directory, self.settings = directory, settings
        self.generations = directory / GENERATIONS

    @classmethod
    def open(cls, directory: str | Path, settings: dict, resume: bool,
             overwrite: bool) -> EvalStore:
        """A fresh eval needs a folder without eval files (or --overwrite, which deletes them);
        --resume needs the saved settings to be these (a folder without an eval starts one)."""
        directory = Path(directory)
        existing = [name for name in EVAL_FILES if (directory / name).exists()]
        if existing and not (resume or overwrite):
            raise ConfigError(f"--output: {str(directory)!r} already holds an eval "
                              f"({', '.join(existing)}); pass --resume to continue it or "
                              f"--overwrite to replace it")
        store = cls(directory, settings)
        if resume and existing:
            store._check_saved_settings()
            return store
        if resume:
            warn(f"--resume: no eval to resume in {str(directory)!r}; starting one")
        for name in existing:  # --overwrite
            (directory / name).unlink()
        write_atomic(directory / SETTINGS, json.dumps(settings, indent=1) + "\n")
        return store

    def _check_saved_settings(self) -> None:
        path = self.directory / SETTINGS
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            raise ConfigError(f"--resume: {str(path)!r} is missing or unreadable, so the eval "
                              f"there cannot be checked against these settings; pass "
                              f"--overwrite to start it over")
        changed = [f"{key}: {saved.get(key)!r} -> {value!r}"
                   for key, value in self.settings.items() if saved.get(key) != value]
        if changed:
            raise ConfigError(f"--resume: the eval in {str(self.directory)!r} ran with other "
                              f"settings ({'; '.join(changed)}); resume it with its own, or pass "
                              f"--overwrite to start over")

    def completed(self, problems: Sequence[Sample], n: int,
                  per_chunk: int) -> dict[int, list[EvalRecord]]:
        """The records of the chunks the file holds whole (problem index -> its n records). The
        file is cut after the last of them: a half-written chunk, or a torn line, goes."""
        if not self.generations.exists():
            return {}
        chunk_sizes = [min(per_chunk, len(problems) - first)
                       for first in range(0, len(problems), per_chunk)]
        done: dict[int, list[EvalRecord]] = {}
        pending: list[EvalRecord] = []
        kept_bytes = offset = 0
        with self.generations.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                offset += len(line)
                record = self._record(line, number, problems)
                if record is None:
                    break
                pending.append(record)
                chunk = record.problem // per_chunk
                if len(pending) == chunk_sizes[chunk] * n:
                    self._check_chunk(pending, chunk, per_chunk, n)
                    for record in pending:
                        done.setdefault(record.problem, []).append(record)
                    pending, kept_bytes = [], offset
        if kept_bytes < self.generations.stat().st_size:
            warn(f"{self.generations}: the last chunk was not written whole (an interrupted "
                 f"write); it is generated again")
            os.truncate(self.generations, kept_bytes)
        return done

    def _record(self, line: bytes, number: int, problems: Sequence[Sample]
                ) -> Optional[EvalRecord]:
        """The record on a line, None for a torn last line; an error for a record of a problem
        these --data do not have."""
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and set(row) == RECORD_FIELDS and line.endswith(b"\n")):
            return None
        record = EvalRecord(**row)
        index = record.problem
        if not (isinstance(index, int) and 0 <= index < len(problems)
                and problem_source(problems[index]) == record.data_source
                and problems[index].ground_truth == record.ground_truth):
            raise ConfigError(f"--resume: {str(self.generations)!r} line {number} is not a sample "
                              f"of these --data (problem {index!r}, {record.data_source!r}, "
                              f"answer {record.ground_truth!r}); pass --overwrite to start over")
        return record

    def _check_chunk(self, records: list[EvalRecord], chunk: int, per_chunk: int, n: int) -> None:
        first = chunk * per_chunk
        expected = [(first + i // n, i % n) for i in range(len(records))]
        if [(record.problem, record.sample) for record in records] != expected:
            raise ConfigError(f"--resume: {str(self.generations)!r} does not hold chunk {chunk}'s "
                              f"samples in order (problems from {first}, {n} each); pass "
                              f"--overwrite to start over")

    def append(self, records: Sequence[EvalRecord]) -> None:
        """One chunk's records, on disk (flushed and synced) before the next chunk starts."""
        text = "".join(json.dumps(asdict(record)) + "\n" for record in records)

        def write() -> None:
            with self.generations.open("a") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())

        naming_full_disk(self.generations, "generations", write)

    def finish(self, summary: dict, settings: dict) -> Path:
        """`results.json`: the settings (with the eval's time) and the summary."""
        path = self.directory / RESULTS
        write_atomic(path, json.dumps({"settings": settings, **summary}, indent=1) + "\n")
        return path
