"""The run folder's files: atomic writes, clear errors for a full disk, stale temporary files,
and what a fresh start, `--resume` and `--overwrite` do with an existing run (docs/robustness.md).

A run folder (`output.dir`) holds `metrics.jsonl`, `tensorboard/`, `checkpoints/` and
`config.yaml` (and with Weights & Biases `wandb_id` and its `wandb/`). Temporary names carry the
writer's PID (`.NAME.tmp-PID`, `.write-probe-PID`), so start-up removes those whose process is
gone, never a live writer's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Optional, TypeVar

import torch
import yaml

from luffy_fast.config_parsing import changed_settings
from luffy_fast.errors import ConfigError

RUN_FILES = ("metrics.jsonl", "tensorboard", "checkpoints", "config.yaml",
             "wandb_id", "wandb")  # the last two with output.wandb_project
EARLIER_CONFIGS = "config.until-step-*.yaml"  # a resume's earlier settings (write_run_config)
_TEMPORARY = re.compile(r"^\.(?:.+\.tmp|write-probe)-(\d+)$")
Result = TypeVar("Result")


class DiskFullError(OSError):
    """Writing under a run folder failed because its file system is full."""

    def __init__(self, path: Path, what: str) -> None:
        free = _free_mib(path)
        super().__init__(errno.ENOSPC, f"no space left on device while writing {what} to "
                                       f"{str(path)!r} ({free} free); free some space and "
                                       f"rerun with --resume")
        self.path = path


def _free_mib(path: Path) -> str:
    for candidate in (path, *path.parents):
        try:
            return f"{shutil.disk_usage(candidate).free / 2**20:.1f} MiB"
        except OSError:
            continue
    return "unknown"


def is_disk_full(error: BaseException, path: Path) -> bool:
    """Whether `error` (an OSError, or torch's RuntimeError that drops the errno) came from a
    full disk: ENOSPC / EDQUOT, or a 1 MiB probe write beside `path` now fails with them."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    folder = path if path.is_dir() else path.parent
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        with probe.open("wb") as out:
            out.write(b"\0" * 2**20)
            out.flush()
            os.fsync(out.fileno())
    except OSError as probe_error:
        return probe_error.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        probe.unlink(missing_ok=True)
    return False


def naming_full_disk(path: Path, what: str, write: Callable[[], Result]) -> Result:
    """Run `write`; a failure from a full disk is re-raised as DiskFullError naming `path`."""
    try:
        return write()
    except (OSError, RuntimeError) as error:
        if isinstance(error, DiskFullError) or not is_disk_full(error, Path(path)):
            raise
        raise DiskFullError(Path(path), what) from error


def write_atomic(path: Path, text: str) -> None:
    """Replace `path`'s contents in one step: readers see the old text or the new, never half.
    A failed write leaves no temporary file behind."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")

    def write() -> None:
        try:
            temporary.write_text(text)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    naming_full_disk(path, path.name, write)


def check_no_file_in_the_way(path: str | Path, key: str) -> None:
    """A ConfigError naming `key` when `path`, or the nearest of its parents that exists, is a
    file, so that `path` cannot be a folder; reads only."""
    path = Path(path)
    blocking = next((part for part in (path, *path.parents) if part.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(f"{key}: {str(path)!r} cannot be a folder: {str(blocking)!r} is a file")


def ensure_writable_dir(path: str | Path, key: str = "output.dir") -> Path:
    """Create `path` if needed and prove it is writable, or raise naming the cause."""
    path = Path(path)
    probe = path / f".write-probe-{os.getpid()}"
    try:
        check_no_file_in_the_way(path, key)
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(path, "a write probe") from None
        raise ConfigError(f"{key}: {str(path)!r} is not writable "
                          f"({error.strerror or error})") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return path


@contextlib.contextmanager
def claim_run_dir(folder: str | Path, rank: int = 0, key: str = "output.dir") -> Iterator[None]:
    """Rank 0 holds an exclusive lock on `folder/.lock` while a run uses the folder, so that a
    second run there at the same time (a `--resume` started while the ranks of an interrupted
    launch still train, say) is a ConfigError naming `key` and the process that holds it. The
    OS drops the lock when that process ends, however it ends; a file system without locks is
    not checked."""
    if rank != 0:
        yield
        return
    with open(ensure_writable_dir(folder, key) / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ConfigError(f"{key}: {str(folder)!r} is in use by another run (process "
                              f"{holder}); wait for it to end or stop it (the ranks of a "
                              f"launch: signal their process group)") from None
        except OSError:
            pass  # no locks on this file system
        else:
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        yield


def link_tree(source: Path, target: Path, skip: Collection[str] = ()) -> None:
    """`source`'s files again under `target` as hard links: the same data on disk, kept while
    either name is left; a file whose link fails (another file system, or one without hard
    links) is copied. `skip`: names in `source` itself left out."""
    for path in sorted(Path(source).rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0] in skip:
            continue
        destination = Path(target) / relative
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete `.NAME.tmp-PID` and `.write-probe-PID` files in `folder` whose process is gone
    (left by a crash or a full disk); returns what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and entry.is_file() and not _process_alive(int(match.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def holds_a_run(folder: Path) -> list[str]:
    """The names of a previous run's files in `folder` (empty: nothing to lose)."""
    return [item.name for item in run_items(folder)
            if item.is_file() or (item.is_dir() and any(item.iterdir()))]


def run_items(folder: str | Path) -> list[Path]:
    """The paths in `folder` that belong to a run: RUN_FILES and its earlier settings."""
    folder = Path(folder)
    return [folder / name for name in RUN_FILES] + sorted(folder.glob(EARLIER_CONFIGS))


def check_run_dir(folder: str | Path, resume: bool, overwrite: bool, rank: int = 0) -> None:
    """Refuse to start a fresh run over a previous one unless `--overwrite` says so; with it,
    start_fresh clears the previous run's files. This runs before the process group exists: in
    a multi-rank launch only rank 0 looks and clears with --overwrite, the other ranks leave the
    folder alone (none of them writes a run file before rank 0 has joined the process group)."""
    folder = Path(folder)
    if resume or (overwrite and rank != 0):
        return
    found = holds_a_run(folder)
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"output.dir: {str(folder)!r} already holds a run ({', '.join(found)}); "
                          f"pass --resume to continue it or --overwrite to replace it")
    start_fresh(folder, rank)


