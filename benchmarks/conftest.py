"""pytest configuration of the benchmark suite: `pytest benchmarks/ --benchmark`.

Without --benchmark every benchmark is skipped (they take minutes). The plan (shapes,
implementations, rounds) depends on the device: CUDA when present, else the CPU; --bench-dry-run
runs the CUDA plan's code paths at toy sizes on any device. The run ends with the comparison table.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HOW_TO_RUN = "benchmarks run only on request: pytest benchmarks/ --benchmark (see BENCHMARKS.md)"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("luffy-fast benchmarks")
    group.addoption("--benchmark", action="store_true", default=False,
                    help="run the luffy-fast benchmarks in benchmarks/ (skipped otherwise)")
    group.addoption("--bench-dry-run", action="store_true", default=False,
                    help="the CUDA plan at toy sizes, one round: checks the code paths on any device")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    group.addoption("--bench-out", default=None,
                    help="results folder (default benchmarks/results; a temp folder for dry runs)")
    group.addoption("--bench-append", action="store_true", default=False,
                    help="add to the records of an earlier run in --bench-out (staged runs)")


def _enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("--benchmark", default=False))


def pytest_configure(config: pytest.Config) -> None:
    if not _enabled(config) or not config.getoption("--bench-dry-run"):
        return
    import torch

    if not torch.cuda.is_available():
        # The triton backend on the CPU needs the interpreter, chosen when kernels are defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _enabled(config):
        return
    skip = pytest.mark.skip(reason=HOW_TO_RUN)
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.machine()}"


def _software() -> str:
    import torch

    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("triton", "liger_kernel"):
        try:
            from importlib.metadata import version

            parts.append(f"{name.replace('_', '-')} {version(name.replace('_', '-'))}")
        except Exception:
            parts.append(f"{name} absent")
    return ", ".join(parts)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class BenchSession:
    """The run's plan, device, input cache and result recorder (one per pytest session)."""

    def __init__(self, config: pytest.Config):
        import torch

        from .cases import make_plan
        from .report import Recorder

        device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = device
        self.dry_run = bool(config.getoption("--bench-dry-run"))
        self.plan = make_plan(device, self.dry_run)
        out = config.getoption("--bench-out")
        if out is None:
            out = Path(tempfile.gettempdir()) / "luffy-bench-dry-run" if self.dry_run else HERE / "results"
        self.out_dir = Path(out)
        meta = {
            "tag": self.plan.tag,
            "device": device,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": _machine(device),
            "software": _software(),
            "command": "pytest " + " ".join(config.invocation_params.args),
            "git_commit": _git_commit(),
            "rounds": self.plan.rounds,
            "warmup_rounds": self.plan.warmup_rounds,
        }
        self.recorder = Recorder(self.out_dir, self.plan.tag, meta,
                                 append=bool(config.getoption("--bench-append")))
        self._inputs_key, self._inputs = None, None
        self.not_timed: dict = {}  # (case, impl) -> why a later round need not try again

    def inputs(self, case):
        """Inputs for `case`, kept while consecutive benchmarks use the same case."""
        from .cases import make_inputs

        if self._inputs_key != case:
            self._inputs = None  # free the previous case's tensors first
            self.free()
            self._inputs, self._inputs_key = make_inputs(case, self.device), case
        return self._inputs

    def free(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def record(self, kind: str, case, impl: str, **fields) -> None:
        self.recorder.add(kind=kind, impl=impl, case_id=case.id, case=case.to_dict(), **fields)


_SESSION: BenchSession | None = None


@pytest.fixture(scope="session")
def bench(request: pytest.FixtureRequest) -> BenchSession:
    global _SESSION
    if _SESSION is None:
        _SESSION = BenchSession(request.config)
    return _SESSION


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize over the device's plan (known at collection time)."""
    names = set(metafunc.fixturenames)
    if not names & {"speed_case", "memory_impl"}:
        return
    import torch

    from .cases import base_impl, make_plan, runs_on

    config = metafunc.config
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = make_plan(device, bool(config.getoption("--bench-dry-run")))
    if "speed_case" in names:
        # Rounds interleave the implementations (naive, liger, torch, naive, ...): on a shared
        # machine a change in load then hits all of them alike instead of one of them.
        params = [(case, k, impl) for case in plan.main_cases for k in range(plan.rounds)
                  for impl in plan.impls if runs_on(impl, case)]
        metafunc.parametrize(("speed_case", "speed_round", "speed_impl"), params,
                             ids=[f"{case.id}-round{k}-{impl}" for case, k, impl in params])
    if "memory_impl" in names:
        # Ours first, Liger (slowest, compiled on CUDA) last: a run cut short keeps what matters.
        order = ["triton", "triton_256mb", "torch", "naive", "liger"]
        # LUFFY_BENCH_EXTRA_IMPLS: those of the above with switches, after ours
        switched = [impl for impl in plan.impls if impl != base_impl(impl) and base_impl(impl) in order]
        order[2:2] = switched
        metafunc.parametrize("memory_impl", [impl for impl in order if impl in plan.impls])


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _enabled(config):
        terminalreporter.write_line(f"luffy-fast: {HOW_TO_RUN}", yellow=True)
        return
    if _SESSION is None:
        return
    from .report import write

    text = write(_SESSION.out_dir, _SESSION.plan.tag)["markdown"]
    terminalreporter.section("luffy-fast benchmark results")
    terminalreporter.write_line(f"(written to {_SESSION.out_dir})")
    for line in text.splitlines():
        terminalreporter.write_line(line)
