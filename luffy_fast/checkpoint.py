"""Checkpoints in `output.dir/checkpoints/`: save, publish atomically, find the latest, load, prune.

A checkpoint is written to a staging folder, renamed into place, and only then is the `latest`
pointer replaced (write + rename), so a crash mid-save never corrupts `latest`
(docs/design.md §The trainer). Each `step-N/` holds the DeepSpeed state (`deepspeed/`), a
transformers export (`hf/`, model and tokenizer) and `trainer_state.json`. The regular
checkpoint of a step whose state was just saved as the best hard-links the best one's files
instead of serializing the model again.

Faults (docs/robustness.md): weights with a non-finite value are never published; a full disk
raises DiskFullError naming the folder and leaves no staging folder; start-up removes stale
staging folders and temporary files; a `latest` that is missing its folder, or empty, falls back
to the newest complete checkpoint with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from luffy_fast.distributed import gathered_parameters
from luffy_fast.errors import ConfigError
from luffy_fast.rollout.weights import size_capped
from luffy_fast.run_files import (
    link_tree,
    naming_full_disk,
    remove_stale_temporaries,
    start_fresh,
    warn,
    write_atomic,
)


class NonFiniteWeightsError(RuntimeError):
    """The weights to save hold NaN or inf: the checkpoint is not published."""


class NoCheckpointError(RuntimeError):
    """`--resume` found a `latest` pointer but no complete checkpoint to resume from."""


def read_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint folder's trainer_state.json: its step, the run's config and the sampler's
    position (read once on resume, for the sampler check before the DeepSpeed load and for load)."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


class CheckpointManager:
    """The checkpoints under `root` (a run folder's `checkpoints/`, or its `checkpoints/best/`);
    rank 0 writes the files, every rank its DeepSpeed shard."""

    def __init__(self, root: Path, keep: int, rank: int = 0, world_size: int = 1,
                 bucket_mb: float = 256) -> None:
        self.root = Path(root)
        self.keep = keep
        self.rank, self.world_size = rank, world_size
        self.bucket_mb = bucket_mb  # ZeRO-3: full-size weights gathered at once for the export

    def remove_stale_files(self) -> None:
        """Start-up clean-up (rank 0, before any save): staging folders of interrupted saves
        and temporary files of dead processes."""
        if self.rank != 0:
            return
        folders = [self.root, *(p for p in self.root.glob("*") if p.is_dir()  # e.g. best/
                                and not p.name.startswith(("step-", ".staging-")))]
        for folder in folders:
            for staging in folder.glob(".staging-*"):
                shutil.rmtree(staging, ignore_errors=True)
            remove_stale_temporaries(folder)
        remove_stale_temporaries(self.root.parent)  # the run folder: metrics, write probes

    def save(self, engine, tokenizer, step: int, config: dict,
             extra_state: Optional[dict] = None, link_from: Optional[Path] = None) -> Path:
        """DeepSpeed state + transformers export + trainer state of `engine` (its module holds
        the transformers model as `.policy`), published atomically as `step-N`. `link_from`: a
        checkpoint of this very state (the best one of this step, Validation.keep_best), whose
        files the new folder hard-links (copies where links fail) instead of serializing the
        model again, so either stays whole when the other is pruned; every rank passes the
        same."""
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:06d}"
        staging = root / f".staging-step-{step:06d}"
        if self.rank == 0 and staging.exists():
            shutil.rmtree(staging)
        self._barrier()
        zero_stage = engine.zero_optimization_stage()
        # the weights were gathered and checked for the linked checkpoint's save
        state = self._host_weights(engine, step, zero_stage) if link_from is None else None

        def write() -> None:
            if link_from is None:
                self._write(engine, tokenizer, state, staging)
            elif self.rank == 0:  # every rank's DeepSpeed shard is among the files linked
                link_tree(link_from, staging, skip=("trainer_state.json",))
            if self.rank == 0:
                (staging / "trainer_state.json").write_text(json.dumps(
                    {"step": step, "config": config, "world_size": self.world_size,
                     "zero_stage": zero_stage, "bf16": bool(engine.bfloat16_enabled()),
                     **(extra_state or {})}, indent=1))

        try:
            naming_full_disk(staging, f"checkpoint step {step}", write)
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            write_atomic(root / "latest", final.name + "\n")
            self.prune(keep=final.name)
        self._barrier()
        return final

    def _host_weights(self, engine, step: int, zero_stage: int) -> Optional[dict]:
        """The policy's weights (its state_dict) on the host for rank 0's export (None on the
        other ranks), or NonFiniteWeightsError when one holds NaN or inf. At ZeRO-3 they are
        gathered `bucket_mb` at a time (the run's rollout.vllm.sync_bucket_mb, as for the weight
        sync): the whole model at once on every GPU, beside vLLM's memory, is what a 7B model
        cannot afford."""
        state, bad = ({} if self.rank == 0 else None), []
        for bucket in size_capped(engine.module.policy.state_dict(keep_vars=True).items(),
                                  self.bucket_mb * 2**20):
            with gathered_parameters(unique_parameters(bucket), zero_stage):
                for name, tensor in bucket:
                    # checked on the device by every rank (the same gathered weights: all raise
                    # together); only rank 0, which writes the export, copies them to the host
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        bad.append(name)
                    elif state is not None and not bad:
                        state[name] = tensor.detach().cpu().clone()
        if bad:
            raise NonFiniteWeightsError(f"step {step}: the weights hold non-finite values "
                                        f"({', '.join(bad[:3])}...); checkpoint not published")
        return state

    def _write(self, engine, tokenizer, state: Optional[dict], staging: Path) -> None:
        engine.save_checkpoint(str(staging), tag="deepspeed", save_latest=False)
        if self.rank == 0:
            engine.module.policy.save_pretrained(staging / "hf", state_dict=state)
            tokenizer.save_pretrained(staging / "hf")

    def prune(self, keep: str) -> None:
        """Delete all but the newest `self.keep` checkpoints (never the one named `keep`)."""
        saved = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in saved[:-self.keep]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """The complete checkpoint folders (with their trainer_state.json), oldest first."""
        return sorted(p for p in self.root.glob("step-*") if (p / "trainer_state.json").is_file())

    def latest(self) -> Optional[Path]:
        """The checkpoint to resume from: the one `latest` points to; if that pointer is empty
        or names a missing or incomplete folder, the newest complete checkpoint, with a warning
        (NoCheckpointError when there is none); None when no checkpoint was ever published."""
        pointer = self.root / "latest"
        complete = self.complete()
        if not pointer.exists():
            if complete:
                warn(f"{self.root}: no `latest` pointer; resuming from the newest complete "
                     f"checkpoint {complete[-1].name}")
                return complete[-1]
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if name and "/" not in name and (path / "trainer_state.json").is_file():
            return path
        if not complete:
            raise NoCheckpointError(
                f"{pointer}: points to {name or '(nothing)'!r}, which is not a complete "
                f"checkpoint, and no complete step-* folder is left in {self.root}; "
                f"run without --resume (with --overwrite) to start over")
        warn(f"{pointer}: points to {name or '(nothing)'!r}, which is not a complete "
             f"checkpoint; resuming from the newest complete one, {complete[-1].name}")
        return complete[-1]

    def resume_point(self, resume: bool) -> Optional[Path]:
        """Start-up: stale files removed; with `resume`, the checkpoint to continue from
        (`latest`); without it, or with no checkpoint yet, None and the run folder (this root's
        parent) prepared for a fresh start by run_files.start_fresh: a fresh start replaces an
        old run's checkpoints, best checkpoint, metrics and TensorBoard."""
        self.remove_stale_files()
        latest = self.latest() if resume else None
        if latest is None:
            if resume and self.rank == 0:
                warn(f"{self.root}: no checkpoint to resume from; starting from step 0")
            start_fresh(self.root.parent, self.rank, self.world_size)
        return latest

    def resume(self, engine, resume: bool, check: Callable[[dict], None]
               ) -> tuple[Optional[Path], int, Optional[dict]]:
        """`resume_point`, then the DeepSpeed state of the checkpoint it names, if any, after
        `check` (the trainer's test of its trainer state, cheap: before the load). Returns the
        checkpoint, its step (0 without one) and its trainer state."""
        latest = self.resume_point(resume)
        if latest is None:
            return None, 0, None
        saved = read_trainer_state(latest)  # read once
        check(saved)
        self.check_ranks(saved, engine.zero_optimization_stage(), latest)
        check_optimizer_layout(saved, engine.zero_optimization_stage(),
                               bool(engine.bfloat16_enabled()), latest)
        return latest, self.load(engine, latest, saved), saved

    def check_ranks(self, saved: dict, zero_stage: int, path: Path) -> None:
        """DeepSpeed loads ZeRO-1/2/3 optimizer states only on the number of ranks that
        partitioned them (ZeRO-0 states load on any): a clear error before the load."""
        ranks, stage = saved.get("world_size"), saved.get("zero_stage", 0)
        if ranks is not None and ranks != self.world_size and stage:
            raise ConfigError(f"train.zero_stage: {path} was saved by {ranks} rank(s) at "
                              f"ZeRO-{stage}, and DeepSpeed cannot load its partitioned "
                              f"optimizer states on {self.world_size} (this run: "
                              f"ZeRO-{zero_stage}): resume with {ranks} rank(s)")

    @staticmethod
    def load(engine, path: Path, trainer_state: Optional[dict] = None) -> int:
        """Restore the DeepSpeed state (weights, optimizer, LR schedule); returns the step, from
        `trainer_state` (the folder's, already read) or else from the folder."""
        trainer_state = read_trainer_state(path) if trainer_state is None else trainer_state
        load_path, _ = engine.load_checkpoint(str(path), tag="deepspeed")
        if load_path is None:
            raise RuntimeError(f"could not load the DeepSpeed state from {path}")
        return int(trainer_state["step"])

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def unique_parameters(bucket: list[tuple[str, Tensor]]) -> list[nn.Parameter]:
    """The bucket's parameters, each once (a tied weight is under two names), buffers left out."""
    return list({id(t): t for _, t in bucket if isinstance(t, nn.Parameter)}.values())


def check_optimizer_layout(saved: dict, zero_stage: int, bf16: bool, path: Path) -> None:
    """DeepSpeed's optimizer states differ by ZeRO stage (1 and 2 share theirs) and by bf16 or
    not; its load of another layout fails in its own code (a KeyError, a missing file): a clear
    error before the load. A checkpoint that does not record its stage is checked by its
    settings' `train.zero_stage`, one that does not record `bf16` by stage alone."""
    settings = saved.get("config") or {}
    stage = saved.get("zero_stage", settings.get("train", {}).get("zero_stage", zero_stage))
    toy = settings.get("model", {}).get("path") == "toy"
    weights = "" if toy else f", or start a new run from its weights: model.path={path / 'hf'}"
    if {stage, zero_stage} != {1, 2} and stage != zero_stage:
        raise ConfigError(f"train.zero_stage: {path} was saved at ZeRO-{stage}, and DeepSpeed "
                          f"cannot load its optimizer states at ZeRO-{zero_stage} (only ZeRO-1 "
                          f"and 2 load each other's): resume with train.zero_stage={stage}"
                          f"{weights}")
    precision = {True: "bf16", False: "fp32"}
    if saved.get("bf16", bf16) != bf16:
        raise ConfigError(f"model.precision: {path} was saved in {precision[saved['bf16']]}, "
                          f"and DeepSpeed cannot load its optimizer states in {precision[bf16]}:"
                          f" resume with model.precision={precision[saved['bf16']]}{weights}")
