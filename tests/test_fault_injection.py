"""Faults injected at the exact point where they strike (docs/robustness.md, one test per row):
torn metrics lines, a broken `latest`, non-finite losses, a full disk, stale temporary files,
a restart from step 0, the grad norm at ZeRO-0 and the plain progress lines."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import subprocess
import warnings

import pytest
import torch

from helpers import tiny_config
from luffy_fast.checkpoint import CheckpointManager
from luffy_fast.metrics import MetricsLogger, ProgressLog, read_metrics
from luffy_fast.nonfinite import NonFiniteTrainingError, optimizer_step
from luffy_fast.run_files import DiskFullError, ensure_writable_dir, start_fresh, write_atomic
from luffy_fast.trainer import LuffyTrainer

DEAD_PID = 2**22 + 12345  # above Linux's pid_max: never a live process


def strict_rows(path) -> list[dict]:
    """Every line parsed as strict JSON (bare NaN / Infinity rejected)."""
    def reject(name):
        raise AssertionError(f"bare {name} in {path}")
    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def trainer(tmp_path, *overrides) -> LuffyTrainer:
    return LuffyTrainer(tiny_config(tmp_path, "eval.every=0", *overrides))


def weights(run: LuffyTrainer) -> dict:
    return {n: p.detach().clone() for n, p in run.engine.module.policy.named_parameters()}


# --------------------------------------------------------------------- 1. torn metrics line

def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    rows = [{"step": 0, "x": 1.0}, {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 41, "loss": 0.1')
    with pytest.warns(RuntimeWarning, match=r"line 4 is not a complete JSON object"):
        logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=2)
    logger.log({"step": 3, "loss": 0.125})
    assert strict_rows(path) == rows + [{"step": 3, "loss": 0.125}]


# --------------------------------------------------------------------- 2. a broken `latest`

def fake_checkpoints(root, steps, complete=True):
    for step in steps:
        folder = root / f"step-{step:06d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return CheckpointManager(root, keep=2)


@pytest.mark.parametrize("pointer", ["step-000009\n", "", "\n", "step-000004\n"])
def test_broken_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, pointer):
    manager = fake_checkpoints(tmp_path, [2, 3])
    fake_checkpoints(tmp_path, [4], complete=False)  # a folder without its trainer state
    (tmp_path / "latest").write_text(pointer)
    with pytest.warns(RuntimeWarning, match="resuming from the newest complete one, step-000003"):
        assert manager.latest() == tmp_path / "step-000003"


def test_broken_latest_without_any_checkpoint_is_an_error(tmp_path):
    manager = fake_checkpoints(tmp_path, [])
    (tmp_path / "latest").write_text("step-000005\n")
    with pytest.raises(RuntimeError, match=r"points to 'step-000005'.*no complete step-\* folder"):
        manager.latest()


def test_resume_without_any_checkpoint_says_it_starts_over(tmp_path):
    manager = fake_checkpoints(tmp_path / "checkpoints", [])  # a fresh start clears tmp_path
    with pytest.warns(RuntimeWarning, match="no checkpoint to resume from; starting from step 0"):
        assert manager.resume_point(resume=True) is None


def test_resume_with_a_broken_latest_and_a_torn_line_continues_the_run(tmp_path):
    """End to end: the run's own metrics up to the checkpoint are kept, not truncated."""
    first = trainer(tmp_path, "train.steps=2", "output.save_every=1", "output.keep_checkpoints=2")
    first.train()
    before = read_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "checkpoints" / "latest").write_text("step-000007\n")  # a folder that is gone
    with (tmp_path / "metrics.jsonl").open("a") as out:
        out.write('{"step": 41, "loss": 0.1')
    resumed = trainer(tmp_path, "train.steps=3", "output.save_every=1")
    with pytest.warns(RuntimeWarning):
        resumed.train(resume=True)
    after = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in after] == [1, 2, 3]
    assert after[:2] == before
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000003\n"


# --------------------------------------------------------------------- 3. non-finite steps

def nan_loss_on(run: LuffyTrainer, calls: set[int]):
    """Make the policy's loss NaN on the given forward calls (counted from 0)."""
    module = run.engine.module
    real = module.forward
    count = {"n": 0}

    def forward(micro, *args, **kwargs):
        out = real(micro, *args, **kwargs)
        if kwargs.get("logprobs_only") or (args and args[0]):
            return out
        index, count["n"] = count["n"], count["n"] + 1
        if index in calls:
            loss, stats = out
            return loss * math.nan, stats
        return out

    module.forward = forward


