"""The command line's contract (docs/robustness.md): a user-caused failure is one message naming
the input and exit code 2 (a traceback only with --debug); an existing run folder needs --resume
or --overwrite; flags may follow the dotted overrides."""

from __future__ import annotations

import os

import pytest

from helpers import tiny_config
from luffy_fast import cli
from luffy_fast.cli import main
from luffy_fast.errors import ConfigError
from luffy_fast.metrics import read_metrics
from luffy_fast.run_files import launched_world_size


def config_file(tmp_path, *overrides) -> tuple[str, object]:
    out = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(tiny_config(out, "eval.every=0", "output.save_every=1", *overrides).to_yaml())
    return str(path), out


def test_flags_are_accepted_after_the_overrides(capsys):
    args = cli._parse(["train", "--config", "c.yaml", "optim.lr=1e-3", "--overwrite",
                       "train.steps=5", "--dry-run"])
    assert args.overwrite and args.dry_run and not args.resume
    assert args.overrides == ["optim.lr=1e-3", "train.steps=5"]
    args = cli._parse(["--resume", "train", "--config", "c.yaml", "optim.lr=1e-3"])
    assert args.resume and not args.overwrite and args.overrides == ["optim.lr=1e-3"]
    args = cli._parse(["--overwrite", "train", "--config", "c.yaml"])
    assert args.overwrite and not args.resume and args.overrides == []
    for flag in ("--bogus", "--optim.lr=1e-3"):  # a flag with "=" is no override either
        with pytest.raises(SystemExit) as exit_info:
            cli._parse(["train", "--config", "c.yaml", "a=1", flag])
        assert exit_info.value.code == 2
        assert f"error: unrecognized arguments: {flag}\n" in capsys.readouterr().err
    # the DeepSpeed launcher's flag, before the command (`deepspeed --module luffy_fast train`)
    args = cli._parse(["--local_rank=3", "train", "--config", "c.yaml", "a=1", "--local-rank=3"])
    assert args.command == "train" and args.overrides == ["a=1"]


