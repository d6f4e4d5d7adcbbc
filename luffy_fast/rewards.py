"""Verifiable rewards: a reward function maps (response text, sample) to a float.

Each task owns its reward (luffy_fast.tasks); the math task's is here, the toy task's in
luffy_fast/toy/task.py. The trainer and `luffy-fast eval` score through a RewardPool
(luffy_fast/reward_pool.py), so a reward function must pickle when the pool has workers.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Optional, Protocol

from luffy_fast.data import THINK_OPEN

THINK_CLOSE = "</think>"
# math-verify's own per-call limits (seconds; signal-based, so main thread only). The pool's
# per-item timeout is the guard that always holds (docs/design.md §Rewards).
VERIFIER_TIMEOUT = 5


class RewardFunction(Protocol):
    """A reward function that cannot run outside a process's main thread (signal-based
    timeouts, say) sets `main_thread_only` to the reason, which a RewardPool gives when it
    refuses `workers=0` (its scoring runs in a thread of the calling process)."""

    def __call__(self, response: str, sample: Any) -> float:
        """The reward of one response (1.0 correct, 0.0 otherwise for binary rewards)."""


def answer_segment(response: str) -> Optional[str]:
    """The official answer segment: with "<think>\\n" put back in front of the response, the
    text between the first and the second "</think>" (the second element of a split on it);
    None when there is no "</think>" (docs/algorithm.md §Rewards)."""
    parts = (THINK_OPEN + response).split(THINK_CLOSE)
    return parts[1] if len(parts) > 1 else None


MAIN_THREAD_ONLY = ("math-verify before 0.8 (e.g. the official pin, 0.6.0) parses only in a "
                    "process's main thread (its timeouts use SIGALRM; elsewhere it returns "
                    "nothing, so every answer would score 0): score in worker processes "
                    "(reward.workers >= 1, eval --reward-workers >= 1) or install "
                    "math-verify >= 0.8")


def verifier_runs_in_threads(math_verify_version: str) -> bool:
    """Whether this math-verify release can turn its signal-based timeouts off, which a thread
    other than the main one needs: 0.8 and later (`timeout_seconds=None`)."""
    major, minor = (int(part) for part in re.findall(r"\d+", math_verify_version)[:2])
    return (major, minor) >= (0, 8)


class MathVerifyReward:
    """LUFFY's math reward, as the official code computes it: the answer segment (see
    `answer_segment`) parsed by `math-verify` and verified against the ground truth parsed as
    "$<ground truth>$". No "</think>", nothing parsed, or a verifier error scores 0."""

    def __init__(self) -> None:
        from importlib.metadata import version

        from math_verify import parse, verify  # optional dependency, only for math data

        self._parse, self._verify = parse, verify
        self.main_thread_only = (None if verifier_runs_in_threads(version("math-verify"))
                                 else MAIN_THREAD_ONLY)

    def __call__(self, response: str, sample: Any) -> float:
        answer = answer_segment(response)
        if answer is None:
            return 0.0
        # math-verify's timeouts use SIGALRM, which only the main thread may set; elsewhere (an
        # in-process pool's thread) they are off and the caller bounds the time.
        limit = VERIFIER_TIMEOUT if threading.current_thread() is threading.main_thread() else None
        if limit is None and self.main_thread_only:  # it would score every answer 0, silently
            raise RuntimeError(MAIN_THREAD_ONLY)
        try:
            gold = self._parse(f"${sample.ground_truth}$", parsing_timeout=limit)
            predicted = self._parse(answer, parsing_timeout=limit)
            if not gold or not predicted:
                return 0.0
            return float(bool(self._verify(gold, predicted, timeout_seconds=limit)))
        except Exception:  # the verifier's parsers raise on malformed input: a wrong answer
            return 0.0
