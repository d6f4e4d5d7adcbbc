"""RewardPool: rewards in order from worker processes; a hang, a crash or an exception scores 0,
is counted, and never stalls the batch (luffy_fast/reward_pool.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from luffy_fast.reward_pool import (
    MAX_TIMEOUT,
    RewardPool,
    ScoreReport,
    default_workers,
    task_reward_pool,
)


def length_parity(response: str, sample) -> float:
    """Hand-checkable: 1 for an even-length response, 0 for odd, plus the sample's bonus."""
    if response == "hang":
        time.sleep(3600)
    if response == "crash":
        os._exit(3)
    if response == "raise":
        raise RuntimeError("the verifier choked")
    return float(len(response) % 2 == 0) + sample


@pytest.fixture(scope="module")
def pool():
    with RewardPool(length_parity, workers=2, timeout=2.0) as pool:
        yield pool


def test_rewards_come_back_in_order(pool):
    items = [("ab", 0.0), ("abc", 0.0), ("", 0.5), ("abcd", 10.0), ("x", 0.25)]
    report = pool.score(items)
    # even, odd, even + 0.5, even + 10, odd + 0.25
    assert report.rewards == [1.0, 0.0, 1.5, 11.0, 0.25]
    assert (report.timeouts, report.errors) == (0, 0)


def test_a_hang_a_crash_and_an_exception_score_zero_and_are_counted(pool):
    items = [("ab", 0.0), ("hang", 0.0), ("abc", 0.0), ("crash", 0.0), ("raise", 0.0),
             ("abcd", 0.0), ("hang", 0.0), ("xy", 0.0)]
    report = pool.submit(items).result()
    assert report.rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert report.timeouts == 2
    assert report.errors == 2  # the crash and the exception
    assert any("the verifier choked" in m for m in report.messages)
    assert any("died" in m for m in report.messages)
    # the pool is whole again afterwards
    assert pool.score([("ab", 0.0), ("abc", 1.0)]).rewards == [1.0, 1.0]


def the_sample(response: str, sample) -> object:
    """The sample itself as the reward: a number, a number's text, or something else."""
    return sample


def test_one_worker_goes_on_after_a_crash_a_hang_and_a_dead_process():
    """With a single worker nothing else would pick up the items after the one it lost: its
    successor must. The batch's own timeout (2 s) overrides the pool's (60 s)."""
    with RewardPool(length_parity, workers=1, timeout=60.0) as pool:
        items = [("crash", 0.0), ("ab", 0.0), ("hang", 0.0), ("abcd", 0.5), ("abc", 0.0)]
        report = pool.score(items, timeout=2.0)
        # crash: 0, "ab": even, hang: 0, "abcd": even + 0.5, "abc": odd
        assert report.rewards == [0.0, 1.0, 0.0, 1.5, 0.0]
        assert (report.timeouts, report.errors) == (1, 1)
        assert report.messages == ["item 0: the scoring process died (exit code 3)",
                                   "item 2: no score within 2 s (scored 0)"]
        assert report.seconds >= 2.0  # it waited out the hang's timeout
        # a worker that died between batches is replaced before the next one
        [worker] = pool._workers
        worker.process.kill()
        worker.process.join()
        assert pool.score([("ab", 0.0), ("x", 2.0)]).rewards == [1.0, 2.0]
        # the first five problems are kept, one line each; every one is counted
        report = pool.score([("raise", 0.0)] * 7)
        assert report.rewards == [0.0] * 7 and report.errors == 7
        assert report.messages == [f"item {i}: RuntimeError: the verifier choked"
                                   for i in range(5)]


def test_a_reward_that_is_not_a_number_is_an_error():
    with RewardPool(the_sample, workers=1, timeout=60.0) as pool:
        report = pool.score([("", "2.5"), ("", None), ("", 1), ("", "many")])
    # float("2.5") = 2.5; float(None) and float("many") raise: 0, counted
    assert report.rewards == [2.5, 0.0, 1.0, 0.0] and report.errors == 2
    assert report.messages[0].startswith("item 1: TypeError: float() argument")
    assert report.messages[1] == "item 3: ValueError: could not convert string to float: 'many'"


def test_an_in_process_reward_that_raises_is_raised_by_result():
    pending = RewardPool(length_parity, workers=0).submit([("ab", 0.0), ("raise", 0.0)])
    with pytest.raises(RuntimeError, match="the verifier choked"):
        pending.result()


def test_the_report_metrics_name_each_count():
    report = ScoreReport(rewards=[1.0], timeouts=2, errors=1, seconds=0.5)
    assert report.metrics("eval") == {"eval/timeouts": 2.0, "eval/errors": 1.0,
                                      "time/eval_pool": 0.5}


