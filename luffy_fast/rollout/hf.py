"""Rollouts with transformers' `generate`: the engine for CPUs and small runs.

Inside the trainer the engine generates from the training weights themselves wherever the ZeRO
stage keeps them whole (docs/design.md §The trainer):

- ZeRO 0, 1 and 2: every rank holds the full module parameters, so the engine shares the policy
  module that DeepSpeed trains (in the training precision, bf16 or fp32): no second copy, and
  the weight sync is a no-op.
- ZeRO 3: the parameters are partitioned, so the engine keeps its own copy in the training
  precision (bf16 when training in bf16: 2 bytes per parameter, never an fp32 copy), refreshed
  bucket by bucket after every update. Gathering the whole model for each `generate` call instead
  would need DeepSpeed's ZeRO-3 forward hooks removed for the call: with them in place every
  layer is re-partitioned after its forward, so each decoding step gathers every layer again
  (measured 4.5x slower than the copy on the CPU, and the parameters come back partitioned).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from luffy_fast.rollout.base import (
    Completion,
    RolloutEngine,
    SamplingParams,
    check_generate_args,
    request_seed,
)
from luffy_fast.run_files import rank_and_world


@contextlib.contextmanager
def generation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the call; the module's own mode and flags after.

    Eval: no dropout, and gradient checkpointing (active in training mode only) leaves the KV
    cache on. Frozen: ATen's linear picks its kernel path by the weight's requires_grad (the LM
    head on the last position's hidden state rounds differently in the last bit on the CPU), so a
    shared module samples bit for bit as a frozen copy of it does.
    """
    was_training = model.training
    trainable = [param for param in model.parameters() if param.requires_grad]
    model.eval()
    for param in trainable:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)
        model.train(was_training)


def trainer_hf_engine(policy: PreTrainedModel, tokenizer, device: torch.device, zero_stage: int,
                      bf16: bool, max_batch_size: int = 256) -> HFGenerateEngine:
    """The trainer's engine over `policy`, built before DeepSpeed wraps it (see the module doc).

    Below ZeRO-3 the engine holds `policy` itself: DeepSpeed moves and casts that module's
    parameters in place (the same Parameter objects), so the engine sees the device, the
    precision and every update of the weights being trained. At ZeRO-3 it holds a copy on
    `device` whose floating parameters are cast to bf16 when `bf16` (buffers such as the rotary
    frequencies stay as they are, as DeepSpeed leaves them).
    """
    tokens = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  max_batch_size=max_batch_size)
    if zero_stage < 3:
        return HFGenerateEngine(policy, shares_weights=True, **tokens)
    replica = copy.deepcopy(policy)
    for param in replica.parameters():
        param.requires_grad_(False)
        if bf16 and param.is_floating_point():
            param.data = param.data.to(torch.bfloat16)
    return HFGenerateEngine(replica.to(device), **tokens)


