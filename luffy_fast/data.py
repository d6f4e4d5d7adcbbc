"""Prompts with their ground truth and off-policy traces, as token ids.

Every task (luffy_fast.tasks) hands the trainer `Sample`s. Here: the record, a model
directory's tokenizer, and the math task's loader for the official LUFFY layout
(docs/algorithm.md §The reference run's settings) from Parquet, JSONL or a folder of shards
(rows read by luffy_fast/data_files.py). Limits as the official code applies them: a prompt
longer than `max_prompt_length` is skipped; a trace gets EOS appended and is then cut to
`max_response_length` ("truncate", so a cut trace ends without EOS, like a policy sample that
hits the limit) or left out ("drop"). Both are counted in a `DataReport`. Tokenization is
batched and cached on disk (luffy_fast/data_cache.py), built once per machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from luffy_fast.data_files import DataError, Record, Row, read_rows, training_record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

THINK_OPEN = "<think>\n"
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
TOKENIZE_CHUNK = 1024  # texts per batched tokenizer call


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model directory, exactly as saved.

    AutoTokenizer maps some model types (qwen2 among them) to their own tokenizer class even
    when the directory holds a generic `tokenizer.json` (transformers 5), which silently swaps a
    custom tokenizer, such as the demo's word-level one, for a BPE; a generic class is loaded
    from its `tokenizer.json` directly, anything else through AutoTokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    settings_file = path / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    if (settings.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES
            and (path / "tokenizer.json").is_file()):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@dataclass
class Sample:
    """One prompt: what the policy sees, what the verifier checks, and the traces (none for an
    evaluation problem, luffy_fast/eval_data.py)."""

    prompt_ids: list[int]
    ground_truth: str
    traces: list[list[int]] = field(default_factory=list)  # response token ids, EOS included
    data_source: str = ""
    where: str = ""  # the file and row it came from, for messages


@dataclass(frozen=True)
class DataLimits:
    max_prompt_length: int
    max_response_length: int
    trace_overflow: str = "truncate"  # or "drop"


@dataclass
class DataReport:
    """What loading did to the rows: kept, skipped and cut, with the rows named."""

    source: str
    rows: int = 0
    skipped_prompts: list[str] = field(default_factory=list)  # rows, prompt over the limit
    without_trace: list[str] = field(default_factory=list)  # kept rows with no trace
    truncated_traces: int = 0
    dropped_traces: int = 0
    prompt_lengths: list[int] = field(default_factory=list)  # kept prompts, tokens
    trace_lengths: list[int] = field(default_factory=list)  # traces before the cut, EOS included

    def metrics(self) -> dict:
        return {"data/prompts": self.rows - len(self.skipped_prompts),
                "data/skipped_prompts": len(self.skipped_prompts),
                "data/truncated_traces": self.truncated_traces,
                "data/dropped_traces": self.dropped_traces,
                "data/prompts_without_trace": len(self.without_trace)}

    def summary(self) -> str:
        m = self.metrics()
        return (f"{self.source}: {self.rows} rows, {m['data/prompts']} prompts kept, "
                f"{m['data/skipped_prompts']} skipped (prompt too long), "
                f"{m['data/truncated_traces']} traces truncated, "
                f"{m['data/dropped_traces']} dropped, "
                f"{m['data/prompts_without_trace']} prompts without a trace")

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of `texts` (no special tokens added), TOKENIZE_CHUNK texts per call."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        ids.extend(tokenizer(list(texts[start:start + TOKENIZE_CHUNK]),
                             add_special_tokens=False).input_ids)
    return ids


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt as the policy sees it: the chat template with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("model.chat_template: the tokenizer has no chat template; set "
                        "model.chat_template to a Jinja template file (see configs/templates/)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_records(records: Sequence[Record], tokenizer, limits: DataLimits,
                     source: str = "") -> tuple[list[Sample], DataReport]:
    """Records as samples under `limits` (batched tokenizer calls), and the report."""
    if tokenizer.eos_token_id is None:
        raise DataError("model: the tokenizer has no EOS token (traces end with EOS)")
    report = DataReport(source=source, rows=len(records))
    texts = [render_prompt(tokenizer, r.messages) for r in records]
    prompts = tokenize_texts(tokenizer, texts)
    kept = [len(ids) <= limits.max_prompt_length for ids in prompts]
    trace_texts, owners = [], []
    for i, (record, text) in enumerate(zip(records, texts)):
        for trace in record.targets if kept[i] else ():
            # official: the trace's "<think>\n" is dropped when the prompt already opens it
            if text.endswith(THINK_OPEN) and trace.startswith(THINK_OPEN):
                trace = trace[len(THINK_OPEN):]
            trace_texts.append(trace)
            owners.append(i)
    traces_of: list[list[list[int]]] = [[] for _ in records]
    for owner, ids in zip(owners, tokenize_texts(tokenizer, trace_texts)):
        ids = ids + [tokenizer.eos_token_id]
        report.trace_lengths.append(len(ids))
        if len(ids) > limits.max_response_length:
            if limits.trace_overflow == "drop":
                report.dropped_traces += 1
                continue
            report.truncated_traces += 1
            ids = ids[:limits.max_response_length]
        traces_of[owner].append(ids)
    samples = []
    for record, prompt_ids, traces, keep in zip(records, prompts, traces_of, kept):
        if not keep:
            report.skipped_prompts.append(record.where)
            continue
        if not traces:
            report.without_trace.append(record.where)
        report.prompt_lengths.append(len(prompt_ids))
        samples.append(Sample(prompt_ids, record.ground_truth, traces, record.data_source,
                              record.where))
    return samples, report


def load_samples(path: str | Path, tokenizer, limits: DataLimits, *,
                 record: Callable[[Row], Record] = training_record,
                 key: str = "data.source") -> tuple[list[Sample], DataReport]:
    """Samples and their report from a Parquet/JSONL file or a folder of shards (cached on
    disk by luffy_fast.data_cache.load_cached_samples)."""
    records = [record(row) for row in read_rows(path, key)]
    return tokenize_records(records, tokenizer, limits, source=str(path))


def load_jsonl_samples(path: str | Path, tokenizer: PreTrainedTokenizerBase,
                       max_prompt_length: int, max_response_length: int,
                       trace_overflow: str = "truncate") -> list[Sample]:
    """The samples of an official-layout file (JSONL, Parquet or a folder), no cache."""
    samples, _ = load_samples(path, tokenizer, DataLimits(max_prompt_length, max_response_length,
                                                          trace_overflow))
    if not samples:
        raise DataError(f"{path}: no usable rows (empty, or every prompt is longer than "
                        f"max_prompt_length={max_prompt_length})")
    return samples


def percentiles(values: Sequence[int], points: Sequence[int] = (50, 90, 99, 100)) -> dict:
    """Nearest-rank percentiles of `values` ({} when empty)."""
    if not values:
        return {}
    ordered = sorted(values)
    return {f"p{p}": ordered[max(0, -(-p * len(ordered) // 100) - 1)] for p in points}