@pytest.mark.parametrize("zero_stage, precision", [(0, "fp32"), (2, "fp32"), (0, "bf16")])
def test_a_nan_loss_skips_the_update_and_is_logged_as_null(tmp_path, zero_stage, precision,
                                                          capsys):
    """fp32 ZeRO-0 skips in CheckedAdamW, ZeRO-2 and bf16 (the GPU default) in DeepSpeed's own
    optimizers: the same outcome."""
    run = trainer(tmp_path, f"train.zero_stage={zero_stage}", f"model.precision={precision}",
                  "train.steps=3",
                  "output.save_every=1", "output.keep_checkpoints=1", "output.log_every=1",
                  "optim.lr=1e-2")
    steps = {}
    real_step = run.training_step

    def recording_step(step):
        result = real_step(step)
        steps[step + 1] = weights(run)
        return result

    run.training_step = recording_step
    nan_loss_on(run, calls={0})  # the first micro-batch of step 1
    with pytest.warns(RuntimeWarning, match="optimizer step skipped"):
        history = run.train()
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert [r["nonfinite/skipped_steps"] for r in rows] == [1, 0, 0]
    assert rows[0]["loss"] is None and rows[0]["grad_norm"] is None
    assert all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in rows[1:])
    assert history[0]["nonfinite/skipped_steps"] == 1
    # no update at step 1: the weights are the initial ones, which step 2 then changes
    assert all(torch.isfinite(t).all() for t in steps[3].values())
    changed = [n for n in steps[1] if not torch.equal(steps[1][n], steps[2][n])]
    assert changed, "step 2 must update the weights"
    # the LR schedule counted only the applied optimizer steps
    assert run.scheduler.last_epoch == 2
    assert "step 1/3 |" in capsys.readouterr().out  # plain progress lines, no terminal


def test_the_skipped_step_leaves_the_weights_untouched(tmp_path):
    run = trainer(tmp_path, "train.steps=1", "optim.lr=1e-2")
    before = weights(run)
    nan_loss_on(run, calls={0})
    with pytest.warns(RuntimeWarning, match="optimizer step skipped"):
        run.train()
    after = weights(run)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert run.engine.skipped_steps == 1


def test_a_nonfinite_hidden_state_skips_the_step_instead_of_stopping_the_run(tmp_path):
    """The trainer turns off the op's own finiteness check (a ValueError naming `hidden`): a NaN
    from the policy's weights gives a NaN loss, and the guard skips that optimizer step."""
    from helpers import rollout_batch

    run = trainer(tmp_path, "train.steps=1")
    batch = rollout_batch(run)
    with torch.no_grad():
        run.engine.module.policy.model.norm.weight[0] = math.nan  # every hidden state's first
    result = run.accumulate_gradients(batch, list(range(len(batch))), None)
    assert math.isnan(result["loss"])
    with pytest.warns(RuntimeWarning, match="optimizer step skipped"):
        assert math.isnan(run.nonfinite.optimizer_step(run.engine, 1))
    assert run.engine.skipped_steps == 1


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    run = trainer(tmp_path, "train.steps=5", "output.save_every=1", "output.keep_checkpoints=1",
                  "train.max_nonfinite_steps=2")
    nan_loss_on(run, calls=set(range(1000)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(NonFiniteTrainingError, match=r"2 optimizer steps in a row .*"
                                                         r"train.max_nonfinite_steps = 2"):
            run.train()
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1]  # step 2 raised before it was logged
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-000001"  # the last published weights are the finite initial ones


def test_skipped_steps_in_a_row_count_across_a_resume(tmp_path):
    """The count of skipped steps in a row was not checkpointed: a resumed run restarted it at
    0, so a run pre-empted every few steps never reached train.max_nonfinite_steps; and the
    first resumed step's warnings named step 1."""
    first = trainer(tmp_path, "train.steps=2", "output.save_every=1",
                    "train.max_nonfinite_steps=3")
    nan_loss_on(first, calls=set(range(1000)))
    with pytest.warns(RuntimeWarning, match=r"^step 2: non-finite .* \(2 in a row, 2 in all\)"):
        first.train()
    first.close()
    resumed = trainer(tmp_path, "train.steps=5", "output.save_every=1",
                      "train.max_nonfinite_steps=3")
    nan_loss_on(resumed, calls=set(range(1000)))
    with pytest.warns(RuntimeWarning, match=r"^step 3: non-finite .* \(3 in a row, 3 in all\)"):
        with pytest.raises(NonFiniteTrainingError, match=r"^step 3: 3 optimizer steps in a row"):
            resumed.train(resume=True)
    resumed.close()


def test_nonfinite_weights_are_never_published(tmp_path):
    run = trainer(tmp_path, "train.steps=1")
    with torch.no_grad():
        next(run.engine.module.policy.parameters()).view(-1)[0] = math.nan
    with pytest.raises(RuntimeError, match="non-finite values .*checkpoint not published"):
        run.checkpoints.save(run.engine, run.tokenizer, 1, {})
    assert not (tmp_path / "checkpoints" / "latest").exists()
    assert not list((tmp_path / "checkpoints").glob("*step-*"))


def test_metrics_write_null_for_nonfinite_values(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"step": 1, "loss": math.nan, "grad_norm": math.inf, "n": 3})
    assert strict_rows(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": None, "grad_norm": None, "n": 3}]


# --------------------------------------------------------------------- 5. a full disk

def test_full_disk_during_a_checkpoint_names_the_folder(tmp_path, monkeypatch):
    run = trainer(tmp_path, "train.steps=1")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run.engine, "save_checkpoint", no_space)
    with pytest.raises(DiskFullError, match=r"no space left on device while writing checkpoint "
                                            r"step 1 to '.*\.staging-step-000001'"):
        run.checkpoints.save(run.engine, run.tokenizer, 1, {})
    assert not list((tmp_path / "checkpoints").iterdir())  # no staging folder left behind


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 600 KiB file system (root only): one tiny checkpoint fits, a second does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
            capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_really_full_disk_keeps_the_last_checkpoint(small_tmpfs):
    run = trainer(small_tmpfs, "train.steps=2", "output.save_every=1",
                  "output.keep_checkpoints=2", "output.tensorboard=false")
    with pytest.raises(DiskFullError, match=r"no space left on device .*step 2"):
        run.train()
    root = small_tmpfs / "checkpoints"
    assert (root / "latest").read_text() == "step-000001\n"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]
    assert not [p for p in small_tmpfs.rglob(".*") if "tmp-" in p.name or "probe" in p.name]
    assert [r["step"] for r in strict_rows(small_tmpfs / "metrics.jsonl")] == [1, 2]


