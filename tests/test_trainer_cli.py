"""`luffy-fast train` end to end on a transformers model directory and an OpenR1-style JSONL
file, scored by math-verify (the non-toy path: AutoModel, chat template, JSONL, math reward)."""

from __future__ import annotations

import json

import yaml

from luffy_fast.cli import main
from luffy_fast.metrics import read_metrics
from luffy_fast.toy.model import TinyQwen2Config, build_policy
from math_helpers import math_tokenizer


def test_train_command_on_a_model_directory_and_jsonl(tmp_path):
    tokenizer = math_tokenizer()
    model_dir = tmp_path / "model"
    policy = build_policy(tokenizer, TinyQwen2Config(hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=2,
                                                     num_key_value_heads=1), seed=0)
    policy.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": [{"role": "user", "content": f"q {d}"}],
             "target": [{"role": "assistant", "content": f"{d} </think> \\boxed{{{d}}}"}],
             "reward_model": {"ground_truth": str(d)}, "data_source": "digits"}
            for d in range(10)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)},
        "data": {"source": str(data), "heldout_source": str(data), "max_prompt_length": 8,
                 "max_response_length": 8},
        "rollout": {"n_on": 2, "n_off": 1},
        "train": {"steps": 2, "prompts_per_step": 4, "mini_batch_size": 2, "token_budget": 256},
        "eval": {"every": 2, "num_problems": 4},
        "output": {"dir": str(tmp_path / "out"), "tensorboard": True, "progress_bar": False},
    }))
    assert main(["train", "--config", str(config), "optim.lr=1e-3"]) == 0
    metrics = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    trained = metrics[1:]
    assert all(m["reward_off_policy"] == 1.0 for m in trained)  # math-verify accepts the traces
    assert all(m["response_length_off_policy"] == 4.0 for m in trained)  # 3 words + <eos>
    assert all(m["micro_batches"] >= 1 and m["learning_rate"] == 1e-3 for m in trained)
    assert "heldout_accuracy" in metrics[-1]
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))
    latest = (tmp_path / "out" / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "out" / "checkpoints" / latest / "hf" / "config.json").exists()


def test_saved_generic_tokenizers_load_as_saved(tmp_path):
    """A word-level tokenizer beside a Qwen2 config: AutoTokenizer would swap in Qwen2's BPE."""
    from luffy_fast.data import load_tokenizer

    tokenizer = math_tokenizer()
    build_policy(tokenizer, TinyQwen2Config(hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1), seed=0).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "3 </think> \\boxed{3}"
    # math_helpers.WORDS: "</think>" is id 2, digits start at 6, \\boxed{d} at 16
    assert loaded(text).input_ids == tokenizer(text).input_ids == [9, 2, 19]
