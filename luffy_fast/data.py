"""Prompts with their ground truth and off-policy traces, as token ids.

Every task (luffy_fast.tasks) hands the trainer `Sample`s. Here: the record, a model
directory's tokenizer, and the JSONL reader of the math task, in the OpenR1-Math layout used by
LUFFY (docs/algorithm.md §The reference run's settings): each line has `prompt` (chat
messages), `target` (the trace: an assistant message, or a list of them),
`reward_model.ground_truth`, and optionally `data_source`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

THINK_OPEN = "<think>\n"
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


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
    """One prompt: what the policy sees, what the verifier checks, and the traces."""

    prompt_ids: list[int]
    ground_truth: str
    traces: list[list[int]] = field(default_factory=list)  # response token ids, EOS included
    data_source: str = ""


def _message_text(message, where: str) -> str:
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return message["content"]
    if isinstance(message, str):
        return message
    raise ValueError(f"{where}: expected a chat message with a 'content' string")


def load_jsonl_samples(path: str | Path, tokenizer: PreTrainedTokenizerBase,
                       max_prompt_length: int, max_response_length: int) -> list[Sample]:
    """Read an OpenR1-Math style JSONL file; rows too long for the limits are skipped.

    A row without `prompt` or `reward_model.ground_truth` is an error naming the line.
    A trace's leading "<think>\\n" is dropped when the rendered prompt already ends with it.
    """
    path = Path(path)
    samples = []
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from None
            if "prompt" not in row:
                raise ValueError(f"{where}: the row has no 'prompt'")
            truth = (row.get("reward_model") or {}).get("ground_truth")
            if truth is None:
                raise ValueError(f"{where}: the row has no 'reward_model.ground_truth'")
            messages = row["prompt"]
            if isinstance(messages, str):
                messages = [{"role": "user", "content": messages}]
            prompt_text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=True)
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
            targets = row.get("target") or []
            if not isinstance(targets, list):
                targets = [targets]
            traces = []
            for target in targets:
                text = _message_text(target, f"{where} target")
                if prompt_text.endswith(THINK_OPEN) and text.startswith(THINK_OPEN):
                    text = text[len(THINK_OPEN):]
                ids = tokenizer(text, add_special_tokens=False).input_ids
                traces.append(ids + [tokenizer.eos_token_id])
            if len(prompt_ids) > max_prompt_length:
                continue
            traces = [t for t in traces if len(t) <= max_response_length]
            samples.append(Sample(prompt_ids, str(truth), traces, str(row.get("data_source", ""))))
    if not samples:
        raise ValueError(f"{path}: no usable rows (empty, or every prompt is longer than "
                         f"max_prompt_length={max_prompt_length})")
    return samples
