"""JSONL prompts in the OpenR1-Math layout, and the math-verify reward."""

from __future__ import annotations

import json

import pytest

from luffy_fast.data import Sample, load_jsonl_samples
from luffy_fast.rewards import MathVerifyReward
from luffy_fast.toy.model import build_tokenizer

TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}> {% endif %}")


@pytest.fixture
def tokenizer():
    tokenizer = build_tokenizer(5)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_rows_become_samples(tmp_path, tokenizer):
    rows = [
        {"prompt": [{"role": "user", "content": "1 2 3"}],
         "target": [{"role": "assistant", "content": "= 3 2 1"}],
         "reward_model": {"ground_truth": "321"}, "data_source": "toy"},
        {"prompt": [{"role": "user", "content": "1 2 3 4 5 6 7 8 9"}],  # prompt too long: skipped
         "target": {"role": "assistant", "content": "= 9"}, "reward_model": {"ground_truth": "9"}},
        {"prompt": "4 5", "target": [{"role": "assistant", "content": "= 5 4 5 4 5 4 5 4"}],
         "reward_model": {"ground_truth": "54"}},  # trace too long: cut to 6 tokens
    ]
    samples = load_jsonl_samples(write_rows(tmp_path / "d.jsonl", rows), tokenizer,
                                 max_prompt_length=6, max_response_length=6)
    assert len(samples) == 2
    first = samples[0]
    assert tokenizer.decode(first.prompt_ids) == "1 2 3 >"
    assert first.traces == [tokenizer("= 3 2 1", add_special_tokens=False).input_ids
                            + [tokenizer.eos_token_id]]
    assert (first.ground_truth, first.data_source) == ("321", "toy")
    # official: EOS appended, then cut to max_response_length (so no EOS left)
    assert samples[1].traces == [tokenizer("= 5 4 5 4 5", add_special_tokens=False).input_ids]


@pytest.mark.parametrize("row, message", [
    ({"target": "x", "reward_model": {"ground_truth": "1"}}, r"d.jsonl:1: the row has no 'prompt'"),
    ({"prompt": "1 2"}, r"d.jsonl:1: the row has no 'reward_model.ground_truth'"),
])
def test_rows_missing_fields_name_the_line(tmp_path, tokenizer, row, message):
    with pytest.raises(ValueError, match=message):
        load_jsonl_samples(write_rows(tmp_path / "d.jsonl", [row]), tokenizer, 8, 8)


def test_math_verify_reward():
    reward = MathVerifyReward()
    sample = Sample(prompt_ids=[1], ground_truth="\\frac{1}{2}")
    assert reward("reasoning... </think> The answer is \\boxed{0.5}", sample) == 1.0
    assert reward("<think>\nreasoning </think> \\boxed{\\frac{2}{4}}", sample) == 1.0
    assert reward("reasoning... </think> The answer is \\boxed{3}", sample) == 0.0
    assert reward("no closing tag \\boxed{0.5}", sample) == 0.0  # format failure


def test_a_number_in_scientific_notation_is_graded_as_that_number(tmp_path, tokenizer):
    """A data file's ground truth 1e-05 (a number, as Parquet or JSON gives it) was written
    "1e-05", which math-verify reads as e - 5 (Euler's number): the right answer scored 0 and
    \\boxed{e-5} scored 1."""
    rows = [{"prompt": "1 2", "target": "= 2 1", "reward_model": {"ground_truth": value}}
            for value in (1e-05, 2.5e16, 142.0)]
    samples = load_jsonl_samples(write_rows(tmp_path / "numbers.jsonl", rows), tokenizer, 8, 8)
    assert [s.ground_truth for s in samples] == ["0.00001", "25000000000000000", "142.0"]
    reward = MathVerifyReward()
    assert reward("</think> The answer is \\boxed{0.00001}", samples[0]) == 1.0
    assert reward("</think> The answer is \\boxed{10^{-5}}", samples[0]) == 1.0
    assert reward("</think> The answer is \\boxed{e-5}", samples[0]) == 0.0
    assert reward("</think> \\boxed{2.5 \\times 10^{16}}", samples[1]) == 1.0
    assert reward("</think> \\boxed{142}", samples[2]) == 1.0
