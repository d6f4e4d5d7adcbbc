"""Verifiable rewards: a reward function maps (response text, sample) to a float.

Each task owns its reward (luffy_fast.tasks); the math task's is here, the toy task's in
luffy_fast/toy/task.py.
"""

from __future__ import annotations

from typing import Protocol

from luffy_fast.data import THINK_OPEN, Sample


class RewardFunction(Protocol):
    def __call__(self, response: str, sample: Sample) -> float:
        """The reward of one response (1.0 correct, 0.0 otherwise for binary rewards)."""


class MathVerifyReward:
    """LUFFY's math reward: the response (with "<think>\\n" put back in front) must close its
    reasoning with "</think>"; the text after it is parsed and checked against the ground truth
    with `math-verify`. Format failures score 0."""

    def __init__(self) -> None:
        from math_verify import parse, verify  # optional dependency, only for math data

        self._parse, self._verify = parse, verify

    def __call__(self, response: str, sample: Sample) -> float:
        text = response if response.startswith(THINK_OPEN) else THINK_OPEN + response
        if "</think>" not in text:
            return 0.0
        answer = text.split("</think>", 1)[1]
        gold_text = sample.ground_truth
        if "\\boxed" not in gold_text:
            gold_text = f"\\boxed{{{gold_text}}}"
        try:
            gold, predicted = self._parse(gold_text), self._parse(answer)
            return float(bool(predicted) and self._verify(gold, predicted))
        except Exception:  # the verifier's parsers raise on malformed input: a wrong answer
            return 0.0
