"""The trainer's configuration: one dataclass tree, loaded from YAML with dotted overrides.

    config = load_config("configs/demo_luffy.yaml", ["optim.lr=1e-3", "train.steps=50"])

Every key is checked: an unknown key or a value of the wrong type or range raises ConfigError
naming the dotted key (for example `optim.lr`). The `loss` section is the op's own
LuffyLossConfig, so the trainer and the fused op share one definition of every loss knob.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from luffy_fast.config import NEEDS_MAX_LEN, LuffyLossConfig
from luffy_fast.config_parsing import apply_overrides, build_dataclass, check_exists, read_yaml_file, to_plain
from luffy_fast.config_parsing import check_choice as _choice
from luffy_fast.config_parsing import check_finite as _finite
from luffy_fast.config_parsing import check_int as _positive_int
from luffy_fast.errors import ConfigError
from luffy_fast.model_config import ModelConfig
from luffy_fast.reward_pool import MAX_TIMEOUT
from luffy_fast.rollout.vllm_config import VLLMConfig

__all__ = ["ConfigError", "LuffyTrainConfig", "ModelConfig", "apply_overrides", "config_from_dict",
           "load_config"]


@dataclass
class DataConfig:
    """Prompts, answers and off-policy traces, from a task (luffy_fast.tasks).

    task: "toy" (the demo's digit reversal, generated on the fly), "math" (the official layout
        at `source`: Parquet, JSONL or a folder of shards; math-verify) or a user's
        "package.module:Class"; None picks "toy" when source is "toy", else "math".
    """

    task: Optional[str] = None
    source: str = "toy"
    heldout_source: Optional[str] = None  # held-out problems, any eval layout (toy: generated)
    num_digits: int = 5  # toy task: length of the digit string to reverse
    heldout_fraction: float = 0.1  # toy task: share of all problems reserved for held-out
    max_prompt_length: int = 1024  # longer prompts are skipped (counted)
    max_response_length: int = 8192
    trace_overflow: str = "truncate"  # a longer trace is cut to max_response_length, or "drop"
    # tokenized data are cached here (~/.cache/luffy_fast/data when None; "" turns it off)
    cache_dir: Optional[str] = None

    def validate(self) -> None:
        if self.task is not None and (
                not self.task or (self.task not in ("toy", "math") and ":" not in self.task)):
            raise ConfigError(f"data.task: must be 'toy', 'math' or 'package.module:Class' "
                              f"(got {self.task!r})")
        _positive_int("data", "num_digits", self.num_digits)
        if self.num_digits > 10:
            raise ConfigError(f"data.num_digits: must be at most 10 (got {self.num_digits})")
        _finite("data", "heldout_fraction", self.heldout_fraction, 0.0, 0.5, low_open=True)
        _positive_int("data", "max_prompt_length", self.max_prompt_length)
        _positive_int("data", "max_response_length", self.max_response_length)
        _choice("data", "trace_overflow", self.trace_overflow, ("truncate", "drop"))
        for key in ("source", "heldout_source"):  # a copy of the demo's config, say
            value = getattr(self, key)
            if self.task_name == "toy" and value not in (None, "toy"):
                raise ConfigError(f"data.{key}: the toy task generates its own problems and would "
                                  f"not read {value!r}; set data.task: math to use it")
            if self.task_name == "math" and (key == "source" or value is not None):
                check_exists("data", key, value, " (the math task reads one; 'toy' is the toy "
                                                 "task's, data.task: toy)")

    @property
    def task_name(self) -> str:
        """The task to load: `task`, or the one today's `source` implies."""
        return self.task or ("toy" if self.source == "toy" else "math")


