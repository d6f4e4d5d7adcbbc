"""A tiny math setup for the data, sampler, dry-run and training tests: a word-level tokenizer
with a chat template, a tiny Qwen2 directory, and 20 official-layout rows with known lengths.

The rows (max_prompt_length 8, max_response_length 8 in the tests):
- row i asks "q d" (d = i % 10); rows 0, 5, 10, 15 ask "q d d d d d d d": with the template's
  " so" that is 9 tokens > 8, so those 4 prompts are skipped;
- row i's trace is "d </think> \\boxed{d}" (3 tokens + EOS); rows 3, 7, 11, 15, 19 have
  "d d d d d d d d </think> \\boxed{d}" (10 + EOS = 11 > 8 tokens): cut to 8, and row 15 is
  skipped anyway, so 4 traces are truncated and 16 prompts kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from luffy_fast.toy.model import TinyQwen2Config, build_policy, word_level_tokenizer

TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}so {% endif %}")
WORDS = ["<pad>", "<eos>", "</think>", "q", "so", "sys"] + [str(d) for d in range(10)] \
    + [f"\\boxed{{{d}}}" for d in range(10)]
SKIPPED_ROWS = (0, 5, 10, 15)
LONG_TRACE_ROWS = (3, 7, 11, 15, 19)


def math_tokenizer(chat_template: str | None = TEMPLATE, pad: bool = True):
    return word_level_tokenizer(WORDS, pad="<pad>" if pad else None, eos="<eos>", unk="<pad>",
                                chat_template=chat_template)


def tiny_model_dir(directory: Path, tokenizer=None) -> Path:
    """A tiny random Qwen2 and the tokenizer, saved as a transformers model directory."""
    tokenizer = tokenizer or math_tokenizer()
    policy = build_policy(math_tokenizer(), TinyQwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1), seed=0)
    policy.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def math_rows(count: int = 20) -> list[dict]:
    rows = []
    for i in range(count):
        d = i % 10
        question = " ".join(["q"] + [str(d)] * (7 if i in SKIPPED_ROWS else 1))
        reasoning = " ".join([str(d)] * (8 if i in LONG_TRACE_ROWS else 1))
        rows.append({"prompt": [{"role": "user", "content": question}],
                     "target": [{"role": "assistant",
                                 "content": f"{reasoning} </think> \\boxed{{{d}}}"}],
                     "reward_model": {"ground_truth": str(d), "style": "rule"},
                     "data_source": "digits", "extra_column": i})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def train_yaml(path: Path, model_dir: Path, data: Path, output: Path, **sections) -> Path:
    """A run config for the tiny model on `data` (sections override whole keys)."""
    import yaml

    config = {
        "model": {"path": str(model_dir)},
        "data": {"source": str(data), "max_prompt_length": 8, "max_response_length": 8,
                 "cache_dir": str(output.parent / "cache")},
        "rollout": {"n_on": 2, "n_off": 1},
        "loss": {"normalizer": "token"},
        "optim": {"lr": 1e-3},
        "train": {"steps": 3, "prompts_per_step": 4, "mini_batch_size": 2, "token_budget": 256,
                  "seed": 5, "cpu_threads": 1},
        "eval": {"every": 0},
        "output": {"dir": str(output), "tensorboard": False, "progress_bar": False,
                   "save_every": 0},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(yaml.safe_dump(config))
    return path
