"""A mini-batch's sequences as token-budget micro-batches, and each micro-batch's tensors.

A mini-batch (one optimizer step) is split into micro-batches of at most `train.token_budget`
tokens (first-fit decreasing). Each micro-batch's loss is later rescaled by its normalizer
denominator over the mini-batch's, so the gradient does not depend on the split
(docs/algorithm.md §Normalizers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from luffy_fast.config import LuffyLossConfig
from luffy_fast.loss_math import normalizer_denominator
from luffy_fast.rollout_batch import RolloutBatch


@dataclass
class MicroBatch:
    """Sequences packed into one row without padding; positions restart at 0 per sequence."""

    input_ids: Tensor  # [1, T]
    position_ids: Tensor  # [1, T]
    targets: Tensor  # [T] int64, the loss's ignore_index outside responses
    advantages: Tensor  # [T] float32
    loss_mask: Tensor  # [T] bool
    off_policy_mask: Tensor  # [T] bool
    seq_ids: Tensor  # [T] int64: index of the sequence in the rollout batch
    old_logprobs: Optional[Tensor]  # [T] float32 or None (old policy = current policy)
    sequence_indices: list[int]
    lengths: list[int]  # tokens of each sequence, in order
    filler: bool = False  # a pass without loss tokens, for ZeRO-3's lockstep (micro_batches)

    def padded_rows(self, pad_token_id: int = 0) -> tuple[Tensor, Tensor]:
        """The same sequences as [B, L] right-padded rows and their attention mask."""
        width = max(self.lengths)
        rows = torch.full((len(self.lengths), width), pad_token_id, dtype=torch.long,
                          device=self.input_ids.device)
        mask = torch.zeros_like(rows)
        for row, piece in enumerate(torch.split(self.input_ids[0], self.lengths)):
            rows[row, :len(piece)] = piece
            mask[row, :len(piece)] = 1
        return rows, mask

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device) -> MicroBatch:
        moved = {name: (value.to(device) if isinstance(value, Tensor) else value)
                 for name, value in vars(self).items()}
        return MicroBatch(**moved)


def mini_batch_indices(batch: RolloutBatch, mini: int, groups_per_mini: int) -> list[int]:
    """The sequences of mini-batch `mini`: the members of its `groups_per_mini` groups."""
    in_mini = ((batch.group_ids >= mini * groups_per_mini)
               & (batch.group_ids < (mini + 1) * groups_per_mini))
    return torch.nonzero(in_mini).flatten().tolist()


def sequences_with_gradient(batch: RolloutBatch, indices: Sequence[int],
                            loss_config: LuffyLossConfig) -> list[int]:
    """Drop sequences whose loss gradient is exactly zero (advantage 0, no entropy bonus).

    They still count in the mini-batch's denominator, so the update is unchanged; a mini-batch
    left empty keeps its shortest sequence so every optimizer step sees a backward pass (its
    gradient is zero).
    """
    if loss_config.entropy_coef > 0:
        return list(indices)
    kept = [i for i in indices if float(batch.advantages[i]) != 0.0]
    if not kept and indices:
        kept = [min(indices, key=batch.sequence_length)]
    return kept


def plan_micro_batches(lengths: Sequence[int], token_budget: int,
                       padded: bool = False) -> list[list[int]]:
    """Split sequences into micro-batches of at most `token_budget` tokens (first-fit decreasing).

    Packed (padded=False), a micro-batch costs the sum of its lengths; padded, it costs
    rows x longest row. Returns lists of indices into `lengths`; a sequence longer than the
    budget is an error.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    used: list[int] = []
    for index in order:
        length = lengths[index]
        if length > token_budget:
            raise ValueError(f"a sequence of {length} tokens does not fit "
                             f"train.token_budget={token_budget}")
        for slot, bin_ in enumerate(bins):
            # sorted by decreasing length, so a bin's first sequence is its longest
            cost = (len(bin_) + 1) * lengths[bin_[0]] if padded else used[slot] + length
            if cost <= token_budget:
                bin_.append(index)
                used[slot] += length
                break
        else:
            bins.append([index])
            used.append(length)
    return [sorted(b) for b in bins]


