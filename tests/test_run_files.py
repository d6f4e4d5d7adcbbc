"""The run folder's fresh start (run_files.start_fresh): one function clears an old run, on rank 0
only; the other ranks delete nothing and wait for it (docs/robustness.md). Checkpoint files shared
by hard links (run_files.link_tree), copied where links fail."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

from luffy_fast.checkpoint import CheckpointManager
from luffy_fast.run_files import check_run_dir, link_tree, start_fresh

OLD_RUN = ("metrics.jsonl", "config.yaml", "config.until-step-4.yaml",
           "tensorboard/events.out.tfevents.1",
           "checkpoints/latest", "checkpoints/step-000002/trainer_state.json",
           "checkpoints/best/best.json", "checkpoints/best/step-000001/trainer_state.json")


def old_run(folder) -> None:
    for name in (*OLD_RUN, "notes.txt", "rollout_model/config.json"):  # the last two: not a run's
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("old")


def left(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


class Waits(list):
    """The ranks' waits for rank 0 (barriers and broadcasts); a broadcast hands on `rank_zero`
    (rank 0's value) when it is set, else the caller's own."""

    rank_zero = None


@pytest.fixture
def barriers(monkeypatch) -> Waits:
    """torch.distributed's barrier and broadcast_object_list recorded instead of run (no process
    group in these tests)."""
    calls = Waits()

    def broadcast(holder, src=0, **kwargs):
        calls.append(1)
        if calls.rank_zero is not None:
            holder[0] = calls.rank_zero

    monkeypatch.setattr(torch.distributed, "barrier", lambda *args, **kwargs: calls.append(1))
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)
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


def test_a_failure_to_clear_raises_on_every_rank(tmp_path, barriers, monkeypatch):
    """Rank 0 cannot delete the old run: it raises, and so does every other rank, from rank 0's
    answer, instead of waiting for a rank 0 that is gone."""
    old_run(tmp_path)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with pytest.raises(OSError, match="output.dir: could not clear .*Permission denied") as raised:
        start_fresh(tmp_path, rank=0, world_size=2)
    barriers.rank_zero = str(raised.value)
    before = left(tmp_path)  # what rank 0 managed to delete is gone (metrics.jsonl, a file)
    assert "metrics.jsonl" not in before and "config.yaml" in before
    with pytest.raises(OSError, match="output.dir: could not clear .*Permission denied"):
        start_fresh(tmp_path, rank=1, world_size=2)
    assert len(barriers) == 2  # each rank reached rank 0's answer once
    assert left(tmp_path) == before  # rank 1 deleted nothing


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


def checkpoint_folder(folder) -> dict[str, bytes]:
    files = {"trainer_state.json": b"{}", "hf/model.safetensors": b"weights",
             "deepspeed/mp_rank_00_model_states.pt": b"state"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def test_link_tree_shares_the_files_and_a_failed_link_copies(tmp_path, monkeypatch):
    files = checkpoint_folder(tmp_path / "a")
    link_tree(tmp_path / "a", tmp_path / "b", skip=("trainer_state.json",))
    assert left(tmp_path / "b") == ["deepspeed/mp_rank_00_model_states.pt", "hf/model.safetensors"]
    for name in left(tmp_path / "b"):
        linked, original = (tmp_path / "b" / name).stat(), (tmp_path / "a" / name).stat()
        assert linked.st_ino == original.st_ino and linked.st_nlink == 2

    def cross_device(source, target):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", cross_device)  # e.g. another file system
    link_tree(tmp_path / "a", tmp_path / "c")
    for name, data in files.items():
        copied = tmp_path / "c" / name
        assert copied.read_bytes() == data
        assert copied.stat().st_ino != (tmp_path / "a" / name).stat().st_ino
    assert (tmp_path / "a" / "hf/model.safetensors").stat().st_nlink == 2  # a and b only
