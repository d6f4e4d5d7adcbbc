"""Rewards scored in worker processes, each item under a timeout.

A verifier can take seconds on a pathological answer (math-verify on a huge expression) and a
user's reward function can hang or crash. Neither may stall or kill a training run, so every
item is scored in a worker process: an item past its timeout, or whose worker dies, scores 0
and is counted; the worker is replaced and the other items go on. `submit` returns at once, so
scoring overlaps with whatever the caller does next.

    with RewardPool(MathVerifyReward(), workers=8, timeout=10.0) as pool:
        pending = pool.submit([(text, sample), ...])
        ...                          # other work while the workers score
        report = pending.result()    # rewards in order, plus timeout and error counts
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

log = logging.getLogger(__name__)

# Seconds per item at most: the workers are waited on with poll(), whose timeout ends at
# 2**31 - 1 ms (past it, an OverflowError at the first scoring).
MAX_TIMEOUT = 86400.0
# Loggers of verifiers that print the whole expression on every timeout or parse failure.
QUIET_LOGGERS = ("math_verify", "latex2sympy2_extended")


@dataclass
class ScoreReport:
    """Rewards of one batch, in the order submitted, and what went wrong while scoring it."""

    rewards: list[float]
    timeouts: int = 0  # items that ran past the timeout (scored 0)
    errors: int = 0  # items whose function raised, returned a non-number or killed its worker
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)  # the first few problems, one line each

    def metrics(self, prefix: str = "reward") -> dict:
        """<prefix>/timeouts and /errors; the scoring's wall-clock seconds as time/<prefix>_pool
        (in the timings' namespace, docs/design.md §Rewards)."""
        return {f"{prefix}/timeouts": float(self.timeouts), f"{prefix}/errors": float(self.errors),
                f"time/{prefix}_pool": self.seconds}


def default_workers() -> int:
    """One worker per CPU core this process may run on, shared by the node's ranks
    (LOCAL_WORLD_SIZE, set by torchrun and the deepspeed launcher)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def task_reward_pool(task: Any, workers: Optional[int] = None, timeout: float = 10.0
                     ) -> RewardPool:
    """The pool for a task (luffy_fast.tasks.Task): `workers` when given, else the task's
    `reward_workers` hint (None: one per core), running its `reward_function()`."""
    return RewardPool(task.reward_function(), timeout=timeout,
                      workers=task.reward_workers if workers is None else workers)


def _leave_to_the_pool(signum: int, frame: Any) -> None:
    """A worker's SIGINT handler: nothing. Unlike SIG_IGN it is not inherited through exec, so
    a program a reward function runs still stops on Ctrl-C."""


def _worker(connection: Connection, reward_fn: Callable) -> None:
    # Ctrl-C reaches the terminal's whole process group: the trainer stops the workers itself,
    # so each need not print its own KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, _leave_to_the_pool)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    connection.send("ready")  # imports done: item timeouts count from here
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message is None:
            return
        index, response, sample = message
        try:
            value = float(reward_fn(response, sample))
            reply = (index, value, None)
        except Exception as error:  # a user's function: report it, keep the worker
            reply = (index, 0.0, f"{type(error).__name__}: {error}")
        connection.send(reply)


# A new worker imports the reward function's modules (a verifier, torch) before its first item.
START_TIMEOUT = 300.0


class _Worker:
    def __init__(self, context, reward_fn: Callable) -> None:
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, reward_fn), daemon=True)
        self.process.start()
        child.close()
        self.item: Optional[int] = None  # index of the item it is scoring
        self.deadline = 0.0
        self._ready = False

    def wait_ready(self) -> None:
        """Block until the worker has imported what it needs (not counted in item timeouts)."""
        if self._ready:
            return
        try:
            ready = self.connection.poll(START_TIMEOUT) and self.connection.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(f"RewardPool: a scoring process did not start within "
                               f"{START_TIMEOUT:g} s (exit code {self.process.exitcode}); "
                               "is the reward function importable and picklable?")
        self._ready = True

    def give(self, index: int, response: str, sample: Any, timeout: float) -> None:
        self.wait_ready()
        self.item, self.deadline = index, time.monotonic() + timeout
        self.connection.send((index, response, sample))

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.connection.close()


class PendingScores:
    """Scores being computed in the background; `result()` waits for them."""

    def __init__(self, thread: threading.Thread, box: dict) -> None:
        self._thread, self._box = thread, box

    def result(self) -> ScoreReport:
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["report"]


class RewardPool:
    """`workers` processes scoring `reward_fn(response, sample)`, each item within `timeout` s.

    The function and the samples must pickle (workers are spawned: no fork of a process that
    holds CUDA or a process group). `workers=0` scores in a thread of the calling process, with
    no timeout: for cheap, trusted functions that run outside a main thread (a function with
    `main_thread_only` set is refused).
    """

    def __init__(self, reward_fn: Callable[[str, Any], float], workers: Optional[int] = None,
                 timeout: float = 10.0, start_method: str = "spawn") -> None:
        if workers is not None and (not isinstance(workers, int) or workers < 0):
            raise ValueError(f"RewardPool: `workers` must be None or an integer >= 0 (got {workers!r})")
        if not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"RewardPool: `timeout` must be positive seconds, at most "
                             f"{MAX_TIMEOUT:g} (got {timeout!r})")
        reason = getattr(reward_fn, "main_thread_only", None)
        if workers == 0 and reason:
            raise ValueError(f"RewardPool: `workers` = 0 scores in a thread of this process, "
                             f"which {type(reward_fn).__name__} cannot: {reason}")
        self.reward_fn, self.timeout = reward_fn, float(timeout)
        self.num_workers = default_workers() if workers is None else workers
        self._context = multiprocessing.get_context(start_method)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # one batch at a time

    def _ensure_workers(self) -> None:
        self._workers = [w for w in self._workers if w.process.is_alive()]
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._context, self.reward_fn))

    def submit(self, items: Sequence[tuple[str, Any]],
               timeout: Optional[float] = None) -> PendingScores:
        """Start scoring `items` ((response text, sample) pairs); returns at once. `timeout`
        (seconds per item) overrides the pool's for this batch."""
        items = list(items)
        box: dict = {}

        def run() -> None:
            try:
                box["report"] = self._score(items, timeout or self.timeout)
            except BaseException as error:  # surfaced by result()
                box["error"] = error

        thread = threading.Thread(target=run, name="reward-pool", daemon=True)
        thread.start()
        return PendingScores(thread, box)

    def score(self, items: Sequence[tuple[str, Any]],
              timeout: Optional[float] = None) -> ScoreReport:
        return self.submit(items, timeout).result()

    def _score(self, items: list, timeout: float) -> ScoreReport:
        start = time.monotonic()
        report = ScoreReport(rewards=[0.0] * len(items))
        with self._lock:
            if self.num_workers == 0:
                for index, (response, sample) in enumerate(items):
                    report.rewards[index] = float(self.reward_fn(response, sample))
            elif items:
                self._score_in_workers(items, report, timeout)
        report.seconds = time.monotonic() - start
        return report

    def _note(self, report: ScoreReport, text: str) -> None:
        if len(report.messages) < 5:
            report.messages.append(text)
            log.warning("reward: %s", text)

    def _score_in_workers(self, items: list, report: ScoreReport, timeout: float) -> None:
        self._ensure_workers()
        waiting = list(range(len(items)))[::-1]  # popped from the end: in order
        busy: dict[Connection, _Worker] = {}

        def feed(worker: _Worker) -> None:
            if waiting:
                index = waiting.pop()
                response, sample = items[index]
                worker.give(index, response, sample, timeout)
                busy[worker.connection] = worker

        for worker in self._workers:
            feed(worker)
        while busy:
            now = time.monotonic()
            next_deadline = min(w.deadline for w in busy.values())
            ready = wait(list(busy), timeout=max(0.0, next_deadline - now))
            for connection in ready:
                worker = busy.pop(connection)
                try:
                    index, value, error = connection.recv()
                except (EOFError, OSError):  # the worker died mid-item (a crash, os._exit)
                    fresh = self._replace(worker)  # reaped first: its exit code is known
                    report.errors += 1
                    self._note(report, f"item {worker.item}: the scoring process died "
                                       f"(exit code {worker.process.exitcode})")
                    feed(fresh)
                    continue
                if error is not None:
                    report.errors += 1
                    self._note(report, f"item {index}: {error}")
                else:
                    report.rewards[index] = value
                feed(worker)
            now = time.monotonic()
            for connection, worker in list(busy.items()):
                if worker.deadline <= now and connection not in ready:
                    busy.pop(connection)
                    report.timeouts += 1
                    self._note(report, f"item {worker.item}: no score within {timeout:g} s "
                                       "(scored 0)")
                    feed(self._replace(worker))

    def _replace(self, worker: _Worker) -> _Worker:
        """Kill a worker that hung or died, and start its successor."""
        worker.kill()
        fresh = _Worker(self._context, self.reward_fn)
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.connection.send(None)
            except (BrokenPipeError, OSError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.kill()
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
