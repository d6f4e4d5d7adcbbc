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
from luffy_fast.errors import ConfigError
from luffy_fast.run_files import (
    DiskFullError,
    check_run_dir,
    claim_run_dir,
    ensure_writable_dir,
    holds_a_run,
    is_disk_full,
    link_tree,
    naming_full_disk,
    remove_stale_temporaries,
    start_fresh,
)

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


def test_empty_run_folders_are_not_a_run_to_lose(tmp_path):
    """A start that stopped before writing leaves empty checkpoints/ and tensorboard/: nothing
    to refuse a fresh start for. A file in one of them, or an earlier config, is a run."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    assert holds_a_run(tmp_path) == []
    check_run_dir(tmp_path, resume=False, overwrite=False)
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_text("old")
    (tmp_path / "config.until-step-4.yaml").write_text("old")
    assert holds_a_run(tmp_path) == ["tensorboard", "config.until-step-4.yaml"]


def test_only_the_temporary_files_of_gone_processes_are_removed(tmp_path, monkeypatch):
    names = (".metrics.jsonl.tmp-111", ".write-probe-222", ".config.yaml.tmp-333",
             ".wandb_id.tmp-444", "metrics.jsonl.tmp-111", ".write-probe-x")
    for name in names:
        (tmp_path / name).write_text("")

    def kill(pid, signal):  # 111 and 222 are gone; 333 is another user's; 444 is ours, alive
        assert signal == 0
        if pid in (111, 222):
            raise ProcessLookupError(pid)
        if pid == 333:
            raise PermissionError(pid)

    monkeypatch.setattr(os, "kill", kill)
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".metrics.jsonl.tmp-111", ".write-probe-222"]
    assert sorted(os.listdir(tmp_path)) == [".config.yaml.tmp-333", ".wandb_id.tmp-444",
                                            ".write-probe-x", "metrics.jsonl.tmp-111"]


def test_a_full_disk_or_quota_is_named_and_other_errors_pass_as_they_are(tmp_path, monkeypatch):
    for code in (errno.ENOSPC, errno.EDQUOT):
        assert is_disk_full(OSError(code, os.strerror(code)), tmp_path)
    # the probe writes beside the path: fine here, impossible (not a full disk) in a missing folder
    assert not is_disk_full(RuntimeError("torch's write failed"), tmp_path / "model.pt")
    assert not is_disk_full(RuntimeError("torch's write failed"), tmp_path / "missing" / "model.pt")
    assert os.listdir(tmp_path) == []  # the probe is gone

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=3 * 2**20 + 2**19))

    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskFullError) as raised:
        naming_full_disk(tmp_path / "metrics.jsonl", "metrics", full)
    assert str(raised.value) == (f"[Errno {errno.ENOSPC}] no space left on device while writing "
                                 f"metrics to '{tmp_path / 'metrics.jsonl'}' (3.5 MiB free); free "
                                 f"some space and rerun with --resume")
    assert type(raised.value.__cause__) is OSError  # the original, once
    with pytest.raises(DiskFullError) as outer:  # already named: it passes as it is
        naming_full_disk(tmp_path, "a checkpoint",
                         lambda: naming_full_disk(tmp_path / "metrics.jsonl", "metrics", full))
    assert f"writing metrics to '{tmp_path / 'metrics.jsonl'}'" in str(outer.value)
    assert type(outer.value.__cause__) is OSError

    def denied():
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        naming_full_disk(tmp_path / "metrics.jsonl", "metrics", denied)


def test_the_lock_names_this_process_and_a_file_cannot_be_the_run_folder(tmp_path):
    (tmp_path / ".lock").write_text("4242\n")  # left by a run that has ended
    with claim_run_dir(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    (tmp_path / "run").write_text("a file")
    with pytest.raises(ConfigError, match=rf"^output.dir: '{tmp_path / 'run'}' cannot be a "
                                          rf"folder: '{tmp_path / 'run'}' is a file$"):
        ensure_writable_dir(tmp_path / "run")
