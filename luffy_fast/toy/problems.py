"""The demo's task: reverse a string of digits, with worked steps from a programmatic teacher.

A problem is a string of `num_digits` random digits; the answer is the same digits reversed.
The teacher's trace (the off-policy guidance) first labels each digit with its position, then
reads the labels back from the last to the first, then writes the answer:

    prompt:   3 8 1 4 6 >
    trace:    a 3 b 8 c 1 d 4 e 6 | e 6 d 4 c 1 b 8 a 3 = 6 4 1 8 3 <eos>

Each step is an easy lookup for a small transformer (copy at a fixed offset, find the digit
after a label), so the traces teach quickly; the policy is only rewarded for the answer after
"=", so the steps are guidance, not a requirement.

Train and held-out problems come from disjoint sets: a problem belongs to the held-out split
exactly when a hash of its digits falls in the held-out bucket, so no held-out problem is
ever seen in training, whatever the seed.

The task plug-in that trains on these problems is luffy_fast.toy.task.ToyTask.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

DIGITS = tuple("0123456789")
LABELS = tuple("abcdefghij")
PROMPT_END = ">"
STEP_SEP = "|"
ANSWER_MARK = "="
EOS = "<eos>"
PAD = "<pad>"
SPECIAL_TOKENS = (PAD, EOS)
VOCAB = SPECIAL_TOKENS + DIGITS + (PROMPT_END, STEP_SEP, ANSWER_MARK)


def vocabulary(num_digits: int) -> tuple[str, ...]:
    """Every token the task uses, specials first (pad id 0, eos id 1)."""
    return VOCAB + LABELS[:num_digits]


@dataclass(frozen=True)
class Problem:
    """One problem: `prompt` and `trace` are whitespace-separated token strings."""

    digits: str
    prompt: str
    answer: str
    trace: str


def make_problem(digits: str) -> Problem:
    labelled = [f"{LABELS[i]} {d}" for i, d in enumerate(digits)]
    answer = digits[::-1]
    trace = " ".join(
        labelled + [STEP_SEP] + labelled[::-1] + [ANSWER_MARK] + list(answer) + [EOS]
    )
    return Problem(digits=digits, prompt=" ".join(list(digits) + [PROMPT_END]), answer=answer,
                   trace=trace)


def is_heldout(digits: str, heldout_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(digits.encode()).digest()[:8], "big") / 2.0**64
    return bucket < heldout_fraction


def sample_problems(count: int, num_digits: int, split: str, seed: int,
                    heldout_fraction: float = 0.1) -> list[Problem]:
    """`count` distinct problems of the given split ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout' (got {split!r})")
    if not 1 <= num_digits <= len(LABELS):
        raise ValueError(f"num_digits must be between 1 and {len(LABELS)} (got {num_digits})")
    space = 10**num_digits
    available = space * (heldout_fraction if split == "heldout" else 1 - heldout_fraction)
    if count > 0.5 * available:
        raise ValueError(f"asked for {count} distinct {split} problems of {num_digits} digits; "
                         f"only about {int(available)} exist")
    rng = random.Random(f"{split}:{seed}")
    seen: set[str] = set()
    problems = []
    while len(problems) < count:
        digits = "".join(rng.choice(DIGITS) for _ in range(num_digits))
        if digits in seen or is_heldout(digits, heldout_fraction) != (split == "heldout"):
            continue
        seen.add(digits)
        problems.append(make_problem(digits))
    return problems


def extract_answer(response: str) -> str | None:
    """The answer a response gives: the tokens after the last "=", up to <eos>; None if absent."""
    if EOS not in response.split():
        return None
    body = response.split(EOS)[0]
    if ANSWER_MARK not in body.split():
        return None
    return "".join(body.rsplit(ANSWER_MARK, 1)[1].split())


def chance_of_random_answer(num_digits: int) -> float:
    """Probability that a uniform random policy writes "= <answer> <eos>" at a given point.

    An upper bound for the untrained policy, whose initial next-token distribution is close to
    uniform over the vocabulary: it needs num_digits + 2 specific tokens in a row.
    """
    return (1.0 / len(vocabulary(num_digits))) ** (num_digits + 2)