def test_full_disk_while_logging_names_the_metrics_file(tmp_path, monkeypatch):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    real_open = type(logger.path).open

    def full_open(self, *args, **kwargs):
        if self == logger.path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(type(logger.path), "open", full_open)
    with pytest.raises(DiskFullError, match=r"no space left on device while writing metrics to "
                                            r"'.*metrics.jsonl'"):
        logger.log({"step": 1})


def test_failed_atomic_write_and_probe_leave_no_temporary_files(tmp_path, monkeypatch):
    real_write_text = type(tmp_path).write_text

    def full_write(self, *args, **kwargs):
        real_write_text(self, "")  # the file is created, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(type(tmp_path), "write_text", full_write)
    with pytest.raises(DiskFullError, match="no space left on device"):
        write_atomic(tmp_path / "latest", "step-000001\n")
    with pytest.raises(DiskFullError, match="no space left on device"):
        ensure_writable_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_and_temporary_files_are_cleaned_at_start_up(tmp_path):
    first = trainer(tmp_path, "train.steps=1")
    first.train()
    root = tmp_path / "checkpoints"
    (root / ".staging-step-000002" / "deepspeed").mkdir(parents=True)
    (root / "best" / ".staging-step-000001").mkdir(parents=True)  # the best checkpoint's
    stale = [root / f".latest.tmp-{DEAD_PID}", tmp_path / f".write-probe-{DEAD_PID}",
             root / "best" / f".best.json.tmp-{DEAD_PID}"]
    live = root / f".notes.tmp-{os.getpid()}"  # a live writer's file is left alone
    for path in [*stale, live]:
        path.write_text("x")
    resumed = trainer(tmp_path, "train.steps=2")
    resumed.train(resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (root / ".staging-step-000002").exists()
    assert not (root / "best" / ".staging-step-000001").exists()
    assert not any(p.exists() for p in stale) and live.exists()


# --------------------------------------------------------------------- 8. restart from step 0

def test_restart_from_step_zero_does_not_duplicate_tensorboard_points(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for steps in (3, 2):  # a first run, then a fresh start over it
        start_fresh(tmp_path)  # as the trainer's start does (CheckpointManager.resume_point)
        logger = MetricsLogger(tmp_path, tensorboard=True)
        for step in range(1, steps + 1):
            logger.log({"step": step, "loss": float(step)})
        logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0)]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


