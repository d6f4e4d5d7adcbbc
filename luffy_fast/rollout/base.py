"""The rollout interface: prompts in, N sampled completions per prompt out.

Every engine (transformers `generate`, vLLM) implements `RolloutEngine`. The trainer only ever
talks to this interface, so engines are interchangeable. In one step it calls: `generate`,
`sleep` (before the update), `sync_weights`, `wake`, then `metrics` (docs/design.md §The trainer).
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy decoding; `seed` makes a call reproducible, and
    each data-parallel training rank draws its own random stream from it (`request_seed`)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be positive "
                             f"(got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (got {self.top_p})")


def request_seed(seed: int, prompt_index: int, data_parallel_rank: int = 0) -> int:
    """The seed of one prompt's request: a hash of (call seed, data-parallel rank, prompt index).

    vLLM seeds the n samples of a request with seed, seed + 1, ..., so seeds built by addition
    (seed + index) would replay one prompt's random stream for another prompt, or for the next
    step's call (the trainer passes seed + step); hashed seeds overlap only by chance (2**-62).
    The rank makes two data-parallel ranks draw different streams for their i-th prompts; the
    ranks of one tensor-parallel engine share it. The hash changes the low 32 bits too, the only
    ones torch's CPU generator keeps.
    """
    text = f"{seed}:{data_parallel_rank}:{prompt_index}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass
class Completion:
    """One sampled response.

    token_ids: the response tokens, ending with the EOS token when `finished`.
    logprobs: the behaviour policy's log-probability of each sampled token, under the
        distribution actually sampled from (after temperature and top-p), one per token.
    finished: True when the response ended with EOS, False when cut at max_new_tokens.
    """

    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finished: bool = True

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"Completion has {len(self.token_ids)} tokens but "
                             f"{len(self.logprobs)} log-probs")


class RolloutEngine(abc.ABC):
    """Samples completions from (a copy of) the current policy."""

    # a progress bar over the sequences of each generate call (`luffy-fast eval` sets it; the
    # trainer has its own bar over steps)
    show_progress: bool = False

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 params: SamplingParams) -> list[list[Completion]]:
        """`n` completions for each prompt (token ids without padding), in prompt order."""

    @abc.abstractmethod
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's current weights, as (transformers parameter name, tensor) pairs."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the engine's resources (model copies, worker processes, device memory)."""

    def sleep(self) -> None:
        """Release device memory for the policy update (no-op unless the engine can)."""
        return None

    def wake(self) -> None:
        """Take back what `sleep` released, ready to generate (no-op unless the engine sleeps)."""
        return None

    def metrics(self) -> dict[str, float]:
        """Measurements of the latest calls (e.g. timings, rollout entropy), merged into the
        step's metrics after the weight sync; none by default."""
        return {}


def check_generate_args(prompts: Sequence[Sequence[int]], n: int) -> None:
    """The argument checks every engine's `generate` starts with."""
    if n <= 0:
        raise ValueError(f"n must be positive (got {n})")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