def test_default_workers_share_the_cores_among_the_nodes_ranks(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers() == 4  # 8 cores // 2 ranks
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_workers() == 1  # at least one


def test_a_tasks_pool_takes_its_hint_unless_workers_are_given():
    class Hinted:
        reward_workers = 0

        def reward_function(self):
            return length_parity

    pool = task_reward_pool(Hinted(), timeout=3.0)
    assert (pool.num_workers, pool.timeout) == (0, 3.0)
    assert pool.score([("ab", 0.5)]).rewards == [1.5]  # the task's function, in-process
    assert task_reward_pool(Hinted(), workers=3).num_workers == 3


def test_a_ctrl_c_to_the_process_group_leaves_the_workers_to_the_pool(pool, capfd):
    """Ctrl-C signals every process of the terminal's group: a worker ignores it (no
    KeyboardInterrupt traceback of its own; the trainer closes the pool) and keeps scoring."""
    import signal

    assert pool.score([("ab", 0.0)]).rewards == [1.0]  # the workers are up
    for worker in pool._workers:
        os.kill(worker.process.pid, signal.SIGINT)
    report = pool.score([("ab", 0.0), ("abc", 0.0), ("abcd", 2.0)])
    assert report.rewards == [1.0, 0.0, 3.0] and (report.timeouts, report.errors) == (0, 0)
    assert all(worker.process.is_alive() for worker in pool._workers)
    assert "KeyboardInterrupt" not in capfd.readouterr().err


def default_ctrl_c_in_a_program(response: str, sample) -> float:
    """1.0 when a program that a reward runs stops on SIGINT as usual (Python installs its
    KeyboardInterrupt handler only where SIGINT is not ignored at start)."""
    import subprocess
    import sys

    check = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    output = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    return float(output.stdout.strip() == "True")


def test_programs_a_reward_runs_still_stop_on_ctrl_c():
    """The workers' own indifference to SIGINT is not passed on to the programs they start."""
    with RewardPool(default_ctrl_c_in_a_program, workers=1, timeout=60.0) as pool:
        assert pool.score([("ab", 0.0)]).rewards == [1.0]


def test_submit_then_result_in_workers():
    with RewardPool(length_parity, workers=1, timeout=30.0) as pool:
        pending = pool.submit([("ab", 0.0)] * 3)
        assert pending.result().rewards == [1.0, 1.0, 1.0]


def test_scoring_overlaps_with_the_caller():
    # The reward waits for the caller to go on after submit(): a submit that blocked until
    # scoring ended would leave the event unset, and every reward would be 0 after the wait.
    released = threading.Event()
    pool = RewardPool(lambda response, sample: float(released.wait(timeout=30.0)), workers=0)
    pending = pool.submit([("ab", 0.0)])
    released.set()
    assert pending.result().rewards == [1.0]


def test_in_process_scoring_without_workers():
    report = RewardPool(length_parity, workers=0).score([("ab", 0.0), ("abc", 2.0)])
    assert report.rewards == [1.0, 2.0]


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="workers"):
        RewardPool(length_parity, workers=-1)
    with pytest.raises(ValueError, match=r"`workers` must be None or an integer >= 0 \(got 1.5\)"):
        RewardPool(length_parity, workers=1.5)
    with pytest.raises(ValueError, match="timeout"):
        RewardPool(length_parity, timeout=0)
    # past poll()'s 2**31 - 1 ms the first scoring raised an OverflowError
    with pytest.raises(ValueError, match=r"`timeout` must be positive seconds, at most 86400 "
                                         r"\(got 10000000.0\)"):
        RewardPool(length_parity, timeout=1e7)
    assert RewardPool(length_parity, timeout=MAX_TIMEOUT).timeout == 86400.0  # the bound itself


def test_pathological_math_hits_the_timeout_and_scores_zero():
    """math-verify needs ~5 s on a power tower (its own internal timeout); the pool's 2.5 s
    timeout scores it 0 and the correct answer beside it still scores 1 (in ~0.05 s when warm)."""
    pytest.importorskip("math_verify")
    from luffy_fast.data import Sample
    from luffy_fast.rewards import MathVerifyReward

    sample = Sample(prompt_ids=[1], ground_truth="3")
    items = [("so </think> \\boxed{9^{9^{9^{9}}}}", sample), ("so </think> \\boxed{3}", sample)]
    with RewardPool(MathVerifyReward(), workers=2, timeout=2.5) as pool:
        # warm both workers (the first parse builds math-verify's grammar: slow on a busy
        # machine), under a timeout of its own
        assert pool.score([("</think> \\boxed{3}", sample)] * 2, timeout=300).rewards == [1.0, 1.0]
        report = pool.score(items)
    assert report.rewards == [0.0, 1.0]
    assert report.timeouts == 1


def test_the_trainer_scores_while_the_rollout_correction_runs(tmp_path):
    """The step submits its responses, runs the correction's log-prob pass, then waits."""
    from helpers import tiny_config
    from luffy_fast.trainer import LuffyTrainer

    trainer = LuffyTrainer(tiny_config(tmp_path, "train.steps=1", "eval.every=0",
                                       "output.save_every=0", "rollout.tis_cap=2.0"))
    events, submit, correction = [], trainer.rewards.submit, trainer.rollout_correction

    def recording_submit(items):
        events.append(("submit", len(items)))
        pending = submit(items)
        result = pending.result

        def recording_result():
            events.append(("result",))
            return result()

        pending.result = recording_result
        return pending

    def recording_correction(*args):
        events.append(("correction",))
        return correction(*args)

    trainer.rewards.submit, trainer.rollout_correction = recording_submit, recording_correction
    try:
        metrics = trainer.training_step(0)
    finally:
        trainer.close()
    assert events == [("submit", 16), ("correction",), ("result",)]  # 4 prompts x (3 + 1)
    assert metrics["reward/timeouts"] == 0.0 and metrics["reward/errors"] == 0.0