# --------------------------------------------------------------------- 9. observability

def test_grad_norm_at_every_zero_stage_equals_the_gradients_norm(tmp_path):
    """The norm logged at ZeRO-0, 1, 2 and 3 is the 2-norm of the accumulated gradient of the
    same batch (the oracle: taken from the parameters' .grad at ZeRO-0, before the step)."""
    from helpers import rollout_batch
    from luffy_fast.distributed import gathered_parameters

    norms, updated, expected = {}, {}, None
    for zero_stage in (0, 1, 2, 3):
        run = trainer(tmp_path / str(zero_stage), f"train.zero_stage={zero_stage}",
                      "optim.grad_clip=1e-3", "optim.eps=1e-4")
        batch = rollout_batch(run)
        run.accumulate_gradients(batch, list(range(len(batch))), None)
        if zero_stage == 0:
            grads = [p.grad for p in run.engine.module.parameters() if p.grad is not None]
            expected = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        norm, applied = optimizer_step(run.engine)
        assert applied
        norms[zero_stage] = norm
        parameters = list(run.engine.module.policy.parameters())
        with gathered_parameters(parameters, zero_stage):
            updated[zero_stage] = torch.cat([p.detach().flatten().clone() for p in parameters])
        run.close()
    assert norms == pytest.approx({stage: expected for stage in norms}, rel=1e-5)
    assert expected > 100 * 1e-3  # the clip is far below the norm: the update depends on it
    # the same clipped update at every stage (with eps 1e-4, Adam's first step depends on the
    # gradient's scale): DeepSpeed clips at ZeRO-1/2/3, CheckedAdamW at ZeRO-0
    for stage in (1, 2, 3):
        torch.testing.assert_close(updated[stage], updated[0], rtol=1e-5, atol=1e-7)


def test_checked_adamw_steps_as_adamw_on_the_clipped_gradient():
    """CheckedAdamW(max_norm) = torch's AdamW on gradients scaled to max_norm (the oracle: the
    clipping done by hand), over two steps with gradients of different norms."""
    from luffy_fast.nonfinite import CheckedAdamW

    start = torch.tensor([1.0, -2.0, 0.5])
    steps = [torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, -0.1, 0.2])]
    mine, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    checked = CheckedAdamW([mine], max_norm=1.0, lr=0.1, eps=1.0, weight_decay=0.0)
    plain = torch.optim.AdamW([theirs], lr=0.1, eps=1.0, weight_decay=0.0)
    for grad in steps:
        mine.grad, theirs.grad = grad.clone(), grad * min(1.0, 1.0 / float(grad.norm()))
        checked.step()
        plain.step()
        assert checked._global_grad_norm == pytest.approx(float(grad.norm()))
        torch.testing.assert_close(mine.grad, theirs.grad)  # clipped in place
        torch.testing.assert_close(mine, theirs)


def test_plain_progress_lines_every_n_steps():
    out = io.StringIO()
    log = ProgressLog(every=2, total=5, start_step=0, stream=out)
    for step in range(1, 6):
        log.step(step, {"loss": 0.5 / step, "grad_norm": None})
    lines = out.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    assert "loss 0.25" in lines[0] and "grad_norm None" in lines[0]
    assert not ProgressLog.bar_wanted(True)  # pytest's stderr is not a terminal
    named = io.StringIO()
    ProgressLog(every=1, total=1, start_step=0, stream=named, name="luffy").step(1, {"loss": 1.0})
    assert named.getvalue().startswith("luffy: step 1/1 | loss 1")


def test_every_row_of_the_robustness_table_names_tests_that_exist():
    """docs/robustness.md: each row names its tests; each name is a test in the files below."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    rows = [line for line in (root / "docs" / "robustness.md").read_text().splitlines()
            if re.match(r"\| (\d+|E) \|", line)]
    defined = set()
    for name in ("test_fault_injection.py", "test_cli_errors.py", "test_op_nonfinite.py",
                 "test_trainer.py", "test_validation.py", "test_dry_run.py", "test_reward_pool.py",
                 "test_train_config.py", "test_trainer_parts.py", "test_op_backends.py",
                 "test_eval_resume.py"):
        defined |= set(re.findall(r"^def (test_\w+)", (root / "tests" / name).read_text(), re.M))
    assert len(rows) >= 20
    for row in rows:
        named = re.findall(r"`(test_\w+)`", row.rsplit("|", 2)[-2])
        assert named and set(named) <= defined, row
