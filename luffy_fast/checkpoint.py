"""Checkpoints in `output.dir/checkpoints/`: save, publish atomically, find the latest, load, prune.

A checkpoint is written to a staging folder, renamed into place, and only then is the `latest`
pointer replaced (write + rename), so a crash mid-save never corrupts `latest`
(docs/design.md §The trainer). Each `step-N/` holds the DeepSpeed state (`deepspeed/`), a
transformers export (`hf/`, model and tokenizer) and `trainer_state.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from luffy_fast.distributed import gathered_parameters
from luffy_fast.errors import ConfigError


def ensure_writable_dir(path: str | Path, key: str = "output.dir") -> Path:
    """Create `path` if needed and prove it is writable, or raise naming the cause."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{key}: {str(path)!r} is not writable "
                          f"({error.strerror or error})") from None
    return path


def write_atomic(path: Path, text: str) -> None:
    """Replace `path`'s contents in one step: readers see the old text or the new, never half."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


class CheckpointManager:
    """The checkpoints under `root`; rank 0 writes the files, every rank its DeepSpeed shard."""

    def __init__(self, root: Path, keep: int, rank: int = 0, world_size: int = 1) -> None:
        self.root = Path(root)
        self.keep = keep
        self.rank, self.world_size = rank, world_size

    def save(self, engine, tokenizer, step: int, config: dict, zero_stage: int,
             extra_state: Optional[dict] = None) -> Path:
        """DeepSpeed state + transformers export + trainer state of `engine` (its module holds
        the transformers model as `.policy`), published atomically as `step-N`."""
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:06d}"
        staging = root / f".staging-step-{step:06d}"
        if self.rank == 0 and staging.exists():
            shutil.rmtree(staging)
        self._barrier()
        engine.save_checkpoint(str(staging), tag="deepspeed", save_latest=False)
        policy = engine.module.policy
        with gathered_parameters(policy.parameters(), zero_stage):
            state = {name: tensor.detach().cpu().clone()
                     for name, tensor in policy.state_dict().items()}
        if self.rank == 0:
            policy.save_pretrained(staging / "hf", state_dict=state)
            tokenizer.save_pretrained(staging / "hf")
            (staging / "trainer_state.json").write_text(json.dumps(
                {"step": step, "config": config, **(extra_state or {})}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            write_atomic(root / "latest", final.name + "\n")
            self.prune(keep=final.name)
        self._barrier()
        return final

    def prune(self, keep: str) -> None:
        """Delete all but the newest `self.keep` checkpoints (never the one named `keep`)."""
        saved = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in saved[:-self.keep]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        """The checkpoint `latest` points to, if it is complete."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "trainer_state.json").exists() else None

    @staticmethod
    def load(engine, path: Path) -> int:
        """Restore the DeepSpeed state (weights, optimizer, LR schedule); returns the step."""
        load_path, _ = engine.load_checkpoint(str(path), tag="deepspeed")
        if load_path is None:
            raise RuntimeError(f"could not load the DeepSpeed state from {path}")
        return int(json.loads((path / "trainer_state.json").read_text())["step"])

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()
