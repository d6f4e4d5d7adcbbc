"""Weights & Biases logging (output.wandb_project), against a stand-in `wandb` module that
records what it is sent and, like W&B's servers, remembers each run id's last step (online; an
offline run knows no earlier one): every step reaches W&B once with the numbers of
metrics.jsonl, across a crash and a resume."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from helpers import tiny_config, train_until_killed
from luffy_fast.errors import ConfigError
from luffy_fast.metrics import read_metrics
from luffy_fast.trainer import LuffyTrainer


class FakeRun:
    def __init__(self, server: dict, offline: bool, **settings) -> None:
        self.server, self.settings = server, settings
        # online, a known id resumes after its last step; offline, W&B knows no earlier run
        self.step = 0 if offline else server.get(settings["id"], 0)
        self.sent: list[tuple[int, dict]] = []
        self.exit_code = None

    def log(self, data: dict, step: int) -> None:
        assert step >= self.step, "W&B drops steps below its current one"
        self.sent.append((step, dict(data)))
        self.step = self.server[self.settings["id"]] = step + 1

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code


@pytest.fixture(params=["online", "offline"])
def wandb(monkeypatch, request):
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.server, module.runs, module.failure = {}, [], None

    def init(**settings):
        if module.failure:
            raise module.failure
        module.runs.append(FakeRun(module.server, request.param == "offline", **settings))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def numbers(row: dict) -> dict:
    """A row's numbers but its times (a redone step takes its own time)."""
    timing = ("step_seconds", "tokens_per_second", "peak_memory_mb")
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and k not in timing and not k.startswith("time/")}


def test_every_step_reaches_wandb_once_across_a_crash_and_a_resume(tmp_path, wandb, monkeypatch):
    settings = ["train.steps=4", "output.wandb_project=luffy-tests"]
    config = tiny_config(tmp_path / "run-a", *settings)
    crashed = LuffyTrainer(config)
    train_until_killed(crashed, 3, monkeypatch)  # step 3 logged, past the step-2 checkpoint
    crashed.close()
    [first] = wandb.runs
    run_id = (tmp_path / "run-a" / "wandb_id").read_text().strip()
    assert first.settings == {"project": "luffy-tests", "id": run_id, "resume": "allow",
                              "name": "run-a", "config": config.to_dict(),
                              "dir": str(tmp_path / "run-a")}
    assert [step for step, _ in first.sent] == [0, 1, 2, 3] and first.exit_code == 1

    resumed = LuffyTrainer(tiny_config(tmp_path / "run-a", *settings))
    resumed.train(resume=True)
    resumed.close()
    second = wandb.runs[1]
    assert second.settings["id"] == run_id and second.exit_code == 0
    # step 3 is redone from the step-2 checkpoint, with the same numbers: W&B has it already
    assert [step for step, _ in second.sent] == [4]
    sent = dict(first.sent + second.sent)
    logged = read_metrics(tmp_path / "run-a" / "metrics.jsonl")
    assert [row["step"] for row in logged] == sorted(sent) == [0, 1, 2, 3, 4]
    for row in logged:
        assert numbers(sent[row["step"]]) == pytest.approx(numbers(row), rel=1e-5, abs=1e-7)


def test_a_fresh_run_in_the_folder_is_a_new_wandb_run(tmp_path, wandb):
    settings = ["train.steps=1", "eval.every=0", "output.wandb_project=p",
                "output.wandb_name=mine"]
    for _ in range(2):
        trainer = LuffyTrainer(tiny_config(tmp_path / "run", *settings))
        trainer.train()
        trainer.close()
    first, second = wandb.runs
    assert first.settings["name"] == second.settings["name"] == "mine"
    assert first.settings["id"] != second.settings["id"]
    assert (tmp_path / "run" / "wandb_id").read_text().strip() == second.settings["id"]


def test_a_wandb_run_that_cannot_start_is_one_error_naming_the_key(tmp_path, wandb):
    wandb.failure = RuntimeError("api_key not configured (no-tty)")
    trainer = LuffyTrainer(tiny_config(tmp_path / "run", "train.steps=1", "eval.every=0",
                                       "output.wandb_project=p", "output.tensorboard=true"))
    with pytest.raises(ConfigError, match=r"output.wandb_project: W&B could not start the run "
                                          r"\(RuntimeError: api_key not configured \(no-tty\)\); "
                                          r"log in \(WANDB_API_KEY\), or set WANDB_MODE=offline"):
        trainer.train()
    trainer.close()


def test_wandb_settings_are_checked_before_anything_loads(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"output.wandb_project: logging to Weights & Biases "
                                          r"needs the wandb package, which is not installed"):
        tiny_config(tmp_path, "output.wandb_project=p")
    with pytest.raises(ConfigError, match="output.wandb_project: must not be empty"):
        tiny_config(tmp_path, "output.wandb_project= ")