def rank_zero_value(value, world_size: int):
    """Rank 0's `value` on every rank (a broadcast; `value` as is in a world of one). For a choice
    that gates collectives or files, where each rank's own view (of a shared file system, say)
    could differ."""
    if world_size <= 1:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: (0, 1) without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def from_every_rank(value, world_size: int) -> list:
    """Every rank's `value`, in rank order, on every rank (an all-gather; [value] in a world of
    one)."""
    if world_size <= 1:
        return [value]
    gathered: list = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def start_fresh(folder: str | Path, rank: int = 0, world_size: int = 1) -> None:
    """Prepare the run folder for a fresh start (`--overwrite`, or a run from step 0): rank 0
    deletes a previous run's files (run_items: metrics, TensorBoard, every checkpoint with
    checkpoints/best/, the config and a resume's earlier configs); other files there are left
    alone. The other ranks delete nothing and, in a process group of `world_size` > 1, wait for
    rank 0's outcome: a failure to delete raises on every rank."""
    failure = None
    if rank == 0:
        try:
            for item in run_items(folder):
                if item.is_dir():
                    shutil.rmtree(item)
                elif item.exists():
                    item.unlink()
        except OSError as error:  # every rank raises it, none waits for rank 0 in vain
            failure = f"output.dir: could not clear the previous run's files: {error}"
    if world_size > 1:
        failure = rank_zero_value(failure, world_size)  # also the barrier
    if failure:
        raise OSError(failure)


def warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def launched_rank(variable: str = "RANK") -> int:
    """This process's rank under a launcher, read before the process group exists (RANK;
    LOCAL_RANK: its rank on its node), 0 when not launched (or the variable is not a number:
    the launcher's own check reports that)."""
    value = os.environ.get(variable, "").strip()
    return int(value) if value.isdigit() else 0


def launched_world_size() -> int:
    """The launcher's WORLD_SIZE (1 when not set); a ConfigError naming it when it is not a
    whole number of at least 1 (it was "invalid literal for int()")."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not (text.strip().isdigit() and int(text) >= 1):
        raise ConfigError(f"WORLD_SIZE: must be a whole number of at least 1, got {text!r}")
    return int(text)


def say_at_start(message: str) -> None:
    """A start-up line on stderr, "luffy-fast: <message>", from the launcher's rank 0 or an
    unlaunched process."""
    if launched_rank() == 0:
        print(f"luffy-fast: {message}", file=sys.stderr, flush=True)


def warn_at_start(message: str) -> None:
    """A start-up warning, once per run: from the launcher's rank 0 or an unlaunched process."""
    if launched_rank() == 0:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def say(lead: bool, run_dir: Path, message: str) -> None:
    """A start-up line on stderr from rank 0 (`lead`), prefixed with the run's folder name."""
    if lead:
        print(f"{Path(run_dir).name}: {message}", file=sys.stderr, flush=True)


def write_run_config(run_dir: Path, config, latest: Optional[Path], start_step: int,
                     saved: Optional[dict]) -> None:
    """config.yaml: the run's settings (a LuffyTrainConfig). Resuming from the checkpoint
    `latest` (its trainer state: `saved`), say so; where the settings changed since the
    checkpoint's, name each change and keep the earlier ones as config.until-step-<N>.yaml."""
    path = Path(run_dir) / "config.yaml"
    if latest is not None:
        say(True, run_dir, f"resuming from step {start_step} ({latest})")
        earlier = saved.get("config") or {}
        changes = changed_settings(earlier, config.to_dict())
        if changes:
            kept = path.with_name(f"config.until-step-{start_step}.yaml")
            write_atomic(kept, yaml.safe_dump(earlier, sort_keys=False))
            warn(f"resuming from step {start_step} with changed settings: {'; '.join(changes)} "
                 f"(the earlier settings: {kept})")
    write_atomic(path, config.to_yaml())