def test_contradictory_flags_and_impossible_world_sizes_are_refused(capsys, monkeypatch):
    """--resume --overwrite resumed and ignored --overwrite; --world-size -2 planned negative
    memory and 0 became 1; WORLD_SIZE=abc was "invalid literal for int()"."""
    for argv, message in (
            (["train", "--config", "c.yaml", "--resume", "a=1", "--overwrite"],
             "--resume and --overwrite contradict each other"),
            (["train", "--config", "c.yaml", "--dry-run", "--world-size", "0"],
             "--world-size: must be at least 1, got 0")):
        with pytest.raises(SystemExit) as exit_info:
            cli._parse(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    for value in ("abc", "0", "-2"):
        monkeypatch.setenv("WORLD_SIZE", value)
        with pytest.raises(ConfigError, match=rf"^WORLD_SIZE: must be a whole number of at least "
                                              rf"1, got '{value}'$"):
            launched_world_size()
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert launched_world_size() == 8


def test_a_folder_in_use_by_another_run_is_refused(tmp_path, capsys):
    """A second run in the same output.dir while the first holds it (here: this process holds
    the lock, as the ranks of an interrupted launch would) exits 2 and touches nothing."""
    from luffy_fast.run_files import claim_run_dir

    config, out = config_file(tmp_path, "train.steps=1")
    with claim_run_dir(out):
        assert main(["train", "--config", config]) == 2
        error = capsys.readouterr().err
        assert f"output.dir: '{out}' is in use by another run (process {os.getpid()})" in error
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
        with claim_run_dir(out, rank=1):  # the other ranks leave the lock to rank 0
            pass
    assert main(["train", "--config", config]) == 0  # released: the run goes ahead
    assert main(["train", "--config", config, "train.steps=2", "--resume"]) == 0  # and again


def test_an_existing_run_folder_needs_resume_or_overwrite(tmp_path, capsys):
    config, out = config_file(tmp_path, "train.steps=2", "output.tensorboard=true")
    assert main(["train", "--config", config]) == 0
    first = read_metrics(out / "metrics.jsonl")
    capsys.readouterr()

    assert main(["train", "--config", config, "train.steps=1"]) == 2
    error = capsys.readouterr().err
    assert f"output.dir: '{out}' already holds a run" in error and "Traceback" not in error
    assert read_metrics(out / "metrics.jsonl") == first  # nothing touched

    # --resume placed after the overrides continues the run from its step-2 checkpoint
    assert main(["train", "--config", config, "train.steps=3", "--resume"]) == 0
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[:2] == first

    # --overwrite replaces it: a one-step run, one checkpoint, the old ones gone
    assert main(["train", "--config", config, "train.steps=1", "--overwrite"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000001"]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # old ones gone
    again = read_metrics(out / "metrics.jsonl")[0]
    assert again["loss"] == first[0]["loss"]  # the same seeded first step, from scratch


def test_overwrite_in_a_launched_run_clears_on_rank_zero_only(tmp_path, monkeypatch):
    """Every rank runs the command: the launcher's RANK decides who deletes the old run."""
    config, out = config_file(tmp_path)
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    trained = []

    class Trainer:  # stands in for LuffyTrainer: records what the folder held at its start
        def __init__(self, config):
            trained.append(sorted(p.name for p in out.iterdir()))

        def train(self, resume):
            pass

        def close(self):
            pass

    monkeypatch.setattr("luffy_fast.trainer.LuffyTrainer", Trainer)
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--config", config, "--overwrite"]) == 0
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--config", config, "--overwrite"]) == 0
    assert trained == [["checkpoints", "metrics.jsonl"], [".lock"]]  # rank 0 holds the folder


def test_user_errors_exit_2_without_a_traceback(tmp_path, capsys):
    config, _ = config_file(tmp_path)
    assert main(["train", "--config", config, "optim.lrr=1"]) == 2
    error = capsys.readouterr().err
    assert "configuration error: optim.lrr: unknown key" in error and "Traceback" not in error
    with pytest.raises(ConfigError, match="optim.lrr"):
        main(["train", "--config", config, "optim.lrr=1", "--debug"])


@pytest.mark.parametrize("raised", [ValueError("data.source line 3: not a JSON object"),
                                    FileNotFoundError("model.path: no such folder 'x'")])
def test_value_and_missing_file_errors_exit_2(tmp_path, capsys, monkeypatch, raised):
    config, _ = config_file(tmp_path)

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr("luffy_fast.trainer.LuffyTrainer.__init__", fail)
    assert main(["train", "--config", config]) == 2
    assert str(raised) in capsys.readouterr().err


def test_a_full_disk_exits_1_naming_the_file(tmp_path, capsys, monkeypatch):
    """Not the user's settings (exit 2): the run stopped for want of space, and --resume
    continues it once there is some."""
    from luffy_fast.run_files import DiskFullError

    config, out = config_file(tmp_path)

    def full(*args, **kwargs):
        raise DiskFullError(out / "metrics.jsonl", "metrics")

    monkeypatch.setattr("luffy_fast.trainer.LuffyTrainer.__init__", full)
    assert main(["train", "--config", config]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"luffy-fast: [Errno 28] no space left on device while writing metrics "
                            f"to '{out / 'metrics.jsonl'}' (") and "Traceback" not in error


def test_a_broken_latest_without_checkpoints_exits_2(tmp_path, capsys):
    config, out = config_file(tmp_path, "train.steps=1")
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-000004\n")
    assert main(["train", "--config", config, "--resume"]) == 2
    assert "points to 'step-000004'" in capsys.readouterr().err


def test_a_run_stopped_by_nonfinite_steps_exits_1_with_the_reason(tmp_path, capsys, monkeypatch):
    config, out = config_file(tmp_path, "train.steps=3", "train.max_nonfinite_steps=1")
    from luffy_fast import nonfinite

    monkeypatch.setattr(nonfinite, "poison_if_nonfinite", lambda loss, value: loss * float("nan"))
    with pytest.warns(RuntimeWarning):
        assert main(["train", "--config", config]) == 1
    error = capsys.readouterr().err
    assert "1 optimizer steps in a row had a non-finite loss" in error
    assert "Traceback" not in error


@pytest.mark.parametrize("signal_name, code, said", [
    ("SIGINT", 130, "luffy-fast: interrupted; "),
    ("SIGTERM", 143, "luffy-fast: terminated (SIGTERM); "),
])
def test_a_signal_mid_run_names_the_checkpoint_to_resume_from(tmp_path, capsys, monkeypatch,
                                                              signal_name, code, said):
    import os
    import signal

    from luffy_fast.trainer import LuffyTrainer

    config, out = config_file(tmp_path, "train.steps=3")
    real_step = LuffyTrainer.training_step

    def signalled_at_the_third(self, step):
        if step == 2:  # after step 2's checkpoint (save_every=1)
            os.kill(os.getpid(), getattr(signal, signal_name))
        return real_step(self, step)

    monkeypatch.setattr(LuffyTrainer, "training_step", signalled_at_the_third)
    # Python's own SIGINT handler and the default SIGTERM action, whatever this test process
    # inherited (a job started in the background ignores SIGINT)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    inherited_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert main(["train", "--config", config]) == code
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the CLI's handler is gone
    finally:
        signal.signal(signal.SIGINT, inherited)
        signal.signal(signal.SIGTERM, inherited_term)
    err = capsys.readouterr().err
    assert f"{said}`--resume` continues from {out / 'checkpoints' / 'step-000002'}" in err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    monkeypatch.undo()
    assert main(["train", "--config", config, "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_a_mini_batch_the_ranks_cannot_share_stops_before_anything_loads(tmp_path, capsys,
                                                                        monkeypatch):
    config, _ = config_file(tmp_path, "train.mini_batch_size=4")
    monkeypatch.setenv("WORLD_SIZE", "3")  # as a launcher of 3 ranks sets them
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr("luffy_fast.trainer.load_task", lambda config: pytest.fail("loaded"))
    assert main(["train", "--config", config]) == 2
    assert ("train.mini_batch_size: 4 prompts do not split evenly over 3 ranks"
            in capsys.readouterr().err)


def test_the_interrupt_message_names_what_resume_will_load(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    assert cli.resume_hint("train", str(tmp_path)) == ("; no checkpoint to resume from yet: start "
                                                       "over with `--overwrite`")
    (checkpoints / "step-000001").mkdir(parents=True)
    (checkpoints / "step-000001" / "trainer_state.json").write_text('{"step": 1}')
    (checkpoints / "latest").write_text("step-000009")  # a broken pointer: resume falls back
    assert cli.resume_hint("train", str(tmp_path)) == (
        f"; `--resume` continues from {checkpoints / 'step-000001'}")
    assert cli.resume_hint("eval", None) == (  # an eval without --output keeps nothing
        "; nothing was kept: with `--output DIR` an eval saves its samples as they are scored and "
        "`--resume` continues it")


@pytest.mark.parametrize("command, terminal, shown", [
    ("train", True, False), ("demo", False, False), ("eval", False, False), ("eval", True, True)])
def test_transformers_progress_bars_are_off_where_they_would_break_into_ours(command, terminal,
                                                                            shown):
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    try:
        cli.quiet_library_progress(command, terminal)
        assert transformers_logging.is_progress_bar_enabled() == shown
    finally:
        transformers_logging.enable_progress_bar()


def test_under_a_launcher_errors_are_reported_once_per_node(tmp_path, capsys, monkeypatch):
    """The ranks of a node read the same settings, files and packages: an error in them is
    printed by the node's first rank alone (naming its rank, if not 0), so a node that lacks a
    file still says so; an interrupt by rank 0 alone (the launcher signals every rank); any
    other error by every rank that has it, naming the rank."""
    config, out = config_file(tmp_path, "train.steps=1")
    for rank, local_rank, shown in (("1", "1", ""), ("0", "0", "luffy-fast: "),
                                    ("8", "0", "luffy-fast [rank 8]: ")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(["train", "--config", config, "data.source=/node-local/d.parquet"]) == 2
        error = capsys.readouterr().err
        assert error == "" if not shown else error.startswith(
            f"{shown}configuration error: data.source: ")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "check_run_dir", interrupted)
    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert main(["train", "--config", config]) == 130
        assert ("luffy-fast: interrupted; no checkpoint" in capsys.readouterr().err) == shown

    def missing(*args, **kwargs):
        raise FileNotFoundError("/node-local/data.parquet")

    monkeypatch.setattr(cli, "check_run_dir", missing)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert main(["train", "--config", config]) == 2
    assert capsys.readouterr().err.startswith(
        "luffy-fast [rank 3]: error: /node-local/data.parquet")
    monkeypatch.setenv("RANK", "x")  # not a number: taken as not launched, the error still shown
    assert main(["train", "--config", config]) == 2
    assert capsys.readouterr().err.startswith("luffy-fast: error: /node-local/data.parquet")
