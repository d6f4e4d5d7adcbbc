"""The run folder's fresh start (run_files.start_fresh): one function clears an old run, on rank 0
only; the other ranks delete nothing and wait for it (docs/robustness.md)."""

from __future__ import annotations

import pytest
import torch

from luffy_fast.checkpoint import CheckpointManager
from luffy_fast.run_files import check_run_dir, start_fresh

OLD_RUN = ("metrics.jsonl", "config.yaml", "tensorboard/events.out.tfevents.1",
           "checkpoints/latest", "checkpoints/step-000002/trainer_state.json",
           "checkpoints/best/best.json", "checkpoints/best/step-000001/trainer_state.json")


def old_run(folder) -> None:
    for name in (*OLD_RUN, "notes.txt", "rollout_model/config.json"):  # the last two: not a run's
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("old")


def left(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def barriers(monkeypatch) -> list[int]:
    """torch.distributed.barrier recorded instead of run (no process group in these tests)."""
    calls: list[int] = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda *args, **kwargs: calls.append(1))
    return calls


def test_rank_zero_clears_an_old_run_and_the_other_ranks_wait(tmp_path, barriers):
    old_run(tmp_path)
    start_fresh(tmp_path, rank=1, world_size=2)
    assert left(tmp_path) == sorted([*OLD_RUN, "notes.txt", "rollout_model/config.json"])
    assert len(barriers) == 1  # rank 1 waited for rank 0, deleting nothing
    start_fresh(tmp_path, rank=0, world_size=2)
    assert left(tmp_path) == ["notes.txt", "rollout_model/config.json"]
    assert len(barriers) == 2
    start_fresh(tmp_path)  # a world of one: nothing to wait for, nothing left to clear
    assert len(barriers) == 2 and left(tmp_path) == ["notes.txt", "rollout_model/config.json"]


def test_a_fresh_start_of_the_trainer_clears_through_start_fresh_on_rank_zero(tmp_path, barriers):
    """resume_point (the trainer's start) without a checkpoint to resume: the whole old run,
    best checkpoint, metrics and TensorBoard included, on rank 0 only."""
    old_run(tmp_path)
    assert CheckpointManager(tmp_path / "checkpoints", keep=1, rank=1,
                             world_size=2).resume_point(resume=False) is None
    assert len(left(tmp_path)) == len(OLD_RUN) + 2 and len(barriers) == 1
    assert CheckpointManager(tmp_path / "checkpoints", keep=1, rank=0,
                             world_size=2).resume_point(resume=False) is None
    assert left(tmp_path) == ["notes.txt", "rollout_model/config.json"] and len(barriers) == 2


def test_overwrite_clears_on_rank_zero_only_and_a_kept_run_is_refused_everywhere(tmp_path):
    old_run(tmp_path)
    check_run_dir(tmp_path, resume=False, overwrite=True, rank=1)  # before the process group
    assert len(left(tmp_path)) == len(OLD_RUN) + 2
    with pytest.raises(Exception, match="already holds a run .*pass --resume"):
        check_run_dir(tmp_path, resume=False, overwrite=False, rank=1)
    check_run_dir(tmp_path, resume=True, overwrite=False, rank=0)
    assert len(left(tmp_path)) == len(OLD_RUN) + 2
    check_run_dir(tmp_path, resume=False, overwrite=True, rank=0)
    assert left(tmp_path) == ["notes.txt", "rollout_model/config.json"]