class HFGenerateEngine(RolloutEngine):
    """Samples with `model.generate`, in eval mode with the KV cache on.

    shares_weights=False (the default): `model` becomes the engine's own copy (frozen), refreshed
    by `sync_weights` after every update. shares_weights=True: `model` is the module being
    trained; generation reads its current weights in place, `sync_weights` is a no-op, and the
    module's train/eval mode and gradient flags are the trainer's again after each call
    (`generation_mode`).
    Prompts are left-padded into batches of at most `max_batch_size` sequences.
    """

    def __init__(self, model: PreTrainedModel, pad_token_id: int, eos_token_id: int,
                 max_batch_size: int = 256, shares_weights: bool = False) -> None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive (got {max_batch_size})")
        self.shares_weights = shares_weights
        self.model = model if shares_weights else model.eval().requires_grad_(False)
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.max_batch_size = max_batch_size
        # of the latest generate call: mean entropy of the sampling distribution per sampled token
        self._metrics: dict[str, float] = {}

    @property
    def device(self) -> torch.device:
        """Where the model's weights are now (a shared module moves when DeepSpeed wraps it)."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 params: SamplingParams) -> list[list[Completion]]:
        check_generate_args(prompts, n)
        flat = [list(p) for p in prompts for _ in range(n)]
        completions: list[Completion] = []
        self._entropy_sum, self._entropy_count = 0.0, 0
        device = self.device
        with generation_mode(self.model), \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if params.seed is not None:  # rank 0 samples with the seed itself
                rank = rank_and_world()[0]
                torch.manual_seed(params.seed if rank == 0 else request_seed(params.seed, 0, rank))
            with tqdm(total=len(flat), desc="generating", unit="seq",
                      disable=not self.show_progress) as bar:
                for start in range(0, len(flat), self.max_batch_size):
                    completions.extend(self._generate_batch(
                        flat[start:start + self.max_batch_size], params, device))
                    bar.update(len(completions) - bar.n)
        self._metrics = {"rollout_entropy": self._entropy_sum / max(self._entropy_count, 1)}
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                        device: torch.device) -> list[Completion]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: generation continues at the right
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        greedy = params.temperature == 0
        # temperature and top-p as our own processors, so that the recorder comes after them
        # (generate puts its own warpers after the processors it is given): the ones it would
        # build are turned off (1.0, 0), which also overrides a model's generation defaults
        warpers = [] if greedy else [TemperatureLogitsWarper(params.temperature)] + (
            [TopPLogitsWarper(params.top_p)] if params.top_p < 1 else [])
        sampling = {} if greedy else dict(temperature=1.0, top_p=1.0, top_k=0)
        recorder = SampledLogprobs()
        sequences = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            do_sample=not greedy, max_new_tokens=params.max_new_tokens, use_cache=True,
            pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
            logits_processor=LogitsProcessorList([*warpers, recorder]), **sampling)
        new_tokens = sequences[:, width:].cpu()
        token_logprobs, entropy = (values.cpu() for values in recorder.finish(sequences))
        result = []
        for row, (tokens, lps) in enumerate(zip(new_tokens.tolist(), token_logprobs.tolist())):
            finished = self.eos_token_id in tokens
            length = tokens.index(self.eos_token_id) + 1 if finished else len(tokens)
            result.append(Completion(tokens[:length], lps[:length], finished))
            self._entropy_sum += float(entropy[row, :length].sum())
            self._entropy_count += length
        return result

    @torch.no_grad()
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the named tensors into the engine's own model; with shared weights nothing to do
        (`named_tensors` is not even iterated, so a lazy ZeRO gather never runs)."""
        if self.shares_weights:
            return
        own = dict(self.model.named_parameters())
        own.update(dict(self.model.named_buffers()))
        for name, tensor in named_tensors:
            if name not in own:
                raise KeyError(f"sync_weights: the rollout model has no parameter {name!r}")
            own[name].copy_(tensor.to(own[name].device, own[name].dtype))

    def metrics(self) -> dict[str, float]:
        """`rollout_entropy`: the sampling distribution's mean entropy per sampled token, over
        the latest generate call."""
        return dict(self._metrics)

    def close(self) -> None:
        self.model = None  # the copy (or the reference to the shared module) is all it holds


class SampledLogprobs(LogitsProcessor):
    """The last of generate's logits processors: it sees the scores each token is drawn from
    (temperature and top-p applied) and records, per step, the drawn token's log-prob and the
    distribution's entropy, [B] each. The token drawn at a step is read at the next one (the
    last column of `input_ids`) from the step's log-softmax, so one step's [B, V] is kept at a
    time: transformers' `output_scores` keeps every step's (at B = 256, V = 151936 and 1024
    tokens, 148 GiB in float32)."""

    def __init__(self) -> None:
        self.logprobs: list[torch.Tensor] = []
        self.entropies: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None  # the latest step's log-softmax, [B, V]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._read(input_ids[:, -1])
        logprobs = scores.float().log_softmax(-1)
        self.entropies.append(-(logprobs.exp() * logprobs.clamp_min(-1e30)).sum(-1))
        self._last = logprobs
        return scores

    def _read(self, drawn: torch.Tensor) -> None:
        if self._last is not None:  # at the first step `drawn` is the prompt's last token
            self.logprobs.append(self._last.gather(-1, drawn[:, None]).squeeze(-1))
            self._last = None

    def finish(self, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, new tokens] log-probs and entropies, once generate returned `sequences`."""
        self._read(sequences[:, -1])
        return torch.stack(self.logprobs, dim=1), torch.stack(self.entropies, dim=1)
