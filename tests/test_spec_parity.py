"""The reference run's settings, pinned to the numbers of LUFFY's paper and official scripts
(docs/algorithm.md, docs/reproduce.md): the two recipes, the eval command's defaults, and the
trace's "<think>\\n" handling. Each number is written out here, not read from the code's own
presets, so a changed default fails."""

from __future__ import annotations

import argparse
from pathlib import Path

from luffy_fast.data import DataLimits, tokenize_records
from luffy_fast.data_files import Record
from luffy_fast.train_config import load_config
from math_helpers import math_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def recipe(name, tmp_path):
    data = tmp_path / "train.parquet"
    data.touch()
    return load_config(ROOT / "configs" / f"{name}.yaml",
                       [f"data.source={data}", "data.heldout_source=null"])


def test_luffy_recipe_is_the_reference_run(tmp_path):
    c = recipe("luffy_qwen2.5_math_7b", tmp_path)
    loss = c.loss
    assert (loss.shaping, loss.gamma) == (True, 0.1)
    assert (loss.clip_on_policy, loss.clip_off_policy) == (False, False)
    assert (loss.entropy_coef, loss.normalizer, loss.max_len) == (0.001, "constant", 8192)
    assert loss.temperature == 1.0
    assert (c.optim.lr, c.optim.betas) == (1e-6, (0.9, 0.999))
    assert (c.optim.weight_decay, c.optim.grad_clip) == (0.01, 1.0)
    assert (c.optim.schedule, c.optim.warmup_steps) == ("constant", 0)
    assert (c.train.prompts_per_step, c.train.mini_batch_size) == (128, 64)
    assert c.train.token_budget == 32768
    assert (c.train.seed, c.train.steps) == (47, 500)
    assert (c.algorithm.ppo_epochs, c.algorithm.advantage_std) == (1, False)
    assert (c.rollout.n_on, c.rollout.n_off, c.rollout.temperature, c.rollout.top_p) == (7, 1, 1.0, 1.0)
    assert (c.data.max_prompt_length, c.data.max_response_length) == (1024, 8192)
    assert c.data.trace_overflow == "truncate"
    assert (c.eval.temperature, c.eval.top_p, c.eval.best_metric) == (0.6, 1.0, "val/macro/avg@1")
    assert (c.model.rope_theta, c.model.max_position_embeddings) == (40000, 16384)
    assert c.model.precision == "bf16"
    assert c.model.gradient_checkpointing


def test_onpolicy_recipe_is_the_official_baseline(tmp_path):
    c = recipe("onpolicy_qwen2.5_math_7b", tmp_path)
    loss = c.loss
    assert (loss.clip_on_policy, loss.clip_low, loss.clip_high) == (True, 0.2, 0.2)
    assert (loss.normalizer, loss.max_len, loss.entropy_coef) == ("constant", 8192, 0.001)
    assert (c.rollout.n_on, c.rollout.n_off) == (8, 0)


def test_eval_defaults_are_the_official_evaluation():
    from luffy_fast.eval_cli import add_eval_parser

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "--model", "m", "--data", "d"])
    assert (args.n, args.temperature, args.top_p, args.max_new_tokens) == (1, 0.6, 1.0, 8192)


def test_trace_think_prefix_dropped_only_when_the_prompt_opens_it():
    record = Record([{"role": "user", "content": "q 1"}], ["<think>\n1 </think> \\boxed{1}"],
                    "1", "d", "r")
    lengths = {}
    for generation in ("so <think>\n", "so "):
        tokenizer = math_tokenizer("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                                   "{% if add_generation_prompt %}" + generation + "{% endif %}")
        [sample], _ = tokenize_records([record], tokenizer, DataLimits(16, 32))
        assert sample.traces[0][-1] == tokenizer.eos_token_id
        lengths[generation] = len(sample.traces[0])
        if generation.endswith("<think>\n"):
            assert tokenizer.decode(sample.traces[0][:-1]) == "1 </think> \\boxed{1}"
    # kept when the prompt does not open the reasoning ("<think>" is one unknown word here)
    assert lengths["so "] == lengths["so <think>\n"] + 1