@dataclass
class RolloutConfig:
    """Group composition and sampling: n_on policy samples plus n_off traces per prompt."""

    engine: str = "hf"  # "hf" (transformers generate) or "vllm"
    n_on: int = 7
    n_off: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_batch_size: int = 256  # hf engine: sequences per generate call
    # truncated importance sampling: on-policy advantages times min(pi_train / pi_rollout, cap)
    tis_cap: Optional[float] = None
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def validate(self) -> None:
        _choice("rollout", "engine", self.engine, ("hf", "vllm"))
        self.vllm.validate()
        _positive_int("rollout", "n_on", self.n_on, minimum=0)
        _positive_int("rollout", "n_off", self.n_off, minimum=0)
        if self.n_on + self.n_off < 2:
            raise ConfigError("rollout.n_on: a group needs at least two members "
                              f"(n_on + n_off = {self.n_on + self.n_off})")
        _finite("rollout", "temperature", self.temperature, 0.0, low_open=True)
        _finite("rollout", "top_p", self.top_p, 0.0, 1.0, low_open=True)
        _positive_int("rollout", "max_batch_size", self.max_batch_size)
        if self.tis_cap is not None:
            _finite("rollout", "tis_cap", self.tis_cap, 0.0, low_open=True)


@dataclass
class AlgorithmConfig:
    """Advantage estimation and the number of passes over each rollout batch."""

    advantage_std: bool = False  # divide by the group's std (GRPO) or not (LUFFY, Dr. GRPO)
    ppo_epochs: int = 1

    def validate(self) -> None:
        _positive_int("algorithm", "ppo_epochs", self.ppo_epochs)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warm-up, then constant or cosine).

    The schedule counts optimizer steps, not train.steps: a step takes
    train.prompts_per_step / train.mini_batch_size x algorithm.ppo_epochs of them (two in the
    reference run), so warmup_steps: 10 there warms up over 5 steps. The logged learning_rate
    is the mean over a step's optimizer steps."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0  # cosine: final lr as a fraction of lr

    def validate(self) -> None:
        _finite("optim", "lr", self.lr, 0.0, low_open=True)
        _finite("optim", "weight_decay", self.weight_decay, 0.0)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: must be two numbers in [0, 1) (got {self.betas!r})")
        _finite("optim", "eps", self.eps, 0.0, low_open=True)
        _finite("optim", "grad_clip", self.grad_clip, 0.0)
        _positive_int("optim", "warmup_steps", self.warmup_steps, minimum=0)
        _choice("optim", "schedule", self.schedule, ("constant", "cosine"))
        _finite("optim", "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)


@dataclass
class TrainSection:
    """Batch sizes, length of the run, DeepSpeed ZeRO stage and seed.

    prompts_per_step: prompts per rollout batch (each becomes a group of n_on + n_off).
    mini_batch_size: prompts per optimizer step; prompts_per_step / mini_batch_size optimizer
        steps per rollout batch (LUFFY's reference: 128 / 64 = 2).
    token_budget: most tokens in one packed micro-batch (padding removed).
    epochs: when set, the run's length: train.steps becomes epochs x (training prompts //
        prompts_per_step), each epoch a fresh seeded shuffle (luffy_fast/sampler.py).
    """

    steps: int = 100
    epochs: Optional[int] = None
    prompts_per_step: int = 128
    mini_batch_size: int = 64
    token_budget: int = 32768
    zero_stage: int = 0
    seed: int = 0
    loss_backend: str = "auto"  # fused op backend: auto (triton on CUDA, torch on CPU), ...
    # CPU threads for PyTorch (0: its default). Tiny models run fastest on 1: extra threads
    # buy little and, on a busy machine, oversubscription made steps 5-8x slower (measured).
    cpu_threads: int = 0
    # optimizer steps in a row with a non-finite loss or gradient norm (each skipped) before
    # the run stops (0: never); docs/robustness.md
    max_nonfinite_steps: int = 3

    def validate(self) -> None:
        _choice("train", "loss_backend", self.loss_backend, ("auto", "torch", "triton", "reference"))
        _positive_int("train", "max_nonfinite_steps", self.max_nonfinite_steps, minimum=0)
        for name in ("steps", "prompts_per_step", "mini_batch_size", "token_budget"):
            _positive_int("train", name, getattr(self, name))
        if self.prompts_per_step % self.mini_batch_size:
            raise ConfigError(f"train.mini_batch_size: must divide train.prompts_per_step "
                              f"({self.prompts_per_step} % {self.mini_batch_size} != 0)")
        _choice("train", "zero_stage", self.zero_stage, (0, 1, 2, 3))
        _positive_int("train", "cpu_threads", self.cpu_threads, minimum=0)
        _positive_int("train", "seed", self.seed, minimum=0, maximum=2**31 - 1)  # vLLM: + rank
        if self.epochs is not None:
            _positive_int("train", "epochs", self.epochs)


@dataclass
class EvalConfig:
    """Validation on the held-out problems every `every` steps (and after the last), by the code
    of `luffy-fast eval` (luffy_fast/evaluation.py): `n` samples per problem, temperature 0 is
    greedy. best_metric: a validation metric (e.g. "val/macro/avg@1"; higher is better) whose
    best checkpoint is kept under checkpoints/best; None keeps none. num_problems: how many
    held-out problems, evenly spread over the file (None: all)."""

    every: int = 10
    num_problems: Optional[int] = 200
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    best_metric: Optional[str] = None

    def validate(self) -> None:
        _positive_int("eval", "every", self.every, minimum=0)
        if self.num_problems is not None:
            _positive_int("eval", "num_problems", self.num_problems, minimum=0)
        _finite("eval", "temperature", self.temperature, 0.0)
        _finite("eval", "top_p", self.top_p, 0.0, 1.0, low_open=True)
        _positive_int("eval", "n", self.n)
        if self.best_metric is not None and not self.best_metric.startswith("val/"):
            raise ConfigError(f"eval.best_metric: must name a validation metric such as "
                              f"'val/macro/avg@{self.n}' (got {self.best_metric!r})")


@dataclass
class RewardConfig:
    """Reward scoring in worker processes (luffy_fast/reward_pool.py), each item under `timeout`
    seconds: a hang or crash scores 0 and is counted. workers None: the task's hint (the toy
    task's cheap reward: 0, in-process), else one per CPU core shared by the node's ranks."""

    workers: Optional[int] = None
    timeout: float = 10.0

    def validate(self) -> None:
        if self.workers is not None:
            _positive_int("reward", "workers", self.workers, minimum=0)
        _finite("reward", "timeout", self.timeout, 0.0, MAX_TIMEOUT, low_open=True)


@dataclass
class OutputConfig:
    """Where metrics (JSONL, TensorBoard, optionally Weights & Biases) and checkpoints go."""

    dir: str = "runs/train"
    save_every: int = 50  # checkpoint every N steps (and after the last); 0: only at the end
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress_bar: bool = True  # shown only when stderr is a terminal
    log_every: int = 10  # a plain progress line every N steps where no bar is shown (0: none)
    wandb_project: Optional[str] = None  # also log to this Weights & Biases project (None: off)
    wandb_name: Optional[str] = None  # the W&B run's name (None: output.dir's folder name)

    def validate(self) -> None:
        if not self.dir:
            raise ConfigError("output.dir: must not be empty")
        if self.wandb_project is not None:
            import importlib.util

            from luffy_fast.run_files import launched_rank

            if not self.wandb_project.strip():
                raise ConfigError("output.wandb_project: must not be empty (null turns W&B off)")
            # rank 0 alone logs to W&B: the other ranks (RANK set, not 0) need no wandb
            if launched_rank() == 0 and importlib.util.find_spec("wandb") is None:
                raise ConfigError("output.wandb_project: logging to Weights & Biases needs the "
                                  "wandb package, which is not installed (pip install wandb)")
        _positive_int("output", "save_every", self.save_every, minimum=0)
        _positive_int("output", "keep_checkpoints", self.keep_checkpoints)
        _positive_int("output", "log_every", self.log_every, minimum=0)


@dataclass
class LuffyTrainConfig:
    """The whole run. The `loss` section is luffy_fast.config.LuffyLossConfig; with the
    "constant" normalizer its max_len defaults to data.max_response_length."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LuffyLossConfig = field(default_factory=LuffyLossConfig.luffy)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> None:
        self.validate_sections()
        try:
            self.loss.validate()
        except ValueError as error:
            raise ConfigError(f"loss: {error}") from None
        if self.loss.temperature != self.rollout.temperature:
            raise ConfigError(f"loss.temperature: must equal rollout.temperature (the loss scores "
                              f"tokens under the distribution they were sampled from; got "
                              f"{self.loss.temperature} and {self.rollout.temperature})")
        if self.loss.normalizer in NEEDS_MAX_LEN and self.loss.max_len < self.data.max_response_length:
            raise ConfigError(f"loss.max_len: the {self.loss.normalizer!r} normalizer's max_len "
                              f"({self.loss.max_len}) is below data.max_response_length "
                              f"({self.data.max_response_length})")
        self.validate_across_sections()

    def validate_across_sections(self) -> None:
        """Settings each valid alone that would train wrongly together, without an error."""
        if self.loss.ignore_index >= 0:
            raise ConfigError(f"loss.ignore_index: must be negative (got {self.loss.ignore_index}): "
                              f"it marks the positions outside the loss, and a token id would drop "
                              f"that token from every loss")
        longest, window = (self.data.max_prompt_length + self.data.max_response_length,
                           self.rollout.vllm.max_model_len)
        if self.rollout.engine == "vllm" and window is not None and window < longest:
            raise ConfigError(f"rollout.vllm.max_model_len: {window} is below data.max_prompt_length "
                              f"+ data.max_response_length ({longest}): responses would be cut short")

    def validate_sections(self) -> None:
        """Every section but `loss`, which is built from data and rollout: a bad value there is
        named by its own key, not by the loss field it fills."""
        for section in dataclasses.fields(self):
            if section.name != "loss":
                getattr(self, section.name).validate()

    def optimizer_steps_per_rollout(self) -> int:
        return self.train.prompts_per_step // self.train.mini_batch_size * self.algorithm.ppo_epochs

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_from_dict(values: dict) -> LuffyTrainConfig:
    """Build and validate the tree from nested mappings (missing keys take their defaults)."""
    values = dict(values or {})
    loss_values = values.pop("loss", None)
    config = build_dataclass("", LuffyTrainConfig, values)
    config.validate_sections()
    loss_kwargs = build_dataclass("loss", LuffyLossConfig, loss_values, kwargs_only=True)
    base = dataclasses.asdict(LuffyLossConfig.luffy(max_len=config.data.max_response_length))
    base["temperature"] = config.rollout.temperature  # logits / tau, tau the sampling temperature
    base.update(loss_kwargs)
    if base["normalizer"] in NEEDS_MAX_LEN and base.get("max_len") is None:
        base["max_len"] = config.data.max_response_length
    try:
        config.loss = LuffyLossConfig(**base)
    except ValueError as error:
        raise ConfigError(f"loss: {error}") from None
    config.validate()
    return config


def load_config(path: str | Path | None = None,
                overrides: Sequence[str] = ()) -> LuffyTrainConfig:
    """Read a YAML file (or start from the defaults when path is None), apply overrides."""
    values: dict = {}
    if path is not None:
        if not str(path).strip():
            raise ConfigError("--config: the path is empty")
        values = read_yaml_file(path)
        if values is None:  # empty, or comments only: every setting would silently be a default
            raise ConfigError(f"config file {str(path)!r} is empty (no settings)")
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    return config_from_dict(apply_overrides(values, overrides))