def pack_micro_batch(batch: RolloutBatch, indices: Sequence[int],
                     old_logprobs: Optional[Sequence[Tensor]] = None,
                     ignore_index: int = LuffyLossConfig.ignore_index) -> MicroBatch:
    """The sequences at `indices` as one packed row: inputs are prompt + response minus the
    last token, targets the response (`ignore_index` on prompt positions)."""
    ids, positions, targets, advantages, off_policy, seq_ids, old = [], [], [], [], [], [], []
    for index in indices:
        prompt, response = batch.prompt_ids[index], batch.response_ids[index]
        sequence = prompt + response
        length = len(sequence) - 1
        ids.append(torch.tensor(sequence[:-1], dtype=torch.long))
        positions.append(torch.arange(length))
        target = torch.full((length,), ignore_index, dtype=torch.long)
        target[len(prompt) - 1:] = torch.tensor(response, dtype=torch.long)
        targets.append(target)
        advantage = 0.0 if batch.advantages is None else float(batch.advantages[index])
        advantages.append(torch.full((length,), advantage, dtype=torch.float32))
        off_policy.append(torch.full((length,), bool(batch.off_policy[index])))
        seq_ids.append(torch.full((length,), index, dtype=torch.long))
        if old_logprobs is not None:
            values = torch.zeros(length, dtype=torch.float32)
            values[len(prompt) - 1:] = old_logprobs[index]
            old.append(values)
    targets_flat = torch.cat(targets)
    return MicroBatch(
        input_ids=torch.cat(ids)[None], position_ids=torch.cat(positions)[None],
        targets=targets_flat, advantages=torch.cat(advantages),
        loss_mask=targets_flat != ignore_index, off_policy_mask=torch.cat(off_policy),
        seq_ids=torch.cat(seq_ids), old_logprobs=torch.cat(old) if old_logprobs is not None else None,
        sequence_indices=list(indices), lengths=[len(p) for p in positions])


def micro_batches(batch: RolloutBatch, indices: Iterable[int], token_budget: int,
                  padded: bool = False, old_logprobs: Optional[Sequence[Tensor]] = None,
                  ignore_index: int = LuffyLossConfig.ignore_index,
                  lockstep: Optional[Callable[[int], int]] = None,
                  spare: Sequence[int] = ()) -> Iterator[MicroBatch]:
    """The sequences at `indices` split by `plan_micro_batches` and each part packed by
    `pack_micro_batch`, one micro-batch at a time; each names its sequences (positions in
    the rollout batch) in `sequence_indices`.

    `lockstep` (ZeRO-3 over several ranks, where every forward and backward gathers the
    parameters on all ranks together) maps this rank's count of micro-batches to the count
    every rank runs, the largest (distributed.lockstep_counts, a collective called before the
    first micro-batch); the missing ones are fillers (`filler`): the shortest sequence of
    `spare` (else of `indices`, else of the batch) with no loss token, so a zero loss and a zero
    gradient."""
    indices = list(indices)
    plan = plan_micro_batches([batch.sequence_length(i) for i in indices], token_budget, padded)
    missing = lockstep(len(plan)) - len(plan) if lockstep is not None else 0
    for part in plan:
        yield pack_micro_batch(batch, [indices[i] for i in part], old_logprobs, ignore_index)
    if missing > 0:
        shortest = min(list(spare) or indices or range(len(batch)), key=batch.sequence_length)
        filler = pack_micro_batch(batch, [shortest], old_logprobs, ignore_index)
        filler.loss_mask, filler.filler = torch.zeros_like(filler.loss_mask), True
        for _ in range(missing):
            yield filler


def loss_denominator(batch: RolloutBatch, indices: Sequence[int], config: LuffyLossConfig) -> float:
    """The normalizer's denominator over a whole mini-batch (the sequences at `indices`), the
    same definition as the op's stats["denominator"] for one call."""
    tokens = sum(len(batch.response_ids[i]) for i in indices)
    sequences = sum(1 for i in indices if batch.response_ids[i])
    return float(normalizer_denominator(tokens, sequences, config))
