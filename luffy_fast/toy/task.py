"""The toy task plug-in (`data.task: toy`): digit reversal (luffy_fast/toy/problems.py) with the
demo's own tokenizer and tiny Qwen2 (luffy_fast/toy/model.py). A user's task implements the same
interface (luffy_fast.tasks.Task); see examples/custom_task.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from luffy_fast.data import Sample
from luffy_fast.errors import ConfigError
from luffy_fast.model_config import check_toy_model
from luffy_fast.tasks import Task
from luffy_fast.toy.model import TinyQwen2Config, build_policy, build_tokenizer
from luffy_fast.toy.problems import Problem, extract_answer, sample_problems


def toy_samples(problems: Sequence[Problem], tokenizer) -> list[Sample]:
    """Problems as samples: prompt token ids, the answer as ground truth, the trace."""
    return [Sample(prompt_ids=tokenizer(p.prompt, add_special_tokens=False).input_ids,
                   ground_truth=p.answer,
                   traces=[tokenizer(p.trace, add_special_tokens=False).input_ids],
                   data_source="toy_reverse") for p in problems]


class ToyReverseReward:
    """1 when the answer after the last "=" (ended by <eos>) equals the reversed digits."""

    def __call__(self, response: str, sample: Sample) -> float:
        return float(extract_answer(response) == sample.ground_truth)


class ToyTask(Task):
    """Digit reversal (`data.task: toy`) with its own word-level tokenizer and tiny Qwen2
    (model.path "toy"), shaped by the `model` section; `data.num_digits` digits per problem."""

    reward_workers = 0  # a string comparison: scored in-process, no worker start-up

    def __init__(self, config) -> None:
        super().__init__(config)
        if config.model.path != "toy":
            raise ConfigError("model.path: the toy policy and the toy data go together "
                              f"(model.path={config.model.path!r}, data.task='toy')")
        check_toy_model(config.model)
        self._reward = ToyReverseReward()

    def components(self) -> tuple:
        config = self.config
        tokenizer = build_tokenizer(config.data.num_digits)
        model = config.model
        shape = TinyQwen2Config(hidden_size=model.hidden_size,
                                intermediate_size=model.intermediate_size,
                                num_hidden_layers=model.num_hidden_layers,
                                num_attention_heads=model.num_attention_heads,
                                num_key_value_heads=model.num_key_value_heads,
                                max_position_embeddings=max(128, 2 * config.data.max_response_length))
        return tokenizer, build_policy(tokenizer, shape, seed=config.train.seed)

    def _problems(self, count: int, split: str) -> list[Problem]:
        data = self.config.data
        return sample_problems(count, data.num_digits, split, self.config.train.seed,
                               data.heldout_fraction)

    def train_samples(self, tokenizer) -> list[Sample]:
        available = 10**self.config.data.num_digits * (1 - self.config.data.heldout_fraction)
        return toy_samples(self._problems(min(20000, int(0.4 * available)), "train"), tokenizer)

    def heldout_samples(self, tokenizer) -> list[Sample]:
        count = self.config.eval.num_problems  # generated: None ("all") means the default 200
        try:
            problems = self._problems(200 if count is None else count, "heldout")
        except ValueError as error:  # more than the held-out share of the digit strings
            raise ConfigError(f"eval.num_problems: {error} (data.num_digits, "
                              f"data.heldout_fraction)") from None
        return toy_samples(problems, tokenizer)

    def reward(self, response: str, sample: Sample) -> float:
        return self._reward(response, sample)
