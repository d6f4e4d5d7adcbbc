"""The math reward as the official code computes it (docs/algorithm.md §Rewards), checked by hand:
"<think>\\n" put back in front, the answer between the first and the second "</think>", gold
parsed as "$<ground truth>$", no "</think>" or nothing parsed scores 0."""

from __future__ import annotations

import threading

import pytest

from luffy_fast.data import Sample
from luffy_fast.rewards import answer_segment

math_verify = pytest.importorskip("math_verify")


def sample(ground_truth: str) -> Sample:
    return Sample(prompt_ids=[1], ground_truth=ground_truth)


@pytest.fixture(scope="module")
def reward():
    from luffy_fast.rewards import MathVerifyReward

    return MathVerifyReward()


def test_answer_segment_by_hand():
    # "<think>\n" + response, split on "</think>", element 1
    assert answer_segment("plan</think> so 7") == " so 7"
    assert answer_segment("a</think> 7 </think> 42") == " 7 "  # not everything after the first
    assert answer_segment("<think>\nplan</think>x") == "x"
    assert answer_segment("</think>") == ""
    assert answer_segment("no closing tag \\boxed{3}") is None


@pytest.mark.parametrize("response, ground_truth, expected", [
    ("plan </think> The answer is \\boxed{42}.", "42", 1.0),
    # the answer is the first segment after </think>: 7 here, not 42
    ("a </think> \\boxed{7} </think> \\boxed{42}", "42", 0.0),
    ("a </think> \\boxed{7} </think> \\boxed{42}", "7", 1.0),
    # a response that still opens with <think>\n scores like one that does not
    ("<think>\nplan </think> \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    # gold parsed as $x+1$: an expression, compared symbolically
    ("plan </think> \\boxed{1+x}", "x+1", 1.0),
    ("plan </think> \\boxed{2}", "\\boxed{2}", 1.0),  # a boxed gold parses inside $...$ too
    ("no closing tag \\boxed{42}", "42", 0.0),  # format failure
    ("plan </think> no answer at all", "42", 0.0),  # nothing parsed
    ("plan </think> \\boxed{41}", "42", 0.0),
    # verify(gold, answer), in that order: an interval gold does not accept an inequality
    # (math-verify accepts the reverse: verify(answer, gold) would score 1.0)
    ("plan </think> \\boxed{1<x<2}", "(1,2)", 0.0),
])
def test_math_reward_by_hand(reward, response, ground_truth, expected):
    assert reward(response, sample(ground_truth)) == expected


@pytest.mark.parametrize("response, ground_truth, expected", [
    # The official out-of-distribution files (ARC-c, GPQA-diamond, MMLU-Pro) hold multiple-choice
    # questions with a letter (or an ARC-c option number) as the ground truth, graded by the
    # same math reward. Checked against math-verify 0.6.0, the official pin, on 2026-11-29.
    ("plan </think> \\boxed{C}", "C", 1.0),
    ("plan </think> \\boxed{(C)}", "C", 1.0),
    ("plan </think> \\boxed{\\text{C}}", "C", 1.0),
    ("plan </think> \\boxed{A}", "C", 0.0),
    ("plan </think> \\boxed{2}", "2", 1.0),  # ARC-c's numbered options
    # The questions ask for "ANSWER: $LETTER"; the official grader finds no expression in
    # that line and scores it 0, as it does an option written out in the box.
    ("plan </think> ANSWER: C", "C", 0.0),
    ("plan </think> \\boxed{C) 10^{-8} eV}", "C", 0.0),
])
def test_multiple_choice_answers_are_graded_as_the_official_code_grades_them(
        reward, response, ground_truth, expected):
    assert reward(response, sample(ground_truth)) == expected


def test_math_reward_outside_the_main_thread(reward):
    """math-verify's own timeouts need the main thread; in another thread (an in-process pool)
    the reward still verifies instead of scoring every answer 0."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault(
        "reward", reward("plan </think> \\boxed{42}", sample("42"))))
    thread.start()
    thread.join()
    assert box["reward"] == 1.0


@pytest.mark.parametrize("version, threads", [("0.6.0", False), ("0.7.0", False), ("0.8.0", True),
                                              ("0.9.0", True), ("1.0.0rc1", True), ("0.10", True)])
def test_which_math_verify_releases_run_outside_the_main_thread(version, threads):
    # 0.8.0 added timeout_seconds=None (no signal); 0.6.0, the official pin, always arms SIGALRM
    from luffy_fast.rewards import verifier_runs_in_threads

    assert verifier_runs_in_threads(version) is threads


def test_a_main_thread_only_math_verify_is_refused_outside_the_main_thread():
    """With math-verify < 0.8 every answer would parse to nothing in a thread and score 0: the
    reward raises there, the in-process pool refuses it up front, worker processes are fine."""
    from luffy_fast.reward_pool import RewardPool
    from luffy_fast.rewards import MAIN_THREAD_ONLY, MathVerifyReward

    old = MathVerifyReward()
    assert old.main_thread_only is None  # this checkout's math-verify runs anywhere
    old.main_thread_only = MAIN_THREAD_ONLY  # as __init__ sets it for 0.6.0
    assert old("plan </think> \\boxed{42}", sample("42")) == 1.0  # the main thread: as before
    box = {}

    def score():
        try:
            old("plan </think> \\boxed{42}", sample("42"))
        except RuntimeError as error:
            box["error"] = str(error)

    thread = threading.Thread(target=score)
    thread.start()
    thread.join()
    assert "reward.workers >= 1" in box["error"]
    with pytest.raises(ValueError, match="`workers` = 0 .* MathVerifyReward cannot: math-verify before 0.8"):
        RewardPool(old, workers=0)
    with RewardPool(old, workers=1) as pool:  # a worker process scores in its main thread
        assert pool.score([("plan </think> \\boxed{42}", sample("42"))]).rewards == [1.0]


def test_a_verifier_that_raises_scores_zero(monkeypatch):
    """math-verify's parsers raise on some malformed input (any exception type): a wrong answer,
    0.0, not a crash of the scoring worker."""
    from luffy_fast.rewards import MathVerifyReward

    broken = MathVerifyReward()

    def parse(*args, **kwargs):
        raise ValueError("malformed LaTeX")

    monkeypatch.setattr(broken, "_parse", parse)
    assert broken("plan </think> \\boxed{42}", sample("42")) == 0.0
